"""Time the normfuse kernels on a GPU against copy bandwidth and torch's implementations.

    python bench/kernels.py --out bench/results            # the full tokens x hidden x dtype grid
    python bench/kernels.py --quick --tune --out DIR       # target shapes only, plus a layout sweep

Each cell is timed with CUDA events around one launch, after writing a 256 MB buffer so that L2
(50 MB on an H100) holds none of the inputs; the median of many runs is reported, the raw times
are kept. Bandwidth counts the bytes that must move: x [+ residual], gamma [+ beta] read,
y [+ sum] written. In the same run: device-to-device copy bandwidth (torch copy_ of 1 GiB),
an empty kernel launched through the same path as ours (the floor for decode shapes),
torch's fused F.rms_norm / F.layer_norm (the Add forms add first), the unfused decomposition
that the reference ONNX graph runs (normops.torch_modules' maths), and torch.compile of it.
Writes <out>/<gpu>-kernels.json and <out>/<gpu>-kernels.png.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from normops import DEFAULT_EPSILON, OPS  # noqa: E402
from plugins import config, launcher  # noqa: E402

TOKENS = (1, 32, 512, 4096, 16384, 65536)
HIDDEN = (768, 1024, 2048, 4096, 8192, 16384)
DTYPES = ("bfloat16", "float16", "float32")
TARGET_TOKENS = (4096, 16384, 65536)
TARGET_HIDDEN = (4096, 8192)
EMPTY_PTX = """.version 8.0
.target sm_80
.address_size 64
.visible .entry normfuse_empty()
{
  ret;
}
"""
FLUSH_BYTES = 256 << 20
EPS = DEFAULT_EPSILON


class Timer:
    def __init__(self):
        self.flush_buf = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")

    def times_us(self, fn, budget_s: float = 0.25, min_reps: int = 15, max_reps: int = 200,
                 flush: bool = True) -> list[float]:
        """Event-timed runs of fn. flush=False keeps L2 warm: the GPU is held busy with a sleep
        kernel instead, so that the host's launch overhead stays out of the interval either way."""
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        est = time.perf_counter() - t0 + 2e-4
        reps = int(min(max_reps, max(min_reps, budget_s / est)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if flush:
                self.flush_buf.zero_()  # evict L2; also keeps the GPU busy while the launch is queued
            else:
                torch.cuda._sleep(200_000)  # ~0.1 ms of GPU time while the launch is queued
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]


def device_info() -> dict:
    import cupy

    props = torch.cuda.get_device_properties(0)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem",
                              "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except OSError:
        smi = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "name": props.name, "sm_count": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}", "memory_gib": round(props.total_memory / 2**30, 1),
        "l2_bytes": getattr(props, "L2_cache_size", None), "nvidia_smi": smi,
        "driver_version": cupy.cuda.runtime.driverGetVersion(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cupy": cupy.__version__, "triton": triton_version,
        "python": platform.python_version(),
    }


def tensors(op: str, dtype: str, tokens: int, hidden: int):
    t = getattr(torch, dtype)
    spec = OPS[op]
    x = torch.randn(tokens, hidden, device="cuda", dtype=t)
    res = torch.randn(tokens, hidden, device="cuda", dtype=t) if spec.has_residual else None
    gamma = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(t)
    beta = (0.1 * torch.randn(hidden, device="cuda")).to(t) if spec.centered else None
    return x, res, gamma, beta


def moved_bytes(op: str, dtype: str, tokens: int, hidden: int) -> int:
    spec = OPS[op]
    item = config.ITEMSIZE[dtype]
    rows_io = (2 if spec.has_residual else 1) + len(spec.outputs)
    params = 2 if spec.centered else 1
    return item * hidden * (tokens * rows_io + params)


def ours(op, x, res, gamma, beta, layout=None):
    spec = OPS[op]
    tokens, hidden = x.shape
    launch = launcher.Launch(op, launcher.dtype_name(x), launcher.dtype_name(gamma), tokens, hidden, layout=layout)
    outs = [torch.empty_like(x) for _ in spec.outputs]
    ins = [t for t in (x, res, gamma, beta) if t is not None]
    in_ptrs, out_ptrs = [t.data_ptr() for t in ins], [t.data_ptr() for t in outs]
    stream = torch.cuda.current_stream().cuda_stream
    return lambda: launch(in_ptrs, out_ptrs, EPS, stream), launch.cfg


def unfused(op: str):
    """The maths of the reference graph (normops.torch_modules), one torch op at a time."""
    spec = OPS[op]

    def fn(x, res, gamma, beta):
        s = x + res if spec.has_residual else x
        h = s.float()
        if spec.centered:
            c = h - h.mean(-1, keepdim=True)
            h = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + EPS)
            y = h.to(x.dtype) * gamma + beta
        else:
            y = gamma * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
        return (y, s) if spec.has_residual else y
    return fn


def fused(op: str):
    spec = OPS[op]

    def fn(x, res, gamma, beta):
        s = x + res if spec.has_residual else x
        if spec.centered:
            y = F.layer_norm(s, (s.shape[-1],), gamma, beta, EPS)
        else:
            y = F.rms_norm(s, (s.shape[-1],), gamma, EPS)
        return (y, s) if spec.has_residual else y
    return fn


def summarise(times):
    return statistics.median(times)


def run(args) -> dict:
    timer = Timer()
    info = device_info()
    print("device:", info, flush=True)
    # copy bandwidth: read + write of 1 GiB
    src = torch.empty(1 << 30, dtype=torch.int8, device="cuda").random_()
    dst = torch.empty_like(src)
    copy_times = timer.times_us(lambda: dst.copy_(src), budget_s=1.0)
    copy_tbps = 2 * src.numel() / (summarise(copy_times) * 1e-6) / 1e12
    del src, dst
    empty = launcher._function(EMPTY_PTX, "normfuse_empty")
    import cupy

    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)

    def empty_launch():
        with stream:
            empty((1,), (1,), ())
    empty_times = timer.times_us(empty_launch, budget_s=0.5, max_reps=400)
    empty_warm_times = timer.times_us(empty_launch, budget_s=0.5, max_reps=400, flush=False)
    print(f"copy {copy_tbps:.3f} TB/s; empty launch {summarise(empty_times):.2f} us", flush=True)

    tokens_list = TARGET_TOKENS if args.quick else TOKENS
    hidden_list = tuple(args.hidden) if args.hidden else (TARGET_HIDDEN if args.quick else HIDDEN)
    dtypes = tuple(args.dtypes) if args.dtypes else (("bfloat16",) if args.quick else DTYPES)
    if args.quick:
        tokens_list = (1, 32) + tokens_list
    if args.tokens:
        tokens_list = tuple(args.tokens)
    rows = []
    compiled = {}
    # Every compiled function shares one code object (the closure in `unfused`), so dynamo's
    # per-code cache must hold all ops x dtypes x shape kinds, or it falls back to eager.
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = 256
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 256
    same_size_copy: dict[int, float] = {}

    def copy_tbps_for(nbytes: int) -> float:
        """Copy bandwidth for a copy moving the same bytes (read + write) as the cell."""
        if nbytes not in same_size_copy:
            a = torch.empty(max(nbytes // 2, 16), dtype=torch.int8, device="cuda")
            b = torch.empty_like(a)
            t = timer.times_us(lambda: b.copy_(a), budget_s=args.budget)
            same_size_copy[nbytes] = 2 * a.numel() / (summarise(t) * 1e-6) / 1e12
        return same_size_copy[nbytes]
    for dtype in dtypes:
        for op in OPS:
            impls = {"torch_fused": fused(op), "torch_unfused": unfused(op)}
            if dtype in args.compile_dtypes:
                compiled.setdefault((op, dtype), torch.compile(unfused(op)))
                impls["torch_compile"] = compiled[(op, dtype)]
            for hidden in hidden_list:
                for tokens in tokens_list:
                    x, res, gamma, beta = tensors(op, dtype, tokens, hidden)
                    nbytes = moved_bytes(op, dtype, tokens, hidden)
                    copy_here = copy_tbps_for(nbytes)
                    fn, cfg = ours(op, x, res, gamma, beta)
                    cells = {"normfuse": (fn, cfg.kernel)}
                    if args.tune and tokens >= 4096:
                        for layout in candidate_layouts(dtype, hidden):
                            f2, c2 = ours(op, x, res, gamma, beta, layout=layout)
                            cells[f"normfuse[{layout[0]}x{layout[1]}]"] = (f2, c2.kernel)
                    for name, impl in impls.items():
                        cells[name] = ((lambda impl=impl: impl(x, res, gamma, beta)), None)
                    if tokens <= 32:
                        cells["normfuse_l2_warm"] = (fn, cfg.kernel)
                    for name, (f, kernel) in cells.items():
                        try:
                            t = timer.times_us(f, budget_s=args.budget, flush=not name.endswith("_l2_warm"))
                        except Exception as exc:  # e.g. out of memory for the unfused graph
                            print(f"  {name} failed: {exc.__class__.__name__}: {exc}", flush=True)
                            continue
                        med = summarise(t)
                        rows.append({"op": op, "dtype": dtype, "tokens": tokens, "hidden": hidden, "impl": name,
                                     "kernel": kernel, "bytes": nbytes, "median_us": med,
                                     "same_size_copy_tbps": copy_here,
                                     "tbps": nbytes / (med * 1e-6) / 1e12, "times_us": [round(v, 3) for v in t]})
                    mine = [r for r in rows[-len(cells):] if r["impl"] == "normfuse"]
                    line = " ".join(f"{r['impl']}={r['tbps']:.2f}" for r in rows[-len(cells):])
                    print(f"{op:12s} {dtype:8s} {tokens:6d}x{hidden:<6d} {line}"
                          f" ({mine[0]['median_us']:.1f} us)" if mine else "", flush=True)
                    del x, res, gamma, beta, fn, cells
                torch.cuda.empty_cache()
            if args.partial:
                args.partial.write_text(json.dumps({"device": info, "results": rows}))
    return {"device": info, "timing": "CUDA events around one launch after a 256 MB L2 flush; median",
            "copy": {"bytes": 2 << 30, "tbps": copy_tbps, "times_us": copy_times},
            "empty_launch": {"median_us": summarise(empty_times), "times_us": empty_times},
            "empty_launch_l2_warm": {"median_us": summarise(empty_warm_times), "times_us": empty_warm_times},
            "results": rows}


def candidate_layouts(dtype: str, hidden: int) -> list[tuple[int, int]]:
    v = config.vector_width(dtype)
    vectors = -(-hidden // v)
    out = []
    for tpr in config.THREADS_PER_ROW:
        for c in config.slot_choices(dtype):
            if c * tpr >= vectors and c * tpr < 2 * vectors + tpr:
                out.append((tpr, c))
    return out


def report(data: dict) -> str:
    rows = data["results"]
    copy = data["copy"]["tbps"]
    empty = data["empty_launch"]["median_us"]
    get = {(r["op"], r["dtype"], r["tokens"], r["hidden"], r["impl"]): r for r in rows}
    lines = [f"copy bandwidth {copy:.2f} TB/s; empty launch {empty:.2f} us",
             "| op | dtype | tokens x hidden | normfuse TB/s | % copy | % same-size copy | torch fused TB/s | speed-up | unfused TB/s | compile TB/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (op, dtype, tokens, hidden, impl), r in sorted(get.items()):
        if impl != "normfuse" or tokens < 4096 or hidden not in TARGET_HIDDEN or dtype != "bfloat16":
            continue
        f = get.get((op, dtype, tokens, hidden, "torch_fused"))
        u = get.get((op, dtype, tokens, hidden, "torch_unfused"))
        c = get.get((op, dtype, tokens, hidden, "torch_compile"))
        lines.append(f"| {op} | {dtype} | {tokens}x{hidden} | {r['tbps']:.2f} | {100 * r['tbps'] / copy:.0f}% | "
                     f"{100 * r['tbps'] / r['same_size_copy_tbps']:.0f}% | "
                     f"{f['tbps'] if f else float('nan'):.2f} | {f['median_us'] / r['median_us'] if f else float('nan'):.2f}x | "
                     f"{u['tbps'] if u else float('nan'):.2f} | {c['tbps'] if c else float('nan'):.2f} |")
    lines += ["", "all dtypes, 16384 tokens: normfuse TB/s (torch fused TB/s)",
              "| op | dtype | " + " | ".join(str(h) for h in HIDDEN) + " |", "|---|---|" + "---|" * len(HIDDEN)]
    for op in OPS:
        for dtype in DTYPES:
            cells = []
            for h in HIDDEN:
                r, f = get.get((op, dtype, 16384, h, "normfuse")), get.get((op, dtype, 16384, h, "torch_fused"))
                cells.append(f"{r['tbps']:.2f} ({f['tbps']:.2f})" if r and f else "-")
            if any(c != "-" for c in cells):
                lines.append(f"| {op} | {dtype} | " + " | ".join(cells) + " |")
    warm = data["empty_launch_l2_warm"]["median_us"]
    lines += ["", f"decode (tokens <= 32): median us; empty launch {empty:.2f} us after an L2 flush, "
              f"{warm:.2f} us with L2 warm",
              "| op | dtype | tokens x hidden | L2 flushed | over empty | L2 warm | over empty |",
              "|---|---|---|---|---|---|---|"]
    for (op, dtype, tokens, hidden, impl), r in sorted(get.items()):
        if impl == "normfuse" and tokens <= 32:
            w = get.get((op, dtype, tokens, hidden, "normfuse_l2_warm"))
            wm = w["median_us"] if w else float("nan")
            lines.append(f"| {op} | {dtype} | {tokens}x{hidden} | {r['median_us']:.2f} | {r['median_us'] - empty:+.2f} | "
                         f"{wm:.2f} | {wm - warm:+.2f} |")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["results"] if r["dtype"] == "bfloat16"]
    tokens = max(r["tokens"] for r in rows if r["tokens"] <= 16384)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2), sharey=True)
    for ax, op in zip(axes, OPS):
        for impl in ("normfuse", "torch_fused", "torch_compile", "torch_unfused"):
            pts = sorted((r["hidden"], r["tbps"]) for r in rows
                         if r["op"] == op and r["impl"] == impl and r["tokens"] == tokens)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.axhline(data["copy"]["tbps"], color="grey", ls="--", label="copy")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{op}, bf16, {tokens} tokens")
        ax.set_xlabel("hidden")
    axes[0].set_ylabel("TB/s (bytes that must move / time)")
    axes[0].legend(fontsize=8)
    fig.suptitle(data["device"]["name"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--quick", action="store_true", help="bf16 target shapes and decode shapes only")
    p.add_argument("--tune", action="store_true", help="also time every sensible layout at tokens >= 4096")
    p.add_argument("--compile-dtypes", nargs="*", default=["bfloat16"], help="dtypes to time torch.compile on")
    p.add_argument("--dtypes", nargs="*", help="dtypes to run (default: bf16 with --quick, else all)")
    p.add_argument("--tokens", nargs="*", type=int, help="token counts to run (default: the grid)")
    p.add_argument("--hidden", nargs="*", type=int, help="hidden sizes to run (default: the grid)")
    p.add_argument("--budget", type=float, default=0.25, help="seconds of timing per cell")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.partial = args.out / "partial.json"
    data = run(args)
    args.partial.unlink(missing_ok=True)
    gpu = data["device"]["name"].lower().replace("nvidia ", "").replace(" ", "-")
    stem = f"{gpu}-kernels" + ("-quick" if args.quick else "") + ("-tune" if args.tune else "")
    (args.out / f"{stem}.json").write_text(json.dumps(data, indent=1))
    table = report(data)
    (args.out / f"{stem}.md").write_text(table + "\n")
    plot(data, args.out / f"{stem}.png")
    print(table)


if __name__ == "__main__":
    main()
