"""python -m export.rewrite IN.onnx -o OUT.onnx [--target tensorrt|onnxruntime|onnx] [--no-residual] [--no-proof] [--report R.json]"""
from __future__ import annotations

import sys

from ..cli import Parser, output_file, run_cli
from ..files import write_json
from .emit import TARGETS
from .rewriter import describe_counts, rewrite_file


def main(argv=None) -> int:
    parser = Parser(prog="python -m export.rewrite",
                                     description="Fuse every provable LayerNorm/RMSNorm subgraph of an ONNX model.")
    parser.add_argument("input", help="ONNX model to rewrite (external weights are never read; an output in another directory gets a copy of them)")
    parser.add_argument("-o", "--output", type=output_file, required=True, help="where to write the rewritten model")
    parser.add_argument("--target", choices=TARGETS, default="tensorrt",
                        help="tensorrt: normfuse plugin ops; onnxruntime: com.microsoft contrib ops (for its CPU "
                             "provider add --no-residual: its Skip ops run slower there); onnx: standard ops")
    parser.add_argument("--no-residual", action="store_true", help="do not fuse the residual Add in front of a norm")
    parser.add_argument("--no-proof", action="store_true", help="skip the numerical proof of each fusion")
    parser.add_argument("--report", type=output_file, help="write the rewrite report (every fusion and rejection) as JSON")
    args = parser.parse_args(argv)

    def job():
        report = rewrite_file(args.input, args.output, target=args.target, residual=not args.no_residual,
                              prove_fusions=not args.no_proof)
        print(f"{args.input}: fused {report.fused} norm(s) ({describe_counts(report.counts)}) for target {args.target}; "
              f"{len(report.rejected)} rejected; {report.nodes_before} -> {report.nodes_after} nodes "
              f"in {report.seconds:.2f} s")
        in_bodies = sum(f.scope != "main" for f in report.fusions)
        if in_bodies:
            print(f"  {in_bodies} of them inside If/Loop/Scan bodies")
        for r in report.rejected:
            where = "" if r.scope == "main" else f" in {r.scope}"
            print(f"  rejected {r.pattern} at '{r.output}'{where}: {r.reason}")
        for note in report.notes:
            print(f"  note: {note}")
        if args.report:
            write_json(args.report, report.as_dict())
        print(f"wrote {args.output}")

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
