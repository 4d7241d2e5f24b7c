"""Latency, throughput, peak memory and op-class shares, reference vs fused (stage 4b).

    python -m export.bench reference.onnx fused.onnx [--backend ort-cpu] [--batch 1 --seq 128] [--runs 100]

Each graph is measured in a fresh process (export.bench_worker), one after the other, so one
graph's allocations cannot hide in the other's and neither inherits a warm allocator.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
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
    from .onnx_io import load_graph_only

    return len(load_graph_only(model).graph.node)


def main(argv=None) -> int:
    from .cli import DIM_HELP, Parser, dim_size, non_negative_int, output_file, positive_int, run_cli
    from .files import write_json

    parser = Parser(prog="python -m export.bench", description=__doc__.splitlines()[0])
    parser.add_argument("reference", help="the reference .onnx")
    parser.add_argument("fused", help="the fused .onnx (onnxruntime target)")
    parser.add_argument("--backend", default="ort-cpu", choices=("ort-cpu", "ort-cuda"),
                        help="ONNX Runtime provider (default ort-cpu)")
    parser.add_argument("--batch", type=positive_int, default=1, help="batch size (default 1)")
    parser.add_argument("--seq", type=positive_int, default=128, help="sequence length (default 128)")
    parser.add_argument("--dim", type=dim_size, action="append", default=[], metavar="NAME=SIZE", help=DIM_HELP)
    parser.add_argument("--runs", type=positive_int, default=100, help="timed runs per graph (default 100)")
    parser.add_argument("--warmup", type=non_negative_int, default=10, help="untimed runs per graph first (default 10)")
    parser.add_argument("--json", type=output_file, help="write results as JSON")
    args = parser.parse_args(argv)

    def job():
        for path in (args.reference, args.fused):
            require_file(path)
        results = [bench_graph(Path(p), g, args.backend, args.batch, args.seq, args.runs, args.warmup, dims=dict(args.dim))
                   for g, p in (("reference", args.reference), ("fused", args.fused))]
        for r in results:
            print(f"{r['graph']:9s} {r['backend']}: p50 {r['latency_ms']['p50']:.3f} ms  p99 {r['latency_ms']['p99']:.3f} ms"
                  f"  peak {r['peak_memory_mb']:.1f} MB  nodes {r['nodes']}")
        if args.json:
            write_json(args.json, results)

    return run_cli(job)


if __name__ == "__main__":
    raise SystemExit(main())
