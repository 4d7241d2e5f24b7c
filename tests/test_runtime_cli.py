"""python -m export.run: npz in, npz out, one-line errors naming the input, timings."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from export.rewrite import rewrite_file
from export.run import read_inputs
from export.runtime import TensorSpec, numpy_dtype

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fused(exported, tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "fused.onnx"
    rewrite_file(exported("layernorm"), path, target="onnxruntime")
    return path


def run(*args):
    return subprocess.run([sys.executable, "-m", "export.run", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_outputs_file_holds_what_the_model_computes(fused, tmp_path):
    x = np.random.default_rng(3).standard_normal((2, 5, 64)).astype(np.float32)
    np.savez(tmp_path / "in.npz", hidden_states=x)
    done = run(fused, "--inputs", tmp_path / "in.npz", "--outputs", tmp_path / "out.npz",
               "--providers", "CPUExecutionProvider")
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "out.npz") as out:
        assert out.files == ["output"]
        want = ort.InferenceSession(str(fused), providers=["CPUExecutionProvider"]).run(None, {"hidden_states": x})[0]
        np.testing.assert_array_equal(out["output"], want)
    assert "output: [2, 5, 64] float32" in done.stdout


def test_random_inputs_are_shown_with_the_sizes_dim_gave_them(fused):
    """--dim sizes a named axis over what --random says for it: the line of each input shows it."""
    done = run(fused, "--random", "1x4", "--dim", "seq=3")
    assert done.returncode == 0, done.stderr
    assert "input hidden_states: [1, 3, 64] float32" in done.stdout and "output: [1, 3, 64] float32" in done.stdout


@pytest.mark.parametrize("arrays,words", [
    ({"x": np.zeros((1, 2, 64), np.float32)}, ["'x'", "not an input"]),
    ({"hidden_states": np.zeros((1, 2, 64), np.int64)}, ["'hidden_states'", "int64"]),
    ({"hidden_states": np.zeros((1, 64), np.float32)}, ["'hidden_states'", "rank 2"]),
    ({"hidden_states": np.zeros((1, 2, 65), np.float32)}, ["'hidden_states'", "axis 2"]),
])
def test_mismatched_inputs_exit_1_with_one_line(fused, tmp_path, arrays, words):
    np.savez(tmp_path / "in.npz", **arrays)
    done = run(fused, "--inputs", tmp_path / "in.npz", "--outputs", tmp_path / "out.npz")
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    for word in words:
        assert word in done.stderr
    assert not (tmp_path / "out.npz").exists()


def test_unreadable_inputs_and_bad_flags(fused, tmp_path):
    (tmp_path / "junk.npz").write_text("junk")
    done = run(fused, "--inputs", tmp_path / "junk.npz")
    assert done.returncode == 1 and "not a .npz archive" in done.stderr
    done = run(fused, "--inputs", tmp_path / "absent.npz")
    assert done.returncode == 1 and "no such file" in done.stderr
    done = run(fused)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    done = run(fused, "--random", "2by3")
    assert done.returncode == 2 and "BATCHxSEQ" in done.stderr


def test_random_inputs_and_bench_json(fused, tmp_path):
    done = run(fused, "--random", "1x16", "--bench", "5", "--warmup", "1", "--json", tmp_path / "t.json")
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "t.json").read_text())
    bench = summary["bench"]
    assert summary["inputs"]["hidden_states"][0] == [1, 16, 64]
    assert len(bench["raw_latencies_ms"]) == 5 and bench["latency_ms"]["p99"] >= bench["latency_ms"]["p50"] > 0
    assert bench["throughput_tokens_per_s"] > 0
    assert bench["peak_gpu_memory_mb"] is None or bench["peak_gpu_memory_mb"] >= 0


def test_bfloat16_arrays_come_back_from_their_raw_npz_form(tmp_path):
    values = np.array([[1.5, -2.0]], dtype=numpy_dtype("bfloat16"))
    np.savez(tmp_path / "in.npz", x=values)  # numpy stores them as |V2
    with np.load(tmp_path / "in.npz") as raw:
        assert raw["x"].dtype.kind == "V"
    arrays = read_inputs(tmp_path / "in.npz", [TensorSpec("x", "bfloat16", (None, 2))])
    assert arrays["x"].dtype == numpy_dtype("bfloat16")
    np.testing.assert_array_equal(arrays["x"].astype(np.float32), [[1.5, -2.0]])


def test_a_device_memory_that_cannot_be_measured_is_unknown_not_zero(fused):
    """The record a build's GPU bench makes of `export.run --bench`: where the device's memory
    cannot be read (here: no GPU), its peak is None, which the report prints as n/a, not 0.0."""
    from export.report import memory_cell
    from export.run import bench_in_process_of_its_own

    record = bench_in_process_of_its_own(fused, "fused", "ort-cpu", 1, 16, 3, 1)
    if record["peak_memory_mb"] is not None:
        pytest.skip("this machine's GPU memory can be read")
    assert record["latency_ms"]["p50"] > 0 and memory_cell(record) == "n/a"
    assert memory_cell({**record, "peak_memory_mb": 12.345}) == "12.3"


@pytest.mark.parametrize("spec, shape, dtype, tokens", [
    (("input_ids", (None, None)), (2, 7), "int64", 14),
    (("hidden_states", (None, None, 64)), (2, 7, 64), "float32", 14),
    (("x", (1, 8, 64)), (1, 8, 64), "float32", 8),  # a block exported with every size fixed
    (("input_features", (None, 80, None)), (2, 80, 300), "float32", None),  # 80 mel bins, not tokens
    (("pixel_values", (None, 3, 32, 32)), (2, 3, 32, 32), "float32", None),
    (("input_values", (None, None)), (2, 4000), "float32", None),  # a waveform
    (("input_features", (1, 80, 3000)), (1, 80, 3000), "float32", None),  # static: shaped as hidden states, named not
    (("features", (None, None, None), ("batch", "feature_size", "frames")), (2, 80, 300), "float32", None),
    (("input_values", (None, 1, None)), (2, 1, 4000), "float32", None),  # a waveform with its channel axis
])
def test_a_throughput_in_tokens_only_for_inputs_that_hold_tokens(spec, shape, dtype, tokens):
    """An image's channels or a spectrogram's mel bins are not tokens: their tokens/s is n/a, and
    the record has samples per second instead."""
    from export.backends import tokens_per_run
    from export.run import time_runs

    feeds = {spec[0]: np.zeros(shape, dtype)}
    assert tokens_per_run([TensorSpec(*spec[:1], dtype, *spec[1:])], feeds) == tokens
    timing = time_runs(lambda: sum(range(1000)), 3, 0, tokens, batch=shape[0])
    p50_s = timing["latency_ms"]["p50"] / 1000.0
    assert timing["throughput_samples_per_s"] == pytest.approx(shape[0] / p50_s)
    assert timing["throughput_tokens_per_s"] == (None if tokens is None else pytest.approx(tokens / p50_s))
