"""Reference graph vs fused graph (or engine), output by output, against tolerances (stage 4a).

    python -m export.validate reference.onnx fused.onnx [--shapes 1x16,2x64] [--backend ort-cpu]
    python -m export.validate reference.onnx fused.plan                 # ORT reference vs TensorRT engine
    python -m export.validate reference.onnx fused-tensorrt.onnx --backend onnx-reference
    python -m export.validate ... --save-outputs DIR                   # Polygraphy-readable files
    python -m export.validate ... --inputs in.npz                      # given inputs (or DIR/inputs.json)

Each pair runs both models on the same random inputs (integer inputs such as token ids stay
within the table they index, see `backends.index_bounds`) and reports, per output, max/mean/median
absolute and relative error, quantiles of the share of the tolerance used and the lowest quantile
that exceeds it, and whether every element is within the dtype's graph tolerance
(normops.tolerances.GRAPH). NaN and Inf must appear in the same places in both.

Two ONNX files are also compared op by op: at the first shape each fused op runs alone on the
reference's own values (export.norm_check) and must be within one op's tolerance (normops.OP),
which catches an op computing another norm (an epsilon 10x off) that the graph's tolerance lets
through on unit-scale inputs.

A failing pair is looked into: each fused op on the reference's own values (export.norm_check),
then the choices made by value (export.selection_check); a fp16/bf16 pair whose fused ops are all
right is judged again against the reference run in float32 (export.precision_check), since the
half reference's own rounding is no truth to meet.

`--save-outputs DIR` writes `inputs.json` (Polygraphy's `--load-inputs` format) and
`<side>-outputs.json` (Polygraphy's RunResults, `--load-outputs`), so a run can be checked again
with Polygraphy itself, e.g.
`polygraphy run fused.onnx --onnxrt --load-inputs DIR/inputs.json --load-outputs DIR/reference-outputs.json`.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto

from normops import EXACT, GRAPH, OP, Tolerance, error_stats, numpy_dtype, tolerance_for, within

from .backends import index_bounds, leading_dims, make_runner, random_arrays
from .decode import mask_over_the_cache
from .dims import hint_on_failure
from .errors import NormfuseError, UsageError, first_line
from .files import require_file
from .precision_check import Float32Reference, check_against_float32


@dataclass
class Side:
    model: Path
    backend: str
    label: str  # "reference" or "fused"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'1x16,2x64' -> [(1, 16), (2, 64)]"""
    shapes = []
    for item in text.split(","):
        try:
            batch, seq = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise UsageError(f"bad shape {item!r}: expected BATCHxSEQ, e.g. 2x64") from None
        if batch < 1 or seq < 1:
            raise UsageError(f"bad shape {item!r}: batch and sequence must be positive")
        shapes.append((batch, seq))
    return shapes


# a pair of these that fails, though each fused op is right, is judged again against the reference in float32
HALF_DTYPES = ("float16", "bfloat16")
FLOAT32_REFERENCE = "reference in float32@ort-cpu"

QUANTILES = (0.5, 0.9, 0.99, 0.999, 1.0)


def output_stats(actual, expected, tol: Tolerance) -> dict:
    """normops.error_stats plus NaN/Inf counts, quantiles of the share of the tolerance used
    (|a - e| / (atol + rtol |e|): 1.0 is at the limit) and the lowest quantile above 1."""
    if np.shape(actual) != np.shape(expected):  # compare() names the output; a caller of its own gets this
        raise NormfuseError(f"output shapes differ: {list(np.shape(actual))} vs {list(np.shape(expected))}")
    tol = tolerance_for(expected, tol)  # integers and booleans: exactly
    stats = error_stats(actual, expected, tol)
    a = np.asarray(actual, dtype=np.float64).ravel()
    e = np.asarray(expected, dtype=np.float64).ravel()
    stats["nan"] = int(np.isnan(a).sum())
    stats["inf"] = int(np.isinf(a).sum())
    stats["reference_nonfinite"] = int((~np.isfinite(e)).sum())
    finite = np.isfinite(a) & np.isfinite(e)
    error, allowed = np.abs(a[finite] - e[finite]), tol.atol + tol.rtol * np.abs(e[finite])
    if tol == EXACT:  # integers: measured in half steps, so any difference uses 2 or more (and fails)
        allowed = np.full_like(error, 0.5)
    used = error / allowed
    stats["tolerance_used"] = {_q_name(q): float(np.quantile(used, q)) if used.size else 0.0 for q in QUANTILES}
    failed = [q for q in QUANTILES if stats["tolerance_used"][_q_name(q)] > 1.0]
    stats["nonfinite_mismatch"] = int((~within(a, e, tol) & ~finite).sum())  # NaN vs number, +inf vs -inf
    if stats["nonfinite_mismatch"]:
        stats["failed_quantile"] = "nan/inf"
    else:
        stats["failed_quantile"] = _q_name(failed[0]) if failed else None
    stats["shape"] = list(np.shape(actual))
    # a reference whose every value lies within atol of 0 (a random model whose activations die
    # out: SAM's neck at 1e-23) is matched by any output near 0: such a pass says little
    stats["reference_within_atol"] = bool(tol != EXACT and finite.any() and np.all(np.abs(e[finite]) <= tol.atol))
    return stats


def result_note(stats: dict) -> str:
    """What the figures alone do not say: values NaN or Inf on one side only, nothing finite to
    compare (both sides NaN or Inf alike), a reference all within atol of 0, or "" where none holds."""
    if stats.get("nonfinite_mismatch"):
        return f"{stats['nonfinite_mismatch']} value(s) NaN or Inf on one side only"
    if stats.get("finite_compared") == 0 and "shape" in stats and 0 not in stats["shape"]:  # a scalar too
        return "no finite value to compare: NaN or Inf alike on both sides"
    if stats.get("reference_within_atol"):
        return (f"every reference value is within atol ({stats['atol']:.3g}) of 0: this shows only that the "
                "candidate's are too")
    return ""


def fused_op_failed(pair: dict) -> bool:
    """A pair that fails only because a fused op alone is off (every output within tolerance): the
    tables give it a row of its own, since no output row fails."""
    check = pair.get("norm_check")
    return bool(not pair.get("passed", True) and check and not check["passed"]
                and all(s["passed"] for s in pair["outputs"].values()))


def result_cell(stats: dict) -> str:
    """The result column of the validation tables: pass or FAIL, with `result_note`."""
    note = result_note(stats)
    return ("pass" if stats["passed"] else "FAIL") + (f" ({note})" if note else "")


def _q_name(q: float) -> str:
    return "max" if q == 1.0 else f"p{q * 100:g}"


CONDITION_PASSES = ("Identity", "Squeeze", "Unsqueeze", "Reshape", "Flatten", "Not")


def branch_switches(graph) -> list[str]:
    """Boolean one-element inputs that an If reads as its condition, directly or reshaped or
    negated (Optimum's merged decoders choose between the first step and the steps with a cache
    by `use_cache_branch`): validation runs each shape with them all true and again all false, so
    that both branches are compared. `graph`: the model's GraphProto (`onnx_io.graph_skeleton`)."""
    from .rewrite.scopes import walk_nodes

    switches = {}
    for value in graph.input:
        tensor = value.type.tensor_type
        if tensor.elem_type == TensorProto.BOOL and tensor.HasField("shape") and all(
                d.HasField("dim_value") and d.dim_value == 1 for d in tensor.shape.dim):
            switches[value.name] = False
    nodes = list(walk_nodes(graph.node))
    producers = {name: node for node in nodes for name in node.output}
    for node in nodes:
        if node.op_type != "If" or not node.input:
            continue
        condition = node.input[0]
        while condition in producers and producers[condition].op_type in CONDITION_PASSES and producers[condition].input:
            condition = producers[condition].input[0]  # the same one value, reshaped or negated
        if condition in switches:
            switches[condition] = True
    return [name for name, read_by_if in switches.items() if read_by_if]


QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def candidate_optimization(graph) -> str:
    """ONNX Runtime's optimisation level for the candidate side of a reference whose GraphProto is
    `graph` (None: not an ONNX file): all, as deployed, except in a model quantised with Q/DQ
    pairs, where its extended optimisations run those pairs as int8 kernels that round differently
    from the graph as written (0.37 max abs on a tiny QDQ stack, with no norm fused at all): there
    basic, so that what differs from the reference is the rewrite."""
    from .rewrite.scopes import walk_nodes

    quantised = graph is not None and any(node.op_type in QDQ_OPS for node in walk_nodes(graph.node))
    return "basic" if quantised else "all"


def shape_label(pair: dict) -> str:
    """'1x16', or '1x16 use_cache_branch=false' for a pair run with its branch switches set."""
    switches = "".join(f" {name}={str(value).lower()}" for name, value in pair.get("switches", {}).items())
    return f"{pair['shape'][0]}x{pair['shape'][1]}{switches}"


RANDOM_OPS = ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial")


def random_node(graph) -> str | None:
    """The first node that makes the outputs of the model whose GraphProto is `graph` change from
    run to run, described; None when there is none. Torch writes every Dropout of a model exported
    in training mode with a constant training_mode of True."""
    import onnx
    from onnx import numpy_helper

    from .rewrite.scopes import walk_nodes

    nodes = list(walk_nodes(graph.node))  # control-flow bodies too
    constants = {t.name: t for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL}
    constants.update({n.output[0]: n.attribute[0].t for n in nodes
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    for node in nodes:
        if node.op_type in RANDOM_OPS:
            return f"{node.op_type} '{node.name}' draws random numbers"
        if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2] in constants:
            if bool(np.any(numpy_helper.to_array(constants[node.input[2]]))):
                return f"Dropout '{node.name}' runs in training mode (export the model after model.eval())"
    return None


def dropout_switches(graph) -> list[str]:
    """Graph inputs a Dropout reads as its training_mode: fed false (true makes every run differ)."""
    from .rewrite.scopes import walk_nodes

    inputs = {value.name for value in graph.input}
    return list(dict.fromkeys(node.input[2] for node in walk_nodes(graph.node)
                              if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2] in inputs))


# the float types from most to least precise: a pair is held to the tolerance of the least precise it involves
PRECISION_ORDER = ("float64", "float32", "float16", "bfloat16")
ENGINE_PRECISIONS = {"fp16": "float16", "bf16": "bfloat16"}  # a weakly typed engine's --precision


def least_precise(*dtypes: str | None) -> str:
    known = [d for d in dtypes if d in PRECISION_ORDER]
    return max(known, key=PRECISION_ORDER.index) if known else next(d for d in dtypes if d)


def engine_precision(path) -> str | None:
    """The float type a TensorRT engine built weakly typed with fp16 or bf16 allowed may compute in
    (its sidecar's precision), or None: an ONNX file, or an engine of the graph's own types."""
    if Path(path).suffix != ".plan":
        return None
    from .tensorrt_engine import read_sidecar

    precision = (read_sidecar(path) or {}).get("precision")
    return ENGINE_PRECISIONS.get(precision) if isinstance(precision, str) else None


def check_output_types(reference_outputs, candidate) -> None:
    """A NormfuseError where the candidate declares one of the reference's outputs with another
    element type: a fused graph must keep the interface (a KV cache's dtype, the logits')."""
    from .triton_repo import onnx_signature, plan_signature

    suffix = Path(candidate).suffix
    try:
        outputs = onnx_signature(candidate)[1] if suffix == ".onnx" else plan_signature(candidate)[1] \
            if suffix == ".plan" else []
    except NormfuseError:  # an engine without its sidecar: its runner says so
        return
    declared = {o.name: o.dtype for o in outputs}
    for output in reference_outputs:
        if output.name in declared and declared[output.name] != output.dtype:
            raise NormfuseError(f"{candidate}: output {output.name!r} is {declared[output.name]} where the "
                                f"reference's is {output.dtype}: the fused graph must keep its outputs' types")


def compare(reference: Side, candidate: Side, shapes: list[tuple[int, int]], dtype: str, seed: int = 0,
            progress=None, save_dir: str | Path | None = None, given: list[dict] | None = None,
            dims: dict[str, int] | None = None) -> list[dict]:
    """One pair record per shape: {reference, candidate, shape, passed, outputs: {name: stats}}.

    Both sides get the same inputs: random, from the reference graph's signature, seeded, with
    named dynamic dimensions sized by `dims` and `export.dims`' rules (a model with branch
    switches, see `branch_switches`, gets two pairs per shape, the switches true then false); or
    `given`, a list of feed dicts (one pair each; see `read_given_inputs`), checked against the
    signature first. With `save_dir`, inputs and both sides' outputs are written in Polygraphy's
    formats."""
    from .runtime import TensorSpec, check_feeds
    from .triton_repo import onnx_signature

    from .onnx_io import graph_skeleton

    inputs, output_specs = onnx_signature(reference.model)
    check_output_types(output_specs, candidate.model)
    graph = graph_skeleton(reference.model).graph if Path(reference.model).suffix == ".onnx" else None
    if graph is not None:
        random = random_node(graph)
        if random:
            raise NormfuseError(f"{reference.model}: its outputs change from run to run, so no comparison can pass: "
                                f"{random}")
    if given is not None:
        specs = [TensorSpec(i.name, i.dtype, tuple(i.shape), rank_known=i.rank_known) for i in inputs]
        for feeds in given:
            check_feeds(specs, feeds, f"{reference.model} (--inputs)")
        shapes = [leading_dims(feeds) for feeds in given]
    tolerance_dtype = least_precise(dtype, engine_precision(candidate.model))
    tolerance = GRAPH[tolerance_dtype]
    bounds = index_bounds(reference.model) if given is None else {}
    training = dropout_switches(graph) if graph is not None else []
    switches = branch_switches(graph) if given is None and graph is not None else []
    settings = [dict.fromkeys(switches, True), dict.fromkeys(switches, False)] if switches else [{}]
    runs = [(index, shape, setting) for index, shape in enumerate(shapes) for setting in settings]
    all_feeds = []
    for index, (batch, seq), setting in runs:
        feeds = given[index] if given is not None else random_arrays(
            inputs, batch, seq, seed=seed, bounds=bounds, dims=dims, where=str(reference.model))
        feeds.update({name: np.full_like(feeds[name], on) for name, on in setting.items()})
        if given is None:  # Dropout's training_mode as an input: off, or no two runs agree
            feeds.update({name: np.zeros_like(feeds[name]) for name in training if name in feeds})
        elif any(np.any(feeds.get(name, False)) for name in training):
            raise UsageError(f"{reference.model}: --inputs sets Dropout's training_mode "
                             f"({next(n for n in training if np.any(feeds.get(n, False)))}) true, so the outputs "
                             "change from run to run and no comparison can pass")
        mask_over_the_cache(feeds, inputs, output_specs)
        all_feeds.append(feeds)
    # One model loaded at a time: the reference runs every input first and is let go before the
    # candidate loads, so validating needs the memory of one model, not of two. The reference runs
    # as written: ONNX Runtime's own fusions are not what is being checked (and its LayerNormFusion
    # builds invalid nodes on some fp16 TorchScript exports).
    cand_level = candidate_optimization(graph)
    all_expected = _run_each(make_runner(reference.model, reference.backend, shapes, optimization="none", dims=dims),
                             all_feeds, inputs if given is None else ())
    all_actual = _run_each(make_runner(candidate.model, candidate.backend, shapes, dims=dims, optimization=cand_level),
                           all_feeds, inputs if given is None else (), progress)

    for (_, (batch, seq), _), expected, actual in zip(runs, all_expected, all_actual):
        missing = set(expected) - set(actual)
        if missing:
            raise NormfuseError(f"{candidate.model}: outputs {sorted(missing)} missing (it has {sorted(actual)})")
        for name in expected:
            if np.shape(actual[name]) != np.shape(expected[name]):
                raise NormfuseError(f"{candidate.model}: output {name!r} has shape {list(np.shape(actual[name]))} at "
                                    f"{batch}x{seq}, the reference's {list(np.shape(expected[name]))}")
    judged = [{name: output_stats(actual[name], expected[name], tolerance) for name in expected}
              for expected, actual in zip(all_expected, all_actual)]
    failing = [k for k, outputs in enumerate(judged) if not all(o["passed"] for o in outputs.values())]
    optimised = _reference_as_optimised(reference, candidate, cand_level, failing, all_feeds, shapes, dims,
                                        inputs if given is None else ())

    # every fused op alone, on the reference's own values at the first inputs, held to one op's
    # tolerance (normops.OP) against the reference's nodes in float64: an op that computes another
    # norm (an epsilon 10x off, say) can hide inside the graph's tolerance on unit-scale inputs
    both_onnx = Path(candidate.model).suffix == ".onnx" and Path(reference.model).suffix == ".onnx"
    # once per setting of the branch switches (a merged decoder's fused ops in each branch), at the first shape
    op_checks = {k: check_each_fused_op(reference, candidate, all_feeds[k], tolerance_dtype)
                 for k in range(len(settings))} if both_onnx else {}
    pairs: list[dict] = []
    iterations: list = []
    fused_ops_right = False  # the norm check's finding (it runs on the first failing pair)
    float32 = Float32Reference(reference.model) if dtype in HALF_DTYPES and Path(reference.model).suffix == ".onnx" \
        else None
    for k, ((index, (batch, seq), setting), feeds, expected, actual) in enumerate(
            zip(runs, all_feeds, all_expected, all_actual)):
        outputs = judged[k]
        op_check = op_checks.get(k)
        op_off = op_check is not None and not op_check["passed"]  # no second opinion clears that
        passed = all(o["passed"] for o in outputs.values()) and not op_off
        as_written = None
        if not passed and not op_off and k in optimised:
            # the fused graph against the reference optimised as it is: what the rewrite changed
            again = {name: output_stats(actual[name], optimised[k][name], tolerance) for name in expected}
            if all(o["passed"] for o in again.values()):
                as_written, outputs, passed = outputs, again, True
        norms = None
        if not passed and both_onnx and (op_off or not any(p.get("norm_check") for p in pairs)):
            # where does the difference come from? each fused op alone, on the reference's values
            # (once per candidate: the first pair that fails)
            norms = op_check or check_each_fused_op(reference, candidate, feeds, tolerance_dtype)
            if norms["passed"] and norms["norms"]:
                # every fused op is right on its own: did a choice by value go another way?
                from .selection_check import check_selections

                try:
                    selections = check_selections(reference.model, reference.backend, candidate.model,
                                                  candidate.backend, feeds, cand_level)
                except Exception:  # a diagnosis only
                    selections = None
                if selections is not None:
                    norms["selections"] = selections
        if norms is not None:
            fused_ops_right = bool(norms["passed"] and norms["norms"])
        float32_check = against_half = None
        if not passed and not op_off and float32 is not None and fused_ops_right:
            # every fused op is right on its own: is the candidate right against the model computed without
            # half-precision rounding? (a half reference is not that truth; see export.precision_check)
            try:
                float32_check = check_against_float32(float32.run(feeds), expected, actual, tolerance)
            except Exception as exc:  # a second opinion only: the verdict stands without it
                float32_check = {"error": f"{exc.__class__.__name__}: {first_line(exc, 160)}"}
            stats = float32_check.pop("stats", None)
            if float32_check.get("passed"):
                against_half, outputs, passed = outputs, stats, True
        pairs.append({
            "reference": f"{reference.label}@{reference.backend}",
            "candidate": f"{candidate.label}@{candidate.backend}",
            "shape": [batch, seq],
            **({"switches": setting} if setting else {}),
            **({"candidate_optimization": cand_level} if cand_level != "all" and candidate.backend.startswith("ort-") else {}),
            "input_shapes": {name: list(np.shape(value)) for name, value in feeds.items()},
            "dtype": dtype,
            "passed": passed,
            "outputs": outputs,
            **({"norm_check": norms} if norms is not None else {}),
            **({"op_check": op_check} if op_check is not None and norms is None else {}),
            **({"reference_optimization": cand_level, "as_written": as_written,
                "judged_against": f"{reference.label} optimised ({cand_level})@{reference.backend}"}
               if as_written is not None else {}),
            **({"tolerance_dtype": tolerance_dtype} if tolerance_dtype != dtype else {}),
            **({"float32_check": float32_check} if float32_check is not None else {}),
            **({"against_half_reference": against_half, "judged_against": FLOAT32_REFERENCE} if against_half is not None
               else {}),
        })
        iterations.append((feeds, expected, actual))
    if float32 is not None:
        float32.close()
    if save_dir is not None:
        save_polygraphy(save_dir, iterations, f"{reference.label}@{reference.backend}",
                        f"{candidate.label}@{candidate.backend}", reference.label, candidate.label)
    return pairs


def check_each_fused_op(reference: Side, candidate: Side, feeds: dict, dtype: str) -> dict:
    """export.norm_check's result for the candidate's fused ops on `feeds`, held to normops.OP of
    `dtype`; one that cannot run is said in the result, never raised."""
    from .norm_check import check_fused_norms, could_not_check

    try:
        return check_fused_norms(reference.model, reference.backend, candidate.model, candidate.backend, feeds,
                                 OP[dtype] if dtype in OP else GRAPH[dtype], fallback_tolerance=GRAPH[dtype])
    except Exception as exc:  # the pair's own verdict stands without it
        return could_not_check(exc)


def _reference_as_optimised(reference: Side, candidate: Side, level: str, failing: list[int], all_feeds: list[dict],
                            shapes, dims, made_up_inputs) -> dict[int, dict]:
    """The reference's outputs at the candidate's ONNX Runtime optimisation level, for the inputs at
    the positions in `failing`, with ONNX Runtime's own norm fusions off; {} unless both sides run on
    one ONNX Runtime provider at a level other than none, or when the reference does not run so.

    The reference runs as written and the candidate as deployed, so a failing pair may measure
    ONNX Runtime's own optimisations (a convolution's other summation order, where a random-weight
    ResNet's outputs reach 2e6) rather than the rewrite. Such a pair is judged again against the
    reference optimised as the candidate is; a second opinion only, so a reference that does not
    load so (ONNX Runtime's LayerNormFusion builds invalid nodes on some fp16 TorchScript exports)
    leaves the verdict as it was."""
    if not failing or level == "none" or reference.backend != candidate.backend \
            or not reference.backend.startswith("ort-") or Path(reference.model).suffix != ".onnx":
        return {}
    from .runtime import WITHOUT_NORM_FUSIONS

    try:
        # ONNX Runtime's own norm fusions stay off: at level all they turn a spelled-out norm into the
        # very op the rewrite emits, and the fusion would be judged against a fusion of itself
        runner = make_runner(reference.model, reference.backend, shapes, optimization=level + WITHOUT_NORM_FUSIONS,
                             dims=dims)
        outputs = _run_each(runner, [all_feeds[k] for k in failing], made_up_inputs)
    except Exception:  # a second opinion only: the verdict stands without it
        return {}
    return dict(zip(failing, outputs))


def describe_as_written(pair: dict) -> str:
    """One line for a pair that passed against the reference optimised as the candidate is."""
    worst = max(s["max_abs"] for s in pair["as_written"].values())
    return (f"judged against the reference run at ONNX Runtime's optimisation level '{pair['reference_optimization']}', "
            f"as the fused graph runs, with ONNX Runtime's own norm fusions off: against the reference as written it "
            f"differs by up to {worst:.3g} (max abs), which is ONNX Runtime's other optimisations, not the rewrite")


def describe_float32(pair: dict) -> str:
    """One line for a pair judged again against the reference run in float32 (export.precision_check)."""
    from .precision_check import describe

    line = describe(pair["float32_check"], pair["dtype"])
    if pair.get("against_half_reference"):
        worst = max(s["max_abs"] for s in pair["against_half_reference"].values())
        line += f" (against it the fused graph differs by up to {worst:.3g}, max abs)"
    return line


def _run_each(runner, all_feeds: list[dict], made_up_inputs, progress=None) -> list[dict]:
    """The runner's outputs for each feed dict; the runner (and its session or engine) is let go after."""
    outputs = []
    try:
        with hint_on_failure(made_up_inputs):
            for feeds in all_feeds:
                outputs.append(runner.run(feeds))
                if progress:
                    progress()
        return outputs
    finally:
        del runner
        gc.collect()  # ONNX Runtime sessions sit in reference cycles


def read_given_inputs(path: str | Path, reference: str | Path) -> list[dict]:
    """Feed dicts from a .npz (one set of inputs) or a Polygraphy inputs file (`polygraphy run
    --save-inputs`, or this command's `--save-outputs`: a JSON list of feed dicts)."""
    from .run import read_inputs
    from .triton_repo import onnx_signature

    path = Path(path)
    inputs, _ = onnx_signature(reference)
    if path.suffix == ".json":
        require_file(path)
        try:
            from polygraphy.json import load_json
        except ImportError:
            raise NormfuseError(f"{path}: reading Polygraphy's inputs format needs it: pip install polygraphy") from None
        try:
            loaded = load_json(str(path))
        except Exception as exc:
            raise NormfuseError(f"{path}: not a Polygraphy inputs file ({exc.__class__.__name__}: "
                                f"{first_line(exc)})") from None
        feeds_list = list(loaded) if isinstance(loaded, (list, tuple)) else []
        if not feeds_list or not all(isinstance(f, dict) and f for f in feeds_list):
            raise NormfuseError(f"{path}: not a Polygraphy inputs file (expected a list of name -> array dicts)")
        bf16 = {i.name for i in inputs if i.dtype == "bfloat16"}
        # Polygraphy has no bfloat16 numpy type; --save-outputs writes such inputs as float32 (exact)
        return [{k: (np.asarray(v).astype(numpy_dtype("bfloat16")) if k in bf16 else np.asarray(v))
                 for k, v in feeds.items()} for feeds in feeds_list]
    return [read_inputs(path, inputs)]


def _polygraphy_array(value) -> np.ndarray:
    """numpy has no bfloat16 Polygraphy can read back: such arrays are saved as float32 (exact)."""
    array = np.asarray(value)
    if array.dtype.name == "bfloat16":
        return array.astype(np.float32)
    return array


def save_polygraphy(save_dir, iterations, ref_runner_name: str, cand_runner_name: str, ref_label: str,
                    cand_label: str) -> dict[str, Path]:
    """inputs.json (list of feed dicts, `polygraphy run --load-inputs`) and one RunResults file
    per side (`--load-outputs`; `polygraphy inspect data` shows them)."""
    try:
        from polygraphy.comparator import RunResults
        from polygraphy.json import save_json
        from polygraphy.logger import G_LOGGER
    except ImportError:
        raise NormfuseError("--save-outputs writes Polygraphy's formats and needs it: pip install polygraphy") from None
    from .files import atomic_path, folder_made_for, require_writable

    G_LOGGER.module_severity = G_LOGGER.ERROR
    save_dir = require_writable(save_dir, folder=True)
    paths = {"inputs": save_dir / "inputs.json", ref_label: save_dir / f"{ref_label}-outputs.json",
             cand_label: save_dir / f"{cand_label}-outputs.json"}
    with folder_made_for(save_dir):
        with atomic_path(paths["inputs"]) as tmp:
            save_json([{k: _polygraphy_array(v) for k, v in feeds.items()} for feeds, _, _ in iterations], str(tmp))
        for label, runner_name, index in ((ref_label, ref_runner_name, 1), (cand_label, cand_runner_name, 2)):
            results = RunResults()
            results.add([{k: _polygraphy_array(v) for k, v in it[index].items()} for it in iterations],
                        runner_name=runner_name)
            with atomic_path(paths[label]) as tmp:
                results.save(str(tmp))
    return paths


def polygraphy_compare(reference_outputs: str | Path, candidate_outputs: str | Path, tol: Tolerance) -> bool:
    """Polygraphy's own comparator over two saved RunResults files (its rule: each element within
    atol or within rtol), as a second opinion next to ours."""
    from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    results = RunResults()
    for path in (reference_outputs, candidate_outputs):
        for runner_name, iteration_results in RunResults.load(str(path)).items():
            results.add([dict(it.items()) for it in iteration_results], runner_name=runner_name)
    accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=tol.atol, rtol=tol.rtol))
    return bool(accuracy)


def reference_backend(requested: str, candidate: str, dtype: str) -> str:
    """The reference's backend when --reference-backend is not given: --backend, or ONNX Runtime's
    CPU provider when that names TensorRT (the reference graph is the one being checked against,
    not built). A bfloat16 graph against a TensorRT engine goes to the onnx reference evaluator
    instead: ONNX Runtime's CPU provider has no bfloat16 MatMul, so `validate REF.onnx FUSED.plan`
    of a bf16 engine would otherwise fail before comparing anything."""
    backend = "ort-cpu" if requested == "tensorrt" else requested
    if dtype == "bfloat16" and backend == "ort-cpu" and candidate == "tensorrt":
        return "onnx-reference"
    return backend


def candidate_backend(path: Path, requested: str) -> str:
    """A .plan runs on TensorRT whatever --backend says for the reference."""
    from .runtime import ENGINE_SUFFIXES

    return "tensorrt" if path.suffix in ENGINE_SUFFIXES else requested


def main(argv=None) -> int:
    from .cli import DIM_HELP, Parser, dim_size, output_file, output_folder, run_cli
    from .files import write_json

    parser = Parser(prog="python -m export.validate", description=__doc__.splitlines()[0])
    parser.add_argument("reference", help="reference ONNX model, or a folder of them (an Optimum export)")
    parser.add_argument("candidate", help="fused ONNX model, or a TensorRT engine (.plan); a folder for a folder "
                                          "(the models of the same names, as export.rewrite writes them)")
    parser.add_argument("--shapes", default="1x16,2x64", help="BATCHxSEQ list (default 1x16,2x64)")
    parser.add_argument("--dim", type=dim_size, action="append", default=[], metavar="NAME=SIZE", help=DIM_HELP)
    parser.add_argument("--backend", default="ort-cpu", choices=("ort-cpu", "ort-cuda", "onnx-reference", "tensorrt"),
                        help="backend for both models (default ort-cpu; onnx-reference runs normfuse ops through normops; "
                             "tensorrt builds an engine from an .onnx candidate)")
    parser.add_argument("--reference-backend", choices=("ort-cpu", "ort-cuda", "onnx-reference", "tensorrt"),
                        help="backend for the reference only (default: --backend, or ort-cpu for tensorrt; "
                             "onnx-reference for a bfloat16 graph against a TensorRT engine)")
    parser.add_argument("--inputs", metavar="FILE",
                        help="compare on these inputs instead of random ones (--shapes is then not used): a .npz "
                             "(one set) or a Polygraphy inputs JSON (a list of sets), e.g. from --save-outputs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--json", type=output_file, help="write the comparison as JSON")
    parser.add_argument("--save-outputs", metavar="DIR", type=output_folder, help="write inputs and outputs in Polygraphy's formats")
    args = parser.parse_args(argv)

    def job():
        shapes = parse_shapes(args.shapes)
        if args.inputs and args.dim:
            raise UsageError("--dim sizes random inputs; with --inputs the inputs' own shapes are used")
        if Path(args.reference).is_dir():
            return validate_folder(args, shapes)
        dtype = model_dtype(args.reference)
        candidate = Path(args.candidate)
        cand_backend = candidate_backend(candidate, args.backend)
        ref_backend = args.reference_backend or reference_backend(args.backend, cand_backend, dtype)
        require_file(candidate)  # model_dtype has checked the reference
        given = read_given_inputs(args.inputs, args.reference) if args.inputs else None
        pairs = compare(Side(Path(args.reference), ref_backend, "reference"), Side(candidate, cand_backend, "fused"),
                        shapes, dtype, seed=args.seed, save_dir=args.save_outputs, given=given, dims=dict(args.dim))
        print_pairs(pairs, dtype, args.dim)
        if args.save_outputs:
            print(f"wrote Polygraphy inputs and outputs to {args.save_outputs}/")
        if args.json:
            write_json(args.json, pairs)
        return 0 if all(p["passed"] for p in pairs) else 1

    return run_cli(job)


def print_pairs(pairs: list[dict], dtype: str, dims: list[tuple], prefix: str = "") -> None:
    """A line per compared output (PASS, or FAIL from the quantile where it fails), and the norm
    check's line under a failing pair."""
    with_dims = "".join(f" {name}={size}" for name, size in dims)
    for pair in pairs:
        for name, s in pair["outputs"].items():
            verdict = "PASS" if s["passed"] else f"FAIL from {s['failed_quantile']}"
            held_as = pair.get("tolerance_dtype", dtype)
            print(f"{prefix}{verdict} {shape_label(pair)}{with_dims} {name} ({pair['candidate']} vs "
                  f"{pair.get('judged_against', pair['reference'])}): max_abs {s['max_abs']:.3g} median_abs {s['median_abs']:.3g} "
                  f"max_rel {s['max_rel']:.3g}, tolerance used p99 {s['tolerance_used']['p99']:.2g} "
                  f"max {s['tolerance_used']['max']:.2g} (atol {s['atol']:g}, rtol {s['rtol']:g}, "
                  f"{held_as if held_as == dtype else f'{held_as}: the engine computes in it'})"
                  + (f"; {note}" if (note := result_note(s)) else ""))
        if fused_op_failed(pair):
            print(f"{prefix}FAIL {shape_label(pair)}{with_dims} fused ops alone ({pair['candidate']}): see below")
        if pair.get("op_check"):
            from .norm_check import describe_passed

            print(f"{prefix}  {shape_label(pair)}{with_dims}: {describe_passed(pair['op_check'])}")
        if pair.get("norm_check"):
            from .norm_check import describe

            print(f"{prefix}  {shape_label(pair)}{with_dims}: {describe(pair['norm_check'])}")
        if pair.get("as_written"):
            print(f"{prefix}  {shape_label(pair)}{with_dims}: {describe_as_written(pair)}")
        if pair.get("float32_check"):
            print(f"{prefix}  {shape_label(pair)}{with_dims}: {describe_float32(pair)}")


def validate_folder(args, shapes) -> int:
    """export.validate REFERENCE_FOLDER CANDIDATE_FOLDER: each model of the first against the model
    of the same name in the second (as export.rewrite writes a folder), each with its share of the
    --dim flags; --save-outputs gets a folder per model, --json an entry per model."""
    from .dims import sizes_per_model
    from .files import paired_models, write_json

    reference, candidate = Path(args.reference), Path(args.candidate)
    if args.inputs:
        raise UsageError("--inputs gives one model's inputs; with folders the inputs are made up per model")
    models = paired_models(reference, candidate)
    shares = sizes_per_model(models, args.dim)
    results, passed = {}, True
    for model in models:
        dtype = model_dtype(model)
        fused = candidate / model.name
        cand_backend = candidate_backend(fused, args.backend)
        ref_backend = args.reference_backend or reference_backend(args.backend, cand_backend, dtype)
        pairs = compare(Side(model, ref_backend, "reference"), Side(fused, cand_backend, "fused"), shapes, dtype,
                        seed=args.seed, save_dir=Path(args.save_outputs) / model.stem if args.save_outputs else None,
                        dims=dict(shares[model]))
        print_pairs(pairs, dtype, shares[model], prefix=f"{model.name}: ")
        results[model.name] = pairs
        passed = passed and all(p["passed"] for p in pairs)
    if args.save_outputs:
        print(f"wrote Polygraphy inputs and outputs to {args.save_outputs}/<model name>/")
    if args.json:
        write_json(args.json, results)
    print(f"{len(models)} models: " + ("every output passed" if passed else "some outputs FAILED"))
    return 0 if passed else 1


LEAST_PRECISE_FIRST = ("bfloat16", "float16", "float32", "float64")


def model_dtype(path) -> str:
    """The dtype whose tolerance applies: the least precise float type the model computes in (its
    inputs, outputs, weights, constants and casts), so a model converted to fp16 inside with fp32
    inputs and outputs (ONNX Runtime's converter with keep_io_types) is held to fp16's tolerance."""
    return model_dtypes(path)[1]


def model_dtypes(path) -> tuple[str, str]:
    """(the I/O dtype: the first floating graph input's, the hidden states of normfuse's stacks,
    else the first floating output's, a language model fed token ids; the least precise float
    type anywhere in the main graph)."""
    from .onnx_io import graph_skeleton
    from .rewrite.checks import FLOAT_TYPES

    graph = graph_skeleton(path).graph
    initializers = {t.name for t in graph.initializer}
    io_types = [v.type.tensor_type.elem_type for v in graph.input if v.name not in initializers] + \
        [v.type.tensor_type.elem_type for v in graph.output]
    io_dtype = next((FLOAT_TYPES[t] for t in io_types if t in FLOAT_TYPES), None)
    if io_dtype is None:
        raise NormfuseError(f"{path}: no floating-point input or output to compare")
    found = {io_dtype} | {FLOAT_TYPES.get(t.data_type) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Cast":
            found |= {FLOAT_TYPES.get(a.i) for a in node.attribute if a.name == "to"}
        elif node.op_type == "Constant":
            found |= {FLOAT_TYPES.get(a.t.data_type) for a in node.attribute if a.name == "value"}
    return io_dtype, next(d for d in LEAST_PRECISE_FIRST if d in found)


if __name__ == "__main__":
    raise SystemExit(main())
