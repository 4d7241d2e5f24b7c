"""Stage 4a: reference graph vs fused graph (or engine), output by output, against tolerances.

    python -m export.validate reference.onnx fused.onnx [--shapes 1x16,2x64] [--backend ort-cpu]

Each pair runs both models on the same random inputs and reports, per output, max/mean/median
absolute and relative error and whether every element is within the dtype's graph tolerance
(normops.tolerances.GRAPH). NaN and Inf must appear in the same places in both.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from normops import GRAPH, error_stats

from .backends import make_runner, random_feeds
from .errors import NormfuseError, UsageError


@dataclass
class Side:
    model: Path
    backend: str
    label: str  # "reference" or "fused"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'1x16,2x64' -> [(1, 16), (2, 64)]"""
    shapes = []
    for item in text.split(","):
        try:
            batch, seq = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise UsageError(f"bad shape {item!r}: expected BATCHxSEQ, e.g. 2x64") from None
        if batch < 1 or seq < 1:
            raise UsageError(f"bad shape {item!r}: batch and sequence must be positive")
        shapes.append((batch, seq))
    return shapes


def compare(reference: Side, candidate: Side, shapes: list[tuple[int, int]], dtype: str, seed: int = 0,
            progress=None) -> list[dict]:
    """One pair record per shape: {reference, candidate, shape, passed, outputs: {name: stats}}."""
    ref_runner = make_runner(reference.model, reference.backend, optimization="none")
    cand_runner = make_runner(candidate.model, candidate.backend)
    tolerance = GRAPH[dtype]
    pairs = []
    for batch, seq in shapes:
        feeds = random_feeds(reference.model, batch, seq, seed=seed)
        expected, actual = ref_runner.run(feeds), cand_runner.run(feeds)
        missing = set(expected) - set(actual)
        if missing:
            raise NormfuseError(f"{candidate.model}: outputs {sorted(missing)} missing (it has {sorted(actual)})")
        outputs = {name: error_stats(actual[name], expected[name], tolerance) for name in expected}
        pairs.append({
            "reference": f"{reference.label}@{reference.backend}",
            "candidate": f"{candidate.label}@{candidate.backend}",
            "shape": [batch, seq],
            "dtype": dtype,
            "passed": all(o["passed"] for o in outputs.values()),
            "outputs": outputs,
        })
        if progress:
            progress()
    return pairs


def main(argv=None) -> int:
    from .cli import run_cli
    from .files import write_json

    parser = argparse.ArgumentParser(prog="python -m export.validate", description=__doc__.splitlines()[0])
    parser.add_argument("reference", help="reference ONNX model")
    parser.add_argument("candidate", help="fused ONNX model")
    parser.add_argument("--shapes", default="1x16,2x64", help="BATCHxSEQ list (default 1x16,2x64)")
    parser.add_argument("--backend", default="ort-cpu", choices=("ort-cpu", "ort-cuda", "onnx-reference"),
                        help="backend for both models (onnx-reference runs normfuse ops through normops)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the comparison as JSON")
    args = parser.parse_args(argv)

    def job():
        shapes = parse_shapes(args.shapes)
        dtype = model_dtype(args.reference)
        pairs = compare(Side(Path(args.reference), args.backend, "reference"),
                        Side(Path(args.candidate), args.backend, "fused"), shapes, dtype, seed=args.seed)
        for pair in pairs:
            for name, s in pair["outputs"].items():
                verdict = "PASS" if s["passed"] else "FAIL"
                print(f"{verdict} {pair['shape'][0]}x{pair['shape'][1]} {name}: max_abs {s['max_abs']:.3g} "
                      f"max_rel {s['max_rel']:.3g} (atol {s['atol']:g}, rtol {s['rtol']:g}, {dtype})")
        if args.json:
            write_json(args.json, pairs)
        return 0 if all(p["passed"] for p in pairs) else 1

    return run_cli(job)


def model_dtype(path) -> str:
    """Dtype of the model's first graph input (the hidden states)."""
    import onnx

    from .onnx_io import load_graph_only
    from .rewrite.checks import FLOAT_TYPES

    model = load_graph_only(path)
    elem = model.graph.input[0].type.tensor_type.elem_type
    if elem not in FLOAT_TYPES:
        raise NormfuseError(f"{path}: first input has non-float type {onnx.TensorProto.DataType.Name(elem)}")
    return FLOAT_TYPES[elem]


if __name__ == "__main__":
    raise SystemExit(main())
