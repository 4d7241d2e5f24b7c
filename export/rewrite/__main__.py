"""python -m export.rewrite IN.onnx -o OUT.onnx [--target tensorrt|onnxruntime|onnx] [--no-residual] [--no-proof] [--report R.json]
python -m export.rewrite IN_FOLDER -o OUT_FOLDER [...]   (every *.onnx of the folder; other files copied)
python -m export.rewrite IN.onnx|IN_FOLDER --dry-run [...]  (what would be fused and why not; nothing written)"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ..cli import Parser, output_file, output_folder, run_cli
from ..errors import UsageError
from ..files import atomic_path, json_text, write_json
from .emit import TARGETS
from .rewriter import check_excluded, check_excluded_before_writing, describe_counts, rewrite_file


def main(argv=None) -> int:
    parser = Parser(prog="python -m export.rewrite",
                                     description="Fuse every provable LayerNorm/RMSNorm subgraph of an ONNX model.")
    parser.add_argument("input", help="ONNX model to rewrite (external weights are never read; an output in another "
                                      "directory gets a copy of them), or a folder of models as Optimum lays them out "
                                      "(encoder_model.onnx, decoder_model_merged.onnx, ...): each *.onnx in it is "
                                      "rewritten under its own name into the -o folder, and its other files (config.json, "
                                      "tokenizer) are copied there")
    parser.add_argument("-o", "--output", help="where to write the rewritten model (a folder for a folder)")
    parser.add_argument("--dry-run", action="store_true",
                        help="only say what would be fused and what refused, with the reasons; write no model")
    parser.add_argument("--target", choices=TARGETS, default="tensorrt",
                        help="tensorrt: normfuse plugin ops; onnxruntime: com.microsoft contrib ops (for its CPU "
                             "provider add --no-residual: its Skip ops run slower there); onnx: standard ops "
                             "(a model's opset is raised to 17 for LayerNormalization, to 23 for RMSNormalization)")
    parser.add_argument("--no-residual", action="store_true", help="do not fuse the residual Add in front of a norm")
    parser.add_argument("--no-proof", action="store_true", help="skip the numerical proof of each fusion")
    parser.add_argument("--exclude", action="append", default=[], metavar="TENSOR",
                        help="leave the norm ending at this tensor as written (repeatable; the name the report and "
                             "the norm check give: the fused op's first output keeps it)")
    parser.add_argument("--report", type=output_file, help="write the rewrite report (every fusion and rejection) as JSON")
    args = parser.parse_args(argv)
    if args.output is None and not args.dry_run:
        parser.error("the following arguments are required: -o/--output (or --dry-run, to write no model)")
    if args.output is not None and args.dry_run:
        parser.error("argument -o/--output: --dry-run writes no model")
    folder = Path(args.input).is_dir()

    def rewrite(source: Path, destination: Path, before_writing=None):
        report = rewrite_file(source, destination, target=args.target, residual=not args.no_residual,
                              prove_fusions=not args.no_proof, exclude=frozenset(args.exclude), check_exclude=not folder,
                              before_writing=before_writing)
        print(f"{source}: {'would fuse' if args.dry_run else 'fused'} {report.fused} norm(s) "
              f"({describe_counts(report.counts)}) for target {args.target}; {len(report.rejected)} rejected; "
              f"{report.nodes_before} -> {report.nodes_after} nodes in {report.seconds:.2f} s")
        in_bodies = sum(f.scope != "main" for f in report.fusions)
        if in_bodies:
            print(f"  {in_bodies} of them inside If/Loop/Scan bodies")
        for r in report.rejected:
            where = "" if r.scope == "main" else f" in {r.scope}"
            print(f"  rejected {r.pattern} at '{r.output}'{where}: {r.reason}")
        for note in report.notes:
            print(f"  note: {note}")
        return report

    def job():
        if args.dry_run:
            from ..files import models_in, require_file

            sources = models_in(Path(args.input)) if folder else [require_file(args.input)]
            reports = {source.name: rewrite(source, None) for source in sources}
            if folder:
                check_excluded(args.exclude, list(reports.values()), str(args.input))
            if args.report:
                write_json(args.report, {"models": {name: r.as_dict() for name, r in reports.items()}} if folder
                           else reports[sources[0].name].as_dict())
            print("nothing written (--dry-run)")
            return
        try:  # checked before any work: a file where a folder must be, or the other way round
            (output_folder if folder else output_file)(args.output)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"argument -o/--output: {exc}") from None
        if folder:
            from ..files import models_in

            # a name no model has: refused before any model is written
            check_excluded_before_writing(models_in(Path(args.input)), args.exclude, str(args.input), target=args.target,
                                          residual=not args.no_residual, prove_fusions=not args.no_proof)
            reports = rewrite_folder(Path(args.input), Path(args.output), rewrite)
            if args.report:
                write_json(args.report, {"models": {name: r.as_dict() for name, r in reports.items()}})
            return
        if not args.report:
            rewrite(Path(args.input), Path(args.output))
        else:  # the report is written first and put in place last: both appear, or neither
            with atomic_path(args.report) as report_file:
                rewrite(Path(args.input), Path(args.output),
                        lambda report: report_file.write_text(json_text(report.as_dict())))
        print(f"wrote {args.output}")

    return run_cli(job)


def rewrite_folder(source: Path, destination: Path, rewrite) -> dict:
    """Each *.onnx of `source` rewritten (`rewrite(model, output)`) into `destination` under its
    own name, the other files copied (the models' weight files go with each model, as
    rewrite_file places them); {file name: report}."""
    from ..files import models_in
    from ..onnx_io import files_beside_models

    models = models_in(source)
    if destination.resolve() == source.resolve():
        raise UsageError(f"{destination}: the output folder is the input folder; the rewritten models keep their names, "
                         "so write them to another one")
    others = files_beside_models(source)
    reports = {model.name: rewrite(model, destination / model.name) for model in models}
    copied = []
    for other in others:
        with atomic_path(destination / other.name) as tmp:
            shutil.copyfile(other, tmp)
        copied.append(other.name)
    print(f"wrote {len(models)} model(s) to {destination}" + (f", and copied {', '.join(copied)}" if copied else ""))
    return reports


if __name__ == "__main__":
    sys.exit(main())
