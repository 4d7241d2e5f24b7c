"""Which form of "residual Add + norm" runs fastest on an ONNX Runtime provider.

    python bench/ort_ops.py [--provider cpu|cuda] [--tokens 1 128 2048] [--hidden 768 4096]
                            [--dtypes float32 float16] [--runs 100] [--out bench/results]

Per norm (LayerNorm, RMSNorm), dtype and tokens x hidden, three graphs compute the same
`s = x + r; y = norm(s)` with both y and s as outputs (the sum is the next residual):
- `exported`: the norm written out as an exporter does (ReduceMean, Pow, Sqrt, Div, ...; RMSNorm
  with LLaMA's fp32 casts), left to ONNX Runtime's own graph optimiser;
- `norm op`: normfuse's `onnxruntime` target with `--no-residual` (the Add stays, the norm becomes
  LayerNormalization / SimplifiedLayerNormalization);
- `skip op`: normfuse's `onnxruntime` target (Skip[Simplified]LayerNormalization, the Add inside).
The last two are written by the rewriter itself from the first, so this times what it emits.
Sessions as export.bench makes them (all graph optimisations); on CUDA through I/O binding, so no
copy is timed. The three run in alternation, one run of each per round in rotating order, so
drift falls on all alike. Writes `<device>-ort-<provider>-ops.{json,md,png}` with every raw time.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FORMS = ("exported", "norm op", "skip op")
ONNX_TYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
EPSILON = 1e-5


def exported_graph(norm: str, dtype: str, hidden: int) -> onnx.ModelProto:
    """s = x + r; y = norm(s), decomposed. RMSNorm widens to fp32 for its statistics and casts back
    (as Hugging Face's LLaMA does); LayerNorm computes in the input dtype (as F.layer_norm's
    decomposition by TorchScript does)."""
    from normops import numpy_dtype

    np_dtype = numpy_dtype(dtype)
    t = ONNX_TYPE[dtype]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((1 + 0.1 * rng.standard_normal(hidden)).astype(np_dtype), "gamma"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes")]
    n = helper.make_node
    nodes = [n("Add", ["x", "r"], ["s"])]
    if norm == "rmsnorm":
        inits += [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
                  numpy_helper.from_array(np.array(EPSILON, np.float32), "eps")]
        nodes += [n("Cast", ["s"], ["s32"], to=TensorProto.FLOAT), n("Pow", ["s32", "two"], ["sq"]),
                  n("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1), n("Add", ["ms", "eps"], ["mse"]),
                  n("Sqrt", ["mse"], ["rms"]), n("Reciprocal", ["rms"], ["inv"]), n("Mul", ["s32", "inv"], ["n32"]),
                  n("Cast", ["n32"], ["n"], to=t), n("Mul", ["gamma", "n"], ["y"])]
    else:
        inits += [numpy_helper.from_array((0.1 * rng.standard_normal(hidden)).astype(np_dtype), "beta"),
                  numpy_helper.from_array(np.array(2.0, np_dtype), "two"),
                  numpy_helper.from_array(np.array(EPSILON, np_dtype), "eps")]
        nodes += [n("ReduceMean", ["s", "axes"], ["mean"], keepdims=1), n("Sub", ["s", "mean"], ["d"]),
                  n("Pow", ["d", "two"], ["d2"]), n("ReduceMean", ["d2", "axes"], ["var"], keepdims=1),
                  n("Add", ["var", "eps"], ["vare"]), n("Sqrt", ["vare"], ["std"]), n("Div", ["d", "std"], ["nrm"]),
                  n("Mul", ["nrm", "gamma"], ["g"]), n("Add", ["g", "beta"], ["y"])]
    io = [helper.make_tensor_value_info(name, t, ["tokens", hidden]) for name in ("x", "r", "y", "s")]
    graph = helper.make_graph(nodes, f"add_{norm}", io[:2], io[2:], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def write_forms(norm: str, dtype: str, hidden: int, directory: Path) -> dict[str, Path]:
    """The three graphs of one cell, the last two written by normfuse's rewriter."""
    from export.rewrite import rewrite_model

    model = exported_graph(norm, dtype, hidden)
    paths = {}
    for form, fused in (("exported", None), ("norm op", False), ("skip op", True)):
        if fused is not None:
            out, report = rewrite_model(model, target="onnxruntime", residual=fused)
            want = 1 if fused else 0
            if report.fused != 1 or sum(f.residual for f in report.fusions) != want:
                raise SystemExit(f"{norm} {dtype} {hidden}: the rewriter fused {report.fused} norm(s), "
                                 f"{sum(f.residual for f in report.fusions)} with the Add; expected 1 and {want}")
        else:
            out = model
        paths[form] = directory / f"{norm}-{dtype}-{hidden}-{form.replace(' ', '_')}.onnx"
        onnx.save(out, str(paths[form]))
    return paths


def time_cell(paths: dict[str, Path], backend: str, dtype: str, tokens: int, hidden: int, runs: int,
              warmup: int) -> dict[str, list[float]]:
    from export.backends import OrtRunner
    from normops import numpy_dtype

    rng = np.random.default_rng(1)
    feeds = {name: rng.standard_normal((tokens, hidden)).astype(numpy_dtype(dtype)) for name in ("x", "r")}
    runners = {form: OrtRunner(path, backend) for form, path in paths.items()}
    for runner in runners.values():
        runner.bind(feeds)
        for _ in range(warmup):
            runner.run_bound()
    times: dict[str, list[float]] = {form: [] for form in runners}
    order = list(runners)
    for i in range(runs):
        for form in order[i % len(order):] + order[:i % len(order)]:
            started = time.perf_counter()
            runners[form].run_bound()
            times[form].append((time.perf_counter() - started) * 1e6)
    return times


def device_name(provider: str) -> str:
    if provider == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(text: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in text.lower()).split())[:40]


def markdown(result: dict) -> str:
    lines = [f"ONNX Runtime {result['onnxruntime']} {result['provider']} provider, {result['device']} "
             f"({result['threads']} threads); median us of {result['runs']} alternated runs (in brackets: time relative to `exported`, below 1 is faster)",
             "", "| norm | dtype | tokens x hidden | exported | norm op | skip op | skip op / norm op |",
             "|---|---|---|---|---|---|---|"]
    for cell in result["cells"]:
        med = cell["median_us"]
        ratios = " | ".join(f"{med[f]:.1f} ({med[f] / med['exported']:.2f}x)" for f in FORMS)
        lines.append(f"| {cell['norm']} | {cell['dtype']} | {cell['tokens']}x{cell['hidden']} | {ratios} | "
                     f"{med['skip op'] / med['norm op']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Time of the two fused forms relative to the exported one, per cell (log scale: 1 is par)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from export.files import atomic_path

    cells = result["cells"]
    short = {"layernorm": "LN", "rmsnorm": "RMS"}
    labels = [f"{short[c['norm']]} {c['dtype'].replace('float', 'fp')} {c['tokens']}x{c['hidden']}" for c in cells]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.55 * len(cells)), 4.5))
    for offset, form in ((-0.2, "norm op"), (0.2, "skip op")):
        ratios = [c["median_us"][form] / c["median_us"]["exported"] for c in cells]
        ax.bar([i + offset for i in range(len(cells))], ratios, width=0.4, label=form)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
    ax.set_xticks(range(len(cells)), labels, fontsize=7, rotation=60, ha="right")
    ax.set_ylabel("time relative to the exported form")
    ax.set_title(f"Add + norm on ONNX Runtime {result['onnxruntime']} ({result['provider']}, {result['device']})")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--norms", nargs="+", default=["layernorm", "rmsnorm"], choices=("layernorm", "rmsnorm"))
    parser.add_argument("--dtypes", nargs="+", default=None, choices=tuple(ONNX_TYPE),
                        help="default: float32 float16 (and bfloat16 on cuda; the CPU provider has no bf16 kernels)")
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 128, 2048])
    parser.add_argument("--hidden", nargs="+", type=int, default=[768, 4096])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)

    from export.backends import availability, import_onnxruntime
    from export.files import write_json, write_text

    ort = import_onnxruntime()
    dtypes = args.dtypes or (["float32", "float16"] + (["bfloat16"] if args.provider == "cuda" else []))
    backend = f"ort-{args.provider}"
    available = availability(backend)
    if not available.present:
        parser.exit(1, f"error: --provider {args.provider}: {available.reason}\n")
    device = device_name(args.provider)
    result = {"provider": args.provider, "device": device, "onnxruntime": ort.__version__,
              "python": platform.python_version(), "threads": len(os.sched_getaffinity(0)),
              "runs": args.runs, "warmup": args.warmup, "forms": list(FORMS), "cells": []}
    cells = [(n, d, t, h) for n in args.norms for d in dtypes for h in args.hidden for t in args.tokens]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (norm, dtype, tokens, hidden) in enumerate(cells, 1):
            paths = write_forms(norm, dtype, hidden, Path(tmp))
            times = time_cell(paths, backend, dtype, tokens, hidden, args.runs, args.warmup)
            median = {form: statistics.median(v) for form, v in times.items()}
            result["cells"].append({"norm": norm, "dtype": dtype, "tokens": tokens, "hidden": hidden,
                                    "median_us": median, "raw_us": {f: [round(x, 2) for x in v] for f, v in times.items()}})
            print(f"[{i}/{len(cells)}] {norm} {dtype} {tokens}x{hidden}: "
                  + ", ".join(f"{f} {m:.1f} us" for f, m in median.items()), flush=True)
    stem = Path(args.out) / f"{slug(device)}-ort-{args.provider}-ops"
    write_json(stem.with_suffix(".json"), result)
    table = markdown(result)
    write_text(stem.with_suffix(".md"), table)
    plot(result, stem.with_suffix(".png"))
    print(table)
    print(f"wrote {stem}.json, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
