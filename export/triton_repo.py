"""A Triton Inference Server model repository for a built model, to scale out on Triton.

    python -m export.triton_repo build/small-rmsnorm/fused.plan --repo triton/ [--name normfuse_rmsnorm]
    python -m export.build --norm rmsnorm --triton-repo triton/     # the same, for every model built

Writes `<repo>/<name>/config.pbtxt` and `<repo>/<name>/1/model.plan` (the `tensorrt_plan`
platform) or `model.onnx` with its external weights (`onnxruntime_onnx`). The config gives the
inputs' and outputs' dtypes and dims; when axis 0 is dynamic it is Triton's batch axis
(`max_batch_size`, left out of `dims`) and dynamic batching is on. The sequence axis stays -1:
Triton batches requests of equal shape together. The text is checked by parsing it with Triton's
own protobuf definitions (`tritonclient.grpc.model_config_pb2`, from `pip install tritonclient[grpc]`).

TensorRT engines need no plugin library on the server: the normfuse plugins are AOT plugins,
their kernels are inside the engine, as PTX the driver compiles at load. The server's TensorRT
must be the version that built the engine, on the same GPU architecture, with a driver that
supports the CUDA release of the nvcc that wrote that PTX (see the engine's .json sidecar, copied
beside it: `kernels_nvcc_release`).
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import NormfuseError, UsageError
from .files import (copy_as_new, folder_made_for, no_room_names, replace_folder, require_file, require_writable,
                    staging_folder, write_text)

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
                "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8",
                "uint64": "TYPE_UINT64", "uint32": "TYPE_UINT32", "uint16": "TYPE_UINT16", "uint8": "TYPE_UINT8",
                "bool": "TYPE_BOOL", "string": "TYPE_STRING"}
PLATFORMS = {".onnx": "onnxruntime_onnx", ".plan": "tensorrt_plan"}
MODEL_FILES = {".onnx": "model.onnx", ".plan": "model.plan"}


class TritonClientMissing(NormfuseError):
    pass


def can_check_configs() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("tritonclient.grpc.model_config_pb2") is not None
    except ModuleNotFoundError:
        return False


@dataclass
class IO:
    name: str
    dtype: str
    shape: list[int | None]  # None: dynamic
    dim_params: tuple[str | None, ...] = ()  # the name of each dynamic axis the graph gives one (export.dims)
    rank_known: bool = True  # False: the graph gives no shape at all (shape is then empty)


def onnx_signature(path: str | Path) -> tuple[list[IO], list[IO]]:
    """Graph inputs (initializers excluded) and outputs of an ONNX file."""
    from .onnx_io import graph_skeleton
    from .rewrite.checks import FLOAT_TYPES

    import onnx

    model = graph_skeleton(path)

    def io(value) -> IO:
        kind = value.type.WhichOneof("value")
        if kind != "tensor_type":  # sequences, maps, optionals: nothing here makes or checks those
            raise NormfuseError(f"{path}: {value.name!r} is {'a ' + kind.removesuffix('_type') if kind else 'untyped'}, "
                                "not a tensor: normfuse runs models whose inputs and outputs are tensors")
        ttype = value.type.tensor_type
        if ttype.elem_type == onnx.TensorProto.STRING:  # numpy would call it object
            dtype = "string"
        else:
            dtype = FLOAT_TYPES.get(ttype.elem_type) or onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type).name
        shape = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
        params = tuple(d.dim_param or None if not d.HasField("dim_value") else None for d in ttype.shape.dim)
        return IO(value.name, dtype, shape, params, ttype.HasField("shape"))

    initializers = {t.name for t in model.graph.initializer}
    return ([io(v) for v in model.graph.input if v.name not in initializers], [io(v) for v in model.graph.output])


def plan_signature(path: str | Path) -> tuple[list[IO], list[IO], int | None, int | None]:
    """Inputs, outputs, and the profile's largest and smallest batch of an engine, from its sidecar."""
    from .tensorrt_engine import read_sidecar, sidecar_path

    sidecar = read_sidecar(path)
    if sidecar is None or "io" not in sidecar:
        raise NormfuseError(f"{path}: its sidecar {sidecar_path(path).name} (written by export.tensorrt_engine) "
                            "is missing or has no I/O signature")
    inputs, outputs = ([IO(t["name"], t["dtype"], t["shape"], tuple(t.get("dim_params") or ()), t.get("rank_known", True))
                        for t in sidecar["io"][kind]] for kind in ("inputs", "outputs"))
    max_batch = min_batch = None
    profiles = sidecar.get("profiles") or []
    if profiles:
        batched = [shape for shape in profiles[0].values() if shape["min"]]  # a scalar input has no axis 0
        if batched:
            max_batch = min(shape["max"][0] for shape in batched)
            min_batch = max(shape["min"][0] for shape in batched)
    return inputs, outputs, max_batch, min_batch


def config_text(name: str, platform: str, inputs: list[IO], outputs: list[IO], max_batch_size: int,
                queue_delay_us: int = 100, instances: int = 1, kind: str = "KIND_GPU") -> str:
    """config.pbtxt in protobuf text format. max_batch_size 0: no batch axis, full dims."""
    def tensor(io: IO) -> str:
        if io.dtype not in TRITON_TYPES:
            raise NormfuseError(f"{io.name}: dtype {io.dtype} has no Triton type")
        if not io.rank_known:
            raise NormfuseError(f"{io.name}: the model gives it no shape, not even its rank, and Triton needs its dims")
        dims = io.shape[1:] if max_batch_size > 0 else io.shape
        text_dims = ", ".join("-1" if d is None else str(d) for d in dims)
        # Triton needs non-empty dims: a tensor that is only its batch axis (a UNet's timestep, [batch])
        # or a scalar is served as [1] and reshaped to nothing for the model, as its docs say
        shape = f"dims: [ {text_dims} ]" if dims else "dims: [ 1 ]\n    reshape: { shape: [ ] }"
        return f'  {{\n    name: "{io.name}"\n    data_type: {TRITON_TYPES[io.dtype]}\n    {shape}\n  }}'

    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch_size}",
             "input [\n" + ",\n".join(tensor(i) for i in inputs) + "\n]",
             "output [\n" + ",\n".join(tensor(o) for o in outputs) + "\n]"]
    if max_batch_size > 0:
        lines.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}")
    lines.append(f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]")
    return "\n".join(lines) + "\n"


def parse_config(text: str):
    """Parse config.pbtxt with Triton's ModelConfig message; NormfuseError naming what is wrong."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise TritonClientMissing("checking a Triton config needs tritonclient: pip install 'tritonclient[grpc]'") from None
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise NormfuseError(f"config.pbtxt does not parse as Triton's ModelConfig: {exc}") from None
    problems = []
    if not config.name:
        problems.append("no name")
    if config.platform not in PLATFORMS.values() and not config.backend:
        problems.append(f"unknown platform {config.platform!r}")
    for kind, tensors in (("input", config.input), ("output", config.output)):
        if not tensors:
            problems.append(f"no {kind}s")
        for t in tensors:
            if t.data_type == model_config_pb2.TYPE_INVALID:
                problems.append(f"{kind} {t.name!r} has no data_type")
            if any(d < -1 or d == 0 for d in t.dims):
                problems.append(f"{kind} {t.name!r} has bad dims {list(t.dims)}")
            if not t.dims:
                problems.append(f"{kind} {t.name!r} has no dims (Triton needs some: [ 1 ] with reshape {{ shape: [ ] }})")
    if config.HasField("dynamic_batching") and config.max_batch_size < 1:
        problems.append("dynamic_batching needs max_batch_size >= 1")
    if problems:
        raise NormfuseError(f"Triton config for {config.name or '?'}: " + "; ".join(problems))
    return config


def model_name(path: Path) -> str:
    """A Triton model name from a file name: letters, digits, _ and -."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", path.stem) or "model"


def not_batched_why(inputs: list[IO], outputs: list[IO]) -> str | None:
    """Why Triton may not batch requests along axis 0 of this model, or None where it may. Triton
    batches every input and output along axis 0 (and refuses a config with batching where one has a
    fixed axis 0 or no axis at all), so each must have a dynamic axis 0, and those the graph names
    must share one name: an input of fixed [1] (a merged decoder's use_cache_branch), a stacked
    cache [2, batch, ...], a scalar loss, or an output whose axis 0 is another size rule it out."""
    for kind, tensors in (("input", inputs), ("output", outputs)):
        for io in tensors:
            if not io.shape or io.shape[0] is not None:
                axis = "has no axis 0" if not io.shape else f"has a fixed axis 0 of {io.shape[0]}"
                return f"{kind} {io.name!r} {axis}"
    return axis_0_names_differ(inputs, outputs)


def axis_0_names_differ(inputs: list[IO], outputs: list[IO]) -> str | None:
    """Where the graph names axis 0 otherwise in some inputs or outputs (`batch` and `batch_x_seq`):
    said, or None. Triton itself reads no names, so an explicit max_batch_size overrides this."""
    names = {io.dim_params[0] for io in inputs + outputs if io.dim_params and io.dim_params[0]}
    if len(names) > 1:
        return f"axis 0 has {len(names)} names ({', '.join(sorted(names))}), so it may not be one batch"
    return None


def write_repository(model_path: str | Path, repo: str | Path, *, name: str | None = None, version: int = 1,
                     max_batch_size: int | None = None, queue_delay_us: int = 100, instances: int = 1,
                     kind: str | None = None, validate: bool | None = None) -> Path:
    """Write (or replace) `<repo>/<name>/` for one model; returns that folder.

    validate: parse the config with Triton's ModelConfig first (None: when tritonclient is installed)."""
    model_path, repo = Path(model_path), require_writable(repo, folder=True)
    require_file(model_path)
    suffix = model_path.suffix
    if suffix not in PLATFORMS:
        raise UsageError(f"{model_path}: Triton models here are .onnx or .plan, not {suffix!r}")
    name = name or model_name(model_path)
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise UsageError(f"{name!r} is not a usable Triton model name")
    if suffix == ".plan":
        inputs, outputs, profile_batch, smallest_batch = plan_signature(model_path)
    else:
        from .backends import refuse_plugin_ops

        refuse_plugin_ops(model_path, "Triton's onnxruntime backend")
        inputs, outputs = onnx_signature(model_path)
        profile_batch = smallest_batch = None
    not_batched = not_batched_why(inputs, outputs)
    if not not_batched and smallest_batch is not None and smallest_batch > 1:
        # Triton's batcher sends any batch from 1 up: one under the profile's minimum would fail
        not_batched = f"the engine profile's smallest batch is {smallest_batch}, and Triton may send a batch of 1"
    if max_batch_size is None:
        max_batch_size = 0 if not_batched else (profile_batch or 8)
    if max_batch_size > 0 and not_batched and not_batched != axis_0_names_differ(inputs, outputs):
        raise UsageError(f"{model_path}: axis 0 cannot be Triton's batch axis: {not_batched} (use max_batch_size 0)")
    if profile_batch is not None and max_batch_size > profile_batch:
        raise UsageError(f"{model_path}: max_batch_size {max_batch_size} is above the engine profile's batch "
                         f"maximum {profile_batch}")
    kind = kind or ("KIND_GPU" if suffix == ".plan" else "KIND_AUTO")
    try:
        text = config_text(name, PLATFORMS[suffix], inputs, outputs, max_batch_size, queue_delay_us, instances, kind)
        if validate or (validate is None and can_check_configs()):
            parse_config(text)
    except TritonClientMissing:
        raise
    except NormfuseError as exc:
        raise type(exc)(f"{model_path}: {exc}") from None

    with folder_made_for(repo), no_room_names(repo / name):
        staging = staging_folder(repo, f".{name}.")
        try:
            version_dir = staging / str(version)
            version_dir.mkdir()
            copy_as_new(model_path, version_dir / MODEL_FILES[suffix])
            for extra in _companions(model_path):
                copy_as_new(extra, version_dir / extra.name)
            write_text(staging / "config.pbtxt", text)
            replace_folder(staging, repo / name)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return repo / name


def _companions(model_path: Path) -> list[Path]:
    """Files the model needs beside it: ONNX external data, an engine's sidecar."""
    if model_path.suffix == ".plan":
        from .tensorrt_engine import sidecar_path

        side = sidecar_path(model_path)
        return [side] if side.is_file() else []
    from .onnx_io import external_locations, graph_skeleton

    files = []
    for location in sorted(external_locations(graph_skeleton(model_path))):  # (it refuses a missing file)
        if os.path.dirname(os.path.normpath(location)):  # "sub/w.data", "../w.data", "/abs/w.data"
            raise NormfuseError(f"{model_path}: external data {location!r} is not beside the model; "
                                "Triton needs it in the version folder")
        files.append(model_path.parent / location)
    return files


def main(argv=None) -> int:
    from .cli import Parser, non_negative_int, output_folder, positive_int, run_cli

    parser = Parser(prog="python -m export.triton_repo", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help=".onnx or .plan files")
    parser.add_argument("--repo", type=output_folder, required=True, help="model repository folder")
    parser.add_argument("--name", help="model name (one model only; default: the file name)")
    parser.add_argument("--max-batch-size", type=positive_int, help="default: the engine profile's max batch, or 8")
    parser.add_argument("--queue-delay-us", type=non_negative_int, default=100,
                        help="dynamic batching: how long a request may wait for others, in us (default 100)")
    parser.add_argument("--instances", type=positive_int, default=1, help="model instances per device (default 1)")
    parser.add_argument("--kind", choices=("KIND_AUTO", "KIND_GPU", "KIND_CPU"),
                        help="where instances run (default: KIND_GPU for a .plan, KIND_AUTO for an .onnx)")
    args = parser.parse_args(argv)
    if args.name and len(args.models) > 1:
        parser.error("--name takes one model")
    names = [model_name(Path(model)) for model in args.models]
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice:  # the second would replace the first (Optimum's folders all hold a model.onnx)
        given = [model for model, name in zip(args.models, names) if name == twice]
        parser.error(f"{given[0]} and {given[1]} would both be the model {twice!r}: give them distinct file names, "
                     "or one at a time with --name")

    def job() -> int:
        if not can_check_configs():
            print("note: tritonclient is not installed, so the configs are written unchecked "
                  "(pip install 'tritonclient[grpc]' to check them against Triton's ModelConfig)")
        for model in args.models:
            folder = write_repository(model, args.repo, name=args.name, max_batch_size=args.max_batch_size,
                                      queue_delay_us=args.queue_delay_us, instances=args.instances, kind=args.kind)
            print(f"wrote {folder}/config.pbtxt")
        return 0

    return run_cli(job)


if __name__ == "__main__":
    raise SystemExit(main())
