"""TensorRT engines: build a `.plan` from an ONNX graph with the normfuse plugins registered.

    python -m export.tensorrt_engine build/small-rmsnorm/fused-tensorrt.onnx -o fused.plan \\
        --batch 1:1:8 --seq 1:128:2048 [--precision strongly-typed|fp16|bf16|fp32] \\
        [--workspace-mb 4096] [--timing-cache build/timing.cache]

The network is parsed from the ONNX file (external weights are read from beside it), built
with one optimisation profile (MIN:OPT:MAX for the batch axis and the sequence axis of every
input), a workspace limit and a timing cache kept on disk, and written atomically with a JSON
sidecar (`<plan>.json`): TensorRT version, GPU and compute capability, profile, precision, the
plugins in the graph with their versions, the compile-time kernel switches in force
($NORMFUSE_AB_DEFINES), and the ONNX file's SHA-256.

The normfuse ops are TensorRT plugins registered through `tensorrt.plugin` with an AOT
implementation (plugins/); the network prefers AOT plugins, so their PTX is embedded in the
engine and serving it needs neither Python nor our package. The ONNX parser needs no flag for
them: a node whose op type it does not import itself is looked up in the plugin registry by op
type, `plugin_version` and `plugin_namespace`. The unfused reference graph builds without
plugins: TensorRT imports LayerNormalization natively, RMSNormalization since 10.15, and
otherwise runs the elementary ops (its own fusions may merge them).

Precision: `strongly-typed` builds the types the ONNX graph has. `fp16`, `bf16` and `fp32` build a
weakly typed network (TensorRT picks kernel precisions, fp16/bf16 allowed or not); TensorRT 11
removed weak typing (every network is strongly typed, `BuilderFlag.FP16`/`BF16` are gone), so
there they are a usage error: export the graph in the dtype wanted instead.

TensorRT is imported lazily; without it this module imports, and building says how to install it.
"""
from __future__ import annotations

import hashlib
import json
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import NormfuseError, UsageError, first_line
from .files import atomic_path, write_json

INSTALL_HINT = ("install it on a machine with an NVIDIA GPU and driver: `pip install tensorrt` (its libraries come "
                "from NVIDIA's package index at install time) or use NVIDIA's TensorRT container; without it, run "
                "the ONNX graph on ONNX Runtime (ort-cpu or ort-cuda)")
PRECISIONS = ("strongly-typed", "fp16", "bf16", "fp32")
SIDECAR_VERSION = 1

if TYPE_CHECKING:  # the flag helpers' annotations (mypy reads tensorrt-stubs); nothing at run time
    import tensorrt


class TensorRTMissing(NormfuseError):
    pass


def tensorrt_status() -> tuple[bool, str]:
    """(importable, why not). Type stubs alone (tensorrt-stubs) leave a `tensorrt` namespace
    package without the bindings; that counts as missing."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return False, "TensorRT is not installed"
    try:
        import tensorrt
    except Exception as exc:  # a broken install: missing libnvinfer, CUDA mismatch
        return False, f"TensorRT is installed but does not import ({exc.__class__.__name__}: {first_line(exc)})"
    if not hasattr(tensorrt, "Builder"):
        return False, "only TensorRT's type stubs are installed (the `tensorrt` package has no bindings)"
    return True, ""


def import_tensorrt() -> Any:
    """The tensorrt module, or TensorRTMissing with one line saying why and how to install it."""
    present, reason = tensorrt_status()
    if not present:
        raise TensorRTMissing(f"{reason}; {INSTALL_HINT}")
    import tensorrt

    return tensorrt


def trt_dtype_name(dtype: Any) -> str:
    """Contract dtype name of a tensorrt.DataType."""
    names = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
             "BOOL": "bool", "INT8": "int8", "UINT8": "uint8"}
    key = getattr(dtype, "name", str(dtype).split(".")[-1])
    if key not in names:
        raise NormfuseError(f"unsupported TensorRT tensor type {key}")
    return names[key]


@dataclass(frozen=True)
class Range:
    """MIN:OPT:MAX of one dynamic axis in the optimisation profile."""

    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str, flag: str = "range") -> Range:
        """'8' -> 8:8:8, '1:128:512' -> Range(1, 128, 512)."""
        parts = text.split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise UsageError(f"{flag} {text!r}: expected MIN:OPT:MAX integers, e.g. 1:128:512") from None
        if len(values) == 1:
            values *= 3
        if len(values) != 3:
            raise UsageError(f"{flag} {text!r}: expected MIN:OPT:MAX (three numbers) or one number")
        lo, opt, hi = values
        if not 1 <= lo <= opt <= hi:
            raise UsageError(f"{flag} {text!r}: need 1 <= MIN <= OPT <= MAX")
        return cls(lo, opt, hi)

    def covering(self, *values: int) -> Range:
        """This range widened to include `values`."""
        return Range(min(self.min, *values), self.opt, max(self.max, *values))

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


@dataclass
class EngineOptions:
    batch: Range = Range(1, 1, 8)
    seq: Range = Range(1, 128, 512)
    dims: dict[str, Range] = field(default_factory=dict)  # named dynamic dimensions (export.dims)
    precision: str = "strongly-typed"  # types as the ONNX graph has them
    workspace_mb: int = 4096
    timing_cache: Path | None = None
    optimization_level: int | None = None  # TensorRT's default (3) when None
    plugins: bool = True
    verbose: bool = False


def profile_shapes(model_path: str | Path, batch: Range, seq: Range,
                   dims: dict[str, Range] | None = None) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shape of every graph input, each sized by `export.dims.input_shapes` (the rule
    random inputs follow): fixed dimensions are kept, `dims` sizes named ones, a dynamic axis 0 is
    the batch and any other the sequence, and a derived name ('past + seq') is worked out."""
    from .dims import input_shapes
    from .triton_repo import onnx_signature

    inputs, _ = onnx_signature(model_path)
    per_kind = {kind: input_shapes(inputs, getattr(batch, kind), getattr(seq, kind),
                                   {name: getattr(r, kind) for name, r in (dims or {}).items()}, str(model_path))
                for kind in ("min", "opt", "max")}
    shapes = {}
    for spec in inputs:
        shape = {kind: per_kind[kind][spec.name] for kind in per_kind}
        for axis, (lo, opt, hi) in enumerate(zip(shape["min"], shape["opt"], shape["max"])):
            if not lo <= opt <= hi:
                raise NormfuseError(f"{model_path}: input {spec.name!r} axis {axis} would be {lo}:{opt}:{hi} "
                                    "(MIN:OPT:MAX) in the profile; give its names ranges with --dim NAME=MIN:OPT:MAX")
        shapes[spec.name] = shape
    return shapes


def plugin_ops(model_path: str | Path) -> list[dict]:
    """The plugin ops the graph uses: name, namespace, version, node count (sorted by name); nodes
    inside If/Loop/Scan bodies and local functions count too (a merged decoder's fused norms sit in
    its If's branches, and the parser needs their plugins registered as much as the main graph's)."""
    from normops import DOMAIN

    from .onnx_io import graph_skeleton
    from .rewrite.scopes import all_nodes

    found: dict[tuple, int] = {}
    for node in all_nodes(graph_skeleton(model_path)):
        if node.domain != DOMAIN:
            continue
        attrs = {a.name: a.s.decode() for a in node.attribute if a.name in ("plugin_namespace", "plugin_version")}
        key = (node.op_type, attrs.get("plugin_namespace", ""), attrs.get("plugin_version", ""))
        found[key] = found.get(key, 0) + 1
    return [{"name": n, "namespace": ns, "version": v, "nodes": c} for (n, ns, v), c in sorted(found.items())]


def io_signature(onnx_path: str | Path) -> dict:
    """The engine's inputs and outputs as the ONNX graph declares them (TensorRT keeps the names)."""
    from .triton_repo import onnx_signature

    inputs, outputs = onnx_signature(onnx_path)
    return {kind: [{"name": t.name, "dtype": t.dtype, "shape": t.shape, "dim_params": list(t.dim_params),
                    "rank_known": t.rank_known} for t in tensors]
            for kind, tensors in (("inputs", inputs), ("outputs", outputs))}


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def gpu_info(device: int = 0) -> dict:
    """GPU name, compute capability, driver, memory of CUDA device `device`, from nvidia-smi and,
    where torch has CUDA, from CUDA itself; empty when there is no GPU."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        out = subprocess.run(["nvidia-smi", f"--id={device}", "--query-gpu=name,compute_cap,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    fields = [f.strip() for f in out.strip().splitlines()[0].split(",")] if out.strip() else []
    if len(fields) < 4:
        return {}
    info = {"name": fields[0], "compute_capability": fields[1], "driver": fields[2], "memory": fields[3]}
    # nvidia-smi numbers the GPUs in PCI order whatever CUDA_VISIBLE_DEVICES says, and CUDA (which
    # TensorRT runs on) fastest first: on a machine of mixed GPUs, device N's own figures come from CUDA
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(device)
            info.update(name=props.name, compute_capability=f"{props.major}.{props.minor}",
                        memory=f"{props.total_memory // 2**20} MiB")
    except Exception:  # no torch, or no CUDA in it: nvidia-smi's figures stand
        pass
    return info


def sidecar_path(plan_path: str | Path) -> Path:
    return Path(f"{plan_path}.json")


def make_sidecar(onnx_path: Path, plan_path: Path, options: EngineOptions, *, tensorrt_version: str,
                 gpu: dict, profiles: dict, build_seconds: float, plan_bytes: int) -> dict:
    from plugins.build import env_defines, kernels_fingerprint, nvcc_release

    plugins = plugin_ops(onnx_path)
    return {
        "sidecar_version": SIDECAR_VERSION,
        "plan": plan_path.name,
        "plan_bytes": plan_bytes,
        "onnx": str(onnx_path),
        "onnx_sha256": sha256(onnx_path),
        "tensorrt_version": tensorrt_version,
        "gpu": gpu.get("name"),
        "compute_capability": gpu.get("compute_capability"),
        "driver": gpu.get("driver"),
        "precision": options.precision,
        "workspace_mb": options.workspace_mb,
        "optimization_level": options.optimization_level,
        "timing_cache": str(options.timing_cache) if options.timing_cache else None,
        "profiles": [profiles],
        "batch_range": str(options.batch),
        "seq_range": str(options.seq),
        "dim_ranges": {name: str(r) for name, r in options.dims.items()},
        "plugins": plugins,
        # what the embedded kernels were made from (plugins.build.kernels_fingerprint) and by which nvcc
        **({"kernels_fingerprint": kernels_fingerprint(), "kernels_nvcc_release": _release_text(nvcc_release())}
           if plugins else {}),
        # compile-time kernel switches in force ($NORMFUSE_AB_DEFINES): an engine built with any
        # embeds kernels other than the default, proven ones
        "kernel_switches": list(env_defines()),
        "io": io_signature(onnx_path),
        "build_seconds": round(build_seconds, 3),
        "host": platform.node(),
    }


def _release_text(release: tuple[int, int] | None) -> str | None:
    return ".".join(map(str, release)) if release else None


def build_engine(onnx_path: str | Path, plan_path: str | Path, options: EngineOptions | None = None) -> dict:
    """Build `onnx_path` into `plan_path` (atomically) and write its sidecar; returns the sidecar."""
    import time

    options = options or EngineOptions()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if options.precision not in PRECISIONS:
        raise UsageError(f"unknown precision {options.precision!r}; choose from {', '.join(PRECISIONS)}")
    profiles = profile_shapes(onnx_path, options.batch, options.seq, options.dims)  # a bad --dim fails first
    import_tensorrt()
    uses_plugins = bool(plugin_ops(onnx_path))
    if uses_plugins:
        if not options.plugins:
            raise NormfuseError(f"{onnx_path}: holds normfuse plugin ops but plugins were turned off")
        from plugins import register_tensorrt_plugins
        from plugins.build import ToolchainError, check_driver_loads, driver_cuda_version, nvcc_release

        try:  # before TensorRT times the tactics, which is where a driver too old for the PTX fails
            check_driver_loads(nvcc_release(), driver_cuda_version(), "the plugins' kernels would be")
        except ToolchainError as exc:
            raise NormfuseError(f"{onnx_path}: {exc}") from None
        register_tensorrt_plugins()
    cache_in, cache_dropped = timing_cache_in(options.timing_cache, uses_plugins)
    started = time.perf_counter()
    serialized, cache_bytes = _build(onnx_path, options, profiles, uses_plugins, cache_in)
    seconds = time.perf_counter() - started
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(serialized)
    if options.timing_cache and cache_bytes:
        save_timing_cache(options.timing_cache, cache_bytes, uses_plugins)
    sidecar = make_sidecar(onnx_path, plan_path, options, tensorrt_version=_tensorrt_version(), gpu=gpu_info(),
                           profiles=profiles, build_seconds=seconds, plan_bytes=len(serialized))
    if cache_dropped:
        sidecar["timing_cache_dropped"] = cache_dropped
    write_json(sidecar_path(plan_path), sidecar)
    return sidecar


def kernels_stamp(timing_cache: str | Path) -> Path:
    """Where the fingerprint of the normfuse kernels a timing cache timed is kept, beside it."""
    return Path(f"{timing_cache}.kernels")


def timing_cache_in(timing_cache: str | Path | None, uses_plugins: bool) -> tuple[bytes, str | None]:
    """(the timing cache to start a build from, why the one on disk was left out or None).

    TensorRT keys a plugin's timings by its name, version and shapes, not by its kernels, so a cache
    that timed other normfuse kernels (another source, launch table, switch or nvcc) would have
    TensorRT pick a tactic number by old timings, without timing it again; a build with plugins
    starts from such a cache only while the kernels' fingerprint beside it is today's."""
    if not timing_cache or not Path(timing_cache).is_file():
        return b"", None
    if uses_plugins:
        from plugins.build import kernels_fingerprint

        stamp = kernels_stamp(timing_cache)
        if not stamp.is_file() or stamp.read_text().strip() != kernels_fingerprint():
            return b"", (f"{timing_cache} was left out: it " + ("timed other normfuse kernels" if stamp.is_file() else
                         "does not say which normfuse kernels it timed") + ", which TensorRT would not time again")
    return Path(timing_cache).read_bytes(), None


def save_timing_cache(timing_cache: str | Path, cache_bytes: bytes, uses_plugins: bool) -> None:
    """Write the timing cache and, after a build with plugins, the fingerprint of the kernels it timed.
    (A build without plugins keeps the plugin timings it was given, so their fingerprint stands.)"""
    with atomic_path(timing_cache) as tmp:
        tmp.write_bytes(cache_bytes)
    if uses_plugins:
        from plugins.build import kernels_fingerprint

        with atomic_path(kernels_stamp(timing_cache)) as tmp:
            tmp.write_text(kernels_fingerprint() + "\n")


def _tensorrt_version() -> str:
    import tensorrt as trt

    return str(trt.__version__)


def _parser_error(error: Any) -> str:
    """One line from a TensorRT ParserError: the node and its description."""
    try:
        return f"node {error.node()}: {error.desc()}"
    except Exception:
        return str(error)


def network_flags(creation_flag: type[tensorrt.NetworkDefinitionCreationFlag], precision: str,
                  uses_plugins: bool) -> int:
    """The `create_network` bit mask, from the members of `trt.NetworkDefinitionCreationFlag`.

    The bits are the members' values, which TensorRT 11 renumbered (STRONGLY_TYPED 1 -> 0,
    PREFER_AOT_PYTHON_PLUGINS 3 -> 2), so they are never written as numbers here."""
    flags = 0
    if uses_plugins:
        # our plugins define only aot_impl, which TensorRT would pick anyway; saying so keeps the
        # engine free of Python even if a JIT implementation is ever registered beside it
        flags |= 1 << int(creation_flag.PREFER_AOT_PYTHON_PLUGINS)
    strongly_typed = getattr(creation_flag, "STRONGLY_TYPED", None)  # deprecated and ignored in 11
    if precision == "strongly-typed" and strongly_typed is not None:
        flags |= 1 << int(strongly_typed)
    return flags


def precision_builder_flag(builder_flag: type[tensorrt.BuilderFlag], precision: str,
                           tensorrt_version: str = "") -> tensorrt.BuilderFlag | None:
    """The `trt.BuilderFlag` member a weakly typed precision sets (None for fp32 and
    strongly-typed); UsageError where this TensorRT has no weak typing (11 and later)."""
    if precision == "strongly-typed":
        return None
    if not hasattr(builder_flag, "FP16"):  # TensorRT 11 removed FP16/BF16/INT8/FP8 with weak typing
        raise UsageError(f"--precision {precision} asks for a weakly typed network, which TensorRT "
                         f"{tensorrt_version or 'this version'} does not build (every network is strongly typed "
                         "since TensorRT 11): use --precision strongly-typed with a graph exported in the dtype "
                         "wanted (e.g. --dtype float16)")
    return {"fp16": builder_flag.FP16, "bf16": builder_flag.BF16}.get(precision)


def _build(onnx_path: Path, options: EngineOptions, profiles: dict, uses_plugins: bool,
           cache_in: bytes) -> tuple[bytes, bytes]:
    """The TensorRT calls: network, parser, builder config, profile, timing cache, build.
    (Call import_tensorrt() first: it turns a missing TensorRT into a one-line error.)"""
    import tensorrt as trt

    builder_flag = precision_builder_flag(trt.BuilderFlag, options.precision, _tensorrt_version())
    logger = trt.Logger(trt.Logger.VERBOSE if options.verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt.NetworkDefinitionCreationFlag, options.precision, uses_plugins))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise NormfuseError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors[0] if errors else 'no detail'}"
                            + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if builder_flag is not None:
        config.set_flag(builder_flag)
    if options.optimization_level is not None:
        config.builder_optimization_level = options.optimization_level

    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in profiles:
            raise NormfuseError(f"{onnx_path}: network input {name!r} is not a graph input of the ONNX file")
        shape = profiles[name]
        profile.set_shape(name, trt.Dims(shape["min"]), trt.Dims(shape["opt"]), trt.Dims(shape["max"]))
    config.add_optimization_profile(profile)

    cache = config.create_timing_cache(cache_in)
    config.set_timing_cache(cache, False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise NormfuseError(f"{onnx_path}: TensorRT could not build an engine (run with --verbose for its log)")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())


def read_sidecar(plan_path: str | Path) -> dict | None:
    path = sidecar_path(plan_path)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def engine_mismatches(sidecar: dict | None, tensorrt_version: str, compute_capability: str | None,
                      driver: tuple[int, int] | None = None) -> list[str]:
    """Why an engine cannot load here, from its sidecar: a plan deserialises only in the TensorRT
    version that built it (10.9, 10.13 and 11.x plans are mutually unreadable; normfuse builds no
    version-compatible engines) and on the GPU architecture it was built for, and its plugins' PTX
    only where the driver supports the CUDA release of the nvcc that wrote it (`driver`, as
    plugins.build.driver_cuda_version reads it; None: not checked)."""
    if not sidecar:
        return []
    problems = []
    built_with = sidecar.get("tensorrt_version")
    if built_with and tensorrt_version and built_with != tensorrt_version:
        problems.append(f"built with TensorRT {built_with}, this is TensorRT {tensorrt_version}")
    built_for = sidecar.get("compute_capability")
    if built_for and compute_capability and built_for != compute_capability:
        problems.append(f"built for compute capability {built_for}, this GPU is {compute_capability}")
    release = sidecar.get("kernels_nvcc_release")
    if release and driver:
        from plugins.build import ToolchainError, check_driver_loads

        try:
            major, minor = (int(part) for part in release.split(".")[:2])
            check_driver_loads((major, minor), driver, "its plugins' kernels are")
        except ToolchainError as exc:
            problems.append(str(exc))
        except ValueError:  # a release the sidecar spells otherwise: TensorRT's own error stands
            pass
    return problems


def check_sidecar(plan_path: str | Path, onnx_path: str | Path | None = None) -> list[str]:
    """Reasons the engine may not fit here: another TensorRT, another GPU, a changed ONNX file."""
    sidecar = read_sidecar(plan_path)
    if sidecar is None:
        return [f"{plan_path}: no sidecar {sidecar_path(plan_path).name}"]
    present, _ = tensorrt_status()
    version = ""
    if present:
        import tensorrt

        version = str(tensorrt.__version__)
    from plugins.build import driver_cuda_version

    problems = engine_mismatches(sidecar, version, gpu_info().get("compute_capability"), driver_cuda_version())
    if onnx_path is not None and Path(onnx_path).is_file() and sha256(onnx_path) != sidecar["onnx_sha256"]:
        problems.append(f"{onnx_path} changed since the engine was built")
    return problems


@dataclass
class TensorRTRunner:
    """Runner interface (backends.make_runner) over a `.plan`; an `.onnx` is built first into a
    temporary engine whose profile covers `shapes`."""

    model_path: Path
    shapes: list[tuple[int, int]] = field(default_factory=lambda: [(1, 16), (2, 64)])
    dims: dict[str, int] = field(default_factory=dict)  # named dynamic dimensions, fixed (export.dims)
    name: str = "tensorrt"

    def __post_init__(self) -> None:
        import tempfile

        from .runtime import TensorRTModel

        path = Path(self.model_path)
        if path.suffix == ".onnx":
            self._tmp = tempfile.TemporaryDirectory()
            batches = [b for b, _ in self.shapes]
            seqs = [s for _, s in self.shapes]
            options = EngineOptions(batch=Range(min(batches), max(batches), max(batches)),
                                    seq=Range(min(seqs), max(seqs), max(seqs)),
                                    dims={name: Range(size, size, size) for name, size in self.dims.items()})
            plan = Path(self._tmp.name) / (path.stem + ".plan")
            build_engine(path, plan, options)
            path = plan
        self.model = TensorRTModel(path)
        self.output_names = self.model.output_names

    def run(self, feeds: dict) -> dict:
        return self.model.run(feeds)


def main(argv: list[str] | None = None) -> int:
    from .cli import DIM_RANGE_HELP, Parser, dim_range, output_file, positive_int, run_cli

    parser = Parser(prog="python -m export.tensorrt_engine", description=__doc__.splitlines()[0])
    parser.add_argument("onnx", help="ONNX graph (fused-tensorrt.onnx or reference.onnx)")
    parser.add_argument("-o", "--output", type=output_file, required=True, help="engine file (.plan); the sidecar is <output>.json")
    parser.add_argument("--batch", default="1:1:8", help="batch MIN:OPT:MAX (default 1:1:8)")
    parser.add_argument("--seq", default="1:128:512", help="sequence MIN:OPT:MAX (default 1:128:512)")
    parser.add_argument("--dim", type=dim_range, action="append", default=[], metavar="NAME=MIN:OPT:MAX",
                        help=DIM_RANGE_HELP)
    parser.add_argument("--precision", choices=PRECISIONS, default="strongly-typed",
                        help="strongly-typed: the ONNX graph's types (default); fp16/bf16/fp32: a weakly typed "
                             "network with (or without) those kernels, TensorRT 10 only")
    parser.add_argument("--workspace-mb", type=positive_int, default=4096, help="builder workspace limit in MiB (default 4096)")
    parser.add_argument("--timing-cache", type=output_file, help="timing cache file, read if present and updated")
    parser.add_argument("--optimization-level", type=int, choices=range(0, 6),
                        help="builder optimisation level 0..5 (default: TensorRT's, 3)")
    parser.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    args = parser.parse_args(argv)

    def job() -> int:
        options = EngineOptions(batch=Range.parse(args.batch, "--batch"), seq=Range.parse(args.seq, "--seq"),
                                dims=dict(args.dim),
                                precision=args.precision, workspace_mb=args.workspace_mb,
                                timing_cache=Path(args.timing_cache) if args.timing_cache else None,
                                optimization_level=args.optimization_level, verbose=args.verbose)
        sidecar = build_engine(args.onnx, args.output, options)
        plugins = ", ".join(f"{p['namespace']}::{p['name']} v{p['version']} x{p['nodes']}" for p in sidecar["plugins"])
        print(f"wrote {args.output} ({sidecar['plan_bytes'] / 2**20:.1f} MiB, TensorRT {sidecar['tensorrt_version']}, "
              f"{sidecar['gpu']} sm {sidecar['compute_capability']}, {sidecar['build_seconds']:.1f} s; "
              f"plugins: {plugins or 'none'})")
        return 0

    return run_cli(job)


if __name__ == "__main__":
    raise SystemExit(main())
