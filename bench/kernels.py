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

Kernel source versions side by side (A/B), in one run, on the same shapes and launch table:

    python bench/kernels.py --quick --sources HEAD,59deae0^ --out DIR
    python bench/kernels.py --quick --sources HEAD,HEAD+NORMFUSE_AB_NO_TRAILING_SYNC --out DIR
    python bench/kernels.py --sources HEAD,59deae0^ --static sm_90,sm_80     # no GPU: ptxas + SASS

Each --sources item is a git revision (its plugins/*.cu and norm_common.cuh, compiled with the
current plugins/build.py flags), "worktree" (plugins/ as it is) or a directory holding those files
(also --variant-dir; `--sources REV --save-sources DIR` writes a revision's files to DIR/<commit>
for a machine whose copy of the project has no git history), optionally followed by
+NAME[=VALUE] compile-time switches (the
NORMFUSE_AB_* list in plugins/norm_common.cuh). Every variant runs with the current
plugins/config.py launch shape; a variant whose entry point, parameters or launch bounds do not
fit it is refused with the reason ($NORMFUSE_AB_DEFINES does not apply here). Per cell, the variants are timed in alternation (one launch
of each per round, rotating the order), so clock and thermal drift fall on all of them alike.
Writes <out>/<gpu>-kernels-ab.{json,md}: every raw time, the median per variant, the median of
the per-round time ratios against the first variant, and the largest output difference from it.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from normops import DEFAULT_EPSILON, OPS  # noqa: E402
from plugins import build, config, launcher  # noqa: E402

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
                    self.flush_buf.zero_()
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


def run(args) -> dict:
    timer = Timer()
    info = device_info()
    print("device:", info, flush=True)
    refs = reference_timings(timer)
    tokens_list, hidden_list, dtypes = shapes(args)
    rows = []
    compiled = {}
    # Every compiled function shares one code object (the closure in `unfused`), so dynamo's
    # per-code cache must hold all ops x dtypes x shape kinds, or it falls back to eager.
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = 256
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 256
    copy_tbps_for = SameSizeCopy(timer, args.budget)
    for dtype in dtypes:
        for op in args.ops or OPS:
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
            **refs, "results": rows}


def candidate_layouts(dtype: str, hidden: int) -> list[tuple[int, int]]:
    v = config.vector_width(dtype)
    vectors = -(-hidden // v)
    out = []
    for tpr in config.THREADS_PER_ROW:
        for c in config.slot_choices(dtype):
            if c * tpr >= vectors and c * tpr < 2 * vectors + tpr:
                out.append((tpr, c))
    return out


# ---------------------------------------------------------------- kernel source versions (--sources)
SOURCE_FILES = (build.HEADER, *(f"{family}.cu" for family in config.FAMILY.values()))
_SWITCH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(=[A-Za-z0-9_.+-]*)?")


class VariantError(ValueError):
    """A source version that cannot be compared with the current launch table, and why."""


@dataclass
class SourceVariant:
    label: str  # as given on the command line, e.g. "59deae0^" or "HEAD+NORMFUSE_AB_NO_PREFETCH"
    base: str  # a git revision, "worktree" or a directory
    defines: tuple[str, ...] = ()
    commit: str | None = None  # the revision resolved (None for the work tree or a directory)
    source_dir: Path | None = None  # where its sources are (None: plugins/ of the work tree)
    sources_sha256: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict:
        return {"label": self.label, "base": self.base, "commit": self.commit, "defines": list(self.defines),
                "source_dir": None if self.source_dir is None else str(self.source_dir),
                "sources_sha256": self.sources_sha256}


def parse_sources(items: list[str] | None, dirs: list[str] | None = None) -> list[SourceVariant]:
    """--sources items (comma- or space-separated) and --variant-dir directories, in order.

    Item: BASE[+NAME[=VALUE]...], BASE a git revision, "worktree" or a directory of sources."""
    out: list[SourceVariant] = []
    for item in [part for raw in items or [] for part in raw.split(",") if part.strip()] + list(dirs or []):
        item = item.strip()
        base, *switches = item.split("+") if not Path(item).is_dir() else (item,)
        if not base:
            raise VariantError(f"{item!r}: no revision or directory before the '+'")
        for d in switches:
            if not _SWITCH.fullmatch(d):
                raise VariantError(f"{item!r}: bad switch {d!r}; expected +NAME or +NAME=VALUE")
        out.append(SourceVariant(label=item, base=base, defines=tuple(switches)))
    labels = [v.label for v in out]
    if len(set(labels)) != len(labels):
        raise VariantError(f"a variant is given twice: {labels}")
    return out


def materialise(variant: SourceVariant, workdir: Path, repo: Path = ROOT) -> SourceVariant:
    """Resolve the variant's sources: `git show REV:plugins/<file>` into workdir, or check a directory."""
    if variant.base == "worktree":
        variant.source_dir = None
        src = build.SOURCE_DIR
    elif Path(variant.base).is_dir():
        src = variant.source_dir = Path(variant.base).resolve()
        missing = [f for f in SOURCE_FILES if not (src / f).is_file()]
        if missing:
            raise VariantError(f"{variant.label}: directory {src} lacks {', '.join(missing)}")
        if (src / "COMMIT").is_file():  # written by --save-sources
            variant.commit = (src / "COMMIT").read_text().split()[0]
    else:
        found = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{variant.base}^{{commit}}"],
                               capture_output=True, text=True)
        if found.returncode != 0:
            raise VariantError(f"{variant.label}: {variant.base!r} is neither a git revision of {repo} nor a directory"
                               " (a shallow clone lacks older revisions: git fetch --unshallow; a copy without git"
                               " history takes directories written by --save-sources where the history is)")
        variant.commit = found.stdout.strip()
        src = variant.source_dir = workdir / variant.commit[:12]
        src.mkdir(parents=True, exist_ok=True)
        for f in SOURCE_FILES:
            shown = subprocess.run(["git", "-C", str(repo), "show", f"{variant.commit}:plugins/{f}"],
                                   capture_output=True)
            if shown.returncode != 0:
                raise VariantError(f"{variant.label}: revision {variant.commit[:12]} has no plugins/{f} (the kernels "
                                   "were split into these files in a6d837a; older revisions cannot be built here)")
            (src / f).write_bytes(shown.stdout)
    import hashlib

    texts = {f: (src / f).read_bytes() for f in SOURCE_FILES}
    for d in variant.defines:
        name = d.partition("=")[0]
        if not any(re.search(rb"\b" + name.encode() + rb"\b", t) for t in texts.values()):
            raise VariantError(f"{variant.label}: the sources of {variant.base} never mention {name}, so the "
                               "switch would change nothing (use 'worktree' for switches not committed yet)")
    variant.sources_sha256 = {f: hashlib.sha256(t).hexdigest()[:16] for f, t in texts.items()}
    return variant


def entry_contract(ptx: str, kernel: str) -> tuple[list[str], int | None] | None:
    """(parameter types, .maxntid) of `kernel` in `ptx`; None if there is no such entry point."""
    m = re.search(rf"\.entry {re.escape(kernel)}\((.*?)\)\s*(\.maxntid\s+(\d+))?", ptx, re.S)
    if not m:
        return None
    kinds = [p.split()[1].lstrip(".") for p in m.group(1).split(",") if p.strip()]
    return kinds, int(m.group(3)) if m.group(3) else None


def variant_ptx(variant: SourceVariant, op: str, x_dtype: str, g_dtype: str, cfg: config.LaunchConfig,
                arch: str) -> str:
    """The variant's one-kernel module for `cfg`, after checking it fits the current launch contract:
    the same entry point and parameter types as the work tree's kernel, launch bounds that admit
    cfg.block, and no dynamic shared memory (the launch table passes none). Raises VariantError."""
    try:
        ptx = build.ptx_for_launch(op, x_dtype, g_dtype, cfg, arch, variant.source_dir, variant.defines)
    except build.ToolchainError as exc:
        raise VariantError(f"{variant.label}: does not compile with the current plugins/build.py unit "
                           f"for {cfg.kernel}:\n{exc}") from exc
    ref = entry_contract(build.ptx_for_launch(op, x_dtype, g_dtype, cfg, arch, None, ()), cfg.kernel)
    got = entry_contract(ptx, cfg.kernel)
    if got is None:
        raise VariantError(f"{variant.label}: no entry point {cfg.kernel}: its kernel names or NORMFUSE_VARIANTS "
                           "do not follow the current plugins/config.py")
    if ref is not None and got[0] != ref[0]:
        raise VariantError(f"{variant.label}: {cfg.kernel} takes ({', '.join(got[0])}), the current launch passes "
                           f"({', '.join(ref[0])}): a different kernel signature, refused")
    if got[1] is not None and got[1] < cfg.block:
        raise VariantError(f"{variant.label}: {cfg.kernel} is bounded to {got[1]} threads a block, the launch "
                           f"table uses {cfg.block}")
    if re.search(r"\.extern\s+\.shared", ptx):
        raise VariantError(f"{variant.label}: {cfg.kernel} uses dynamic shared memory, which the launch table "
                           "does not pass")
    return ptx


class VariantLaunch(launcher.Launch):
    """launcher.Launch for a variant's PTX: the same launch shape, arguments and launch call."""

    def __init__(self, variant: SourceVariant, op: str, x_dtype: str, gamma_dtype: str, rows: int, hidden: int,
                 layout: tuple[int, int] | None = None, arch: str | None = None):
        self.spec = OPS[op]
        self.cfg = config.launch_config(op, x_dtype, rows, hidden, layout=layout)
        self.ptx = variant_ptx(variant, op, x_dtype, gamma_dtype, self.cfg, arch or build.target_arch())
        self.function = launcher._function(self.ptx, self.cfg.kernel)
        self.rows, self.hidden = rows, hidden


def shapes(args) -> tuple[tuple[int, ...], tuple[int, ...], tuple[str, ...]]:
    """(tokens, hidden sizes, dtypes) the options select, as in the default run."""
    tokens_list = TARGET_TOKENS if args.quick else TOKENS
    hidden_list = tuple(args.hidden) if args.hidden else (TARGET_HIDDEN if args.quick else HIDDEN)
    dtypes = tuple(args.dtypes) if args.dtypes else (("bfloat16",) if args.quick else DTYPES)
    if args.quick:
        tokens_list = (1, 32) + tokens_list
    if args.tokens:
        tokens_list = tuple(args.tokens)
    return tokens_list, hidden_list, dtypes


def run_variants(args, variants: list[SourceVariant]) -> dict:
    """Time each variant's kernel on every selected cell, all variants of a cell in alternation."""
    timer = Timer()
    info = device_info()
    print("device:", info, flush=True)
    refs = reference_timings(timer)
    arch = build.target_arch()
    tokens_list, hidden_list, dtypes = shapes(args)
    same_size = SameSizeCopy(timer, args.budget)
    rows = []
    labels = [v.label for v in variants]
    for dtype in dtypes:
        for op in args.ops or OPS:
            spec = OPS[op]
            for hidden in hidden_list:
                for tokens in tokens_list:
                    x, res, gamma, beta = tensors(op, dtype, tokens, hidden)
                    nbytes = moved_bytes(op, dtype, tokens, hidden)
                    copy_here = same_size(nbytes)
                    layouts = [None]
                    if args.tune and tokens >= 4096:
                        layouts += candidate_layouts(dtype, hidden)
                    in_ptrs = [t.data_ptr() for t in (x, res, gamma, beta) if t is not None]
                    stream = torch.cuda.current_stream().cuda_stream
                    for layout in layouts:
                        launches, outs = [], []
                        for v in variants:
                            launch = VariantLaunch(v, op, dtype, launcher.dtype_name(gamma), tokens, hidden,
                                                   layout=layout, arch=arch)
                            o = [torch.full_like(x, float("nan")) for _ in spec.outputs]
                            out_ptrs = [t.data_ptr() for t in o]
                            launches.append(lambda launch=launch, out_ptrs=out_ptrs: launch(in_ptrs, out_ptrs, EPS, stream))
                            outs.append(o)
                        cfg = launch.cfg
                        for fn in launches:  # outputs for the comparison, before any timing
                            fn()
                        torch.cuda.synchronize()
                        # largest |difference| from the first variant's outputs (inf where either is NaN)
                        diffs = [max(float((a - b).abs().nan_to_num(float("inf")).max().float()) if a.numel() else 0.0
                                     for a, b in zip(o, outs[0])) for o in outs]
                        modes = [("", True)] + ([("_l2_warm", False)] if tokens <= 32 else [])
                        for suffix, flush in modes:
                            times = timer.times_us_interleaved(launches, budget_s=args.budget, flush=flush)
                            for v, t, diff in zip(variants, times, diffs):
                                med = summarise(t)
                                ratios = [a / b for a, b in zip(t, times[0])]
                                rows.append({"op": op, "dtype": dtype, "tokens": tokens, "hidden": hidden,
                                             "impl": f"normfuse{suffix}", "variant": v.label, "kernel": cfg.kernel,
                                             "layout": [cfg.threads_per_row, cfg.slots], "bytes": nbytes,
                                             "median_us": med, "same_size_copy_tbps": copy_here,
                                             "tbps": nbytes / (med * 1e-6) / 1e12,
                                             "ratio_to_first": statistics.median(ratios),
                                             "max_abs_diff_vs_first": diff,
                                             "times_us": [round(u, 3) for u in t]})
                            cell = rows[-len(variants):]
                            print(f"{op:12s} {dtype:8s} {tokens:6d}x{hidden:<6d} {cfg.kernel}{suffix} "
                                  + " ".join(f"{r['variant']}={r['median_us']:.2f}us/{r['tbps']:.2f}TB/s"
                                             f"(x{r['ratio_to_first']:.3f})" for r in cell), flush=True)
                        del launches, outs
                    del x, res, gamma, beta
                torch.cuda.empty_cache()
            if args.partial:
                args.partial.write_text(json.dumps({"device": info, "variants": [v.describe() for v in variants],
                                                    "results": rows}))
    return {"device": info, "arch": arch, "variants": [v.describe() for v in variants], "labels": labels,
            "timing": "CUDA events around one launch after a 256 MB L2 flush (_l2_warm: after a sleep kernel); "
                      "variants of a cell in alternation, order rotating each round; median",
            **refs, "results": rows}


def report_variants(data: dict) -> str:
    labels = data["labels"]
    first = labels[0]
    lines = [f"copy bandwidth {data['copy']['tbps']:.2f} TB/s; empty launch {data['empty_launch']['median_us']:.2f} us "
             f"({data['empty_launch_l2_warm']['median_us']:.2f} us with L2 warm); ratio: median over rounds of "
             f"time / time of {first} (below 1 is faster)",
             "| op | dtype | tokens x hidden | kernel | mode | " + " | ".join(f"{v} us (TB/s, % same-size copy)"
                                                                      for v in labels)
             + " | " + " | ".join(f"{v} ratio" for v in labels[1:]) + " | max diff |",
             "|---|---|---|---|---|" + "---|" * (2 * len(labels))]
    cells: dict = {}
    for r in data["results"]:
        cells.setdefault((r["op"], r["dtype"], r["tokens"], r["hidden"], r["kernel"], r["impl"]), {})[r["variant"]] = r
    for (op, dtype, tokens, hidden, kernel, impl), by in cells.items():
        mode = "L2 warm" if impl.endswith("_l2_warm") else "L2 flushed"
        cols = [f"{by[v]['median_us']:.2f} ({by[v]['tbps']:.2f}, {100 * by[v]['tbps'] / by[v]['same_size_copy_tbps']:.0f}%)"
                if v in by else "-" for v in labels]
        ratios = [f"{by[v]['ratio_to_first']:.3f}" if v in by else "-" for v in labels[1:]]
        diff = max(by[v]["max_abs_diff_vs_first"] for v in by)
        lines.append(f"| {op} | {dtype} | {tokens}x{hidden} | {kernel} | {mode} | " + " | ".join(cols + ratios)
                     + f" | {diff:.3g} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- static analysis (--static, no GPU)
REGISTERS_PER_SM = 65536
MAX_THREADS_PER_SM = {"sm_80": 2048, "sm_90": 2048}
MAX_BLOCKS_PER_SM = 32
_RESOURCES = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\n"
                        r"ptxas info\s+: Used (\d+) registers([^\n]*)")
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def occupancy(registers: int, block: int, arch: str, smem: int = 0) -> tuple[int, int]:
    """(blocks per SM, warps per SM) that registers and block size allow (registers are granted
    per warp in units of 256; shared memory here is tiny and not limiting)."""
    warps = -(-block // 32)
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    blocks = min(REGISTERS_PER_SM // (per_warp * warps), MAX_THREADS_PER_SM.get(arch, 2048) // (warps * 32),
                 MAX_BLOCKS_PER_SM)
    return blocks, blocks * warps


def sass_instructions(cubin: Path) -> list[tuple[int, str]]:
    """(address, instruction) of the cubin's SASS (cuobjdump -sass, or nvdisasm)."""
    tool = shutil.which("cuobjdump")
    if tool:
        text = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    else:
        tool = shutil.which("nvdisasm")
        if not tool:
            raise build.ToolchainError("neither cuobjdump nor nvdisasm is on PATH "
                                       "(pip install nvidia-cuda-cuobjdump puts one in nvidia/cu13/bin)")
        text = subprocess.run([tool, "-hex", str(cubin)], capture_output=True, text=True, check=True).stdout
    return [(int(m.group(1), 16), m.group(2)) for m in _SASS_LINE.finditer(text)]


def _opcode(ins: str) -> str:
    return ins.split()[1] if ins.startswith("@") else ins.split()[0]


def sass_summary(instructions: list[tuple[int, str]]) -> dict:
    """Counts over the whole kernel and over its vectorised in-register path (from its first
    LDG.E.128 to the EXIT after its last STG.E.128): global loads and stores by width, barriers,
    shuffles, L2 prefetches (CCTL), backward branches (loops), and the parameter-load round trips
    after the last barrier (groups of loads each waiting on the store before it)."""
    ops = [_opcode(i) for _, i in instructions]

    def counts(seq: list[str]) -> dict:
        out: dict[str, int] = {}
        for op in seq:
            if op.startswith(("LDG", "STG", "BAR", "CCTL", "SHFL", "LDS", "STS")):
                out[op] = out.get(op, 0) + 1
        return out

    def backward(pairs) -> int:
        n = 0
        for addr, ins in pairs:
            m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", ins)
            if m and int(m.group(1), 16) <= addr:
                n += 1
        return n

    summary = {"instructions": len(ops), "whole": counts(ops), "loops": backward(instructions)}
    vec = [k for k, op in enumerate(ops) if op.startswith("LDG") and ".128" in op]
    st = [k for k, op in enumerate(ops) if op.startswith("STG") and ".128" in op]
    if vec and st:
        lo, hi = vec[0], st[-1]
        while hi < len(ops) - 1 and ops[hi] != "EXIT":
            hi += 1
        path = ops[lo:hi + 1]
        bars = [k for k, op in enumerate(path) if op.startswith("BAR")]
        tail = path[bars[-1] + 1:] if bars else path
        trips, loading = 0, False
        for op in tail:
            if op.startswith("LDG") and not loading:
                trips, loading = trips + 1, True
            elif op.startswith("STG"):
                loading = False
        summary.update({"vector_path": counts(path), "vector_path_instructions": len(path),
                        "vector_path_loops": backward(instructions[lo:hi + 1]),
                        "param_load_round_trips_after_last_barrier": trips})
    return summary


def static_analysis(variants: list[SourceVariant], arches: list[str], ops, dtype: str, hidden_list,
                    gamma_dtype: str | None = None, rows: int = 65536, tune: bool = False) -> list[dict]:
    """ptxas resources, occupancy and SASS counts of each variant's kernel for each cell's launch
    (with `tune`, also for every layout --tune times)."""
    cells = []
    for op in ops:
        for hidden in hidden_list:
            layouts = [None] + (candidate_layouts(dtype, hidden) if tune else [])
            for cfg in dict.fromkeys(config.launch_config(op, dtype, rows, hidden, layout=lo) for lo in layouts):
                cells.append((op, hidden, cfg))
    g = gamma_dtype or dtype
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        for op, hidden, cfg in cells:
            for arch in arches:
                for v in variants:
                    report = build.ptxas_check(variant_ptx(v, op, dtype, g, cfg, arch), arch, cubin=cubin)
                    m = _RESOURCES.search(report)
                    regs = int(m.group(4))
                    found = re.search(r"(\d+) bytes smem", m.group(5))
                    smem = int(found.group(1)) if found else 0
                    blocks, warps = occupancy(regs, cfg.block, arch, smem)
                    row = {"op": op, "dtype": dtype, "gamma_dtype": g, "hidden": hidden, "arch": arch,
                           "variant": v.label, "kernel": cfg.kernel, "block": cfg.block, "registers": regs,
                           "spill_bytes": int(m.group(2)) + int(m.group(3)), "stack_bytes": int(m.group(1)),
                           "smem_bytes": smem, "blocks_per_sm": blocks, "warps_per_sm": warps,
                           # x (+ residual) bytes the resident blocks load at once, one row group each
                           "input_bytes_per_sm": blocks * cfg.rows_per_block * hidden * config.ITEMSIZE[dtype]
                           * (2 if OPS[op].has_residual else 1)}
                    try:
                        row["sass"] = sass_summary(sass_instructions(cubin))
                    except build.ToolchainError as exc:
                        row["sass"] = {"error": str(exc)}
                    out.append(row)
    return out


def report_static(rows: list[dict]) -> str:
    lines = ["static analysis (ptxas -v, cuobjdump -sass), not a measurement. Occupancy from registers and block "
             "size; input KiB/SM: x (+ residual) of the resident blocks' rows. Instruction counts are of the "
             "16-byte in-register path the bench shapes take (one row group per block, so per row): "
             "trips = dependent gamma/beta load round trips after the last barrier; loops = backward branches",
             "| op | hidden | arch | variant | kernel | regs | spill B | smem B | blocks/SM | warps/SM | input KiB/SM | "
             "LDG.128 | other LDG | STG.128 | BAR.SYNC | CCTL | SHFL | trips | loops |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["sass"]
        vp = s.get("vector_path", {})
        ldg128 = sum(n for k, n in vp.items() if k.startswith("LDG") and ".128" in k)
        other = sum(n for k, n in vp.items() if k.startswith("LDG") and ".128" not in k)
        stg128 = sum(n for k, n in vp.items() if k.startswith("STG") and ".128" in k)
        bar = sum(n for k, n in vp.items() if k.startswith("BAR"))
        cctl = sum(n for k, n in vp.items() if k.startswith("CCTL"))
        shfl = sum(n for k, n in vp.items() if k.startswith("SHFL"))
        kinds = sorted({k.removeprefix("LDG.E.128").lstrip(".") or "plain" for k in vp if k.startswith("LDG.E.128")})
        lines.append(f"| {r['op']} | {r['hidden']} | {r['arch']} | {r['variant']} | {r['kernel']} | {r['registers']} | "
                     f"{r['spill_bytes']} | {r['smem_bytes']} | {r['blocks_per_sm']} | {r['warps_per_sm']} | "
                     f"{r['input_bytes_per_sm'] // 1024} | {ldg128} ({', '.join(kinds) or '-'}) | {other} | {stg128} | "
                     f"{bar} | {cctl} | {shfl} | {s.get('param_load_round_trips_after_last_barrier', '-')} | "
                     f"{s.get('vector_path_loops', '-')} |")
    return "\n".join(lines)


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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results; "
                   "--static writes files only when given)")
    p.add_argument("--quick", action="store_true", help="bf16 target shapes and decode shapes only")
    p.add_argument("--tune", action="store_true", help="also time every sensible layout at tokens >= 4096")
    p.add_argument("--compile-dtypes", nargs="*", default=["bfloat16"], help="dtypes to time torch.compile on")
    p.add_argument("--dtypes", nargs="*", help="dtypes to run (default: bf16 with --quick, else all)")
    p.add_argument("--tokens", nargs="*", type=int, help="token counts to run (default: the grid)")
    p.add_argument("--hidden", nargs="*", type=int, help="hidden sizes to run (default: the grid)")
    p.add_argument("--ops", nargs="*", choices=list(OPS), help="ops to run (default: all)")
    p.add_argument("--budget", type=float, default=0.25, help="seconds of timing per cell (per variant with --sources)")
    p.add_argument("--sources", nargs="+", metavar="REV[+SWITCH...]",
                   help="time these kernel source versions side by side (comma- or space-separated): a git "
                        "revision, 'worktree' or a directory, each optionally +NAME[=VALUE] compile-time switches")
    p.add_argument("--variant-dir", action="append", metavar="DIR",
                   help="a directory of kernel sources (norm_common.cuh and the four .cu files) to add as a variant")
    p.add_argument("--save-sources", type=Path, metavar="DIR",
                   help="no GPU: write each --sources revision's kernel sources to DIR/<commit> (for --variant-dir "
                        "on a machine whose copy of the project has no git history) and stop")
    p.add_argument("--static", metavar="ARCH[,ARCH]",
                   help="no GPU: ptxas -v and SASS counts of each variant's kernel for the selected ops, dtype "
                        "(first of --dtypes, default bfloat16) and hidden sizes (default 4096 8192)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    try:
        args.variants = parse_sources(args.sources, args.variant_dir)
    except VariantError as exc:
        p.error(str(exc))
    if args.static:
        args.arches = [a.strip() for a in args.static.split(",") if a.strip()]
        for a in args.arches:
            try:
                build.nvcc_flags(a)
            except ValueError as exc:
                p.error(str(exc))
        if not args.variants:
            args.variants = parse_sources(["worktree"])
    elif args.variant_dir and not args.sources and len(args.variants) == 1:
        p.error("--variant-dir needs a second variant to compare with (e.g. --sources worktree)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="normfuse-variants-") as workdir:
        try:
            variants = [materialise(v, Path(workdir)) for v in args.variants]
        except VariantError as exc:
            sys.exit(f"error: {exc}")
        if args.save_sources:
            for v in variants:
                if v.commit is None:
                    continue
                dest = args.save_sources / v.commit[:12]
                dest.mkdir(parents=True, exist_ok=True)
                for f in SOURCE_FILES:
                    shutil.copyfile(v.source_dir / f, dest / f)
                (dest / "COMMIT").write_text(f"{v.commit} {v.base}\n")
                print(f"{v.label}: {dest}  (use: --variant-dir {dest}, or --sources {dest}+SWITCH)")
            return
        if args.static:
            dtype = (args.dtypes or ["bfloat16"])[0]
            try:
                rows = static_analysis(variants, args.arches, args.ops or list(OPS), dtype,
                                       tuple(args.hidden or TARGET_HIDDEN), tune=args.tune)
            except VariantError as exc:
                sys.exit(f"error: {exc}")
            table = report_static(rows)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "kernels-static.json").write_text(json.dumps(
                    {"variants": [v.describe() for v in variants], "results": rows}, indent=1))
                (args.out / "kernels-static.md").write_text(table + "\n")
            print(table)
            return
        args.out = args.out or ROOT / "bench" / "results"
        args.out.mkdir(parents=True, exist_ok=True)
        args.partial = args.out / "partial.json"
        if variants:
            try:
                data = run_variants(args, variants)
            except VariantError as exc:
                sys.exit(f"error: {exc}")
        else:
            data = run(args)
        args.partial.unlink(missing_ok=True)
    gpu = data["device"]["name"].lower().replace("nvidia ", "").replace(" ", "-")
    if variants:
        stem = f"{gpu}-kernels-ab"
        (args.out / f"{stem}.json").write_text(json.dumps(data, indent=1))
        table = report_variants(data)
        (args.out / f"{stem}.md").write_text(table + "\n")
        print(table)
        return
    stem = f"{gpu}-kernels" + ("-quick" if args.quick else "") + ("-tune" if args.tune else "")
    (args.out / f"{stem}.json").write_text(json.dumps(data, indent=1))
    table = report(data)
    (args.out / f"{stem}.md").write_text(table + "\n")
    plot(data, args.out / f"{stem}.png")
    print(table)


if __name__ == "__main__":
    main()
