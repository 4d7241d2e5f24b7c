"""Peak memory of the pipeline's commands on a model whose weights are large, against the weights' size.

    python bench/build_memory.py [--preset llama-7b] [--layers 2] [--dtype float32] [--runs 5] [--torchscript-layers 3]
                                 [--json bench/results/build-memory-cpu.json]

Exports the preset's stack (2 LLaMA-7B-shaped layers: 1.6 GB of fp32 weights in an external data
file), exports it and a larger one (3 layers, past 2 GiB) with TorchScript's exporter too, then runs,
each as the command line in a process of its own: `export.validate` on onnx's
reference evaluator (the TensorRT-target graph, as a machine without TensorRT checks it), on ONNX
Runtime's CPU provider, and the whole `export.build --onnx` (rewrite, validation, bench workers).
A command's peak is the largest resident set of it and its children (ru_maxrss of the process
tree, read by a parent of its own). Validating needs the memory of one model (the reference is let
go before the candidate loads), the evaluator reads the weights once, and a bench worker profiles
after its timed session is gone: so each peak should stay near the weights' size plus ONNX
Runtime's own working copy, not a multiple of it.
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.files import write_json  # noqa: E402

# runs a command and prints the largest resident set (KiB on Linux) of it and its descendants
PEAK_OF = ("import resource, subprocess, sys\n"
           "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)\n")


def peak_of(command: list[str], cwd: Path) -> dict:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PEAK_OF, *command], cwd=cwd, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), **_env()})
    kib, code = out.stdout.split()[-2:]
    return {"command": " ".join(command[2:]), "exit_code": int(code), "seconds": round(time.perf_counter() - started, 2),
            "peak_rss_mb": round(int(kib) / 1024, 1)}


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-7b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--torchscript-layers", type=int, default=3,
                        help="also export this many layers with TorchScript (3: 2.4 GB, past its 2 GiB protobuf limit)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "build-memory-cpu.json"))
    args = parser.parse_args(argv)
    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(f"exporting {args.preset} x{args.layers} ({args.dtype}) ...", flush=True)
        export = peak_of([python, "-m", "export.export_model", "--norm", "rmsnorm", "--preset", args.preset,
                          "--layers", str(args.layers), "--dtype", args.dtype, "-o", "ref.onnx"], folder)
        weights_mb = sum(p.stat().st_size for p in folder.glob("ref.onnx*")) / 2**20
        for target, name in (("tensorrt", "fused-tensorrt.onnx"), ("onnxruntime", "fused-cpu.onnx")):
            subprocess.run([python, "-m", "export.rewrite", "ref.onnx", "-o", name, "--target", target]
                           + (["--no-residual"] if target == "onnxruntime" else []),
                           cwd=folder, check=True, capture_output=True, env={"PYTHONPATH": str(ROOT), **_env()})
        rows = {"export": export}
        # TorchScript's exporter: one protobuf up to 2 GiB, past it a file per weight (gathered into one)
        for layers in dict.fromkeys([args.layers, args.torchscript_layers]):
            label = f"export --exporter torchscript ({layers} layers)"
            print(f"{label} ...", flush=True)
            rows[label] = peak_of([python, "-m", "export.export_model", "--norm", "rmsnorm", "--preset", args.preset,
                                   "--layers", str(layers), "--dtype", args.dtype, "--exporter", "torchscript",
                                   "-o", f"ts-{layers}.onnx"], folder)
            rows[label]["weights_mb"] = round(sum(p.stat().st_size for p in folder.glob(f"ts-{layers}.onnx*")) / 2**20, 1)
            for written in folder.glob(f"ts-{layers}.onnx*"):
                written.unlink()
        for label, command in (
                ("validate on onnx's reference evaluator", ["export.validate", "ref.onnx", "fused-tensorrt.onnx",
                                                            "--backend", "onnx-reference", "--shapes", "1x16"]),
                ("validate on ort-cpu", ["export.validate", "ref.onnx", "fused-cpu.onnx", "--backend", "ort-cpu",
                                         "--shapes", "1x16,1x32"]),
                ("build --onnx", ["export.build", "--onnx", "ref.onnx", "--out", "out", "--seq", "32",
                                  "--runs", str(args.runs), "--warmup", "1"])):
            print(f"{label} ...", flush=True)
            rows[label] = peak_of([python, "-m", *command], folder)
    for row in rows.values():
        row["peak_over_weights"] = round(row["peak_rss_mb"] / row.get("weights_mb", weights_mb), 2)
    import onnxruntime

    record = {"machine": platform.processor() or platform.machine(), "cpus": __import__("os").cpu_count(),
              "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
              "onnx": __import__("onnx").__version__, "model": f"{args.preset} rmsnorm stack, {args.layers} layers, {args.dtype}",
              "weights_mb": round(weights_mb, 1), "commands": rows}
    write_json(args.json, record)
    width = max(map(len, rows))
    print(f"weights: {weights_mb:.0f} MB")
    for label, row in rows.items():
        print(f"{label:<{width}}  peak {row['peak_rss_mb']:>8.0f} MB  ({row['peak_over_weights']:.2f}x the weights)"
              f"  {row['seconds']:>6.1f} s  exit {row['exit_code']}")
    print(f"wrote {args.json}")
    return 0 if all(row["exit_code"] == 0 for row in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
