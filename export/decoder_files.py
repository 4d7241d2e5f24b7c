"""Which files make a KV-cache decoder: a folder as Optimum lays one out (the merged decoder, a
decoder-only model.onnx, or an encoder-decoder's two halves, and its encoder), the two halves
joined behind the merged form's signature, and the values export.decode reads from config.json."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UsageError

# Optimum's merged decoders (decoder_model_merged.onnx, as transformers.js serves them) hold the
# decoder without and with a cache in the two branches of one If, chosen by this input
CACHE_BRANCH = "use_cache_branch"
# the files of a folder as Optimum lays it out, in the order they are looked for
FOLDER_DECODERS = ("decoder_model_merged.onnx", "model.onnx")
FOLDER_HALVES = ("decoder_model.onnx", "decoder_with_past_model.onnx")  # first step, steps with a cache
FOLDER_ENCODER = "encoder_model.onnx"


@dataclass(frozen=True)
class Halves:
    """Optimum's two halves of an encoder-decoder's decoder named file by file (export.build writes
    each half's fused forms in a folder of its own), which `load_decoder` joins as a folder's halves."""
    first: Path  # decoder_model.onnx's form: the first step
    with_past: Path  # decoder_with_past_model.onnx's form: the steps after
    suffix = ".onnx"  # what the checks on a decoder's path read

    def __str__(self) -> str:
        return f"{self.first} + {self.with_past}"


def resolve_folder(path: str | Path | Halves) -> tuple[Path | Halves, Path | None]:
    """(decoder, encoder or None) of a folder as Optimum lays one out: the merged decoder, else a
    decoder-only model.onnx, else the folder itself where it holds the decoder's two halves
    (`load_decoder` joins them); and encoder_model.onnx where there is one. A file is itself, and so
    are `Halves`."""
    if isinstance(path, Halves):
        return path, None
    path = Path(path)
    if not path.is_dir():
        return path, None
    decoder = next((path / name for name in FOLDER_DECODERS if (path / name).is_file()), None)
    if decoder is None and all((path / name).is_file() for name in FOLDER_HALVES):
        decoder = path
    if decoder is None:
        raise UsageError(f"{path}: no decoder in this folder (looked for {', '.join(FOLDER_DECODERS)}, "
                         f"or {' and '.join(FOLDER_HALVES)})")
    encoder = path / FOLDER_ENCODER
    return decoder, encoder if encoder.is_file() else None


def load_decoder(path: Path | Halves, providers: list[str] | None = None, optimization: str = "all"):
    """The decoder at `path` loaded (export.runtime): a model, or a folder of Optimum's two halves (or
    the two named as `Halves`) as one `SplitDecoder`."""
    from .runtime import OrtModel, load

    if isinstance(path, Halves) or path.is_dir():
        files = (path.first, path.with_past) if isinstance(path, Halves) else (path / name for name in FOLDER_HALVES)
        first, with_past = (OrtModel(file, providers=providers, optimization=optimization) for file in files)
        return SplitDecoder(first, with_past, path)
    if optimization == "all":  # as served: load() also names a file of an unknown kind
        return load(path, providers=providers)
    return OrtModel(path, providers=providers, optimization=optimization)


class SplitDecoder:
    """Optimum's two halves of an encoder-decoder's decoder (decoder_model.onnx for the first step,
    decoder_with_past_model.onnx for the steps after) behind the signature of its merged form: a
    `use_cache_branch` input picks the half, and each half gets the inputs it takes. The half with a
    cache returns no encoder keys and values (the merged form's branch returns placeholders): the
    decoding loop reads them from the first step."""

    def __init__(self, first, with_past, path: Path):
        from .runtime import TensorSpec

        self.first, self.with_past, self.path = first, with_past, path
        taken = {spec.name for spec in with_past.inputs}
        self.inputs = (list(with_past.inputs) + [spec for spec in first.inputs if spec.name not in taken]
                       + [TensorSpec(CACHE_BRANCH, "bool", (1,))])
        self.outputs = list(first.outputs)
        self.providers = with_past.providers
        self.on_cuda = with_past.on_cuda

    def _half(self, feeds: dict):
        model = self.with_past if bool(np.asarray(feeds[CACHE_BRANCH]).ravel()[0]) else self.first
        taken = {spec.name for spec in model.inputs}
        return model, {name: value for name, value in feeds.items() if name in taken}

    def run(self, feeds: dict) -> dict:
        model, feeds = self._half(feeds)
        return model.run(feeds)

    def run_keeping(self, feeds: dict, keep):
        model, feeds = self._half(feeds)
        given = {spec.name for spec in model.outputs}
        return model.run_keeping(feeds, [name for name in keep if name in given])


def config_value(decoder_path: Path, key: str) -> int:
    """An integer of the config.json beside an encoder-decoder's decoder (Optimum and transformers
    write one: decoder_start_token_id, pad_token_id), else 0."""
    if isinstance(decoder_path, Halves):
        decoder_path = decoder_path.first
    config = (decoder_path if decoder_path.is_dir() else decoder_path.parent) / "config.json"
    try:
        value = json.loads(config.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return 0
    return int(value) if isinstance(value, int) else 0


def as_path(path):
    """A decoder's path as decode() takes it: a file or folder, or `Halves` as they are."""
    return path if isinstance(path, Halves) else Path(path)
