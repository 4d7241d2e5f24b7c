"""Run the normfuse kernels' CUDA source on the CPU: a test instrument for machines without a GPU.

The translation unit is the one nvcc compiles (`build.module_source`, every variant, split-row
ones included), compiled by the host C++ compiler against `emulation/cuda_host.h`, which runs each
CUDA thread as a fiber and each block on an OS thread (its header says what is emulated and what
fails a launch). Launches take the `config.launch_config` shape and the `trt.aot_impl` argument
order, as the GPU launcher does. So a wrong index, slice, statistic merge, barrier or launch shape
fails a CPU test; the PTX, its speed and the GPU's own rounding (rsqrtf, fused multiply-adds) are
for tests/gpu to prove.

Each launch runs in a forked child over shared memory: every buffer ends at a page that may not
be touched, so a read or write past a tensor's end kills the child (reported as such), and a hang
is stopped after `timeout` seconds. Outputs start as NaN, so an element never written shows.
Libraries are cached beside the PTX cache, in its parent folder's `emulated/` (by default
~/.cache/normfuse/emulated), keyed by the sources and flags.
"""
from __future__ import annotations

import ctypes
import faulthandler
import hashlib
import mmap
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from normops import DEFAULT_EPSILON, OPS

from . import build, config, launcher

EMULATION_DIR = Path(__file__).resolve().parent / "emulation"
EMULATED_ARCH = "sm_90"  # the arch whose module is emulated: it holds every variant, split-row ones too
# -O0: half the compile time of -O1, and a launch's time goes to switching threads, not arithmetic.
# Hidden visibility: g++ makes a static local of an inline function (every __shared__ variable here)
# a process-wide unique symbol, so two loaded modules would share one block's shared memory.
FLAGS = ["-std=c++17", "-O0", "-fPIC", "-shared", "-pthread", "-fvisibility=hidden", "-fvisibility-inlines-hidden",
         "-Wno-unknown-pragmas"]
UNSUPPORTED_DEFINES = {
    "NORMFUSE_AB_MIN_THREADS_PER_SM": "a register cap means nothing on the CPU",
}


ORDERS = {"fifo": 0, "lifo": 1}  # cuda_host.h's kFifo, kLifo


class EmulationError(RuntimeError):
    """The emulated launch failed: a barrier misuse, a deadlock, an access past a buffer, a crash."""


def host_compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


@lru_cache(maxsize=None)
def cuda_include_dir() -> Path | None:
    """Where nvcc finds cuda_fp16.h/cuda_bf16.h (the emulation includes the real ones)."""
    nvcc = build.nvcc_path()
    if nvcc is None:
        return None
    out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    for found in re.findall(r'INCLUDES="-I([^"]+)"', out):
        if (Path(found) / "cuda_bf16.h").exists():
            return Path(found).resolve()
    return None


def unavailable_reason() -> str | None:
    """Why kernels cannot be emulated here, or None."""
    if not hasattr(os, "fork") or not Path("/proc/self").exists():
        return "the emulator needs Linux (fork, mprotect and ucontext)"
    if host_compiler() is None:
        return "no host C++ compiler (g++ or c++) on PATH"
    if cuda_include_dir() is None:
        return "no CUDA toolkit headers (nvcc with cuda_bf16.h) to compile the kernels' source against"
    return None


def kernel_names(op: str, x_dtype: str, variant: tuple[int, ...] | None = None) -> list[str]:
    """The entry points of the emulated module (every variant, or `variant`'s), as `config.kernel_name`
    spells them."""
    chosen = config.variants(x_dtype) + config.split_variants(x_dtype) if variant is None else [variant]
    return [config.kernel_name(op, *v) if len(v) == 3 else config.kernel_name(op, v[0], v[1], v[2], v[3])
            for v in chosen]


def emulated_source(op: str, x_dtype: str, gamma_dtype: str | None, defines: tuple[str, ...] = (),
                    variant: tuple[int, ...] | None = None) -> str:
    """nvcc's translation unit plus one C entry per kernel that launches it on the emulator."""
    for d in defines:
        reason = UNSUPPORTED_DEFINES.get(d.partition("=")[0])
        if reason:
            raise ValueError(f"{d} cannot be emulated: {reason}")
    unit = build.module_source(op, x_dtype, gamma_dtype, variant, defines, arch=EMULATED_ARCH)
    entries = "".join(
        f'extern "C" __attribute__((visibility("default"))) const char* normfuse_emulate_{name}(\n'
        f"        unsigned grid, unsigned block, unsigned cluster, unsigned order, void** params) {{\n"
        f"    return ::normfuse_emu::launch({name}, grid, block, cluster, order, params);\n}}\n"
        for name in kernel_names(op, x_dtype, variant))
    return unit + entries


def library(op: str, x_dtype: str, gamma_dtype: str | None = None, defines: tuple[str, ...] = (),
            source_dir: Path | str | None = None, variant: tuple[int, ...] | None = None) -> ctypes.CDLL:
    """The compiled emulation of `op`'s module for these dtypes (built on first use, then cached).

    `source_dir`: another copy of the kernel sources (as `build.get_ptx` takes), e.g. an edited one;
    `variant`: only that kernel (seconds less to compile, for a one-off source).
    """
    return _library(config._spec(op).name, x_dtype, config.gamma_dtype_name(x_dtype, gamma_dtype), tuple(defines),
                    str(Path(source_dir or build.SOURCE_DIR).resolve()), None if variant is None else tuple(variant))


@lru_cache(maxsize=None)
def _library(op: str, x_dtype: str, g: str, defines: tuple[str, ...], source_dir: str,
             variant: tuple[int, ...] | None) -> ctypes.CDLL:
    reason = unavailable_reason()
    if reason:
        raise build.ToolchainError(f"cannot emulate the kernels: {reason}")
    sources = Path(source_dir)
    unit = emulated_source(op, x_dtype, g, defines, variant)
    cxx = str(host_compiler())
    flags = FLAGS + ["-include", "cuda_host.h", "-I", str(EMULATION_DIR), "-I", str(sources),
                     "-I", str(cuda_include_dir())]
    h = hashlib.sha256()
    for path in (build.source_path(op, sources), sources / build.HEADER, *sorted(EMULATION_DIR.glob("*.h"))):
        h.update(path.read_bytes())
    h.update(unit.encode())
    h.update("\0".join([cxx, *flags]).encode())
    tag = "all" if variant is None else "_".join(map(str, variant))
    name = f"{config.FAMILY[op]}_{config.SHORT[x_dtype]}_{config.SHORT[g]}_{tag}_{h.hexdigest()[:20]}.so"
    cached = build.cache_dir().parent / "emulated" / name
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "module.cpp"
            src.write_text(unit)
            out = Path(tmp) / name
            result = subprocess.run([cxx, *flags, "-o", str(out), str(src)], capture_output=True, text=True)
            if result.returncode != 0:
                raise build.ToolchainError(f"{cxx} failed to compile the emulated {op} module:\n{result.stderr[-4000:]}")
            staged = cached.with_suffix(f".{os.getpid()}.tmp")
            shutil.move(out, staged)  # the temporary folder may be on another file system
        os.replace(staged, cached)  # atomic, as the PTX cache: a concurrent build never sees half a file
    return ctypes.CDLL(str(cached))


# ---------------------------------------------------------------- buffers with a guard page
_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class GuardedBuffer:
    """Shared memory (the forked launch writes it, the parent reads it) holding one array whose
    last byte lies within 16 bytes of a page nothing may touch; its start keeps the original
    array's address modulo 16, so a test's misaligned tensor stays misaligned."""

    def __init__(self, array: np.ndarray, misalign: int = 0):
        nbytes = array.nbytes
        pages = -(-(nbytes + 16) // _PAGE) + 1
        self.map = mmap.mmap(-1, pages * _PAGE)  # MAP_SHARED | MAP_ANONYMOUS
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        guard = base + (pages - 1) * _PAGE
        if _libc.mprotect(guard, _PAGE, 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed on a guard page")
        start = guard - nbytes
        start -= (start - misalign) % 16
        self.address = start
        self.array = np.frombuffer(self.map, dtype=array.dtype, count=array.size, offset=start - base).reshape(array.shape)
        self.array[...] = array


def _misalignment(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0] % 16


def numpy_dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def run(op: str, *inputs: np.ndarray, epsilon: float = DEFAULT_EPSILON, layout: tuple[int, ...] | None = None,
        defines: tuple[str, ...] = (), source_dir: Path | str | None = None, order: str | int = "lifo",
        one_kernel: bool = False, timeout: float = 120.0) -> tuple[np.ndarray, ...]:
    """Run `op` on numpy arrays in contract order (x, [residual], gamma, [beta]) through its emulated
    kernel; returns (y, [sum]) shaped like x. A C-contiguous array whose address is not 16-byte
    aligned (a slice) keeps that misalignment, so the kernels' scalar paths can be tested.

    `order`: which released thread runs first, "lifo" (a warp races ahead: a missing barrier lets it
    overwrite what others have not read), "fifo", or an int >= 2 seeding a random order.
    `one_kernel`: compile only the launched kernel (for sources compiled once, e.g. an edited copy).
    """
    if isinstance(order, str) and order in ORDERS:
        order_code = ORDERS[order]
    elif isinstance(order, int) and order >= 2:  # 0 and 1 are the named orders' codes
        order_code = order
    else:
        raise ValueError(f"order must be one of {sorted(ORDERS)} or an int >= 2, got {order!r}")
    spec = OPS[op]
    named = launcher.named_inputs(op, inputs)
    launcher.check_operands(op, named)  # what the GPU launcher refuses, refused here too
    x, gamma = named["x"], named["gamma"]
    rows, hidden = launcher.rows_and_hidden(x.shape)
    cfg = config.launch_config(op, launcher.dtype_name(x), rows, hidden, layout=layout)
    module = library(op, launcher.dtype_name(x), launcher.dtype_name(gamma), tuple(defines), source_dir,
                     cfg.variant if one_kernel else None)
    entry = getattr(module, f"normfuse_emulate_{cfg.kernel}")
    entry.restype = ctypes.c_char_p
    entry.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]

    ins = [GuardedBuffer(a, _misalignment(a)) for a in inputs]
    outs = [GuardedBuffer(np.full(x.shape, np.nan, dtype=x.dtype), _misalignment(x)) for _ in spec.outputs]
    if rows == 0:
        return tuple(o.array.copy() for o in outs)
    values = ([ctypes.c_void_p(b.address) for b in ins]
              + [ctypes.c_int32(rows), ctypes.c_int32(hidden), ctypes.c_int32(config.epsilon_bits(epsilon))]
              + [ctypes.c_void_p(b.address) for b in outs])
    params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    _launch_in_child(lambda: entry(int(cfg.grid), cfg.block, cfg.ctas_per_row, order_code, params),
                     cfg.kernel, timeout)
    return tuple(o.array.copy() for o in outs)


def _launch_in_child(launch, kernel: str, timeout: float) -> None:
    """Run `launch()` (returns None or an error message) in a forked child; raise on any failure."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: launch, report, leave without running the parent's clean-up
        os.close(read_end)
        faulthandler.disable()  # a crash is the parent's to report, not a traceback on stderr
        code = 0
        try:
            message = launch()
            if message:
                os.write(write_end, message[:8000])
                code = 1
        except BaseException as e:  # noqa: BLE001 - anything the child meets goes to the parent
            os.write(write_end, repr(e).encode()[:8000])
            code = 2
        os._exit(code)
    os.close(write_end)
    message, deadline = b"", time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise EmulationError(f"{kernel}: the emulated launch ran past {timeout:.0f} s (a hang?)")
            ready, _, _ = select.select([read_end], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(read_end, 65536)
                if not chunk:
                    break
                message += chunk
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(read_end)
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
        hint = " (a read or write past the end of a tensor reaches its guard page)" if sig == "SIGSEGV" else ""
        raise EmulationError(f"{kernel}: the emulated launch died of {sig}{hint}")
    if os.WEXITSTATUS(status) != 0:
        raise EmulationError(f"{kernel}: {message.decode(errors='replace')}")
