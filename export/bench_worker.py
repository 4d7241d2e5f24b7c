"""One graph's benchmark in a process of its own, so its memory is not mixed with another's.

    python -m export.bench_worker MODEL --backend ort-cpu --batch 1 --seq 128 --runs 100 --json out.json

Peak memory is the process's peak resident set (its high-water mark, reset just before the
session is created) minus its resident set at that moment: what the session and its runs took.
On ort-cuda it is the device memory in use after the runs minus before the session (the host's
resident set, mostly the CUDA libraries and alike for every graph, is kept as process_peak_rss_mb).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

from .memory import peak_rss_mb, reset_peak_rss, rss_mb


def measure(model: str, backend: str, batch: int, seq: int, warmup: int, runs: int, profile_runs: int,
            norm_nodes: set[str], dims: dict[str, int] | None = None) -> dict:
    from .backends import OrtRunner, import_onnxruntime, leading_dims, random_feeds, tokens_per_run
    from .errors import NormfuseError
    from .run import GPU_MEMORY_METHOD, gpu_memory_used_mb, time_runs

    import_onnxruntime()  # before the baseline: its code is not the session's memory

    feeds = random_feeds(model, batch, seq, seed=0, dims=dims)
    batch, seq = leading_dims(feeds)  # what was run: an axis the model fixes keeps its size
    # on the GPU the graphs' memory is the device's: the host's is mostly the CUDA libraries, alike for both
    gpu_baseline = gpu_memory_used_mb() if backend == "ort-cuda" else None
    peak_was_reset = reset_peak_rss()
    baseline = rss_mb()
    started = time.perf_counter()
    optimization = "all"  # what a user of ONNX Runtime gets by default, its own fusions included
    try:
        runner = OrtRunner(model, backend, optimization=optimization)
    except NormfuseError:  # ORT's own fusions can build an invalid node on some fp16 exports
        optimization = "none"
        runner = OrtRunner(model, backend, optimization=optimization)
    session_s = time.perf_counter() - started
    runner.bind(feeds)  # bound once (uploaded once on CUDA): the timed loop is the session's run alone
    timing = time_runs(runner.run_bound, runs, warmup, tokens_per_run(runner.model.inputs, feeds), batch)
    process_peak = peak_rss_mb()  # the worker's own whole resident set at its peak
    peak = process_peak - baseline
    method = "VmHWM after reset minus RSS before session" if peak_was_reset else "ru_maxrss minus RSS before session"
    if gpu_baseline is not None:
        used = gpu_memory_used_mb()
        if used is not None:
            peak, method = used - gpu_baseline, GPU_MEMORY_METHOD
    del runner  # the profiled sessions below load the model again: one session in memory at a time
    gc.collect()
    classes = profile_op_classes(model, backend, feeds, profile_runs, norm_nodes, optimization) if profile_runs else None
    return {
        "backend": backend,
        "ort_graph_optimization": optimization,
        "shape": [batch, seq],
        "input_shapes": {name: list(value.shape) for name, value in feeds.items()},
        **timing,
        "peak_memory_mb": round(peak, 2),
        "process_peak_rss_mb": round(process_peak, 1),
        "peak_memory_method": method,
        "session_create_s": round(session_s, 3),
        "op_classes": classes,
    }


def profile_op_classes(model: str, backend: str, feeds: dict, runs: int, norm_nodes: set[str],
                       optimization: str = "all") -> dict:
    """export.op_classes' summary of `runs` profiled runs, in a session of their own after two
    warm-up runs in a first session whose profile is thrown away, and after that session's own first
    run (its memory allocation), which the summary leaves out."""
    from .backends import OrtRunner
    from .op_classes import summarise_profile

    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "profile")
        warm = OrtRunner(model, backend, profile_prefix=prefix, optimization=optimization)
        for _ in range(2):
            warm.run(feeds)
        os.unlink(warm.end_profiling())  # warm-up runs are not counted
        del warm
        gc.collect()
        profiled = OrtRunner(model, backend, profile_prefix=prefix, optimization=optimization)
        for _ in range(1 + runs):
            profiled.run(feeds)
        return summarise_profile(profiled.end_profiling(), norm_nodes, runs, skip_runs=1)


def main(argv=None) -> int:
    from .cli import dim_size, run_cli
    from .files import write_json

    parser = argparse.ArgumentParser(prog="python -m export.bench_worker")
    parser.add_argument("model")
    parser.add_argument("--backend", default="ort-cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--profile-runs", type=int, default=10)
    parser.add_argument("--dim", type=dim_size, action="append", default=[])
    parser.add_argument("--norm-nodes", help="JSON list of node names counted as normalisation")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)

    def job() -> int:
        from .dims import hint_on_failure
        from .triton_repo import onnx_signature

        norm_nodes = set(json.loads(Path(args.norm_nodes).read_text())) if args.norm_nodes else set()
        with hint_on_failure(onnx_signature(args.model)[0]):  # its inputs are made up
            result = measure(args.model, args.backend, args.batch, args.seq, args.warmup, args.runs,
                             args.profile_runs, norm_nodes, dict(args.dim))
        write_json(args.json, result)
        return 0

    return run_cli(job)


if __name__ == "__main__":
    raise SystemExit(main())
