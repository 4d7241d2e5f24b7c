"""bench/ort_ops.py: the three forms of "residual Add + norm" it times, and its output, on ORT's CPU provider."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.backends import OrtRunner
from normops import GRAPH

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ort_ops(bench_script):
    return bench_script("ort_ops")


@pytest.mark.parametrize("norm,norm_op,skip_op", [("layernorm", "LayerNormalization", "SkipLayerNormalization"),
                                                  ("rmsnorm", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_three_forms_are_what_they_say_and_agree(ort_ops, tmp_path, norm, norm_op, skip_op, dtype):
    paths = ort_ops.write_forms(norm, dtype, 96, tmp_path)
    ops = {form: [n.op_type for n in onnx.load(str(p)).graph.node] for form, p in paths.items()}
    assert norm_op not in ops["exported"] and "ReduceMean" in ops["exported"]
    assert ops["norm op"] == ["Add", norm_op]  # gamma inside the op, the Add left in front
    assert ops["skip op"] == [skip_op]
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal((5, 96)).astype(dtype) for k in ("x", "r")}
    expected = OrtRunner(paths["exported"]).run(feeds)
    for form in ("norm op", "skip op"):
        got = OrtRunner(paths[form]).run(feeds)
        for name in ("y", "s"):
            assert GRAPH[dtype].passes(got[name], expected[name]), (form, name)


def test_a_run_writes_every_raw_time(ort_ops, tmp_path, capsys):
    assert ort_ops.main(["--norms", "rmsnorm", "--dtypes", "float32", "--tokens", "3", "--hidden", "64",
                         "--runs", "4", "--warmup", "1", "--out", str(tmp_path)]) == 0
    [written] = tmp_path.glob("*-ort-cpu-ops.json")
    result = json.loads(written.read_text())
    assert result["provider"] == "cpu" and result["onnxruntime"] and result["device"]
    [cell] = result["cells"]
    assert (cell["norm"], cell["dtype"], cell["tokens"], cell["hidden"]) == ("rmsnorm", "float32", 3, 64)
    assert {f: len(v) for f, v in cell["raw_us"].items()} == {"exported": 4, "norm op": 4, "skip op": 4}
    assert cell["median_us"]["norm op"] == pytest.approx(np.median(cell["raw_us"]["norm op"]), rel=1e-3)
    assert "| rmsnorm | float32 | 3x64 |" in written.with_suffix(".md").read_text()
    assert written.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_an_absent_provider_is_one_line_naming_why(ort_ops, tmp_path, capsys):
    from export.backends import availability

    if availability("ort-cuda").present:
        pytest.skip("ONNX Runtime's CUDA provider runs here")
    with pytest.raises(SystemExit) as exc:
        ort_ops.main(["--provider", "cuda", "--out", str(tmp_path / "r")])
    assert exc.value.code == 1
    assert capsys.readouterr().err == f"error: --provider cuda: {availability('ort-cuda').reason}\n"
    assert not (tmp_path / "r").exists()
