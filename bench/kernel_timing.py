"""GPU timing for the kernel benchmarks: CUDA events around one launch after an L2 flush (or with
L2 warm), one function at a time or several in alternation; the references of the same run (a
1 GiB device copy, a copy of each cell's bytes, an empty kernel launched the way ours are); the
device's description; a cell's input tensors.

Imported by bench/kernels.py (`python bench/kernels.py ...`), bench/kernel_ab.py and
bench/kernel_profile.py. Needs torch
with CUDA and CuPy when it runs (CuPy and Triton are imported there, not here).
"""
from __future__ import annotations

import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kernel_grid import EPS  # noqa: E402

from normops import OP, OPS  # noqa: E402
from plugins import launcher  # noqa: E402

EMPTY_PTX = """.version 8.0
.target sm_80
.address_size 64
.visible .entry normfuse_empty()
{
  ret;
}
"""
FLUSH_BYTES = 256 << 20
FLUSH_MODES = ("dirty", "clean")


class Timer:
    """CUDA-event timing of one launch at a time, each after an L2 flush (or with L2 warm).

    The flush is `dirty` (write 256 MB, as triton's do_bench does) or `clean` (read 256 MB). A
    dirty flush leaves L2 full of modified lines, and the timed kernel's own traffic writes them
    back to memory: up to 50 MB on an H100, a fifth more than the 268 MB a 16384x4096 bf16 RMSNorm
    must move, less for larger cells. A clean flush leaves unmodified lines, dropped for free; the
    previous run's outputs are written back during it, outside the timed interval.
    """

    def __init__(self, flush_mode: str = "dirty"):
        if flush_mode not in FLUSH_MODES:
            raise ValueError(f"flush mode {flush_mode!r}: expected one of {', '.join(FLUSH_MODES)}")
        self.flush_mode = flush_mode
        self.flush_buf = torch.zeros(FLUSH_BYTES, dtype=torch.int8, device="cuda")

    def flush(self) -> None:
        """Evict L2 before a timed launch (also keeps the GPU busy while the launch is queued)."""
        if self.flush_mode == "dirty":
            self.flush_buf.zero_()
        else:
            self.flush_buf.view(torch.float32).sum()  # a read of every byte; the result is not needed

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
                self.flush()
            else:
                torch.cuda._sleep(200_000)  # ~0.1 ms of GPU time while the launch is queued
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]

    def times_us_interleaved(self, fns, budget_s: float = 0.25, min_reps: int = 15, max_reps: int = 200,
                             flush: bool = True) -> list[list[float]]:
        """Event-timed runs of several fns in alternation: each round runs every fn once (each
        after its own flush or sleep, as in `times_us`), the order rotating from round to round.
        Returns one list of times per fn; entry i of every list comes from round i."""
        n = len(fns)
        for _ in range(3):
            for fn in fns:
                fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for fn in fns:
            fn()
        torch.cuda.synchronize()
        est = (time.perf_counter() - t0) / n + 2e-4
        reps = int(min(max_reps, max(min_reps, budget_s / est)))
        starts = [[torch.cuda.Event(enable_timing=True) for _ in range(reps)] for _ in range(n)]
        ends = [[torch.cuda.Event(enable_timing=True) for _ in range(reps)] for _ in range(n)]
        for i in range(reps):
            for k in [(i + j) % n for j in range(n)]:
                if flush:
                    self.flush()
                else:
                    torch.cuda._sleep(200_000)
                starts[k][i].record()
                fns[k]()
                ends[k][i].record()
        torch.cuda.synchronize()
        return [[s.elapsed_time(e) * 1e3 for s, e in zip(starts[k], ends[k])] for k in range(n)]


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


def normfuse_launch(op: str, x, res, gamma, beta, layout: tuple[int, ...] | None = None):
    """normfuse's kernel on a cell's tensors: (enqueue, its launch config, the outputs it writes),
    resolved and allocated once, so that enqueue only launches."""
    spec = OPS[op]
    tokens, hidden = x.shape
    launch = launcher.Launch(op, launcher.dtype_name(x), launcher.dtype_name(gamma), tokens, hidden, layout=layout)
    outs = [torch.empty_like(x) for _ in spec.outputs]
    ins = [t for t in (x, res, gamma, beta) if t is not None]
    in_ptrs, out_ptrs = [t.data_ptr() for t in ins], [t.data_ptr() for t in outs]
    stream = torch.cuda.current_stream().cuda_stream
    return (lambda: launch(in_ptrs, out_ptrs, EPS, stream)), launch.cfg, outs


def tensors(op: str, dtype: str, tokens: int, hidden: int):
    t = getattr(torch, dtype)
    spec = OPS[op]
    x = torch.randn(tokens, hidden, device="cuda", dtype=t)
    res = torch.randn(tokens, hidden, device="cuda", dtype=t) if spec.has_residual else None
    gamma = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(t)
    beta = (0.1 * torch.randn(hidden, device="cuda")).to(t) if spec.centered else None
    return x, res, gamma, beta


AGREEMENT_CHUNK = 1 << 24  # elements compared at a time: float64 copies of a whole 65536x16384 cell would not fit


def agreement(got: list, table: list, dtype: str) -> dict:
    """How far a layout's outputs are from the table kernel's on the same inputs: the largest
    absolute difference and whether every element is within twice the op tolerance of `dtype` (each
    is within the tolerance of the float64 reference, in another summation order). A layout that
    computes something else is then not timed as if it were a faster kernel. The rule is
    normops.within's (NaN meets NaN, an Inf the same Inf), in torch on the GPU: copying a
    65536x16384 cell to numpy for every layout would cost seconds a layout."""
    tol = OP[dtype]
    worst, agrees = 0.0, True
    for whole_a, whole_b in zip(got, table):
        flat_a, flat_b = whole_a.reshape(-1), whole_b.reshape(-1)
        for start in range(0, flat_a.numel(), AGREEMENT_CHUNK):
            a = flat_a[start:start + AGREEMENT_CHUNK].double()
            b = flat_b[start:start + AGREEMENT_CHUNK].double()
            diff = (a - b).abs()
            both_nan = a.isnan() & b.isnan()
            same_inf = (a == b) & a.isinf()
            finite_pair = a.isfinite() & b.isfinite()  # (an Inf is only ever equal to itself)
            ok = both_nan | same_inf | (finite_pair & (diff <= 2 * (tol.atol + tol.rtol * b.abs())))
            agrees = agrees and bool(ok.all())
            compared = diff[~(both_nan | same_inf)]
            if compared.numel():
                m = float(compared.max())  # NaN where one side is NaN and the other not
                worst = m if not m <= worst else worst  # (NaN stays)
    return {"max_abs_diff_vs_table": worst, "agrees_with_table": agrees}


def summarise(times):
    return statistics.median(times)


def reference_timings(timer: Timer) -> dict:
    """Device copy of 1 GiB (read + write counted) and an empty kernel launched through the same
    path as ours, after an L2 flush and with L2 warm (the floor for decode shapes)."""
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
    return {"copy": {"bytes": 2 << 30, "tbps": copy_tbps, "times_us": copy_times},
            "empty_launch": {"median_us": summarise(empty_times), "times_us": empty_times},
            "empty_launch_l2_warm": {"median_us": summarise(empty_warm_times), "times_us": empty_warm_times}}


class SameSizeCopy:
    """Copy bandwidth for a copy moving the same bytes (read + write) as a cell; one per size."""

    def __init__(self, timer: Timer, budget_s: float):
        self.timer, self.budget_s, self.tbps = timer, budget_s, {}

    def __call__(self, nbytes: int) -> float:
        if nbytes not in self.tbps:
            a = torch.empty(max(nbytes // 2, 16), dtype=torch.int8, device="cuda")
            b = torch.empty_like(a)
            t = self.timer.times_us(lambda: b.copy_(a), budget_s=self.budget_s)
            self.tbps[nbytes] = 2 * a.numel() / (summarise(t) * 1e-6) / 1e12
        return self.tbps[nbytes]
