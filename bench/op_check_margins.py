"""How much of one op's tolerance (normops.OP) correct fused ops use, on real models.

Validation holds each fused op, run alone on the reference's own values, to normops.OP
(export.validate.compare); this measures the margin that leaves on transformers models as
`bench/transformers_sweep.py` exports them (small random configs), per dtype:

    python -m bench.op_check_margins --dtype float16 --types llama,gemma2 --json bench/results/op-check-margins.json

Each run adds its records to the JSON (one per type and dtype), with the versions used.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

FIELDS = ("validated", "fused_norms", "fused_op_tolerance_used", "fused_ops_against_float64", "max_abs", "shapes",
          "error")


def main(argv=None) -> int:
    from bench.transformers_sweep import sweep_one, versions
    from export.files import write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", required=True, choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--types", required=True, help="comma-separated transformers model types")
    parser.add_argument("--json", required=True, type=Path)
    args = parser.parse_args(argv)
    data = json.loads(args.json.read_text()) if args.json.exists() else {"records": {}}
    data["versions"] = versions()
    for model_type in args.types.split(","):
        with tempfile.TemporaryDirectory(prefix="normfuse-margins-") as work:
            record = sweep_one(model_type, args.dtype, Path(work))
        kept = {k: record[k] for k in FIELDS if k in record}
        data["records"][f"{model_type}/{args.dtype}"] = kept
        print(model_type, args.dtype, kept, flush=True)
        write_json(args.json, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
