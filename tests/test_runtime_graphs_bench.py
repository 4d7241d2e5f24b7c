"""bench/graphs.py without a GPU: FLOP counting, layer classes, the comparison, and a CPU smoke run."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("bench_graphs", ROOT / "bench" / "graphs.py")
graphs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(graphs)


def test_flops_of_a_stack_are_mostly_matrix_products(exported):
    from export.rewrite import rewrite_file

    reference = exported("rmsnorm")
    report = rewrite_file(reference, reference.parent / "flops-fused.onnx", target="tensorrt")
    norm_nodes = {n for f in report.fusions for n in f.nodes_removed}
    small, large = graphs.graph_flops(reference, 1, 4, norm_nodes), graphs.graph_flops(reference, 2, 64, norm_nodes)
    assert small["nodes_without_shape"] < 10  # rotary's Range/Sin/Cos: ONNX shape inference leaves them open
    assert small["flop_share"]["matmul"] > 0.8 and 0 < small["flop_share"]["norm"] < 0.1
    assert sum(small["flop_share"].values()) == pytest.approx(1.0)
    # 32x the tokens: at least 32x the FLOPs (attention grows faster than linearly)
    assert large["flops"]["matmul"] >= 32 * small["flops"]["matmul"]
    assert large["flops"]["norm"] == pytest.approx(32 * small["flops"]["norm"])


@pytest.mark.parametrize("name,expected", [
    ("normfuse_AddRMSNorm_3", "norm"),
    ("/layers.0/attn/q_proj/MatMul", "matmul"),
    ("/layers.0/mlp/act/Sigmoid + /layers.0/mlp/Mul", "elementwise"),
    ("{ForeignNode[/layers.0/Add.../layers.1/MatMul]}", "mixed"),
    ("/norm/Pow + /norm/ReduceMean", "norm"),
])
def test_tensorrt_layer_classes(name, expected):
    assert graphs.classify_trt_layer(name, {"/norm/Pow", "/norm/ReduceMean"}) == expected


def cell(graph, p50, backend="tensorrt", shape=(1, 1)):
    return {"model": "m", "layers": 1, "dtype": "float16", "shape": list(shape), "backend": backend, "graph": graph,
            "latency_ms": {"p50": p50, "p99": p50 * 1.1}, "peak_gpu_memory_mb": 100.0}


def test_comparison_and_verdict():
    cells = [cell("reference", 2.0), cell("fused", 1.0), cell("reference", 1.0, shape=(1, 512)),
             cell("fused", 1.01, shape=(1, 512)), cell("reference", 1.0, "ort-cuda"), cell("fused", 1.2, "ort-cuda")]
    comparisons = graphs.compare_cells(cells)
    speed = {(c["backend"], tuple(c["shape"])): c["speedup_p50"] for c in comparisons}
    assert speed[("tensorrt", (1, 1))] == pytest.approx(2.0)
    summary = graphs.summarise(comparisons)
    assert not summary["fused_never_slower"]  # 1.2 ms vs 1.0 on ort-cuda; 1.01 vs 1.0 is within the noise margin
    assert [c["backend"] for c in summary["slower_cells"]] == ["ort-cuda"]
    assert summary["geomean_speedup_p50"]["tensorrt"] == pytest.approx((2.0 * (1 / 1.01)) ** 0.5)
    cells.append({**cell("fused", 1.0, shape=(8, 2048)), "error": "out of memory"})
    assert graphs.summarise(graphs.compare_cells(cells))["cells_failed"] == 1


def test_no_gpu_backend_is_a_clear_failure(tmp_path):
    from export.backends import availability

    if any(availability(b).present for b in graphs.GPU_BACKENDS):
        pytest.skip("a GPU backend is present")
    done = subprocess.run([sys.executable, "bench/graphs.py", "--out", str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 1 and "tensorrt" in done.stderr and "ort-cuda" in done.stderr
    assert not list(tmp_path.iterdir())


def test_smoke_run_on_the_cpu_writes_results_and_a_plot(tmp_path, exported):
    import shutil

    # RMSNorm: its written-out norms give ONNX Runtime's CPU provider a fused form of its own (fused-cpu.onnx)
    stack = tmp_path / "work" / "tiny-llama-L1-float32"  # the script reuses an export it finds there
    stack.mkdir(parents=True)
    shutil.copy(exported("rmsnorm", layers=1), stack / "reference.onnx")
    done = subprocess.run([sys.executable, "bench/graphs.py", "--models", "tiny-llama", "--layers", "1", "--dtypes", "float32",
                           "--shapes", "1x4", "--backends", "ort-cpu", "--runs", "3", "--warmup", "1", "--profile-runs", "1",
                           "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--name", "smoke"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "smoke-graphs.json").read_text())
    assert {(c["graph"], c["backend"]) for c in results["cells"]} == {("reference", "ort-cpu"), ("fused", "ort-cpu")}
    for c in results["cells"]:
        assert c["latency_ms"]["p50"] > 0 and c["throughput_tokens_per_s"] > 0 and len(c["raw_latencies_ms"]) == 3 * 5
        assert set(c["op_classes"]) == {"matmul", "norm", "elementwise"} and c["flop_share"]["matmul"] > 0.5
    assert results["stacks"][0]["fused_norms"] == results["stacks"][0]["fused_norms_cpu"] == 3
    assert (stack / "fused-cpu.onnx").is_file()
    assert results["summary"]["cells_compared"] == 1
    assert len(results["comparisons"][0]["speedup_p50_pairs"]) == 5  # 1x4 is a decode cell: 5 pairs by default
    assert (tmp_path / "out" / "smoke-graphs.png").read_bytes()[:4] == b"\x89PNG"


def test_runs_in_parts_merge(tmp_path):
    parts = []
    for i, shape in enumerate(((1, 1), (1, 512))):
        part = {"gpu": {"name": "NVIDIA H100"}, "backends": ["tensorrt"], "skipped": [], "environment": {},
                "grid": {"models": ["m"], "layers": [1], "dtypes": ["float16"], "shapes": [list(shape)], "runs": 5},
                "stacks": [{"model": "m"}], "cells": [cell("reference", 2.0, shape=shape), cell("fused", 1.0, shape=shape)]}
        parts.append(tmp_path / f"part{i}.json")
        parts[-1].write_text(json.dumps(part))
    assert graphs.main(["--merge", *map(str, parts), "--out", str(tmp_path / "out")]) == 0
    merged = json.loads((tmp_path / "out" / "h100-graphs.json").read_text())
    assert merged["grid"]["shapes"] == [[1, 1], [1, 512]] and len(merged["cells"]) == 4
    assert merged["summary"]["cells_compared"] == 2 and merged["summary"]["fused_never_slower"]


def test_merging_unreadable_results_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    for part in (tmp_path / "none.json", tmp_path / "bad.json"):
        assert graphs.main(["--merge", str(part), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "cannot read the results" in err
    assert not (tmp_path / "out").exists()


def test_a_cell_past_its_timeout_is_recorded_not_raised(tmp_path):
    from types import SimpleNamespace

    args = SimpleNamespace(runs=1, warmup=0, profile_runs=0, cuda_graph=False, cell_timeout=0.01)
    cell = graphs.run_worker(tmp_path / "m.onnx", "ort-cpu", 1, 1, [], args)
    assert cell == {"error": "timed out after 0.01 s (--cell-timeout)"}


def test_repeated_cells_compare_as_pairs():
    """Each pair is one reference and one fused process; the cell's speed-up is the pairs' median."""
    from export.bench import combine_pairs

    def runs(*p50s):
        return [{"latency_ms": {"p50": v, "p99": v * 1.1}, "throughput_tokens_per_s": 1000 / v,
                 "peak_gpu_memory_mb": 10.0 + i, "op_classes": {"norm": {}}} for i, v in enumerate(p50s)]

    ref = {**combine_pairs(runs(1.0, 3.0, 1.1), "repeats"), "model": "m", "layers": 1, "dtype": "float16",
           "shape": [1, 1], "backend": "ort-cuda", "graph": "reference"}
    fused = {**combine_pairs(runs(0.5, 3.3, 1.0), "repeats"), "model": "m", "layers": 1, "dtype": "float16",
             "shape": [1, 1], "backend": "ort-cuda", "graph": "fused"}
    # records without raw samples: the pairs' medians; the peak memory is the median pair's
    assert ref["latency_ms"]["p50"] == pytest.approx(1.1) and ref["peak_gpu_memory_mb"] == 11.0
    assert "op_classes" in ref and all("op_classes" not in r for r in ref["repeats"])
    (comparison,) = graphs.compare_cells([ref, fused])
    assert comparison["speedup_p50_pairs"] == pytest.approx([2.0, 3.0 / 3.3, 1.1])
    assert comparison["speedup_p50"] == pytest.approx(1.1)  # the median pair, not a ratio of medians
    assert combine_pairs([*runs(1.0), {"error": "lost"}], "repeats")["error"] == "lost"


def test_decode_cells_get_more_pairs():
    from types import SimpleNamespace

    args = SimpleNamespace(repeats=1, decode_repeats=5)
    assert graphs.repeats_for(1, 1, args) == 5 and graphs.repeats_for(1, 32, args) == 5
    assert graphs.repeats_for(1, 512, args) == 1
    assert graphs.repeats_for(8, 2048, SimpleNamespace(repeats=3, decode_repeats=5)) == 3


def test_a_stack_with_nothing_fused_is_not_compared():
    """A rewrite that fused nothing leaves two copies of one graph: timing them is noise, not a result."""
    cells = [{**cell("reference", 0.25), "fused_norms": 0}, {**cell("fused", 0.37), "fused_norms": 0}]
    (comparison,) = graphs.compare_cells(cells)
    assert "fused no norm" in comparison["error"] and "speedup_p50" not in comparison
    assert graphs.summarise([comparison])["cells_compared"] == 0


def test_merging_older_results_recovers_the_fused_norm_count(tmp_path):
    part = {"gpu": {"name": "NVIDIA H100"}, "backends": ["ort-cuda"], "skipped": [], "environment": {},
            "grid": {"models": ["m"], "layers": [1], "dtypes": ["float16"], "shapes": [[1, 1]], "runs": 5},
            "stacks": [{"model": "m", "layers": 1, "dtype": "float16", "fused_norms": 0}],
            "cells": [cell("reference", 2.0, "ort-cuda"), cell("fused", 1.0, "ort-cuda")]}
    (tmp_path / "old.json").write_text(json.dumps(part))
    assert graphs.main(["--merge", str(tmp_path / "old.json"), "--out", str(tmp_path / "out"), "--name", "again"]) == 0
    merged = json.loads((tmp_path / "out" / "again-graphs.json").read_text())
    assert "fused no norm" in merged["comparisons"][0]["error"] and merged["summary"]["cells_compared"] == 0
