"""Reading and writing ONNX files, leaving large weights on disk as external data."""
from __future__ import annotations

import os
from pathlib import Path

import onnx

from .errors import NormfuseError
from .files import atomic_path

# Above this many bytes of initializers a model is saved with its weights as external data.
EXTERNAL_DATA_THRESHOLD = 1 << 30


def load_graph_only(path: str | os.PathLike) -> onnx.ModelProto:
    """Load a model without reading external weight bytes (they stay referenced on disk)."""
    path = Path(path)
    if not path.is_file():
        raise NormfuseError(f"{path}: no such file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types for a corrupt file
        raise NormfuseError(f"{path}: not a readable ONNX model ({exc.__class__.__name__}: {exc})".splitlines()[0]) from None


def relocate_external_data(model: onnx.ModelProto, source_dir: Path, target_dir: Path) -> None:
    """Point external-data locations, relative to `source_dir`, at the same files from `target_dir`.

    The rewritten model then shares the original weight files instead of copying gigabytes.
    """
    if source_dir.resolve() == target_dir.resolve():
        return
    for tensor in _external_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                absolute = (source_dir / entry.value).resolve()
                entry.value = os.path.relpath(absolute, target_dir.resolve())


def _external_tensors(model: onnx.ModelProto):
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_location == onnx.TensorProto.EXTERNAL:
                yield attr.t


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Save atomically. Weights go to `<name>.data` beside it when large (or when asked)."""
    path = Path(path)
    if external_data is None:
        external_data = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    with atomic_path(path) as tmp:
        if external_data:
            with atomic_path(path.parent / data_name) as tmp_data:
                onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=tmp_data.name, size_threshold=1024)
                _rename_location(tmp, tmp_data.name, data_name)
        else:
            onnx.save_model(model, str(tmp))
    return path


def _rename_location(model_path: Path, old: str, new: str) -> None:
    """The data file was written under a temporary name; make the model point at its final name."""
    model = onnx.load(str(model_path), load_external_data=False)
    for tensor in _external_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save_model(model, str(model_path))
