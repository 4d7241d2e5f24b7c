"""Latency, throughput, peak memory and op-class shares, reference vs fused (stage 4b).

    python -m export.bench reference.onnx fused.onnx [--backend ort-cpu] [--batch 1 --seq 128] [--runs 100]
    python -m export.bench t5/ fused/       # each model of a folder against the one of the same name

Each graph is measured in a fresh process (export.bench_worker), one after the other, so one
graph's allocations cannot hide in the other's and neither inherits a warm allocator. With
`--pairs N` that is done N times, the two taking turns to go first, so the machine's drift falls
on both; the latency figures are then those of all the pairs' runs together, the speed-up the
median of each pair's own ratio, the peak memory the median of the pairs'; each pair's figures are kept.
Memory is in MiB (the JSON's `_mb` keys too).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .cli import ERROR_PREFIX
from .errors import NormfuseError
from .files import require_file


def bench_graph(model: Path, graph: str, backend: str, batch: int, seq: int, runs: int, warmup: int,
                norm_nodes: list[str] | None = None, profile_runs: int = 10, dims: dict[str, int] | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = [str(model), "--backend", backend, "--batch", str(batch), "--seq", str(seq), "--runs", str(runs),
                "--warmup", str(warmup), "--profile-runs", str(profile_runs)]
        for name, size in (dims or {}).items():
            args += ["--dim", f"{name}={size}"]
        if norm_nodes:
            names = Path(tmp) / "norm_nodes.json"
            names.write_text(json.dumps(norm_nodes))
            args += ["--norm-nodes", str(names)]
        result = run_module("export.bench_worker", args, f"{model}: benchmark on {backend}")
    result.update(graph=graph, model=str(model), file_size_mb=round(model.stat().st_size / 2**20, 3),
                  nodes=node_count(model))
    return result


GRAPHS = ("reference", "fused")


def in_pairs(measure: Callable[[str, bool], dict], pairs: int, graphs: tuple[str, ...] = GRAPHS,
             kept_as: str = "pairs") -> list[dict]:
    """`measure(graph, first)` for each of `graphs`, `pairs` times, taking turns to go first
    (reference, fused; fused, reference; ...): one record per graph, its pairs combined
    (`combine_pairs`, each pair's own figures under `kept_as`). `first` is true in the first
    pair, the one to profile."""
    records: dict[str, list[dict]] = {graph: [] for graph in graphs}
    for pair in range(pairs):
        for graph in graphs if pair % 2 == 0 else graphs[::-1]:
            records[graph].append(measure(graph, pair == 0))
    return [combine_pairs(records[graph], kept_as) for graph in graphs]


PEAK_MEMORY_KEYS = ("peak_memory_mb", "peak_gpu_memory_mb")  # host (export.bench), device (bench/graphs.py)


def combine_pairs(records: list[dict], kept_as: str = "pairs") -> dict:
    """One graph's records from several pairs as one: the latency figures of all their runs
    together (every one a run's own time: a p99 is a run's, not an average of the pairs' p99s),
    the throughput at that p50, the median of the pairs' peak memory (noise across processes is
    MiBs, and the highest of several would read as a regression; unknown when a pair's is), every
    raw latency, the first pair's profile; each pair's own figures, less its profile and raw
    latencies, under `kept_as`. The speed-up is taken pair by pair (`speedup`). A failed pair (a record with an
    `error`) fails the whole, its records kept."""
    failed = [r for r in records if "error" in r]
    if failed:
        return {"error": failed[0]["error"], kept_as: records}
    if len(records) == 1:
        return records[0]
    import numpy as np

    from .run import latency_summary

    first = records[0]
    combined = dict(first)
    samples = [v for r in records for v in r.get("raw_latencies_ms", [])]
    if all(r.get("raw_latencies_ms") for r in records):
        combined["latency_ms"] = latency_summary(samples)
        combined["raw_latencies_ms"] = samples
    else:  # records without their samples (older results): the pairs' medians
        combined.pop("raw_latencies_ms", None)  # the first pair's alone would pass for all of them
        combined["latency_ms"] = {q: float(np.median([r["latency_ms"][q] for r in records]))
                                  for q in first["latency_ms"]
                                  if all(isinstance(r["latency_ms"].get(q), (int, float)) for r in records)}
    for key in ("throughput_tokens_per_s", "throughput_samples_per_s"):  # what one run processes, at the p50
        if first.get(key) is not None:
            per_run = first[key] * first["latency_ms"]["p50"] / 1000.0
            combined[key] = per_run / (combined["latency_ms"]["p50"] / 1000.0)
    for key in PEAK_MEMORY_KEYS:
        if key in combined:
            peaks = [r[key] for r in records if r.get(key) is not None]
            combined[key] = float(np.median(peaks)) if len(peaks) == len(records) else None
    combined[kept_as] = [{k: v for k, v in r.items() if k not in ("op_classes", "raw_latencies_ms")} for r in records]
    return combined


def pair_speedups(reference: dict, fused: dict, kept_as: str = "pairs") -> list[float]:
    """Reference p50 over fused p50 in each pair (one figure when measured once)."""
    refs, fuseds = (r.get(kept_as) or [r] for r in (reference, fused))
    return [r["latency_ms"]["p50"] / f["latency_ms"]["p50"] for r, f in zip(refs, fuseds)]


def speedup(reference: dict, fused: dict) -> float:
    """Fused over reference speed at the p50: the median of the pairs' own ratios (the paired
    estimate: drift between pairs cancels within each), or the one ratio."""
    import numpy as np

    return float(np.median(pair_speedups(reference, fused)))


def pair_spread(ratios: list[float]) -> str:
    """" (median of 3 pairs, 0.98x to 1.05x)", or nothing for one pair."""
    if len(ratios) < 2:
        return ""
    return f" (median of {len(ratios)} pairs, {min(ratios):.2f}x to {max(ratios):.2f}x)"


def one_pair_caveat(record: dict) -> str:
    """After a speed-up from one pair: that it holds the noise between processes (two of one graph
    can differ by tens of percent on a shared machine); nothing after several."""
    if len(record.get("pairs") or [record]) > 1:
        return ""
    return " (one process each, so it holds the noise between processes too; --pairs 5 gives the spread)"


def run_module(module: str, args: list[str], what: str) -> dict:
    """`python -m MODULE ARGS --json FILE` in a process of its own; the JSON it wrote. A failure is
    a NormfuseError: the child's own one-line error where it gave one (it names the file and the
    problem already), else `what failed: ` and the last line of its stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        done = subprocess.run([sys.executable, "-m", module, *args, "--json", str(out)], capture_output=True,
                              text=True, env=child_env())
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            if tail.startswith(ERROR_PREFIX):
                raise NormfuseError(tail.removeprefix(ERROR_PREFIX))
            raise NormfuseError(f"{what} failed: {tail}")
        return json.loads(out.read_text())


def child_env() -> dict[str, str]:
    """The environment for a child `python -m export.*`: this checkout first on PYTHONPATH, so the
    child imports the same code whether or not the project is installed. The child keeps the
    caller's working directory, so relative paths in its arguments mean what the user meant."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def node_count(model: Path) -> int:
    """Nodes of the model, those of its If/Loop/Scan bodies included (a merged decoder is one If)."""
    from .onnx_io import graph_skeleton
    from .rewrite.scopes import count_nodes

    return count_nodes(graph_skeleton(model).graph)


def require_counterparts(reference: Path, fused: Path) -> None:
    """A one-line error where `fused` cannot be the reference's fused form, so that their times
    would compare nothing: it must take the same inputs (names, element types, ranks, fixed sizes)
    and give outputs of the same names. (Whether they agree is export.validate's to say.)"""
    from .triton_repo import onnx_signature

    (reference_inputs, reference_outputs), (inputs, outputs) = onnx_signature(reference), onnx_signature(fused)

    def described(io) -> str:
        return f"{io.dtype}[{', '.join('?' if size is None else str(size) for size in io.shape)}]"

    theirs = {io.name: io for io in inputs}
    for io in reference_inputs:
        other = theirs.pop(io.name, None)
        if other is None:
            raise NormfuseError(f"{fused}: takes no input {io.name!r}, which the reference {reference} takes: "
                                "it is not that model's fused form")
        shapes_clash = io.rank_known and other.rank_known and (len(other.shape) != len(io.shape) or any(
            a is not None and b is not None and a != b for a, b in zip(io.shape, other.shape)))
        if other.dtype != io.dtype or shapes_clash:
            raise NormfuseError(f"{fused}: its input {io.name!r} is {described(other)}, the reference's "
                                f"{described(io)}: it is not that model's fused form")
    if theirs:
        raise NormfuseError(f"{fused}: takes an input {next(iter(theirs))!r} the reference {reference} does not: "
                            "it is not that model's fused form")
    missing = [io.name for io in reference_outputs if io.name not in {o.name for o in outputs}]
    if missing:
        raise NormfuseError(f"{fused}: gives no output {missing[0]!r}, which the reference {reference} gives: "
                            "it is not that model's fused form")


def main(argv=None) -> int:
    from .cli import DIM_HELP, Parser, dim_size, non_negative_int, output_file, positive_int, run_cli
    from .files import write_json

    parser = Parser(prog="python -m export.bench", description=__doc__.splitlines()[0])
    parser.add_argument("reference", help="the reference .onnx, or a folder of them (an Optimum export)")
    parser.add_argument("fused", help="the fused .onnx (onnxruntime target); a folder for a folder (the models of the "
                                      "same names, as export.rewrite writes them)")
    parser.add_argument("--backend", default="ort-cpu", choices=("ort-cpu", "ort-cuda"),
                        help="ONNX Runtime provider (default ort-cpu)")
    parser.add_argument("--batch", type=positive_int, default=1, help="batch size (default 1)")
    parser.add_argument("--seq", type=positive_int, default=128, help="sequence length (default 128)")
    parser.add_argument("--dim", type=dim_size, action="append", default=[], metavar="NAME=SIZE", help=DIM_HELP)
    parser.add_argument("--runs", type=positive_int, default=100, help="timed runs per graph (default 100)")
    parser.add_argument("--warmup", type=non_negative_int, default=10, help="untimed runs per graph first (default 10)")
    parser.add_argument("--pairs", type=positive_int, default=1,
                        help="measure both graphs this many times, taking turns to go first (default 1)")
    parser.add_argument("--json", type=output_file, help="write results as JSON")
    args = parser.parse_args(argv)

    def bench_pair(reference: Path, fused: Path, dims: list[tuple], prefix: str = "") -> list[dict]:
        paths = {"reference": reference, "fused": fused}
        results = in_pairs(lambda graph, first: bench_graph(paths[graph], graph, args.backend, args.batch, args.seq,
                                                            args.runs, args.warmup, profile_runs=10 if first else 0,
                                                            dims=dict(dims)), args.pairs)
        for r in results:
            print(f"{prefix}{r['graph']:9s} {r['backend']}: p50 {r['latency_ms']['p50']:.3f} ms  p99 "
                  f"{r['latency_ms']['p99']:.3f} ms  peak {r['peak_memory_mb']:.1f} MiB  nodes {r['nodes']}")
        print(f"{prefix}fused p50 is {speedup(*results):.2f}x the reference's speed{pair_spread(pair_speedups(*results))}"
              f"{one_pair_caveat(results[0])}")
        return results

    def job():
        reference, fused = Path(args.reference), Path(args.fused)
        if reference.is_dir():  # each model of a folder against the one of the same name in the other
            from .dims import sizes_per_model
            from .files import paired_models

            models = paired_models(reference, fused, "fused one")
            for model in models:  # every pair before any is timed
                require_counterparts(model, fused / model.name)
            shares = sizes_per_model(models, args.dim)
            results = {m.name: bench_pair(m, fused / m.name, shares[m], prefix=f"{m.name}: ") for m in models}
        else:
            for path in (reference, fused):
                require_file(path)
            require_counterparts(reference, fused)
            results = bench_pair(reference, fused, args.dim)
        if args.json:
            write_json(args.json, results)

    return run_cli(job)


if __name__ == "__main__":
    raise SystemExit(main())
