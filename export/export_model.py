"""Export a models/ Transformer stack to ONNX with dynamic batch and sequence axes (stage 1).

    python -m export.export_model --norm rmsnorm --preset tiny -o model.onnx
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

from models import BlockConfig

from .errors import NormfuseError, UsageError, first_line
from .files import folder_made_for, put_in_place, staged_beside
from .onnx_io import default_opset, external_locations, load_graph_only, place_written, replacing_model, save_exported

EXPORTERS = ("dynamo", "torchscript")
INPUT_NAME, OUTPUT_NAME = "hidden_states", "output"
DEFAULT_OPSET = 18
DYNAMO_LOWEST_OPSET = 18  # torch's dynamo exporter writes no lower opset


@dataclass
class ExportResult:
    path: Path
    exporter: str
    opset: int
    external_data: bool


def export_model(config: BlockConfig, path: str | Path, *, exporter: str = "dynamo", opset: int = DEFAULT_OPSET,
                 seed: int = 0, external_data: bool | None = None, check: bool = True) -> ExportResult:
    """Build the stack for `config` with seeded weights and write it to `path` as ONNX. `check`:
    refuse (and remove) a graph that onnx's full check rejects; False keeps what the exporter wrote."""
    import torch

    from models.blocks import TORCH_DTYPES, build_model

    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter {exporter!r}; choose from {', '.join(EXPORTERS)}")
    if why := opset_refused(exporter, opset):
        raise UsageError(f"--opset {opset}: {why}")
    if why := combination_refused(exporter, config):
        raise UsageError(why)
    path = Path(path)
    model = build_model(config, seed=seed)
    example = torch.randn(2, 8, config.hidden, dtype=TORCH_DTYPES[config.dtype])
    # written and checked in a staging folder beside `path`, under its own name (the weights file it
    # names is then right), and only then put in place: a failed export leaves a file already at
    # `path` as it was, and no folder it made for it
    with folder_made_for(path.parent), staged_beside(path) as staging:
        staged = staging / path.name
        with _quiet():
            if exporter == "dynamo":
                save_exported(_export_dynamo(model, example, opset), staged, external_data=external_data)
            else:
                with staged_beside(staged) as torchscript_staging:
                    written = _export_torchscript(model, example, opset, torchscript_staging)
                    del model  # its weights are in the file now: not held while the file is laid out
                    place_written(written, staged, external_data=external_data)
        if check:
            _check_exported(staged, exporter)
        data = staged.with_name(staged.name + ".data")
        with replacing_model(path):
            if data.exists():
                put_in_place(data, path.with_name(path.name + ".data"))
            put_in_place(staged, path)
    written = load_graph_only(path)
    return ExportResult(path, exporter, default_opset(written), bool(external_locations(written)))


def combination_refused(exporter: str, config: BlockConfig) -> str | None:
    """Why a combination of flags cannot export, whatever else is given, or None: TorchScript
    writes a half-precision F.layer_norm as a LayerNormalization of mixed dtypes, which onnx's
    check (and ONNX Runtime) refuse."""
    if exporter == "torchscript" and config.norm == "layernorm" and config.dtype != "float32" \
            and not config.decomposed_layernorm:
        return (f"--exporter torchscript writes a {config.dtype} F.layer_norm with mixed dtypes, which onnx refuses: "
                "use --exporter dynamo")
    return None


def decomposed_refused(norm: str, decomposed_layernorm: bool) -> str | None:
    """Why --decomposed-layernorm cannot apply, or None: the rmsnorm stack has no LayerNorm."""
    if decomposed_layernorm and norm == "rmsnorm":
        return "--decomposed-layernorm writes a LayerNorm out; the rmsnorm stack has none"
    return None


def opset_refused(exporter: str, opset: int) -> str | None:
    """Why `exporter` cannot write `opset`, or None. Asked for less than its lowest, torch's dynamo
    exporter says it converts down, yet writes its lowest."""
    if exporter == "dynamo" and opset < DYNAMO_LOWEST_OPSET:
        return (f"torch's dynamo exporter writes opset {DYNAMO_LOWEST_OPSET} at the lowest; "
                f"--exporter torchscript writes opset {opset}")
    return None


def _check_exported(path: Path, exporter: str) -> None:
    """onnx's full check (strict types and shapes) of what the exporter wrote, staged at `path`; a
    graph it rejects is a one-line error, rather than a failure two stages later in ONNX Runtime."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)  # by path: weights may be external
    except Exception as exc:
        # named as the file asked for: the staged copy goes with its folder
        asked = path.parent.parent / path.name
        raise NormfuseError(f"{asked}: the {exporter} exporter wrote a graph onnx rejects: {first_line(exc)}") from None


def _export_dynamo(model, example, opset: int):
    import torch
    from torch.export import Dim

    program = torch.onnx.export(
        model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_shapes={"hidden_states": {0: Dim("batch"), 1: Dim("seq")}}, opset_version=opset,
        optimize=True, verbose=False,
    )
    return program


def _export_torchscript(model, example, opset: int, staging: Path) -> Path:
    """TorchScript's exporter writes a file, which it must: past 2 GiB a model cannot be one
    protobuf, and it then puts each weight in a file of its own beside it. It writes into
    `staging`, from where `place_written` lays the model out without reading its weights."""
    import torch

    written = staging / "model.onnx"
    torch.onnx.export(
        model, (example,), str(written), dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch", 1: "seq"}, OUTPUT_NAME: {0: "batch", 1: "seq"}},
        opset_version=opset,
    )
    return written


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and deprecation chatter; the pipeline shows its own progress."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def main(argv=None) -> int:
    from models import PRESET_NAMES, describe_presets, preset

    from .cli import Parser, output_file, positive_int, run_cli, seed_value, supported_opset

    parser = Parser(prog="python -m export.export_model", description=__doc__.splitlines()[0])
    parser.add_argument("--norm", choices=("rmsnorm", "layernorm"), required=True,
                        help="rmsnorm: LLaMA-style stack; layernorm: GPT-style stack")
    parser.add_argument("--preset", choices=PRESET_NAMES, default="tiny", help=f"stack shape (default tiny): {describe_presets()}")
    parser.add_argument("--layers", type=positive_int, help="Transformer blocks (default: the preset's)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="weights and activations (default float32)")
    parser.add_argument("--exporter", choices=EXPORTERS, default="dynamo", help="dynamo (torch.export, default) or torchscript")
    parser.add_argument("--opset", type=supported_opset, default=DEFAULT_OPSET, help=f"ONNX opset, 17..23 (default {DEFAULT_OPSET})")
    parser.add_argument("--seed", type=seed_value, default=0, help="seed of the weights, 0..2^63-1 (default 0)")
    parser.add_argument("--decomposed-layernorm", action="store_true",
                        help="with --norm layernorm: write LayerNorm out in elementary ops instead of F.layer_norm")
    parser.add_argument("-o", "--output", type=output_file, required=True, help="the .onnx file to write")
    args = parser.parse_args(argv)
    if why := opset_refused(args.exporter, args.opset):
        parser.error(f"argument --opset: {why}")
    if why := decomposed_refused(args.norm, args.decomposed_layernorm):
        parser.error(why)

    def job():
        try:
            config = preset(args.preset, args.norm, layers=args.layers, dtype=args.dtype,
                            decomposed_layernorm=args.decomposed_layernorm)
        except ValueError as exc:  # a shape the preset cannot take
            raise UsageError(str(exc)) from None
        result = export_model(config, args.output, exporter=args.exporter, opset=args.opset, seed=args.seed)
        data = result.path.with_name(result.path.name + ".data")
        weights = (f"; weights in {data.name} beside it, {data.stat().st_size / 2**20:.0f} MiB"
                   if result.external_data and data.exists() else "")
        print(f"wrote {result.path} ({result.exporter}, opset {result.opset}{weights})")

    return run_cli(job)


if __name__ == "__main__":
    raise SystemExit(main())
