"""Compile the kernels to PTX with nvcc, cached on disk, and check PTX with ptxas.

One PTX module per (op, x dtype, gamma dtype, architecture, launch variant), holding that one
kernel; without a variant, one module holds every variant of `config.variants` (what the ptxas
check assembles). Modules are compiled on first use and cached under
$NORMFUSE_CACHE_DIR (default ~/.cache/normfuse/ptx), keyed by a hash of the sources and flags,
so an edited kernel is never served stale, and served only while the nvcc on PATH is of the
release that wrote it (see `_made_by_this_nvcc`). Building an engine needs nvcc; serving it does not,
since TensorRT embeds the PTX in the engine.

`source_dir` and `defines` (default: this directory, none) compile another copy of the sources,
e.g. an older revision's, or the same sources with a compile-time switch; both enter the cache key
(the sources are hashed from that directory, the defines are part of the unit). bench/kernels.py
uses them to time kernel versions side by side (`--sources`). Where no `defines` are passed,
$NORMFUSE_AB_DEFINES (comma-separated NAME or NAME=VALUE) supplies them, so that the GPU tests can
prove a switched kernel (`NORMFUSE_AB_DEFINES=NORMFUSE_AB_NO_TRAILING_SYNC pytest tests/gpu`); it is
for testing only: engines built with it set embed the switched kernels.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from . import config

SOURCE_DIR = Path(__file__).resolve().parent
HEADER = "norm_common.cuh"
ARCHES = ("sm_80", "sm_90")  # architectures the kernels are built and checked for
DEFAULT_ARCH = "sm_80"  # PTX for sm_80 is JIT-compiled by the driver on any newer GPU


class ToolchainError(RuntimeError):
    """nvcc or ptxas is missing or failed."""


_DEFINE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(=[A-Za-z0-9_.+-]*)?")


def source_path(op: str, source_dir: Path | None = None) -> Path:
    return Path(source_dir or SOURCE_DIR) / f"{config.FAMILY[config._spec(op).name]}.cu"


def nvcc_path() -> str | None:
    return shutil.which("nvcc")


_RELEASE = re.compile(r"release (\d+)\.(\d+)")


def ptx_release(ptx: str) -> tuple[int, int] | None:
    """The CUDA release of the nvcc that wrote `ptx`, from its header comment ("Cuda compilation
    tools, release 13.0, ..."); None where the header does not say."""
    header = ptx[:ptx.find(".version")] if ".version" in ptx else ptx[:1000]
    found = _RELEASE.search(header)
    return (int(found[1]), int(found[2])) if found else None


@lru_cache(maxsize=None)
def nvcc_release(nvcc: str | None = None) -> tuple[int, int] | None:
    """The CUDA release of `nvcc` (default: the one on PATH), from `nvcc --version`; None without one."""
    nvcc = nvcc or nvcc_path()
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = _RELEASE.search(out)
    return (int(found[1]), int(found[2])) if found else None


@lru_cache(maxsize=None)
def driver_cuda_version() -> tuple[int, int] | None:
    """The newest CUDA release the installed driver supports (cuDriverGetVersion: 12080 is 12.8);
    None where no driver library loads (no GPU here)."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
            return None
        return version.value // 1000, version.value % 1000 // 10
    return None


def check_driver_loads(release: tuple[int, int] | None, driver: tuple[int, int] | None, what: str) -> None:
    """ToolchainError unless a driver supporting CUDA `driver` can load PTX that nvcc of `release`
    wrote: a driver JIT-compiles only PTX of its own release or older (newer fails with
    CUDA_ERROR_UNSUPPORTED_PTX_VERSION, at engine build or load). Unknown on either side: no check."""
    if release is None or driver is None or driver >= release:
        return
    r, d = ".".join(map(str, release)), ".".join(map(str, driver))
    raise ToolchainError(f"{what} PTX written by nvcc of CUDA {r}, and this GPU's driver supports CUDA {d} at "
                         f"most, so it cannot load it: put an nvcc of CUDA {d} or older first on PATH, or update "
                         "the driver")


def ptxas_path() -> str | None:
    found = shutil.which("ptxas")
    if found:
        return found
    nvcc = nvcc_path()
    if nvcc:
        candidate = Path(nvcc).with_name("ptxas")
        if candidate.exists():
            return str(candidate)
    return None


def _arch_number(arch: str) -> str:
    try:
        number = config.arch_number(arch)
    except ValueError:
        number = 0
    if number < 80:
        raise ValueError(f"unsupported architecture {arch!r}; the kernels need sm_80 or newer")
    return str(number)


def module_source(op: str, x_dtype: str, gamma_dtype: str | None,
                  variant: tuple[int, ...] | None = None, defines: tuple[str, ...] = (),
                  arch: str = DEFAULT_ARCH) -> str:
    """The translation unit nvcc compiles: the op's .cu with its dtypes and launch variants fixed.

    `variant` (threads per row, rows per block, slots[, blocks per row]) keeps one entry point;
    None keeps all that `arch` supports (the split-row variants need sm_90 or newer).
    `defines` ("NAME" or "NAME=VALUE") are #defined first: compile-time switches of the kernels.
    """
    g = config.gamma_dtype_name(x_dtype, gamma_dtype)
    split_ok = config.supports_split(arch)
    available = config.variants(x_dtype) + (config.split_variants(x_dtype) if split_ok else [])
    chosen = available if variant is None else [tuple(variant)]
    for v in chosen:
        if v not in available:
            if v in config.split_variants(x_dtype):
                raise ValueError(f"{v} is a split-row variant: it needs thread block clusters, sm_90 or newer, "
                                 f"not {arch}")
            raise ValueError(f"{v} is not a compiled variant for {x_dtype}")
    one_block = " ".join(f"V({t}, {r}, {c})" for t, r, c in (v for v in chosen if len(v) == 3))
    split = " ".join(f"W({t}, {s}, {c})" for t, _, c, s in (v for v in chosen if len(v) == 4))
    switches = ""
    for d in defines:
        if not _DEFINE.fullmatch(d):
            raise ValueError(f"bad define {d!r}: expected NAME or NAME=VALUE")
        name, _, value = d.partition("=")
        switches += f"#define {name} {value or 1}\n"
    return (switches + f"#define NORMFUSE_X {config.CUDA_TYPE[x_dtype]}\n"
            f"#define NORMFUSE_G {config.CUDA_TYPE[g]}\n"
            f"#define NORMFUSE_VARIANTS(V) {one_block}\n"
            + (f"#define NORMFUSE_SPLIT_VARIANTS(W) {split}\n" if split else "")
            + f'#include "{source_path(op).name}"\n')


def nvcc_flags(arch: str) -> list[str]:
    return ["-ptx", f"-arch=compute_{_arch_number(arch)}", "-std=c++17", "-O3", "-lineinfo"]


def cache_dir() -> Path:
    return Path(os.environ.get("NORMFUSE_CACHE_DIR", Path.home() / ".cache" / "normfuse" / "ptx"))


def _cache_key(op: str, unit: str, flags: list[str], source_dir: Path | None = None) -> str:
    h = hashlib.sha256()
    for path in (source_path(op, source_dir), Path(source_dir or SOURCE_DIR) / HEADER):
        h.update(path.read_bytes())
    h.update(unit.encode())
    h.update("\0".join(flags).encode())
    return h.hexdigest()[:20]


def target_arch() -> str:
    """Architecture to build for: $NORMFUSE_CUDA_ARCH, else the visible GPU's, else sm_80."""
    env = os.environ.get("NORMFUSE_CUDA_ARCH")
    if env:
        return env if env.startswith("sm_") else f"sm_{env}"
    try:
        import cupy  # noqa: PLC0415

        return f"sm_{cupy.cuda.Device().compute_capability}"  # e.g. "90"
    except Exception:  # no CuPy, no driver or no device
        return DEFAULT_ARCH


def env_defines() -> tuple[str, ...]:
    """The compile-time switches $NORMFUSE_AB_DEFINES names (comma- or space-separated)."""
    return tuple(d for d in re.split(r"[,\s]+", os.environ.get("NORMFUSE_AB_DEFINES", "")) if d)


def get_ptx(op: str, x_dtype: str, gamma_dtype: str | None = None, arch: str | None = None,
            variant: tuple[int, ...] | None = None, source_dir: Path | str | None = None,
            defines: tuple[str, ...] | None = None) -> str:
    """PTX text of `op`'s module for x in `x_dtype` and gamma/beta in `gamma_dtype` (None: x's).

    With `variant` = (threads per row, rows per block, slots[, blocks per row]) the module holds
    only that kernel (what the TensorRT plugin embeds and the launcher loads, see
    `ptx_for_launch`); without it, every variant of `config.variants`, and on sm_90 and newer of
    `config.split_variants` (what the ptxas check assembles). `source_dir` and
    `defines`: another copy of the sources, compile-time switches (see the module docstring);
    `defines=None` takes $NORMFUSE_AB_DEFINES, normally unset.
    """
    defines = env_defines() if defines is None else defines
    return _get_ptx(config._spec(op).name, x_dtype, config.gamma_dtype_name(x_dtype, gamma_dtype),
                    arch or target_arch(), None if variant is None else tuple(variant),
                    None if source_dir is None else str(Path(source_dir).resolve()), tuple(defines))


def ptx_for_launch(op: str, x_dtype: str, gamma_dtype: str | None, cfg: config.LaunchConfig,
                   arch: str | None = None, source_dir: Path | str | None = None,
                   defines: tuple[str, ...] | None = None) -> str:
    """The one-kernel module that runs `cfg`."""
    return get_ptx(op, x_dtype, gamma_dtype, arch, cfg.variant, source_dir, defines)


@lru_cache(maxsize=None)
def _get_ptx(op: str, x_dtype: str, g: str, arch: str, variant: tuple[int, ...] | None,
             source_dir: str | None = None, defines: tuple[str, ...] = ()) -> str:
    sources = Path(source_dir) if source_dir else SOURCE_DIR
    flags = nvcc_flags(arch)
    unit = module_source(op, x_dtype, g, variant, defines, arch)
    tag = "all" if variant is None else "t{}_r{}_c{}".format(*variant) + "".join(f"_s{s}" for s in variant[3:])
    name = (f"{config.FAMILY[op]}_{config.SHORT[x_dtype]}_{config.SHORT[g]}_{arch}_{tag}_"
            f"{_cache_key(op, unit, flags, sources)}.ptx")
    cached = cache_dir() / name
    if cached.exists():
        ptx = cached.read_text()
        if _made_by_this_nvcc(ptx):
            return ptx
    nvcc = nvcc_path()
    if nvcc is None:
        raise ToolchainError("nvcc is not on PATH: install the CUDA toolkit to compile the normfuse kernels")
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / name
        src = Path(tmp) / "module.cu"
        src.write_text(unit)
        cmd = [nvcc, *flags, "-I", str(sources), "-o", str(out), str(src)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise ToolchainError(f"nvcc failed ({' '.join(cmd)}):\n{result.stderr}")
        ptx = out.read_text()
    tmp_file = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp_file.write_text(ptx)
    os.replace(tmp_file, cached)  # atomic: concurrent builders never see half a file
    return ptx


def _made_by_this_nvcc(ptx: str) -> bool:
    """Whether cached PTX may be served: written by the release of the nvcc on PATH (another nvcc,
    picked to suit an older driver say, compiles it again), or there is no nvcc to compile it again
    (a cache shipped with the project), or $NORMFUSE_PTX_ANY_NVCC is set (a cache compiled elsewhere,
    to be used as it is)."""
    if os.environ.get("NORMFUSE_PTX_ANY_NVCC") or nvcc_path() is None:
        return True
    return ptx_release(ptx) == nvcc_release()


def kernels_fingerprint() -> str:
    """A hash of what the plugins' kernels are made from: the CUDA sources, the launch table and
    tactics (config.py, trt.py), the compile-time switches in force and nvcc's release. TensorRT keys
    a plugin's timings in a timing cache by its name and shapes only, so a cache is kept only while
    this is unchanged (export.tensorrt_engine)."""
    h = hashlib.sha256()
    for path in sorted([*SOURCE_DIR.glob("*.cu"), SOURCE_DIR / HEADER, SOURCE_DIR / "config.py", SOURCE_DIR / "trt.py"]):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    h.update("\0".join(env_defines()).encode())
    h.update(repr(nvcc_release()).encode())
    return h.hexdigest()[:20]


def ptxas_check(ptx: str, arch: str, cubin: Path | None = None) -> str:
    """Assemble `ptx` for `arch` with ptxas; returns its resource report (-v), raises on error.

    `cubin`: also keep the assembled cubin there (for cuobjdump -sass / nvdisasm).
    """
    ptxas = ptxas_path()
    if ptxas is None:
        raise ToolchainError("ptxas is not on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "module.ptx"
        src.write_text(ptx)
        out = Path(cubin) if cubin is not None else Path(tmp) / "module.cubin"
        result = subprocess.run([ptxas, f"-arch={arch}", "-v", "-o", str(out), str(src)],
                                capture_output=True, text=True)
    if result.returncode != 0:
        raise ToolchainError(f"ptxas -arch={arch} failed:\n{result.stderr}")
    return result.stderr


def prebuild(arch: str | None = None, jobs: int | None = None, ops=None, dtypes=None) -> int:
    """Compile every one-kernel module (all ops, dtype pairs, variants) in parallel; returns the count."""
    from concurrent.futures import ThreadPoolExecutor

    from normops import OPS, SUPPORTED_DTYPES

    arch = arch or target_arch()
    work = []
    for op in ops or OPS:
        for x in dtypes or SUPPORTED_DTYPES:
            for g in dict.fromkeys((x, "float32")):
                split = config.split_variants(x) if config.supports_split(arch) else []
                for v in config.variants(x) + split:
                    work.append((op, x, g, arch, v))
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as pool:
        list(pool.map(lambda w: get_ptx(*w), work))
    return len(work)
