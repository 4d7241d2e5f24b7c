"""One graph's benchmark in a process of its own, so its memory is not mixed with another's.

    python -m export.bench_worker MODEL --backend ort-cpu --batch 1 --seq 128 --runs 100 --json out.json

Peak memory is the process's peak resident set (its high-water mark, reset just before the
session is created) minus its resident set at that moment: what the session and its runs took.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark to the current RSS (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(model: str, backend: str, batch: int, seq: int, warmup: int, runs: int, profile_runs: int,
            norm_nodes: set[str]) -> dict:
    from .backends import OrtRunner, random_feeds
    from .errors import NormfuseError
    from .op_classes import summarise_profile

    import onnxruntime  # noqa: F401  (imported before the baseline: its code is not the session's memory)

    feeds = random_feeds(model, batch, seq, seed=0)
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
    for _ in range(warmup):
        runner.run(feeds)
    latencies = []
    for _ in range(runs):
        t0 = time.perf_counter()
        runner.run(feeds)
        latencies.append((time.perf_counter() - t0) * 1000.0)
    peak = peak_rss_mb() - baseline
    classes = None
    if profile_runs:
        with tempfile.TemporaryDirectory() as tmp:
            profiled = OrtRunner(model, backend, profile_prefix=os.path.join(tmp, "profile"), optimization=optimization)
            for _ in range(2):
                profiled.run(feeds)
            path = profiled.end_profiling()
            os.unlink(path)  # warm-up runs are not counted
            profiled = OrtRunner(model, backend, profile_prefix=os.path.join(tmp, "profile"), optimization=optimization)
            for _ in range(profile_runs):
                profiled.run(feeds)
            classes = summarise_profile(profiled.end_profiling(), norm_nodes, profile_runs)
    lat = np.asarray(latencies)
    tokens = batch * seq
    return {
        "backend": backend,
        "ort_graph_optimization": optimization,
        "shape": [batch, seq],
        "runs": runs,
        "warmup": warmup,
        "latency_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                       "mean": float(lat.mean()), "min": float(lat.min())},
        "throughput_tokens_per_s": tokens / (float(np.percentile(lat, 50)) / 1000.0),
        "peak_memory_mb": round(peak, 2),
        "peak_memory_method": "VmHWM after reset minus RSS before session" if peak_was_reset else "ru_maxrss minus RSS before session",
        "session_create_s": round(session_s, 3),
        "raw_latencies_ms": [round(v, 4) for v in latencies],
        "op_classes": classes,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.bench_worker")
    parser.add_argument("model")
    parser.add_argument("--backend", default="ort-cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--profile-runs", type=int, default=10)
    parser.add_argument("--norm-nodes", help="JSON list of node names counted as normalisation")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    norm_nodes = set(json.load(open(args.norm_nodes))) if args.norm_nodes else set()
    result = measure(args.model, args.backend, args.batch, args.seq, args.warmup, args.runs, args.profile_runs,
                     norm_nodes)
    with open(args.json, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
