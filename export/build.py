"""The whole chain in one command: export, rewrite, build, validate, bench, report.

    python -m export.build --norm rmsnorm            # LLaMA-style `small` stack, every backend present
    python -m export.build --norm layernorm --preset tiny --backend ort-cpu
    python -m export.build --norm rmsnorm --backend tensorrt --dtype float16 --seq-range 1:128:2048
    python -m export.build --norm rmsnorm --triton-repo triton/    # also a Triton model repository
    python -m export.build --onnx model.onnx --seq 512             # any ONNX model instead of a stack
    python -m export.build --onnx t5/                              # each model of a folder (export.build_folder)

`--backend auto` runs ONNX Runtime's CPU provider and, when present, its CUDA provider (I/O
binding) and TensorRT (engines for the fused graph with our plugins and for the reference graph);
what is absent is listed under `skipped` with the reason. Asking for a backend that is absent is
a one-line error. Exit status: 0 when every validation passed, 1 when one failed or a requested
backend is missing, 2 for bad flags.
"""
from __future__ import annotations

import platform
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from models import PRESET_NAMES, count_norms, describe_presets, preset

from .backends import BACKENDS, availability, gpu_present, resolve_backends
from .cli import (DIM_HELP, Parser, dim_range, non_negative_int, output_file, output_folder, positive_int, run_cli,
                  seed_value, supported_opset)
from .errors import MissingKernel, NormfuseError, UsageError
from .files import require_writable
from .bench import GRAPHS, in_pairs
from .export_model import DEFAULT_OPSET, EXPORTERS, decomposed_refused, export_model, opset_refused
from .report import print_summary, write_report
from .tensorrt_engine import PRECISIONS, Range

VALIDATION_SHAPES = [(1, 16)]  # plus the bench shape


def listed(shapes) -> str:
    """(batch, seq) shapes as "1x16, 1x128"."""
    return ", ".join(f"{b}x{s}" for b, s in shapes)


def has_no_norm(rewrite) -> bool:
    """A rewrite that found no norm at all: none fused, none rejected (a spelling refused as no
    norm, F.normalize's, is none)."""
    return rewrite.fused == 0 and not norms_rejected(rewrite)


def norms_rejected(rewrite) -> list:
    """The rejections of norms left unfused, without the spellings refused as no norm."""
    return [r for r in rewrite.rejected if not r.no_norm]


def lacks_kernels(backend: str, dtype: str) -> bool:
    """ONNX Runtime's CPU provider has no bfloat16 kernels (MatMul, Mul): such graphs do not run there."""
    return dtype == "bfloat16" and backend == "ort-cpu"


def parse_args(argv=None):
    parser = Parser(prog="python -m export.build", description=__doc__.splitlines()[0],
                    epilog="exit status: 0 when every validation passed; 1 when one failed (the report is still "
                           "written) or a backend named with --backend cannot run here; 2 for a bad flag or an "
                           "output path that cannot be written")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--norm", choices=("rmsnorm", "layernorm"),
                        help="rmsnorm: LLaMA-style stack; layernorm: GPT-style stack")
    source.add_argument("--onnx", metavar="MODEL",
                        help="run the chain on this ONNX model instead of exporting a stack (its dynamic axis 0 "
                             "is the batch, other dynamic axes the sequence, unless --dim names them; a derived "
                             "name like 'past + seq' is worked out; token ids stay inside the table they index); "
                             "a folder: on each of its models, then an encoder-decoder's pair decoded together, "
                             "and serve-<backend>/ laid out as the folder, each model in the form that backend serves")
    parser.add_argument("--preset", choices=PRESET_NAMES, default="small",
                        help=f"stack shape (default small): {describe_presets()}")
    parser.add_argument("--layers", type=positive_int, help="Transformer blocks (default: the preset's)")
    parser.add_argument("--hidden", type=positive_int, help="hidden size, the normalised axis (default: the preset's)")
    parser.add_argument("--heads", type=positive_int, help="attention heads; must divide --hidden (default: the preset's)")
    parser.add_argument("--ffn", type=positive_int, help="MLP width (default: the preset's)")
    parser.add_argument("--batch", type=positive_int, default=1, help="benchmark batch size (default 1)")
    parser.add_argument("--seq", type=positive_int, default=128,
                        help="benchmark sequence length (default 128; validation also runs at 1x16)")
    parser.add_argument("--dim", type=dim_range, action="append", default=[], metavar="NAME=SIZE",
                        help="with --onnx: " + DIM_HELP + "; NAME=MIN:OPT:MAX also sets its range in TensorRT's "
                             "profile (runs use OPT)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="weights and activations of the exported stack (default float32)")
    parser.add_argument("--opset", type=supported_opset, default=DEFAULT_OPSET, help=f"ONNX opset of the export, 17..23 (default {DEFAULT_OPSET})")
    parser.add_argument("--exporter", choices=EXPORTERS, default="dynamo",
                        help="dynamo (torch.export, default) or torchscript")
    parser.add_argument("--decomposed-layernorm", action="store_true",
                        help="write LayerNorm out in elementary ops instead of F.layer_norm")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="auto (default): every backend present, the rest listed as skipped; a named one "
                             "that cannot run here is an error")
    parser.add_argument("--runs", type=positive_int, default=100, help="timed runs per graph (default 100)")
    parser.add_argument("--warmup", type=non_negative_int, default=10, help="untimed runs per graph first (default 10)")
    parser.add_argument("--pairs", type=positive_int, default=1,
                        help="bench the reference and the fused graph this many times each, in fresh processes, "
                             "taking turns to go first; p50 and p99 are over all their runs, the speed-up the median of the "
                             "pairs' own ratios (default 1)")
    parser.add_argument("--out", type=output_folder,
                        help="output folder (default build/<preset>-<norm>, or build/<model name> with --onnx)")
    parser.add_argument("--seed", type=seed_value, default=0, help="seed of the weights and inputs, 0..2^63-1 (default 0)")
    parser.add_argument("--exclude", action="append", default=[], metavar="TENSOR",
                        help="leave the norm ending at this tensor unfused in every form (repeatable; the name the "
                             "rewrite report and a failing validation's norm check give)")
    parser.add_argument("--decode-tokens", type=non_negative_int, default=32,
                        help="with --onnx of a KV-cache decoder: greedy-decode this many tokens with the reference "
                             "and (fed its tokens) the fused graph on each ONNX Runtime backend, comparing choices, "
                             "scores and step times (default 32; 0: skip)")
    trt = parser.add_argument_group("TensorRT engines")
    trt.add_argument("--batch-range", metavar="MIN:OPT:MAX",
                     help="batch axis of the optimisation profile (default 1:BATCH:max(BATCH,2))")
    trt.add_argument("--seq-range", metavar="MIN:OPT:MAX",
                     help="sequence axis of the optimisation profile (default 1:SEQ:max(SEQ,16))")
    trt.add_argument("--precision", choices=PRECISIONS, default="strongly-typed",
                     help="strongly-typed: the graph's own dtypes (default); fp16/bf16/fp32: a weakly typed "
                          "network with (or without) those kernels, TensorRT 10 only")
    trt.add_argument("--workspace-mb", type=positive_int, default=4096, help="builder workspace limit in MiB (default 4096)")
    trt.add_argument("--timing-cache", type=output_file, help="TensorRT timing cache file (default <out>/timing.cache)")
    parser.add_argument("--triton-repo", metavar="DIR", type=output_folder, help="also write a Triton model repository of the models built")
    args = parser.parse_args(argv)
    if args.onnx:
        stack_only = [flag for flag, given in (("--preset", args.preset != "small"), ("--layers", args.layers),
                                               ("--hidden", args.hidden), ("--heads", args.heads), ("--ffn", args.ffn),
                                               ("--dtype", args.dtype != "float32"), ("--opset", args.opset != DEFAULT_OPSET),
                                               ("--exporter", args.exporter != "dynamo"),
                                               ("--decomposed-layernorm", args.decomposed_layernorm)) if given]
        if stack_only:
            parser.error(f"argument --onnx: {', '.join(stack_only)} "
                         f"{'describe' if len(stack_only) > 1 else 'describes'} the exported stack, "
                         "which does not apply to a given model")
    elif args.dim:
        parser.error("argument --dim: names dimensions of a given model (--onnx); the exported stack's two "
                     "dynamic axes are --batch and --seq")
    if why := opset_refused(args.exporter, args.opset):
        parser.error(f"argument --opset: {why}")
    if why := decomposed_refused(args.norm, args.decomposed_layernorm):
        parser.error(why)
    if args.decode_tokens == 1:
        parser.error("argument --decode-tokens: 1 token has no decode step to time; give 0 (skip) or at least 2")
    try:
        args.batch_range = Range.parse(args.batch_range, "--batch-range") if args.batch_range else None
        args.seq_range = Range.parse(args.seq_range, "--seq-range") if args.seq_range else None
    except UsageError as exc:
        parser.error(str(exc))
    return args


class Pipeline:
    def __init__(self, args, console):
        self.args = args
        self.console = console
        self.stage_seconds: dict[str, float] = {}
        self.stage_peak_mb: dict[str, float] = {}  # the largest resident set of the build or a worker, by stage
        self.skipped: list[dict] = []
        self.backends: list[str] = []
        self.step = 0
        # set by run_on: the report, and the graph greedy decoding checks on each ONNX Runtime backend
        # (None where the rewrite changed nothing for it)
        self.report: dict | None = None
        self.decoded: dict[str, Path | None] = {}
        # ONNX Runtime backends validation found without a kernel for one of the model's ops: why
        self.missing_kernels: dict[str, str] = {}
        self.served: dict[str, Path] = {}
        self.triton_fused: list[Path] = []  # the fused models' Triton entries this build wrote

    @contextmanager
    def stage(self, name: str, what: str):
        from .memory import peak_rss_mb, reset_peak_rss

        self.step += 1
        started = time.perf_counter()
        reset_peak_rss()
        self.worker_peaks_mb: list[float] = []  # what the stage's bench workers report of themselves
        with self.console.status(f"[{self.step}] {what} ..."):
            yield
        seconds = time.perf_counter() - started
        self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + seconds
        # this process's peak in the stage, or a bench worker's own: the kernel's figure for child
        # processes starts from the parent's resident set at the fork, so it cannot tell a worker's
        peak = max([peak_rss_mb(), *self.worker_peaks_mb])
        self.stage_peak_mb[name] = max(self.stage_peak_mb.get(name, 0.0), peak)
        self.console.print(f"[green]done[/] [{self.step}] {what} ({seconds:.1f} s)")

    def run(self) -> int:
        a = self.args
        if a.onnx and Path(a.onnx).is_dir():
            from .build_folder import FolderPipeline

            return FolderPipeline(a, self.console).run()
        if a.onnx:
            return self.run_on(*self.given_model())
        try:
            config = preset(a.preset, a.norm, layers=a.layers, hidden=a.hidden, heads=a.heads, ffn=a.ffn,
                            dtype=a.dtype, decomposed_layernorm=a.decomposed_layernorm or None)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        out = require_writable(a.out or f"build/{a.preset}-{a.norm}", folder=True)  # the default too
        self.check_backends()
        reference = out / "reference.onnx"
        with self.stage("export", f"export {a.preset} {config.norm} stack ({config.layers} layers, {a.dtype}) with {a.exporter}"):
            exported = export_model(config, reference, exporter=a.exporter, opset=a.opset, seed=a.seed)
        described = {**config.as_dict(), "preset": a.preset, "opset": exported.opset, "exporter": a.exporter}
        return self.run_on(reference, out, described, count_norms(config)[0], a.preset, config.norm)

    def given_model(self) -> tuple[Path, Path, dict, None, str, str]:
        """--onnx: the model is the reference graph as it is (not copied); outputs go to --out."""
        import re

        from .validate import model_dtypes

        source = Path(self.args.onnx)
        io_dtype, dtype = model_dtypes(source)  # a one-line error for a missing or unreadable file
        self.check_backends()
        name = re.sub(r"[^A-Za-z0-9_]+", "_", source.stem).strip("_") or "model"
        described = {"source": str(source), "norm": "model", "preset": name, "dtype": dtype}
        self.check_dims(source)  # a --dim the model does not have is a flag error before the rewrite, not after
        inside = f"; computes in {dtype}, whose tolerance applies" if dtype != io_dtype else ""
        self.console.print(f"model {source} ({io_dtype}{inside}): given, so nothing is exported")
        return source, require_writable(self.args.out or f"build/{name}", folder=True), described, None, name, "model"

    @property
    def dims(self) -> dict[str, int]:
        """--dim sizes for the runs: a range's OPT (the whole range goes to TensorRT's profile)."""
        return {name: size.opt for name, size in self.args.dim}

    @property
    def with_dims(self) -> str:
        """' with past_sequence_length=512' for stage lines, where --dim sized named dimensions."""
        return " with " + ", ".join(f"{n}={v}" for n, v in self.dims.items()) if self.dims else ""

    def check_backends(self) -> None:
        backends, self.skipped = resolve_backends(self.args.backend)
        if "tensorrt" in backends:
            self.profile()  # a profile that misses the shapes is a flag error, before any work
            self.check_precision()  # so is a weakly typed --precision on TensorRT 11
        self.backends = backends

    def run_on(self, reference: Path, out: Path, described: dict, expected_norms: int | None, name: str,
               norm: str) -> int:
        """Rewrite, build, validate, bench and report on `reference`; `expected_norms` None: the
        norms the rewriter found (fused or rejected) are what the model has, as far as is known."""
        a = self.args
        backends = self.backends
        dtype = described["dtype"]
        fused, fused_cpu, fused_trt = out / "fused.onnx", out / "fused-cpu.onnx", out / "fused-tensorrt.onnx"
        from .rewrite import describe_counts, describe_unmatched_means, describe_without_epsilon, rewrite_file

        with self.stage("rewrite", "rewrite norms (tensorrt, onnxruntime and onnxruntime CPU forms)"):
            # --exclude: norms left as written (a name no norm ends at is refused; in a folder, by the folder)
            exclude, check = frozenset(a.exclude), not getattr(a, "folder", None)
            rewrite = rewrite_file(reference, fused, target="onnxruntime", exclude=exclude, check_exclude=check)
            # ONNX Runtime's CPU Skip[Simplified]LayerNormalization kernels run slower than its Add
            # followed by the plain norm op (bench/ort_ops.py), so the CPU form keeps the residual Add.
            rewrite_cpu = rewrite_file(reference, fused_cpu, target="onnxruntime", residual=False, exclude=exclude,
                                       check_exclude=check)
            rewrite_trt = rewrite_file(reference, fused_trt, target="tensorrt", exclude=exclude, check_exclude=check)
        if has_no_norm(rewrite_trt):
            spellings = len(rewrite_trt.rejected)  # refused as no norm (epsilon outside the root), each in the report
            self.console.print("    no norm in this model (none found, none rejected"
                               + (f"; {spellings} spelling(s) refused as no norm, see the report" if spellings else "")
                               + "): nothing to fuse; the fused files are copies of it")
        else:
            cpu = (f"{rewrite_cpu.fused} for its CPU provider ({describe_counts(rewrite_cpu.counts)}; residual Adds kept)"
                   if rewrite_cpu.fused
                   else "none for its CPU provider (its norms are already the single ops it would get)")
            self.console.print(f"    fused {rewrite_trt.fused} norms for TensorRT ({describe_counts(rewrite_trt.counts)}), "
                               f"{rewrite.fused} for ONNX Runtime ({describe_counts(rewrite.counts)}), {cpu}")
        if rewrite_trt.unmatched_means:
            self.console.print(f"    [yellow]{describe_unmatched_means(rewrite_trt.unmatched_means)}[/]")
        if rewrite_trt.without_epsilon:
            self.console.print(f"    [yellow]{describe_without_epsilon(rewrite_trt.without_epsilon)}[/]")
        # a CPU form identical to the reference (every norm already a LayerNormalization, say) compares nothing
        cpu_form = fused_cpu if rewrite_cpu.fused else None
        # where the CPU form is the reference itself, decoding on the CPU checks the Skip-op form's
        # choices instead: slower there (bench/README.md), but it is the fused graph a GPU serves
        self.decoded = {"ort-cpu": cpu_form or (fused if rewrite.fused else None), "ort-cuda": fused}
        # what each backend should serve: the fastest form that validated, the reference where nothing changed
        self.served = {"ort-cpu": cpu_form or reference, "ort-cuda": fused if rewrite.fused else reference}
        self.resolve_shapes(reference)

        engines = self.build_engines(reference, fused_trt, out, backends) if "tensorrt" in backends else {}
        validation = self.validate(reference, fused, cpu_form, fused_trt, backends, dtype, engines)
        bench = self.bench(reference, fused, cpu_form, backends, dtype, {"ort-cpu": rewrite_cpu, "ort-cuda": rewrite,
                                                                                  "tensorrt": rewrite_trt},
                           engines)
        decoding = self.decode(reference, backends, dtype)
        self.note_gpu_stages(backends)
        from .decode import decoded_alike

        fused_passed = all(p["passed"] for p in validation) and all(decoded_alike(d["agreement"]) for d in decoding)
        triton = self.write_triton(reference, fused, engines, name, norm, fused_passed) if a.triton_repo else []
        if expected_norms is None:
            expected_norms = rewrite_trt.fused + len(norms_rejected(rewrite_trt))

        report = {
            # the bench shape as run (an axis the model fixes keeps its size), and as asked
            "config": {**described, "batch": self.bench_shape[0], "seq": self.bench_shape[1],
                       "shape_asked": [a.batch, a.seq], "dims": self.dims, "backend": a.backend, "backends_run": backends,
                       "seed": a.seed, "runs": a.runs, "warmup": a.warmup, "pairs": a.pairs},
            "rewrite": {"fused": rewrite_trt.fused, "expected_norms": expected_norms,
                        "counts": rewrite_trt.counts, "rejected": [r.__dict__ for r in rewrite_trt.rejected],
                        "nodes_before": rewrite_trt.nodes_before, "nodes_after": rewrite_trt.nodes_after,
                        "tensorrt": rewrite_trt.as_dict(), "onnxruntime": rewrite.as_dict(),
                        "onnxruntime_cpu": rewrite_cpu.as_dict()},
            "validation": validation,
            "bench": bench,
            "decode": decoding,
            "skipped": self.skipped,
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "stage_peak_rss_mb": {k: round(v, 1) for k, v in self.stage_peak_mb.items()},
            "environment": environment(),
            "files": {"reference": str(reference), "fused": str(fused), "fused_cpu": str(fused_cpu),
                      "fused_tensorrt": str(fused_trt),
                      **{f"{graph}_plan": str(info["plan"]) for graph, info in engines.items()}},
            "engines": {graph: info["sidecar"] for graph, info in engines.items()},
            "triton": triton,
        }
        self.report = report
        with self.stage("report", "write report.json, report.md" + (", report.png" if bench else " (no plot: nothing timed)")):
            paths = write_report(report, out)
        print_summary(report, self.console)
        also = ", ".join(paths[k].name for k in ("json", "png") if k in paths)
        self.console.print(f"report: {paths['md']} (also {also}" + ("" if "png" in paths else "; no plot: nothing was timed") + ")")
        if not all(p["passed"] for p in validation):
            self.console.print("[red]validation FAILED[/]: the fused graph does not match the reference")
            return 1
        if not all(decoded_alike(d["agreement"]) for d in decoding):
            self.console.print("[red]decoding FAILED[/]: the fused decoder chose other tokens or its scores are out "
                               "of tolerance")
            return 1
        return 0

    def profile(self) -> tuple[Range, Range]:
        """Engine profile: the flags' ranges, or ones covering the validation and bench shapes."""
        a = self.args
        shapes = VALIDATION_SHAPES + [(a.batch, a.seq)]
        batch = a.batch_range or Range(1, a.batch, max(a.batch, 2))
        seq = a.seq_range or Range(1, a.seq, max(a.seq, 16))
        if a.batch_range is None and a.seq_range is None:
            batch = batch.covering(*(b for b, _ in shapes))
            seq = seq.covering(*(s for _, s in shapes))
        for b, s_ in shapes:
            if not (batch.min <= b <= batch.max and seq.min <= s_ <= seq.max):
                raise UsageError(f"shape {b}x{s_} (validation or --batch/--seq) is outside the engine profile "
                                 f"--batch-range {batch} --seq-range {seq}")
        return batch, seq

    def check_precision(self, builder_flag=None, tensorrt_version: str = "") -> None:
        """UsageError for a --precision this TensorRT cannot build (fp16/bf16/fp32 are weakly typed
        networks, which TensorRT 11 removed together with BuilderFlag.FP16/BF16); raised here rather
        than after the export and rewrite, from the same rule the engine build applies."""
        from .tensorrt_engine import precision_builder_flag

        if builder_flag is None:
            import tensorrt as trt

            builder_flag, tensorrt_version = trt.BuilderFlag, str(trt.__version__)
        precision_builder_flag(builder_flag, self.args.precision, tensorrt_version)

    def build_engines(self, reference: Path, fused_trt: Path, out: Path, backends) -> dict:
        """fused.plan (our plugins) and reference.plan (TensorRT's own handling of the norms)."""
        from .tensorrt_engine import EngineOptions, build_engine

        a = self.args
        batch, seq = self.profile()
        options = EngineOptions(batch=batch, seq=seq, dims=dict(a.dim), precision=a.precision, workspace_mb=a.workspace_mb,
                                timing_cache=Path(a.timing_cache) if a.timing_cache else out / "timing.cache")
        engines = {}
        for graph, source in (("fused", fused_trt), ("reference", reference)):
            plan = out / f"{graph}.plan"
            with self.stage("engine", f"build TensorRT engine {plan.name} from {source.name} "
                                      f"(batch {batch}, seq {seq}"
                                      + "".join(f", {name} {r}" for name, r in a.dim) + f", {a.precision})"):
                sidecar = build_engine(source, plan, options)
            engines[graph] = {"plan": plan, "source": source, "sidecar": sidecar}
        return engines

    def resolve_shapes(self, reference: Path) -> None:
        """The validation and bench shapes as the model takes them: an axis it fixes keeps its size,
        so a model with a static sequence of 8 is validated and timed at 8 tokens, and says so."""
        from .backends import shape_taken

        a = self.args
        self.validation_shapes = list(dict.fromkeys(shape_taken(reference, b, s, self.dims) for b, s in VALIDATION_SHAPES))
        self.bench_shape = shape_taken(reference, a.batch, a.seq, self.dims)
        asked = list(dict.fromkeys(VALIDATION_SHAPES + [(a.batch, a.seq)]))
        self.shapes_run = list(dict.fromkeys(self.validation_shapes + [self.bench_shape]))  # the bench shape may be 1x16 too
        if self.shapes_run != asked:
            self.console.print(f"    the batch or sequence axis is fixed (by the model or a --dim): shapes {listed(asked)} "
                               f"run as {listed(self.shapes_run)}")

    def check_dims(self, model: Path) -> None:
        from .dims import check_given
        from .triton_repo import onnx_signature

        check_given(onnx_signature(model)[0], self.dims, str(model))

    def validate(self, reference, fused, fused_cpu, fused_trt, backends, dtype, engines=None) -> list[dict]:
        """Each fused graph against the reference on the backends present; `fused_cpu` None: the
        CPU form is the reference graph itself."""
        from .onnx_io import graph_skeleton
        from .validate import Side, candidate_optimization, compare

        a = self.args
        shapes = self.shapes_run
        pairs = []
        # the onnx reference evaluator (slow: Python) runs the small validation shapes only
        where = [f"onnx reference evaluator at {listed(self.validation_shapes)}"]
        where += [f"{b} at {listed(shapes)}" for b in backends if b.startswith("ort-") and not lacks_kernels(b, dtype)]
        where += [f"tensorrt at {listed(shapes)}"] if engines else []
        if any(b.startswith("ort-") for b in backends) and candidate_optimization(graph_skeleton(reference).graph) != "all":
            where += ["fused graphs on ONNX Runtime with its basic optimisations: its int8 kernels for Q/DQ pairs round "
                      "otherwise"]
        with self.stage("validate", f"validate fused vs reference ({'; '.join(where)}){self.with_dims}"):
            # The TensorRT-target graph, with normfuse ops evaluated by the normops references.
            pairs += compare(Side(reference, "onnx-reference", "reference"), Side(fused_trt, "onnx-reference", "fused-tensorrt"),
                             self.validation_shapes, dtype, seed=a.seed, dims=self.dims)
            on_the_evaluator = []  # the ONNX Runtime forms of a backend that cannot run them: checked there instead
            for backend in (b for b in backends if b.startswith("ort-")):
                try:
                    on_backend = [] if self.cannot_run(backend, dtype) else compare(
                        Side(reference, backend, "reference"), Side(fused, backend, "fused"), shapes, dtype,
                        seed=a.seed, dims=self.dims)
                    if on_backend and backend == "ort-cpu" and fused_cpu is not None:
                        on_backend += compare(Side(reference, backend, "reference"), Side(fused_cpu, backend, "fused-cpu"),
                                              shapes, dtype, seed=a.seed, dims=self.dims)
                except MissingKernel as exc:
                    # the model, not the rewrite: its graphs were checked on the evaluator above
                    self.missing_kernels[backend] = f"ONNX Runtime ({backend}) has no kernel for one of the model's " \
                                                    f"ops: {exc.kernel}"
                    on_backend = []
                reason = self.cannot_run(backend, dtype)
                if reason:
                    forms = [(fused, "fused")] + ([(fused_cpu, "fused-cpu")] if backend == "ort-cpu" and fused_cpu else [])
                    on_the_evaluator += [form for form in forms if form not in on_the_evaluator]
                    self.skipped.append({"stage": f"{backend} validation", "reason": (
                        f"{reason}; {' and '.join(p.name for p, _ in forms)} "
                        f"{'were' if len(forms) > 1 else 'was'} checked with the onnx reference evaluator instead")})
                pairs += on_backend
            for form, label in on_the_evaluator:
                pairs += compare(Side(reference, "onnx-reference", "reference"), Side(form, "onnx-reference", label),
                                 self.validation_shapes, dtype, seed=a.seed, dims=self.dims)
            if engines:
                # ORT runs the reference graph; TensorRT runs each engine on the same inputs.
                ref_backend = "ort-cuda" if "ort-cuda" in backends else "ort-cpu"
                if self.cannot_run(ref_backend, dtype):
                    ref_backend = "onnx-reference"
                for graph, info in engines.items():
                    pairs += compare(Side(reference, ref_backend, "reference"),
                                     Side(info["plan"], "tensorrt", f"{graph}-engine"), shapes, dtype, seed=a.seed,
                                     dims=self.dims)
        return pairs

    def cannot_run(self, backend: str, dtype: str) -> str | None:
        """Why ONNX Runtime's `backend` cannot run this model, or None: the CPU provider has no
        bfloat16 kernels, or validation found it without a kernel for one of the model's ops."""
        if lacks_kernels(backend, dtype):
            return "ONNX Runtime's CPU provider has no bfloat16 kernels (MatMul, Mul)"
        return self.missing_kernels.get(backend)

    def bench(self, reference, fused, fused_cpu, backends, dtype, rewrites: dict, engines=None) -> list[dict]:
        """Reference against fused per backend: on ort-cpu the CPU form (`fused_cpu`; None: there is
        none, the reference is timed alone), on ort-cuda the Skip-op form. `rewrites`: each ONNX
        Runtime backend's rewrite report (and "tensorrt"'s), whose fusions say which of the
        reference's nodes its fused graph replaced by norm ops: those count as the reference's norm
        time, so a residual Add the CPU form keeps counts as element-wise in both graphs."""
        from .bench import bench_graph
        from .run import bench_in_process_of_its_own

        a = self.args
        batch, seq = self.bench_shape
        results = []
        for backend in (b for b in backends if b.startswith("ort-")):
            if reason := self.cannot_run(backend, dtype):
                self.skipped.append({"stage": f"{backend} bench", "reason": reason})
                continue
            norm_nodes = [n for f in rewrites[backend].fusions for n in f.nodes_removed]
            with self.stage("bench", f"bench on {backend} at {batch}x{seq}{self.with_dims}, {a.runs} runs per graph"
                                     + (f", {a.pairs} pairs" if a.pairs > 1 else "")):
                if backend == "ort-cpu":
                    models = {"reference": (reference, norm_nodes), "fused": (fused_cpu, None)}
                    graphs = ("reference", "fused") if fused_cpu is not None else ("reference",)
                    results += self.in_pairs(lambda graph, first: bench_graph(
                        models[graph][0], graph, backend, batch, seq, a.runs, a.warmup, models[graph][1],
                        profile_runs=10 if first else 0, dims=self.dims), graphs)
                    if fused_cpu is None:
                        reason = ("nothing to compare: the model has no norm, so the fused graphs are copies of the "
                                  "reference" if has_no_norm(rewrites["tensorrt"]) else
                                  "nothing to compare: the model's norms are already the single ops the CPU form uses "
                                  "(LayerNormalization, SimplifiedLayerNormalization), so fused-cpu.onnx is the "
                                  "reference graph; the Skip ops of fused.onnx run slower than Add + norm there "
                                  "(bench/README.md)")
                        self.skipped.append({"stage": "ort-cpu fused bench", "reason": reason})
                    continue
                # CUDA: timed through I/O binding (inputs uploaded once, outputs left on the device), peak
                # GPU memory; the op classes come from a short profiled run of export.bench's worker.
                models = {"reference": (reference, norm_nodes), "fused": (fused, None)}

                def on_cuda(graph: str, first: bool) -> dict:
                    path, nodes = models[graph]
                    record = bench_in_process_of_its_own(path, graph, backend, batch, seq, a.runs, a.warmup, dims=self.dims)
                    if first:
                        record["op_classes"] = bench_graph(path, graph, backend, batch, seq, 1, 1, nodes,
                                                           dims=self.dims).get("op_classes")
                    return record

                results += self.in_pairs(on_cuda)
        if engines:
            with self.stage("bench", f"bench TensorRT engines at {batch}x{seq}{self.with_dims}, {a.runs} runs per engine"
                                     + (f", {a.pairs} pairs" if a.pairs > 1 else "")):
                results += self.in_pairs(lambda graph, first: bench_in_process_of_its_own(
                    engines[graph]["plan"], graph, "tensorrt", batch, seq, a.runs, a.warmup,
                    source=engines[graph]["source"], dims=self.dims))
        return results

    def in_pairs(self, measure, graphs=GRAPHS) -> list[dict]:
        """`bench.in_pairs` with --pairs, each pair's worker noting its own peak resident set for the
        stage's peak memory."""
        records = in_pairs(measure, self.args.pairs, graphs)
        self.worker_peaks_mb += [r["process_peak_rss_mb"] for record in records for r in record.get("pairs") or [record]
                                 if r.get("process_peak_rss_mb") is not None]
        return records

    def decode(self, reference, backends, dtype) -> list[dict]:
        """A KV-cache decoder served in a greedy decoding loop (export.decode), reference against the
        fused form each ONNX Runtime backend runs (`self.decoded`); nothing for any other model."""
        from .decode import decode, is_decoder, is_encoder_decoders_decoder

        a = self.args
        if a.decode_tokens and is_encoder_decoders_decoder(reference) and getattr(a, "folder", None):
            self.skipped.append({"stage": "greedy decoding", "reason": (
                f"an encoder-decoder's decoder reads its encoder's states: decoding it with the encoder of {a.folder} "
                "is the folder's stage (see the folder's report)")})
        elif a.decode_tokens and is_encoder_decoders_decoder(reference):
            self.skipped.append({"stage": "greedy decoding", "reason": (
                "an encoder-decoder's decoder reads its encoder's states: rewrite the encoder too and decode the pair "
                f"with python -m export.decode {reference.name} --encoder ENCODER.onnx --compare FUSED_DECODER.onnx "
                "--compare-encoder FUSED_ENCODER.onnx, or, for folders in Optimum's layout (export.rewrite rewrites "
                "a whole one), python -m export.decode FOLDER --compare FUSED_FOLDER")})
        if not a.decode_tokens or not is_decoder(reference):
            return []
        records = []
        for backend in (b for b in backends if b.startswith("ort-")):
            if reason := self.cannot_run(backend, dtype):
                self.skipped.append({"stage": f"{backend} greedy decoding", "reason": reason})
                continue
            candidate = self.decoded.get(backend)
            if candidate is None:
                self.skipped.append({"stage": "ort-cpu greedy decoding", "reason": (
                    "nothing to compare: the rewrite changed nothing in this decoder (it has no norm, or its norms "
                    "are the single ops they would become already)")})
                continue
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if backend == "ort-cuda" else ["CPUExecutionProvider"]
            try:
                with self.stage("decode", f"greedy decoding on {backend}: {a.decode_tokens} tokens, reference vs "
                                          f"{candidate.name}"):
                    # two timed rounds, each model going first once: drift falls on both
                    record = decode(reference, candidate, prompt=16, tokens=a.decode_tokens, seed=a.seed,
                                    providers=providers, rounds=2, dims=self.dims)
            except NormfuseError as exc:  # named like a decoder, but not one export.decode can drive
                self.skipped.append({"stage": f"{backend} greedy decoding", "reason": str(exc)})
                continue
            records.append({"backend": backend, **record, **skip_ops_on_the_cpu(backend, candidate)})
        return records

    def write_triton(self, reference, fused, engines, preset_name: str, norm: str, fused_passed: bool) -> list[str]:
        """The models built, as a Triton repository; the fused ones only where every validation and
        decoding passed (as the serving folder): an earlier run's entry of a fused model that now
        fails is removed, and the report says why."""
        from .triton_repo import not_batched_why, onnx_signature, write_repository

        a = self.args
        models = [(graph, f"{preset_name}_{norm}_{graph}_onnx", path)
                  for graph, path in (("reference", reference), ("fused", fused))]
        models += [(graph, f"{preset_name}_{norm}_{graph}_plan", info["plan"]) for graph, info in engines.items()]
        folders = []
        with self.stage("triton", f"write Triton model repository {a.triton_repo}"):
            for graph, name, path in models:
                if not fused_passed and graph != "reference":
                    why = "validation or decoding failed; only models that passed are put up to be served"
                    earlier = Path(a.triton_repo) / name
                    if earlier.is_dir():  # left there, it would stand for a model that no longer passes
                        shutil.rmtree(earlier)
                        why += f" (the earlier {name}/ was removed)"
                    self.console.print(f"    [yellow]{name} not written[/]: {why}")
                    self.skipped.append({"stage": f"Triton model {name}", "reason": why})
                    continue
                if path.suffix == ".plan":
                    batch = None  # the engine profile's maximum
                elif not (unbatched := not_batched_why(*onnx_signature(path))):
                    batch = max(a.batch, 8)
                else:  # a merged decoder's use_cache_branch [1], say: Triton cannot batch it
                    batch = 0
                    self.console.print(f"    {name}: Triton does not batch requests for it (max_batch_size 0): "
                                       f"{unbatched}")
                folders.append(str(write_repository(path, a.triton_repo, name=name, max_batch_size=batch)))
                if graph != "reference":
                    self.triton_fused.append(Path(folders[-1]))  # a folder's pair decoding may yet fail them
        return folders

    def note_gpu_stages(self, backends) -> None:
        gpu = gpu_present()
        if not gpu.present:
            self.skipped.append({"stage": "CUDA kernel tests and benchmark", "reason": gpu.reason})
        if "tensorrt" not in backends and not any("tensorrt" in s["stage"] for s in self.skipped):
            state = availability("tensorrt")
            self.skipped.append({"stage": "tensorrt build, validation and bench",
                                 "reason": state.reason or f"not requested (--backend {self.args.backend})"})
        if "ort-cuda" not in backends and not any("ort-cuda" in s["stage"] for s in self.skipped):
            state = availability("ort-cuda")
            self.skipped.append({"stage": "ort-cuda validation and bench",
                                 "reason": state.reason or f"not requested (--backend {self.args.backend})"})


SKIP_OPS_ON_THE_CPU = ("fused.onnx's Skip ops, decoded on the CPU because its CPU form is the reference itself: "
                      "this checks its tokens; the CPU would serve the reference (ONNX Runtime's CPU Skip kernels can "
                      "run slower than Add + norm, bench/README.md)")


def skip_ops_on_the_cpu(backend: str, *candidates: Path) -> dict:
    """The note a decoding record carries when the CPU decoded a Skip-op form (`Pipeline.decoded`)."""
    return {"note": SKIP_OPS_ON_THE_CPU} if backend == "ort-cpu" and any(c.name == "fused.onnx" for c in candidates) else {}


def environment() -> dict:
    from importlib import metadata

    import numpy
    import onnx

    from .backends import import_onnxruntime

    onnxruntime = import_onnxruntime()
    try:  # its version without importing it (1-2 s), which a run on a given model does not need
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None

    return {"python": platform.python_version(), "machine": platform.machine(), "torch": torch_version,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
            "ort_providers": ",".join(onnxruntime.get_available_providers())}


def main(argv=None) -> int:
    from rich.console import Console

    args = parse_args(argv)
    import sys

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)
    return run_cli(lambda: Pipeline(args, console).run())


if __name__ == "__main__":
    raise SystemExit(main())
