"""A built folder of models laid out as its source was, each model in the form a backend serves.

`export.build --onnx FOLDER` builds each model of an Optimum export in a folder of its own. What a
server loads is a folder like the source: `<out>/serve-ort-cpu/` holds every model under its own
name in the form ONNX Runtime's CPU provider runs best (fused-cpu.onnx, or the model itself where
the rewrite changed nothing for it), with its external weights, and the source's other files
(config.json, generation_config.json, the tokenizer's), so that whatever loaded the source folder
loads this one instead. The folder is filled beside its place and renamed into it, so an earlier
one is replaced whole or not at all.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .errors import NormfuseError
from .files import copy_as_new, replace_folder, staging_folder
from .onnx_io import external_locations, files_beside_models, load_graph_only, rename_location

PREFIX = "serve-"


def serving_folder_name(backend: str) -> str:
    return PREFIX + backend


def write_serving_folder(source: Path, forms: dict[str, Path], target: Path) -> dict:
    """`target` with each model of `forms` ({name in the source folder: file of the form to serve})
    under that name, its weights beside it, and the source's other files; returns what went where."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(target.parent, f".{target.name}.")
    try:
        for name, form in forms.items():
            _place_model(form, staging / name, target)
        others = files_beside_models(source)
        for other in others:
            copy_as_new(other, staging / other.name)
        replace_folder(staging, target)
    except OSError as exc:  # a full disk, say: the earlier folder, if any, stays as it was
        raise NormfuseError(f"{target}: cannot write ({exc.strerror or exc})") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return {"folder": str(target), "models": {name: str(form) for name, form in forms.items()},
            "copied": [other.name for other in others]}


def _place_model(form: Path, destination: Path, target: Path) -> None:
    """A copy of the model at `destination` (in the staging folder of `target`) with its external
    weight files beside it. A data file
    named after the built form (`fused-cpu.onnx.data`, as `onnx_io.save_model` names it) is named
    after the served model instead, since every model's form has that name; any other keeps its
    name, and two models naming one file must mean the same bytes."""
    import filecmp

    model = load_graph_only(form)
    renamed = False
    for location in external_locations(model):
        if Path(location).name != location or location in (".", ".."):  # "sub/w.data", "../w.data"
            raise NormfuseError(f"{form}: external data {location!r} is not beside the model; a serving folder "
                                "holds each model's weights beside it")
        name = destination.name + ".data" if location == form.name + ".data" else location
        placed = destination.parent / name
        if placed.exists() and not filecmp.cmp(placed, form.parent / location):
            raise NormfuseError(f"{form}: its external data {location} and another model's, both to be "
                                f"{target / name}, differ")
        if not placed.exists():
            copy_as_new(form.parent / location, placed)
        if name != location:
            rename_location(model, location, name)
            renamed = True
    if renamed:  # the model names its weight file anew
        import onnx

        onnx.save_model(model, str(destination))
    else:
        copy_as_new(form, destination)  # the bytes as built
