"""export.validate: error statistics and the failing quantile, NaN/Inf, Polygraphy-format files, the command."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export.validate import Side, candidate_backend, compare, output_stats
from normops import GRAPH, Tolerance

ROOT = Path(__file__).resolve().parent.parent
TOL = Tolerance(atol=1e-3, rtol=0.0)


def test_stats_of_identical_outputs():
    x = np.linspace(-1, 1, 1000, dtype=np.float32)
    s = output_stats(x, x, TOL)
    assert s["passed"] and s["failed_quantile"] is None and s["max_abs"] == 0.0
    assert s["tolerance_used"] == {"p50": 0.0, "p90": 0.0, "p99": 0.0, "p99.9": 0.0, "max": 0.0}
    assert s["nan"] == s["inf"] == 0 and s["shape"] == [1000]


def test_failing_quantile_is_the_lowest_over_the_limit():
    expected = np.zeros(1000)
    actual = np.zeros(1000)
    actual[:20] = 5e-3  # 2% of the elements are 5x over: p99 and max fail, p90 does not
    s = output_stats(actual, expected, TOL)
    assert not s["passed"] and s["failed_quantile"] == "p99"
    assert s["tolerance_used"]["max"] == pytest.approx(5.0)
    assert s["tolerance_used"]["p90"] == 0.0
    assert s["failed_fraction"] == pytest.approx(0.02)
    actual[:] = 5e-3
    assert output_stats(actual, expected, TOL)["failed_quantile"] == "p50"
    actual[:] = 0.0
    actual[0] = 5e-3
    assert output_stats(actual, expected, TOL)["failed_quantile"] == "max"


def test_nan_and_inf_must_match():
    expected = np.array([1.0, np.nan, np.inf, 2.0])
    assert output_stats(expected.copy(), expected, TOL)["passed"]
    actual = expected.copy()
    actual[3] = np.nan
    s = output_stats(actual, expected, TOL)
    assert not s["passed"] and s["nan"] == 2 and s["nan_mismatch"] == 1 and s["failed_quantile"] == "nan/inf"
    actual = expected.copy()
    actual[2] = -np.inf
    s = output_stats(actual, expected, TOL)
    assert not s["passed"] and s["failed_quantile"] == "nan/inf" and s["nonfinite_mismatch"] == 1
    assert s["reference_nonfinite"] == 2


def test_plans_run_on_tensorrt():
    assert candidate_backend(Path("fused.plan"), "ort-cpu") == "tensorrt"
    # every suffix export.runtime.load takes for an engine
    assert candidate_backend(Path("fused.engine"), "ort-cpu") == candidate_backend(Path("fused.trt"), "ort-cpu") == "tensorrt"
    assert candidate_backend(Path("fused.onnx"), "ort-cuda") == "ort-cuda"


@pytest.fixture(scope="module")
def graphs(rewritten):
    return rewritten("rmsnorm")


@pytest.fixture(scope="module")
def saved(graphs, tmp_path_factory):
    pytest.importorskip("polygraphy", reason="polygraphy is not installed (tensorrt or dev extra)")
    out = tmp_path_factory.mktemp("polygraphy")
    pairs = compare(Side(graphs["reference"], "ort-cpu", "reference"), Side(graphs["fused"], "ort-cpu", "fused"),
                    [(1, 8), (2, 16)], "float32", save_dir=out)
    return out, pairs


def test_saved_files_are_polygraphy_run_results(saved):
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    out, pairs = saved
    assert all(p["passed"] for p in pairs)
    inputs = load_json(str(out / "inputs.json"))
    assert [feeds["hidden_states"].shape for feeds in inputs] == [(1, 8, 64), (2, 16, 64)]
    for label, runner in (("reference", "reference@ort-cpu"), ("fused", "fused@ort-cpu")):
        results = RunResults.load(str(out / f"{label}-outputs.json"))
        (name, iterations), = results.items()
        assert name == runner and len(iterations) == 2
        assert iterations[1]["output"].shape == (2, 16, 64)


def test_polygraphy_comparator_agrees(saved):
    from export.validate import polygraphy_compare

    out, _ = saved
    assert polygraphy_compare(out / "reference-outputs.json", out / "fused-outputs.json", GRAPH["float32"])
    # the fused graph rounds differently (max abs error ~1e-6): no tolerance at all fails
    assert not polygraphy_compare(out / "reference-outputs.json", out / "fused-outputs.json", Tolerance(0.0, 0.0))


@pytest.mark.skipif(shutil.which("polygraphy") is None, reason="the polygraphy command is not installed")
def test_polygraphy_run_reads_our_inputs_and_outputs(saved, graphs):
    out, _ = saved
    done = subprocess.run(["polygraphy", "run", str(graphs["fused"]), "--onnxrt", "--load-inputs", str(out / "inputs.json"),
                           "--load-outputs", str(out / "reference-outputs.json"), "--atol", "1e-4", "--rtol", "1e-3"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "PASSED" in done.stdout + done.stderr


def run(*args):
    return subprocess.run([sys.executable, "-m", "export.validate", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_command_passes_and_writes_json(graphs, tmp_path):
    done = run(graphs["reference"], graphs["fused"], "--shapes", "1x4", "--json", tmp_path / "v.json")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("PASS 1x4 output")
    (pair,) = json.loads((tmp_path / "v.json").read_text())
    assert pair["outputs"]["output"]["failed_quantile"] is None
    assert set(pair["outputs"]["output"]) >= {"max_abs", "mean_abs", "median_abs", "max_rel", "mean_rel", "median_rel",
                                              "tolerance_used", "nan", "inf", "passed"}


def test_command_fails_with_the_quantile(graphs, tmp_path):
    import onnx

    model = onnx.load(str(graphs["fused"]))
    node = next(n for n in model.graph.node if n.op_type == "SkipSimplifiedLayerNormalization")
    next(a for a in node.attribute if a.name == "epsilon").f = 10.0
    onnx.save(model, str(tmp_path / "broken.onnx"))
    done = run(graphs["reference"], tmp_path / "broken.onnx", "--shapes", "1x4")
    assert done.returncode == 1 and "FAIL from p" in done.stdout


def test_command_errors_are_one_line(graphs, tmp_path):
    done = run(graphs["reference"], tmp_path / "none.onnx")
    assert done.returncode == 1 and "no such file" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    plan = tmp_path / "fused.plan"
    plan.write_bytes(b"\0")
    from export.tensorrt_engine import tensorrt_status

    if not tensorrt_status()[0]:
        done = run(graphs["reference"], plan)
        assert done.returncode == 1 and "pip install tensorrt" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    done = run(graphs["reference"], graphs["fused"], "--shapes", "0x4")
    assert done.returncode == 2
