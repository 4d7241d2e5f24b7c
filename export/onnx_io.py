"""Reading and writing ONNX files, leaving large weights on disk as external data."""
from __future__ import annotations

import contextlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx

from .errors import NormfuseError, first_line
from .files import atomic_path, put_in_place, require_file, staged_beside

# Above this many bytes of initializers a model is saved with its weights as external data.
EXTERNAL_DATA_THRESHOLD = 1 << 30


def load_graph_only(path: str | os.PathLike) -> onnx.ModelProto:
    """Load a model without reading external weight bytes (they stay referenced on disk)."""
    path = require_file(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types for a corrupt file
        raise NormfuseError(f"{path}: not a readable ONNX model ({exc.__class__.__name__}: {first_line(exc)})") from None
    if not model.HasField("graph"):  # an empty file parses as an empty model
        raise NormfuseError(f"{path}: not an ONNX model: it has no graph (an empty file, or another kind of protobuf)")
    _check_external_files(model, path)
    return model


# a tensor of more bytes than this loses them in a skeleton: a weight, not a shape or a switch
SKELETON_KEEPS_BYTES = 4096
_TENSOR_DATA = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


def graph_skeleton(path: str | os.PathLike) -> onnx.ModelProto:
    """The model at `path` with the bytes of its large tensors left out (their names, types, dims
    and external-data records kept), parsed once per version of the file and shared: for the many
    readers of a model's structure (its inputs, its ops, its tables' sizes), which must not change
    it. A model of inline weights is otherwise parsed whole by each of them (27 parses of a 270 MB
    model in one validation)."""
    path = require_file(path)
    stat = path.stat()
    model = _skeleton(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    _check_external_files(model, path)  # each time: a weight file may have gone since the parse
    return model


@lru_cache(maxsize=8)
def _skeleton(path: str, mtime_ns: int, size: int) -> onnx.ModelProto:
    from .rewrite.scopes import graph_and_bodies

    model = load_graph_only(path)
    for graph in graph_and_bodies(model.graph):
        tensors = list(graph.initializer) + [a.t for n in graph.node for a in n.attribute if a.HasField("t")]
        for tensor in tensors:
            if tensor.ByteSize() > SKELETON_KEEPS_BYTES:
                for field in _TENSOR_DATA:
                    tensor.ClearField(field)
    return model


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset of the standard domain (1 where it imports none, as onnx reads it)."""
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 1)


def _check_external_files(model: onnx.ModelProto, path: Path) -> None:
    """A model whose weight file is not beside it fails here, in one line, rather than after a
    rewrite that wrote a model pointing at nothing, or deep inside ONNX Runtime."""
    for location in external_locations(model):
        if not (path.parent / location).is_file():
            raise NormfuseError(f"{path}: its external data file {location} is missing (weights are "
                                f"read from beside the model)")


def share_external_data(model: onnx.ModelProto, source_dir: Path, target_dir: Path) -> list[str]:
    """Make the external weight files that `model` (read from `source_dir`) references loadable
    by a copy of it saved in `target_dir`; returns notes saying what was done.

    ONNX Runtime and onnx load external data only from inside the model's own directory: a
    location such as "../model.onnx.data" is refused, and so is a symbolic link. A hard link is
    refused by onnx too, and would make the source's own file unloadable by onnx while it exists.
    So a model written elsewhere gets a copy of each file (temporary file, then rename) under the
    same relative location. A different file already there is never overwritten.
    """
    import filecmp
    import shutil

    if source_dir.resolve() == target_dir.resolve():
        return []
    moves: dict[str, tuple[Path, str]] = {}  # source location -> (file, location beside the output)
    for written in external_locations(model):
        location = Path(written)
        inside = not location.is_absolute() and ".." not in location.parts
        moves[written] = ((source_dir / location).resolve(), written if inside else location.name)
    targets = [t for _, t in moves.values()]
    if len(set(targets)) != len(targets):
        raise NormfuseError(f"{target_dir}: two external data files of the model would share one name there")
    copied: list[tuple[str, Path]] = []
    for source_location, (file, location) in moves.items():
        if not file.is_file():
            raise NormfuseError(f"{source_dir}: external data file {source_location} is missing")
        destination = target_dir / location
        if destination.exists():
            # a copy made here before keeps size and mtime (copy2), so it is known without reading
            # gigabytes again; any other file there is compared byte for byte
            if filecmp.cmp(destination, file, shallow=True):
                continue
            raise NormfuseError(f"{destination}: already exists and is not the model's external data "
                                f"{file}; remove it or write the rewritten model elsewhere")
        destination.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(destination) as tmp:
            shutil.copy2(file, tmp)
        copied.append((location, file))
    why = ("since ONNX Runtime and onnx read weights only from the model's own directory; write the output beside "
           "the input to share the files instead")
    if len(copied) > 3:  # a model saved one file per tensor: one note, not hundreds
        megabytes = sum(file.stat().st_size for _, file in copied) / 1e6
        notes = [f"external data: copied {len(copied)} files ({megabytes:.1f} MB in all) from {source_dir}, {why}"]
    else:
        notes = [f"external data {location}: copied from {file} ({file.stat().st_size / 1e6:.1f} MB), {why}"
                 for location, file in copied]
    for tensor in _external_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = moves[entry.value][1]
    return notes


SMALL_EXTERNAL_ELEMENTS = 16  # external tensors this small are read: scalars, axes, shapes, never weights


def inline_small_external_data(model: onnx.ModelProto, base_dir: Path) -> int:
    """Read external tensors of at most SMALL_EXTERNAL_ELEMENTS values into the model; returns how many.

    Tools that store every tensor externally (`size_threshold=0`) put the norms' constants there
    too (axes, epsilon, the exponent 2); matching and proving a norm needs their values. Weights,
    gamma and beta included, stay on disk unread."""
    count = 0
    for tensor in list(_external_tensors(model)):
        if int(np.prod(tensor.dims, dtype=np.int64)) > SMALL_EXTERNAL_ELEMENTS:
            continue
        read_external_tensor(tensor, base_dir)
        count += 1
    return count


def read_external_tensor(tensor: onnx.TensorProto, base_dir: Path) -> None:
    """Read an external tensor's bytes (from `base_dir`, the model's folder) into it, in place."""
    from onnx.external_data_helper import load_external_data_for_tensor

    try:
        load_external_data_for_tensor(tensor, str(base_dir))
    except Exception as exc:  # missing file, a location outside the directory, a short file
        raise _unreadable(tensor, base_dir, exc) from None
    tensor.data_location = onnx.TensorProto.DEFAULT
    del tensor.external_data[:]


def tensor_array(tensor: onnx.TensorProto, base_dir: Path) -> np.ndarray:
    """A tensor's values as a numpy array, external data read from `base_dir` straight into the array:
    read into the proto instead (`read_external_tensor`), the bytes stay in protobuf's arena after
    the field is cleared, and the weights would sit in memory twice."""
    try:
        return onnx.numpy_helper.to_array(tensor, base_dir=str(base_dir))
    except Exception as exc:  # missing file, a location outside the directory, a short file
        raise _unreadable(tensor, base_dir, exc) from None


def _unreadable(tensor: onnx.TensorProto, base_dir: Path, exc: Exception) -> NormfuseError:
    return NormfuseError(f"{base_dir}: external data of tensor {tensor.name!r} cannot be read ({first_line(exc)})")


def external_locations(model: onnx.ModelProto) -> list[str]:
    """The external data files a model's tensors name, each once, as written in the model."""
    return list(dict.fromkeys(entry.value for tensor in _external_tensors(model) for entry in tensor.external_data
                              if entry.key == "location"))


@contextlib.contextmanager
def replacing_model(path: str | os.PathLike):
    """Around writing a model to `path`: when the model it replaces kept its weights in `<name>.data`
    and the new one does not use that file, the file goes too, unless another model in the folder
    names it. A stale weights file beside a model reads as its weights, and can be gigabytes."""
    path = Path(path)
    own = path.name + ".data"
    had_own = own in _locations_named_by(path)
    yield
    if had_own and own not in _locations_named_by(path) and not any(
            own in _locations_named_by(other) for other in path.parent.glob("*.onnx") if other != path):
        (path.parent / own).unlink(missing_ok=True)


def _locations_named_by(path: Path) -> list[str]:
    """The external data files the model at `path` names, as plain names (`./m.onnx.data` is
    `m.onnx.data`); none where there is no readable model."""
    try:
        model = onnx.load(str(path), load_external_data=False) if path.is_file() else None
    except Exception:  # not a model (protobuf raises several types): it names no file
        return []
    return [os.path.normpath(location) for location in external_locations(model)] if model is not None else []


def files_beside_models(folder: Path) -> list[Path]:
    """The files of a folder of models that are neither a model nor a model's external weights:
    what goes with the models wherever they are written (config.json, the tokenizer's files)."""
    from .files import models_in

    weights = {location for model in models_in(folder) for location in external_locations(load_graph_only(model))}
    return [other for other in sorted(folder.iterdir())
            if other.is_file() and other.suffix != ".onnx" and other.name not in weights and not other.name.startswith(".")]


def _external_tensors(model: onnx.ModelProto):
    """Every tensor kept outside the file: initializers and Constant values, in the main graph and
    in every control-flow body (an If's branches may hold weights of their own)."""
    yield from _external_in_graph(model.graph)


def _external_in_graph(graph: onnx.GraphProto):
    for tensor in graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_location == onnx.TensorProto.EXTERNAL:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _external_in_graph(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for body in attr.graphs:
                    yield from _external_in_graph(body)


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Save atomically. Weights go to `<name>.data` beside it when large (or when asked); as onnx
    does, they then move out of `model`, whose tensors refer to that file from then on."""
    path = Path(path)
    if external_data is None:
        external_data = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    with replacing_model(path), atomic_path(path) as tmp:
        if external_data:
            # no data file where no tensor is large enough to go out (1 KiB)
            with atomic_path(path.parent / data_name, optional=True) as tmp_data:
                # onnx refuses to write into an existing data file, and looks for it relative to the
                # working directory: the empty placeholder must go, or saving into the folder one
                # works in fails ("External data file exists")
                tmp_data.unlink()
                onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=tmp_data.name, size_threshold=1024)
                # the data file was written under a temporary name: point the model at its final one
                rename_location(model, tmp_data.name, data_name)
                onnx.save_model(model, str(tmp))  # the weights are in the data file already
        else:
            onnx.save_model(model, str(tmp))
    return path


def save_exported(program, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Save torch's ONNXProgram as `save_model` saves a ModelProto, without making one: torch writes
    the weights one at a time from the torch model's own memory (`program.model_proto` would copy
    them all into a proto first: twice the weights in memory). It writes into a staging folder
    beside `path`, with the final names, and both files are then renamed into place."""
    path = Path(path)
    if external_data is None:
        try:
            external_data = sum(value.const_value.nbytes for value in program.model.graph.initializers.values()
                                if value.const_value is not None) > EXTERNAL_DATA_THRESHOLD
        except AttributeError:  # a torch whose ONNXProgram holds its model otherwise: the proto's way
            return save_model(program.model_proto, path)
    data_name = path.name + ".data"
    with replacing_model(path), staged_beside(path) as staging:
        program.save(staging / path.name, external_data=external_data)
        if set(external_locations(load_graph_only(staging / path.name))) - {data_name}:
            # a torch that names its data file otherwise: the weights go through a proto after all
            return save_model(onnx.load(str(staging / path.name)), path, external_data=external_data)
        if (staging / data_name).exists():
            put_in_place(staging / data_name, path.parent / data_name)
        put_in_place(staging / path.name, path)
    return path


def place_written(written: Path, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Put at `path` a model another tool wrote into a staging folder (`written`, alone there with
    its weight files), laid out as `save_model` lays a model out, holding as little of it in memory
    as can be: a file that needs no change is renamed into place; weights the tool wrote as files of
    their own (TorchScript's exporter past 2 GiB: one per tensor) are streamed into one `<name>.data`
    file, a buffer at a time (whatever `external_data` says: past 2 GiB there is no other layout).
    Only a model written whole that must get a data file is read whole."""
    with replacing_model(path):
        return _place_written(written, Path(path), external_data)


def _place_written(written: Path, path: Path, external_data: bool | None) -> Path:
    beside = [p for p in written.parent.iterdir() if p != written]
    if not beside:  # one protobuf with its weights inside
        if external_data is None:
            external_data = written.stat().st_size > EXTERNAL_DATA_THRESHOLD
        if not external_data:
            put_in_place(written, path)
            return path
        return save_model(onnx.load(str(written)), path, external_data=True)
    model = load_graph_only(written)
    data_name = path.name + ".data"
    staged_data = written.parent / f".{data_name}.gathered"
    _gather_external_data(model, written.parent, staged_data, data_name)
    staged_model = written.parent / f".{path.name}.gathered"
    onnx.save_model(model, str(staged_model))  # the graph only: its weights are in the data file already
    put_in_place(staged_data, path.parent / data_name)
    put_in_place(staged_model, path)
    return path


def _gather_external_data(model: onnx.ModelProto, base_dir: Path, target: Path, location: str,
                          inline_below: int = 1024) -> None:
    """Each external tensor's bytes, from wherever in `base_dir` it has them, appended to `target`
    (which the model then names `location`); tensors under `inline_below` bytes go into the model, as
    `save_model` keeps them. A buffer at a time: never a whole weight in memory."""
    import shutil

    from onnx.external_data_helper import ExternalDataInfo

    with open(target, "wb") as out:
        for tensor in list(_external_tensors(model)):
            info = ExternalDataInfo(tensor)
            source, start = base_dir / info.location, info.offset or 0
            try:
                if Path(info.location).is_absolute() or ".." in Path(info.location).parts:
                    raise OSError(f"location {info.location!r} is outside the model's folder")
                length = info.length if info.length is not None else source.stat().st_size - start
                if length < inline_below:
                    read_external_tensor(tensor, base_dir)
                    continue
                offset = out.tell()
                with open(source, "rb") as src:
                    src.seek(start)
                    shutil.copyfileobj(_Limited(src, length), out, 1 << 24)
            except OSError as exc:
                raise _unreadable(tensor, base_dir, exc) from None
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                tensor.external_data.add(key=key, value=value)


class _Limited:
    """The next `length` bytes of a file, read as copyfileobj reads, failing on a short file."""

    def __init__(self, file, length: int):
        self.file, self.left = file, length

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        data = self.file.read(size)
        if size and not data:
            raise OSError(f"{self.file.name}: {self.left} bytes short")
        self.left -= len(data)
        return data


def rename_location(model: onnx.ModelProto, old: str, new: str) -> None:
    """Point every tensor of `model` stored in external file `old` at file `new` instead."""
    for tensor in _external_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
