"""Graph-level GPU benchmark: the reference graph against the fused one, on every GPU backend present.

    python bench/graphs.py --out bench/results                     # the full grid (an hour or so on an H100)
    python bench/graphs.py --quick --out /tmp/graphs               # 1 layer, fp16, decode and 1x512
    python bench/graphs.py --models tiny-llama --dtypes float16 --shapes 1x1,1x16 --backends ort-cpu --runs 5
                                                                   # a smoke test of the script on a CPU

Grid: LLaMA-7B-like (RMSNorm, SwiGLU) and GPT-2-XL-like (LayerNorm) stacks of 1 and 4 layers,
fp16 and bf16, decode (1x1) and prefill (1x512, 8x2048). Backends: ONNX Runtime's CUDA provider
(I/O binding: inputs uploaded once, outputs left on the device) running `reference.onnx` and
the onnxruntime-target `fused.onnx` (on the CPU provider, a smoke test, `fused-cpu.onnx`: the same
target with the residual Adds left alone, see bench/README.md); TensorRT running `reference.plan` (its own handling of
the unfused norms) and `fused.plan` (our plugins). One engine per stack, with a profile
covering every shape of the grid (opt at 1x512).

Per cell, each graph in a process of its own (this script with --worker): latency p50/p99 of
--runs timed runs after --warmup, throughput in tokens/s at p50, peak GPU memory (the larger of the
device memory in use after the model's first run and after the timed runs, minus before the model
was loaded), and per op class (matmul, norm,
elementwise) the share of FLOPs (counted on the reference graph with shapes inferred for the
cell; the fused graph does the same arithmetic) against the share of runtime (ONNX Runtime's
profiler, whose CUDA node times are host-side and include launches; TensorRT's layer profiler,
where a Myelin region that mixes classes is counted as `mixed`).

Sub-millisecond cells are noisy from process to process, so a cell can be measured as pairs
(--repeats, and --decode-repeats for cells of at most DECODE_TOKENS tokens): each pair runs the
reference and the fused graph in fresh processes, alternating which goes first; the cell's speed-up
is the median of the pairs' p50 ratios, and every pair's figures are kept.

Writes <out>/<gpu>-graphs.json (every cell, raw latencies, the fused/reference comparison per
cell and whether the fused graph was ever slower) and <out>/<gpu>-graphs.png.
The working files (ONNX, engines) go to --work (default build/graphs), reused when present.

A grid too long for one sitting runs in parts, each with its own --name, merged afterwards:

    python bench/graphs.py --models llama-7b --layers 1 --name h100-llama-L1 --out /tmp/parts
    python bench/graphs.py --merge /tmp/parts/*-graphs.json --name h100 --out bench/results
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from export.bench import in_pairs, pair_speedups  # noqa: E402

MODELS = {  # name -> (preset, norm)
    "llama-7b": ("llama-7b", "rmsnorm"),
    "gpt2-xl": ("gpt2-xl", "layernorm"),
    "tiny-llama": ("tiny", "rmsnorm"),
    "tiny-gpt": ("tiny", "layernorm"),
}
DEFAULT_MODELS = ("llama-7b", "gpt2-xl")
DEFAULT_LAYERS = (1, 4)
DEFAULT_DTYPES = ("float16", "bfloat16")
DEFAULT_SHAPES = ((1, 1), (1, 512), (8, 2048))
GPU_BACKENDS = ("ort-cuda", "tensorrt")
NOT_SLOWER_MARGIN = 0.02  # p50 within 2% counts as "not slower" (run-to-run noise on a quiet GPU)
DECODE_TOKENS = 32  # cells of at most this many tokens take --decode-repeats pairs


# ----------------------------------------------------------------------------------------------
# FLOPs per op class, from the reference graph with the cell's shapes inferred


def graph_flops(model_path: Path, batch: int, seq: int, norm_nodes: set[str]) -> dict:
    """FLOPs per class of one run at batch x seq (export.op_classes' counting rules)."""
    import onnx

    from export.onnx_io import load_graph_only
    from export.op_classes import CLASSES, classify, node_flops

    model = load_graph_only(model_path)
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if not dim.HasField("dim_value") and axis in (0, 1):
                dim.dim_value = batch if axis == 0 else seq
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, list[int]] = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    for tensor in inferred.graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    totals = {c: 0.0 for c in CLASSES}
    unknown = 0
    for node in inferred.graph.node:
        outs = [shapes.get(o) for o in node.output if o]
        if not outs or outs[0] is None:
            unknown += 1
            continue
        ins = [shapes.get(i) or [] for i in node.input if i]
        totals[classify(node.op_type, node.name, norm_nodes)] += node_flops(node.op_type, ins, [o or [] for o in outs])
    total = sum(totals.values()) or 1.0
    return {"flops": totals, "flop_share": {c: v / total for c, v in totals.items()}, "nodes_without_shape": unknown}


# ----------------------------------------------------------------------------------------------
# The worker: one graph, one backend, one shape, in a process of its own


def classify_trt_layer(name: str, norm_nodes: set[str]) -> str:
    """A TensorRT layer's class from its name (ONNX node names, joined with ' + ' when fused)."""
    from normops import OPS

    if name.startswith("{ForeignNode[") or "myelin" in name.lower():
        return "mixed"
    parts = [p.strip() for p in name.split(" + ")]
    if any(op in name for op in OPS) or (parts and all(p in norm_nodes for p in parts)):
        return "norm"
    if any(key in name for key in ("MatMul", "Gemm", "matmul", "gemm")):
        return "matmul"
    return "elementwise"


def trt_layer_times(model, feeds: dict, runs: int, norm_nodes: set[str]) -> dict:
    """Per-class time per run from TensorRT's layer profiler (no CUDA graph while profiling).

    IProfiler.report_layer_time(layer_name, ms), subclassed with IProfiler.__init__ called, and
    IExecutionContext.profiler are the same in TensorRT 10.9, 10.13 and 11.x; with the default
    enqueue_emits_profile=True each execute_async_v3 reports its layers before it returns."""
    import tensorrt as trt

    class LayerTimes(trt.IProfiler):
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)
            self.ms: dict[str, float] = {}

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            self.ms[layer_name] = self.ms.get(layer_name, 0.0) + ms

    model.bind(feeds)
    # One unprofiled run first: TensorRT defers work to the first enqueue after a shape is set, and
    # the model may be freshly loaded (the --cuda-graph case), so it would land in the first report.
    model.execute()
    model.stream.synchronize()
    profiler = LayerTimes()
    model.context.profiler = profiler
    for _ in range(runs):
        model.execute()  # on the model's device and stream, its False an error (never a CUDA graph replay)
        model.stream.synchronize()
    if not profiler.ms:
        raise RuntimeError(f"{model.path}: TensorRT reported no layer times to the profiler")
    return layer_classes(profiler.ms, runs, norm_nodes)


def layer_classes(layer_ms: dict[str, float], runs: int, norm_nodes: set[str]) -> dict:
    """Per-class time per run and share, from summed per-layer milliseconds over `runs` runs."""
    totals: dict[str, dict] = {}
    for layer, ms in layer_ms.items():
        entry = totals.setdefault(classify_trt_layer(layer, norm_nodes), {"time_ms": 0.0, "kernels": 0})
        entry["time_ms"] += ms / runs
        entry["kernels"] += 1
    total = sum(e["time_ms"] for e in totals.values()) or 1.0
    for entry in totals.values():
        entry["time_share"] = entry["time_ms"] / total
    return totals


def ort_profile(model_path: Path, backend: str, feeds: dict, runs: int, norm_nodes: set[str]) -> dict:
    from export.bench_worker import profile_op_classes

    classes = profile_op_classes(str(model_path), backend, feeds, runs, norm_nodes)
    return {c: {k: v[k] for k in ("time_ms", "time_share", "kernels")} for c, v in classes.items()}


def worker(args) -> int:
    from export.backends import random_arrays
    from export.run import bench, gpu_memory_used_mb
    from export.runtime import load
    from export.validate import parse_shapes

    model_path = Path(args.worker)
    ((batch, seq),) = parse_shapes(args.shape)
    norm_nodes = set(json.loads(Path(args.norm_nodes).read_text())) if args.norm_nodes else set()
    providers = {"ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                 "ort-cpu": ["CPUExecutionProvider"]}.get(args.backend)
    memory = [gpu_memory_used_mb()]
    if memory[0] is not None:
        import torch

        torch.cuda.init()
        torch.zeros(1, device="cuda")  # the CUDA context is not the model's memory
        memory = [gpu_memory_used_mb()]
    model = load(model_path, providers=providers, cuda_graph=args.cuda_graph)
    feeds = random_arrays(model.inputs, batch, seq, seed=0)
    model.run(feeds)
    memory.append(gpu_memory_used_mb())
    timing = bench(model, feeds, args.runs, args.warmup)
    memory.append(gpu_memory_used_mb())
    result = {"shape": [batch, seq], **timing}
    if memory[0] is not None:
        result["peak_gpu_memory_mb"] = round(max(m for m in memory[1:] if m is not None) - memory[0], 2)
    else:
        result["peak_gpu_memory_mb"] = None
    if args.profile_runs:
        if args.backend == "tensorrt":
            plain = load(model_path) if args.cuda_graph else model
            result["op_classes"] = trt_layer_times(plain, feeds, args.profile_runs, norm_nodes)
        else:
            result["op_classes"] = ort_profile(model_path, args.backend, feeds, args.profile_runs, norm_nodes)
    from export.files import write_json

    write_json(args.json, result)
    return 0


# ----------------------------------------------------------------------------------------------
# The driver


def present_backends(requested: list[str] | None) -> tuple[list[str], list[dict]]:
    from export.backends import availability

    chosen, skipped = [], []
    for backend in requested or GPU_BACKENDS:
        state = availability(backend)
        if state.present:
            chosen.append(backend)
        else:
            skipped.append({"backend": backend, "reason": state.reason})
    return chosen, skipped


def prepare(model_name: str, layers: int, dtype: str, work: Path, backends: list[str], shapes, args) -> dict:
    """Export, rewrite and (for TensorRT) build engines for one stack; reused when present."""
    from export.export_model import export_model
    from export.rewrite import rewrite_file
    from models import preset

    preset_name, norm = MODELS[model_name]
    folder = work / f"{model_name}-L{layers}-{dtype}"
    reference = folder / "reference.onnx"
    if not reference.is_file():
        export_model(preset(preset_name, norm, layers=layers, dtype=dtype), reference, seed=0)
    fused, fused_trt = folder / "fused.onnx", folder / "fused-tensorrt.onnx"
    report = rewrite_file(reference, fused_trt, target="tensorrt")
    rewrite_file(reference, fused, target="onnxruntime")
    norm_nodes = sorted(n for f in report.fusions for n in f.nodes_removed)
    stack: dict[str, Any] = {"folder": folder, "onnx": {"reference": reference, "fused": fused}, "plans": {}, "norm_nodes": norm_nodes,
             "fused_norms": report.fused, "rewrite_counts": report.counts, "engines": {}}
    if "ort-cpu" in backends:  # ONNX Runtime's CPU provider runs Add + norm faster than its Skip ops (bench/ort_ops.py)
        fused_cpu = folder / "fused-cpu.onnx"
        stack["onnx_cpu"] = {"reference": reference, "fused": fused_cpu}
        stack["fused_norms_cpu"] = rewrite_file(reference, fused_cpu, target="onnxruntime", residual=False).fused
    if "tensorrt" in backends:
        import tensorrt

        from export.tensorrt_engine import EngineOptions, Range, build_engine, gpu_info, read_sidecar, sha256

        batches, seqs = [b for b, _ in shapes], [s for _, s in shapes]
        opt_batch, opt_seq = (1, 512) if (1, 512) in shapes else shapes[len(shapes) // 2]
        options = EngineOptions(batch=Range(min(batches), opt_batch, max(batches)),
                                seq=Range(min(seqs), opt_seq, max(seqs)), workspace_mb=args.workspace_mb,
                                timing_cache=work / "timing.cache")
        here = {"tensorrt_version": str(tensorrt.__version__), "compute_capability": gpu_info().get("compute_capability"),
                "batch_range": str(options.batch), "seq_range": str(options.seq), "precision": options.precision}
        for graph, source in (("reference", reference), ("fused", fused_trt)):
            plan = folder / f"{graph}.plan"
            sidecar = read_sidecar(plan) if plan.is_file() else None
            stale = stale_engine_reasons(sidecar, {**here, "onnx_sha256": sha256(source)})
            if sidecar is None or stale:
                print(f"  building {plan} ({'; '.join(stale)}) ...", flush=True)
                sidecar = build_engine(source, plan, options)
            stack["plans"][graph] = plan
            stack["engines"][graph] = {k: sidecar[k] for k in ("tensorrt_version", "build_seconds", "plan_bytes",
                                                               "plugins", "precision")}
    return stack


def stale_engine_reasons(sidecar: dict | None, wanted: dict) -> list[str]:
    """Why a `.plan` left by an earlier run cannot be reused (empty: reuse it). Besides the source
    graph and the profile, the TensorRT version and the GPU: a plan deserialises only in the
    TensorRT that built it (a 10.9 or 10.13 plan does not load in 11.x) on the same architecture,
    so a work folder kept across a TensorRT upgrade must be rebuilt, not fail cell by cell."""
    if sidecar is None:
        return ["no engine yet"]
    from export.tensorrt_engine import engine_mismatches

    reasons = ["the source graph changed"] if sidecar.get("onnx_sha256") != wanted.get("onnx_sha256") else []
    reasons += [f"{key} {sidecar.get(key)} -> {wanted[key]}" for key in ("batch_range", "seq_range", "precision")
                if key in wanted and sidecar.get(key) != wanted[key]]
    return reasons + engine_mismatches(sidecar, wanted.get("tensorrt_version") or "",
                                       wanted.get("compute_capability"))


def run_worker(model: Path, backend: str, batch: int, seq: int, norm_nodes: list[str], args, profile: bool = True) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        names = Path(tmp) / "norm_nodes.json"
        names.write_text(json.dumps(norm_nodes))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(model), "--backend", backend,
               "--shape", f"{batch}x{seq}", "--runs", str(args.runs), "--warmup", str(args.warmup),
               "--profile-runs", str(args.profile_runs if profile else 0), "--norm-nodes", str(names), "--json", str(out)]
        if args.cuda_graph and backend == "tensorrt":
            cmd.append("--cuda-graph")
        started = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.cell_timeout)
        except subprocess.TimeoutExpired:  # one cell, not the whole grid
            return {"error": f"timed out after {args.cell_timeout} s (--cell-timeout)"}
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-3:]
            return {"error": " | ".join(tail)}
        result = json.loads(out.read_text())
    result["wall_s"] = round(time.perf_counter() - started, 2)
    return result


def compare_cells(cells: list[dict]) -> list[dict]:
    """Fused vs reference per (model, layers, dtype, shape, backend): p50 speed-up, and the verdict."""
    index: dict[tuple, dict] = {}
    for cell in cells:
        key = (cell["model"], cell["layers"], cell["dtype"], tuple(cell["shape"]), cell["backend"])
        index.setdefault(key, {})[cell["graph"]] = cell
    out = []
    for key, graphs in index.items():
        ref, fused = graphs.get("reference"), graphs.get("fused")
        if ref and fused and fused.get("fused_norms") == 0:  # the two graphs are one: no comparison
            fused = {**fused, "error": "the rewriter fused no norm in this stack for this backend: both graphs are the same"}
        if not ref or not fused or "error" in ref or "error" in fused:
            out.append({"model": key[0], "layers": key[1], "dtype": key[2], "shape": list(key[3]), "backend": key[4],
                        "error": (ref or {}).get("error") or (fused or {}).get("error") or "a graph is missing"})
            continue
        pair_ratios = pair_speedups(ref, fused, kept_as="repeats")
        speedup = float(np.median(pair_ratios))
        out.append({"model": key[0], "layers": key[1], "dtype": key[2], "shape": list(key[3]), "backend": key[4],
                    "speedup_p50_pairs": pair_ratios,
                    "reference_p50_ms": ref["latency_ms"]["p50"], "fused_p50_ms": fused["latency_ms"]["p50"],
                    "reference_p99_ms": ref["latency_ms"]["p99"], "fused_p99_ms": fused["latency_ms"]["p99"],
                    "speedup_p50": speedup, "saved_ms_p50": ref["latency_ms"]["p50"] - fused["latency_ms"]["p50"],
                    "fused_not_slower": speedup >= 1.0 - NOT_SLOWER_MARGIN,
                    "memory_saved_mb": (None if ref.get("peak_gpu_memory_mb") is None or fused.get("peak_gpu_memory_mb") is None
                                        else ref["peak_gpu_memory_mb"] - fused["peak_gpu_memory_mb"])})
    return out


def repeats_for(batch: int, seq: int, args) -> int:
    return max(args.repeats, args.decode_repeats if batch * seq <= DECODE_TOKENS else 1)


def measure_pair(models: dict[str, Path], backend: str, batch: int, seq: int, norm_nodes: list[str], args) -> dict[str, dict]:
    """Reference and fused cells for one (stack, shape, backend), in alternating pairs of fresh
    processes (reference first, then fused first, ...) so drift hits both graphs alike; each pair
    kept under `repeats`. Only the first pair is profiled."""
    def measure(graph: str, first: bool) -> dict:
        nodes = norm_nodes if graph == "reference" else []
        return run_worker(models[graph], backend, batch, seq, nodes, args, profile=first)

    reference, fused = in_pairs(measure, repeats_for(batch, seq, args), kept_as="repeats")
    return {"reference": reference, "fused": fused}


def summarise(comparisons: list[dict]) -> dict:
    ok = [c for c in comparisons if "error" not in c]
    by_backend: dict[str, list[float]] = {}
    for c in ok:
        by_backend.setdefault(c["backend"], []).append(c["speedup_p50"])
    slower = [c for c in ok if not c["fused_not_slower"]]
    return {
        "cells_compared": len(ok),
        "cells_failed": len(comparisons) - len(ok),
        "fused_never_slower": not slower if ok else None,  # None: nothing was compared
        "slower_cells": [{k: c[k] for k in ("model", "layers", "dtype", "shape", "backend", "speedup_p50")} for c in slower],
        "geomean_speedup_p50": {b: float(np.exp(np.mean(np.log(v)))) for b, v in by_backend.items()},
        "min_speedup_p50": {b: float(min(v)) for b, v in by_backend.items()},
        "max_speedup_p50": {b: float(max(v)) for b, v in by_backend.items()},
        "not_slower_margin": NOT_SLOWER_MARGIN,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = [c for c in results["comparisons"] if "error" not in c]
    backends = sorted({c["backend"] for c in comps})
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    ax = axes[0]
    labels = sorted({(c["model"], c["layers"], c["dtype"], tuple(c["shape"])) for c in comps})
    width = 0.8 / max(len(backends), 1)
    for i, backend in enumerate(backends):
        values = []
        for label in labels:
            match = [c for c in comps if (c["model"], c["layers"], c["dtype"], tuple(c["shape"])) == label
                     and c["backend"] == backend]
            values.append(match[0]["speedup_p50"] if match else np.nan)
        ax.bar([x + i * width for x in range(len(labels))], values, width=width, label=backend)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(backends) - 1) / 2 for x in range(len(labels))],
                  [f"{m} L{n} {d.replace('bfloat', 'bf').replace('float', 'fp')}\n{s[0]}x{s[1]}" for m, n, d, s in labels],
                  rotation=90, fontsize=7)
    ax.set_ylabel("p50 speed-up, fused over reference")
    ax.set_title("Fused vs reference graph (above 1: fused is faster)")
    if backends:  # nothing compared (e.g. no norm fused): no bars, no legend
        ax.legend()

    ax = axes[1]
    rows = []
    for cell in results["cells"]:
        classes = cell.get("op_classes")
        if not classes or "error" in cell or cell.get("fused_norms") == 0:  # nothing fused: not a comparison
            continue
        flops = cell.get("flop_share", {})
        rows.append((f"{cell['model']} L{cell['layers']} {cell['shape'][0]}x{cell['shape'][1]}\n{cell['backend']} {cell['graph']}",
                     classes.get("norm", {}).get("time_share", 0.0), flops.get("norm", 0.0)))
    rows = rows[:24]
    ys = range(len(rows))
    ax.barh([y - 0.2 for y in ys], [r[1] * 100 for r in rows], height=0.4, label="norm share of runtime")
    ax.barh([y + 0.2 for y in ys], [r[2] * 100 for r in rows], height=0.4, label="norm share of FLOPs")
    ax.set_yticks(list(ys), [r[0] for r in rows], fontsize=6)
    ax.set_xlabel("%")
    ax.set_title("Normalisation: share of FLOPs vs share of runtime")
    ax.legend(fontsize=7)
    fig.suptitle(f"normfuse graph benchmark on {results['gpu'].get('name', 'no GPU')}")
    fig.tight_layout()
    from export.files import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def parse_list(text: str, kind=str) -> list:
    return [kind(v) for v in text.split(",") if v]


def main(argv=None) -> int:
    from export.cli import Parser, positive_int

    parser = Parser(prog="python bench/graphs.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--work", default=str(ROOT / "build" / "graphs"))
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"from {', '.join(MODELS)}")
    parser.add_argument("--layers", default=",".join(map(str, DEFAULT_LAYERS)))
    parser.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES))
    parser.add_argument("--shapes", default=",".join(f"{b}x{s}" for b, s in DEFAULT_SHAPES))
    parser.add_argument("--backends", help=f"default: the GPU backends present ({', '.join(GPU_BACKENDS)}); "
                                           "ort-cpu only for a smoke test")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--profile-runs", type=int, default=10)
    parser.add_argument("--repeats", type=positive_int, default=1, help="reference/fused pairs of processes per cell")
    parser.add_argument("--decode-repeats", type=positive_int, default=5,
                        help=f"pairs per cell of at most {DECODE_TOKENS} tokens (decode cells are the noisiest)")
    parser.add_argument("--cuda-graph", action="store_true", help="TensorRT runs replay a CUDA graph")
    parser.add_argument("--workspace-mb", type=int, default=8192)
    parser.add_argument("--cell-timeout", type=int, default=900)
    parser.add_argument("--quick", action="store_true", help="1 layer, fp16, shapes 1x1 and 1x512")
    parser.add_argument("--name", help="result file stem (default: the GPU's name)")
    # worker mode (internal)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--norm-nodes", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="merge the results of runs in parts (same GPU)")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.merge:
        return merge(args.merge, Path(args.out), args.name)

    from export.backends import gpu_present
    from export.tensorrt_engine import gpu_info

    if args.quick:
        args.layers, args.dtypes, args.shapes = "1", "float16", "1x1,1x512"
    models = parse_list(args.models)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    dtypes = parse_list(args.dtypes)
    from export.errors import UsageError
    from export.validate import parse_shapes

    try:
        shapes = parse_shapes(args.shapes)
        layers = parse_list(args.layers, int)
    except (UsageError, ValueError) as exc:
        parser.error(str(exc))
    requested = parse_list(args.backends) if args.backends else None
    unknown = [b for b in requested or [] if b not in ("ort-cpu", *GPU_BACKENDS)]
    if unknown:
        parser.error(f"unknown backend(s) {', '.join(unknown)}; choose from ort-cpu, {', '.join(GPU_BACKENDS)}")
    backends, skipped = present_backends(requested)
    gpu = gpu_info()
    if not backends:
        print("no backend to measure on this machine:", file=sys.stderr)
        for s in skipped:
            print(f"  {s['backend']}: {s['reason']}", file=sys.stderr)
        if not gpu_present().present:
            print("run this on a machine with an NVIDIA GPU, onnxruntime-gpu and/or TensorRT (see bench/README.md)",
                  file=sys.stderr)
        return 1
    work, out = Path(args.work), Path(args.out)
    stem = args.name or result_stem(gpu.get("name", "cpu"))
    print(f"backends: {', '.join(backends)}; skipped: {', '.join(s['backend'] for s in skipped) or 'none'}", flush=True)

    from export.backends import import_onnxruntime

    onnxruntime = import_onnxruntime()
    results: dict = {"gpu": gpu, "backends": backends, "skipped": skipped, "grid": {
        "models": models, "layers": layers, "dtypes": dtypes, "shapes": [list(s) for s in shapes], "runs": args.runs,
        "warmup": args.warmup, "cuda_graph": args.cuda_graph, "repeats": args.repeats,
        "decode_repeats": args.decode_repeats},
        "environment": {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
                        "host": platform.node()},
        "cells": [], "stacks": []}
    if "tensorrt" in backends:
        import tensorrt

        results["environment"]["tensorrt"] = tensorrt.__version__
    for model_name in models:
        for n_layers in layers:
            for dtype in dtypes:
                label = f"{model_name} L{n_layers} {dtype}"
                print(f"{label}: export, rewrite{', engines' if 'tensorrt' in backends else ''}", flush=True)
                try:
                    stack = prepare(model_name, n_layers, dtype, work, backends, shapes, args)
                except Exception as exc:  # one stack failing does not lose the others
                    results["stacks"].append({"model": model_name, "layers": n_layers, "dtype": dtype,
                                              "error": f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
                    print(f"  FAILED: {results['stacks'][-1]['error']}", flush=True)
                    continue
                results["stacks"].append({"model": model_name, "layers": n_layers, "dtype": dtype,
                                          "fused_norms": stack["fused_norms"], "rewrite_counts": stack["rewrite_counts"],
                                          **({"fused_norms_cpu": stack["fused_norms_cpu"]} if "fused_norms_cpu" in stack else {}),
                                          "engines": stack["engines"]})
                for batch, seq in shapes:
                    flops = graph_flops(stack["onnx"]["reference"], batch, seq, set(stack["norm_nodes"]))
                    for backend in backends:
                        if backend == "ort-cpu" and dtype == "bfloat16":
                            continue  # no bfloat16 kernels on ONNX Runtime's CPU provider
                        models = {"tensorrt": stack["plans"], "ort-cpu": stack.get("onnx_cpu")}.get(backend, stack["onnx"])
                        fused_norms = stack["fused_norms_cpu"] if backend == "ort-cpu" else stack["fused_norms"]
                        measured = measure_pair(models, backend, batch, seq, stack["norm_nodes"], args)
                        for graph, cell in measured.items():
                            cell.update(model=model_name, layers=n_layers, dtype=dtype, shape=[batch, seq],
                                        backend=backend, graph=graph, flops=flops["flops"], flop_share=flops["flop_share"],
                                        fused_norms=fused_norms)
                            results["cells"].append(cell)
                            if "error" in cell:
                                print(f"  {batch}x{seq} {backend} {graph}: FAILED {cell['error']}", flush=True)
                            else:
                                print(f"  {batch}x{seq} {backend:8s} {graph:9s} p50 {cell['latency_ms']['p50']:8.3f} ms  "
                                      f"p99 {cell['latency_ms']['p99']:8.3f} ms  peak {cell.get('peak_gpu_memory_mb')} MB"
                                      + (f"  (medians of {len(cell['repeats'])} runs)" if cell.get("repeats") else ""),
                                      flush=True)
                results["comparisons"] = compare_cells(results["cells"])
                results["summary"] = summarise(results["comparisons"])
                _write(results, out, stem)  # after every stack: a long run keeps what it measured
    results["comparisons"] = compare_cells(results["cells"])
    results["summary"] = summarise(results["comparisons"])
    json_path = _write(results, out, stem)
    plot(results, out / f"{stem}-graphs.png")
    summary = results["summary"]
    print(f"wrote {json_path} and {stem}-graphs.png; fused never slower: {summary['fused_never_slower']}; "
          f"geomean p50 speed-up: " + ", ".join(f"{b} {v:.3f}x" for b, v in summary["geomean_speedup_p50"].items()))
    return 0


def merge(paths: list[str], out: Path, name: str | None) -> int:
    try:
        parts = [json.loads(Path(p).read_text()) for p in paths]
    except (OSError, ValueError) as exc:
        print(f"normfuse: error: cannot read the results to merge: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    gpus = {part["gpu"].get("name") for part in parts}
    if len(gpus) > 1:
        print(f"refusing to merge results from different GPUs: {', '.join(map(str, gpus))}", file=sys.stderr)
        return 2
    for part in parts:
        note_fused_norms(part)
    merged = {**parts[0], "cells": [c for p in parts for c in p["cells"]], "stacks": [s for p in parts for s in p["stacks"]],
              "backends": sorted({b for p in parts for b in p["backends"]}), "merged_from": [Path(p).name for p in paths]}
    grid = dict(parts[0]["grid"])
    for key, value in grid.items():
        if isinstance(value, list):  # models, layers, dtypes, shapes: the union, in order of appearance
            union: list = []
            for part in parts:
                union += [v for v in part["grid"][key] if v not in union]
            grid[key] = union
    merged["grid"] = grid
    merged["comparisons"] = compare_cells(merged["cells"])
    merged["summary"] = summarise(merged["comparisons"])
    stem = name or result_stem(next(iter(gpus)))
    path = _write(merged, out, stem)
    plot(merged, out / f"{stem}-graphs.png")
    print(f"wrote {path} ({len(merged['cells'])} cells from {len(parts)} runs); fused never slower: "
          f"{merged['summary']['fused_never_slower']}")
    return 0


def note_fused_norms(results: dict) -> None:
    """Give each cell its stack's fused-norm count where it lacks one (results written before cells
    carried it), so that a stack whose rewrite fused nothing is not compared with itself."""
    fused = {(s.get("model"), s.get("layers"), s.get("dtype")): s.get("fused_norms") for s in results.get("stacks", [])}
    for cell in results.get("cells", []):
        if "fused_norms" not in cell:
            count = fused.get((cell.get("model"), cell.get("layers"), cell.get("dtype")))
            if count is not None:
                cell["fused_norms"] = count


def result_stem(gpu_name: str | None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3': the default stem of the result files."""
    return (gpu_name or "gpu").lower().replace("nvidia", "").strip().replace(" ", "-") or "gpu"


def _write(results: dict, out: Path, stem: str) -> Path:
    from export.files import write_json

    path = out / f"{stem}-graphs.json"
    write_json(path, results)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
