"""Run a built model on inputs from a file, for scripts and pipelines.

    python -m export.run fused.onnx --inputs in.npz --outputs out.npz
    python -m export.run fused.plan --inputs in.npz --outputs out.npz --cuda-graph
    python -m export.run fused.onnx --random 1x128 --bench 100 --json timing.json

`--inputs` is a `.npz` whose array names are the model's input names; `--outputs` gets one array
per model output. numpy has no bfloat16: such arrays are stored as 2-byte raw values (`|V2`),
which are read back as bfloat16 when the model takes bfloat16 (`.view(ml_dtypes.bfloat16)` in
your own code). An input that does not fit the model (unknown or missing name, dtype, rank, a
fixed dimension) is a one-line error naming it, exit status 1; bad flags exit 2.

`--bench N` times N runs after `--warmup` runs and prints p50/p99; with `--json` it writes them,
with the peak GPU memory the process used (device memory in use after the runs minus before the
model was loaded) when a GPU is in use.
"""
from __future__ import annotations

import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import NormfuseError, first_line
from .files import require_file
from .memory import peak_rss_mb


def read_inputs(path: str | Path, specs: list) -> dict:
    """Arrays from a .npz, bfloat16 restored from its raw form where the model takes bfloat16."""
    from .runtime import numpy_dtype

    path = require_file(path)
    if not zipfile.is_zipfile(path):
        raise NormfuseError(f"{path}: not a .npz archive (write one with numpy.savez(path, name=array, ...))")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise NormfuseError(f"{path}: not a readable .npz archive ({exc.__class__.__name__}: "
                            f"{first_line(exc)})") from None
    if not arrays:
        raise NormfuseError(f"{path}: holds no arrays")
    wanted = {s.name: s.dtype for s in specs}
    for name, array in arrays.items():
        if wanted.get(name) == "bfloat16" and array.dtype.itemsize == 2 and array.dtype.kind in "Vui":
            arrays[name] = array.view(numpy_dtype("bfloat16"))
    return arrays


def write_outputs(path: str | Path, outputs: dict) -> None:
    from .files import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            arrays: dict[str, Any] = {k: np.asarray(v) for k, v in outputs.items()}
            np.savez(f, **arrays)


def random_inputs(specs: list, shape_text: str, seed: int = 0, bounds: dict[str, int] | None = None,
                  dims: dict[str, int] | None = None, where: str = "model") -> dict:
    """Random inputs for `--random BATCHxSEQ`: dynamic axis 0 is the batch, other axes the sequence,
    named ones as `dims` and `export.dims` say; `bounds` keeps integer inputs inside the tables they
    index (`backends.index_bounds`)."""
    from .backends import random_arrays
    from .validate import parse_shapes

    ((batch, seq),) = parse_shapes(shape_text)[:1]
    return random_arrays(specs, batch, seq, seed, bounds=bounds, dims=dims, where=where)


def gpu_memory_used_mb(device: int = 0) -> float | None:
    """Device memory in use on GPU `device` (by every process on it), from the CUDA driver via torch."""
    from .backends import gpu_present

    if not gpu_present().present:  # no GPU: do not pay for importing torch
        return None
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info(device)
        return (total - free) / 2**20
    except Exception:
        return None


# ONNX Runtime's CUDA memory pool keeps what it took (grown by what was asked: runtime.cuda_provider_options),
# and TensorRT's engine holds its own, so what is in use after the runs is the peak the runs needed
GPU_MEMORY_METHOD = "device memory in use after the runs minus before loading (by every process on the GPU)"


def bench(model, feeds: dict, runs: int, warmup: int) -> dict:
    """Latency of `runs` runs after `warmup`, on inputs bound once (`model.bind`)."""
    from .backends import leading_dims, tokens_per_run

    key = model.bind(feeds)  # inputs bound (on a GPU uploaded) once: the timings are not copies
    if hasattr(model, "launch"):  # TensorRT
        def step():
            model.launch(key)
            model.stream.synchronize()
    else:  # ONNX Runtime
        step = model.run_bound
    ordered = {spec.name: feeds[spec.name] for spec in model.inputs if spec.name in feeds}  # the model's order
    batch, _ = leading_dims(ordered)  # the bench worker's rule: ONNX Runtime and TensorRT records agree
    return time_runs(step, runs, warmup, tokens_per_run(model.inputs, ordered), batch)


def time_runs(step, runs: int, warmup: int, tokens: int | None, batch: int = 1) -> dict:
    """Call `step()` `warmup` times, then time `runs` calls: latency p50/p99/mean/min in ms, the
    throughput at the p50 in tokens per second (None for inputs that hold no tokens,
    `backends.tokens_per_run`) and in samples (the batch) per second, and every latency."""
    for _ in range(warmup):
        step()
    latencies = []
    for _ in range(runs):
        t0 = time.perf_counter()
        step()
        latencies.append((time.perf_counter() - t0) * 1000.0)
    latency = latency_summary(latencies)
    return {"runs": runs, "warmup": warmup, "latency_ms": latency,
            "throughput_tokens_per_s": None if tokens is None else tokens / (latency["p50"] / 1000.0),
            "throughput_samples_per_s": batch / (latency["p50"] / 1000.0),
            "raw_latencies_ms": [round(v, 4) for v in latencies]}


def latency_summary(latencies) -> dict:
    """p50, p99, mean and min of latencies in ms. Percentiles interpolate linearly between the
    sorted samples (numpy's default): of 100 runs the p99 lies between the two slowest, so it is a
    tail figure only with many runs."""
    lat = np.asarray(latencies, dtype=float)
    return {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)), "mean": float(lat.mean()),
            "min": float(lat.min())}


def bench_in_process_of_its_own(model: Path, graph: str, backend: str, batch: int, seq: int, runs: int, warmup: int,
                                source: Path | None = None, cuda_graph: bool = False,
                                dims: dict[str, int] | None = None) -> dict:
    """`python -m export.run MODEL --random BxS --bench RUNS` in a fresh process (so one model's
    device memory cannot hide in another's); a record shaped like export.bench's."""
    from .bench import node_count, run_module

    model = Path(model)
    args = [str(model), "--random", f"{batch}x{seq}", "--bench", str(runs), "--warmup", str(warmup)]
    if backend == "ort-cuda":
        args += ["--providers", "CUDAExecutionProvider,CPUExecutionProvider"]
    elif backend == "ort-cpu":
        args += ["--providers", "CPUExecutionProvider"]
    if cuda_graph:
        args.append("--cuda-graph")
    for name, size in (dims or {}).items():
        args += ["--dim", f"{name}={size}"]
    timing = run_module("export.run", args, f"{model}: benchmark on {backend}")["bench"]
    nodes = node_count(source or model) if source is not None or model.suffix == ".onnx" else None
    return {"backend": backend, "graph": graph, "model": str(model), "shape": [batch, seq], **timing,
            "peak_memory_mb": timing["peak_gpu_memory_mb"],  # None: not measurable here (no torch with CUDA)
            "peak_memory_method": timing["peak_gpu_memory_method"], "cuda_graph": cuda_graph,
            "file_size_mb": round(model.stat().st_size / 2**20, 3), "nodes": nodes, "op_classes": None}


def main(argv=None) -> int:
    from .cli import DIM_HELP, Parser, dim_size, non_negative_int, output_file, positive_int, run_cli
    from .files import write_json

    parser = Parser(prog="python -m export.run", description=__doc__.splitlines()[0])
    parser.add_argument("model", help=".onnx (ONNX Runtime) or .plan (TensorRT engine)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--inputs", help=".npz with one array per model input")
    source.add_argument("--random", metavar="BATCHxSEQ", help="random inputs of this shape instead")
    parser.add_argument("--dim", type=dim_size, action="append", default=[], metavar="NAME=SIZE",
                        help=f"with --random: {DIM_HELP}")
    parser.add_argument("--outputs", type=output_file, help=".npz to write the outputs to")
    parser.add_argument("--providers", help="ONNX Runtime providers, comma-separated (default: CUDA if present, CPU)")
    parser.add_argument("--device", type=non_negative_int, default=0, help="CUDA device index (default 0)")
    parser.add_argument("--cuda-graph", action="store_true", help="TensorRT: replay a captured CUDA graph")
    parser.add_argument("--bench", type=positive_int, metavar="RUNS", help="time RUNS runs")
    parser.add_argument("--warmup", type=non_negative_int, default=10, help="untimed runs before --bench (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random (default 0)")
    parser.add_argument("--json", type=output_file, help="write a JSON summary (shapes, and timings with --bench)")
    args = parser.parse_args(argv)
    if args.dim and not args.random:
        parser.error("--dim sizes --random inputs; --inputs come with their own shapes")

    def job() -> int:
        from .runtime import load

        baseline = gpu_memory_used_mb(args.device)
        started = time.perf_counter()
        providers = [p.strip() for p in args.providers.split(",")] if args.providers else None
        model = load(args.model, providers=providers, device=args.device, cuda_graph=args.cuda_graph)
        load_s = time.perf_counter() - started
        if args.inputs:
            feeds = read_inputs(args.inputs, model.inputs)
        else:
            from .backends import index_bounds

            bounds = index_bounds(args.model) if Path(args.model).suffix == ".onnx" else None
            feeds = random_inputs(model.inputs, args.random, args.seed, bounds, dict(args.dim), str(args.model))
            from .decode import mask_over_the_cache

            mask_over_the_cache(feeds, model.inputs, model.outputs)  # a merged decoder's cache branch
            for name, value in feeds.items():  # the sizes --random and --dim came to
                print(f"input {name}: {list(value.shape)} {value.dtype}")
        from .dims import hint_on_failure

        with hint_on_failure(model.inputs if args.random else ()):
            outputs = model.run(feeds)
        summary: dict = {"model": str(args.model), "kind": type(model).__name__,
                         "providers": getattr(model, "providers", None), "load_s": round(load_s, 3),
                         "inputs": {k: [list(v.shape), str(v.dtype)] for k, v in feeds.items()},
                         "outputs": {k: [list(v.shape), str(v.dtype)] for k, v in outputs.items()}}
        if args.outputs:
            write_outputs(args.outputs, outputs)
        for name, value in outputs.items():
            print(f"{name}: {list(value.shape)} {value.dtype}")
        if args.bench:
            timing = bench(model, feeds, args.bench, args.warmup)
            used = gpu_memory_used_mb(args.device)
            timing["peak_gpu_memory_mb"] = None if used is None or baseline is None else round(used - baseline, 2)
            timing["peak_gpu_memory_method"] = GPU_MEMORY_METHOD
            timing["process_peak_rss_mb"] = round(peak_rss_mb(), 1)  # this process's, imports included
            summary["bench"] = timing
            print(f"p50 {timing['latency_ms']['p50']:.3f} ms  p99 {timing['latency_ms']['p99']:.3f} ms  "
                  + (f"{timing['throughput_tokens_per_s']:.0f} tokens/s" if timing["throughput_tokens_per_s"] is not None
                     else f"{timing['throughput_samples_per_s']:.1f} samples/s"))
        if args.json:
            write_json(args.json, summary)
        return 0

    return run_cli(job)


if __name__ == "__main__":
    raise SystemExit(main())
