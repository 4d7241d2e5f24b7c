"""Reference and fused graphs timed in pairs of fresh processes, taking turns to go first, so the
machine's drift falls on both (`--pairs N` of export.bench and export.build)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from export.bench import combine_pairs, in_pairs, pair_speedups, pair_spread, speedup


def record(p50: float, peak: float = 10.0) -> dict:
    """One process's figures over three runs, p50 in the middle and one slow run (2 x p50)."""
    return {"latency_ms": {"p50": p50, "p99": 2 * p50}, "throughput_tokens_per_s": 1000 / p50,
            "peak_memory_mb": peak, "raw_latencies_ms": [0.9 * p50, p50, 2 * p50], "op_classes": {"norm": p50}}


def test_pairs_take_turns_and_combine():
    order = []
    p50s = {"reference": iter([10.0, 12.0, 11.0]), "fused": iter([5.0, 8.0, 10.0])}

    def measure(graph, first):
        order.append((graph, first))
        return record(next(p50s[graph]), peak=len(order))

    reference, fused = in_pairs(measure, 3)
    assert order == [("reference", True), ("fused", True), ("fused", False), ("reference", False),
                     ("reference", False), ("fused", False)]
    # latency figures are of all nine runs together: the p99 is near the slowest run (24 ms), not
    # the pairs' p99s averaged, and the min is a run's own
    samples = [9.0, 10.0, 20.0, 10.8, 12.0, 24.0, 9.9, 11.0, 22.0]
    assert reference["raw_latencies_ms"] == pytest.approx(samples) and len(reference["pairs"]) == 3
    assert reference["latency_ms"]["p50"] == pytest.approx(11.0) and reference["latency_ms"]["min"] == pytest.approx(9.0)
    assert reference["latency_ms"]["p99"] == pytest.approx(np.percentile(samples, 99)) and 23.8 < reference["latency_ms"]["p99"] < 24
    assert reference["throughput_tokens_per_s"] == pytest.approx(1000 / 11.0)  # the tokens per run at that p50
    assert fused["latency_ms"]["p50"] == pytest.approx(9.0)  # 4.5 5 10 / 7.2 8 16 / 9 10 20
    assert reference["peak_memory_mb"] == 4 and fused["peak_memory_mb"] == 3  # the median of the pairs'

    assert reference["op_classes"] == {"norm": 10.0}  # the first pair's profile
    # the speed-up is the median of the pairs' own ratios (2.0, 1.5, 1.1), not 11/8
    assert pair_speedups(reference, fused) == [2.0, 1.5, 1.1] and speedup(reference, fused) == 1.5
    assert pair_spread([2.0, 1.5, 1.1]) == " (median of 3 pairs, 1.10x to 2.00x)" and pair_spread([1.5]) == ""
    single = record(4.0)
    assert combine_pairs([single]) is single and speedup(record(4.0), record(2.0)) == 2.0


def test_a_graph_alone_is_measured_in_every_pair():
    seen = []
    (only,) = in_pairs(lambda graph, first: seen.append(graph) or record(1.0), 2, ("reference",))
    assert seen == ["reference", "reference"] and len(only["pairs"]) == 2


@pytest.fixture(scope="module")
def graphs(exported, tmp_path_factory):
    from export.rewrite import rewrite_file

    reference = exported("rmsnorm")
    fused = tmp_path_factory.mktemp("pairs") / "fused-cpu.onnx"
    rewrite_file(reference, fused, target="onnxruntime", residual=False)
    return reference, fused


def test_bench_command_in_pairs(graphs, tmp_path, capsys):
    reference, fused = graphs
    from export.bench import main

    assert main([str(reference), str(fused), "--seq", "8", "--runs", "3", "--warmup", "0", "--pairs", "2",
                 "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "the reference's speed (median of 2 pairs, " in out
    results = json.loads((tmp_path / "b.json").read_text())
    assert [len(r["pairs"]) for r in results] == [2, 2] and all(len(r["raw_latencies_ms"]) == 6 for r in results)
    assert all(r["op_classes"] for r in results)  # profiled in the first pair


def test_bench_refuses_a_pair_that_is_not_one_model_before_timing(graphs, tmp_path, capsys):
    """Two graphs that do not take the same inputs or give the same outputs time nothing comparable:
    a one-line error (1), and no JSON."""
    import onnx
    from onnx import helper

    reference, fused = graphs
    other = onnx.load(str(reference))
    x = other.graph.input[0]
    wider = helper.make_tensor_value_info(x.name, x.type.tensor_type.elem_type,
                                          [d.dim_param or d.dim_value for d in x.type.tensor_type.shape.dim[:-1]]
                                          + [x.type.tensor_type.shape.dim[-1].dim_value * 2])
    other.graph.input.remove(x)
    other.graph.input.insert(0, wider)
    onnx.save(other, str(tmp_path / "wider.onnx"))
    extra = onnx.load(str(fused))
    extra.graph.input.append(helper.make_tensor_value_info("mask", onnx.TensorProto.INT64, ["batch", "seq"]))
    onnx.save(extra, str(tmp_path / "extra.onnx"))
    from export.bench import main

    for candidate, words in ((tmp_path / "wider.onnx", f"its input '{x.name}' is float32["),
                             (tmp_path / "extra.onnx", "takes an input 'mask' the reference")):
        assert main([str(reference), str(candidate), "--runs", "1", "--json", str(tmp_path / "b.json")]) == 1
        err = capsys.readouterr().err
        assert words in err and "it is not that model's fused form" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b.json").exists()


def test_build_in_pairs(graphs, tmp_path, capsys):
    reference, _ = graphs
    out = tmp_path / "out"
    from export.build import main

    assert main(["--onnx", str(reference), "--out", str(out), "--seq", "8", "--runs", "3", "--warmup", "0",
                 "--pairs", "2", "--backend", "ort-cpu"]) == 0
    assert "3 runs per graph, 2 pairs" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["pairs"] == 2 and [len(r["pairs"]) for r in report["bench"]] == [2, 2]
    assert "(median of 2 pairs, " in (out / "report.md").read_text()
