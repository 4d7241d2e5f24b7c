"""bench/transformers_sweep.py: transformers' model types built small, exported, rewritten and
validated, each in a process of its own."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "transformers_sweep.py"


@pytest.fixture(scope="module")
def sweep(bench_script):
    return bench_script("transformers_sweep")


def test_two_model_types_are_swept_to_the_end(tmp_path):
    """LLaMA (RMSNorm) and BERT (LayerNorm): every norm module's call fused for TensorRT, the
    onnxruntime form validated at two dynamic shapes; records and Markdown written. BERT's first
    LayerNorm, over a sum that broadcasts its position embeddings, has no residual to fuse, and as a
    plain LayerNormalization it is already ONNX Runtime's own op."""
    out = tmp_path / "sweep.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--types", "llama,bert", "--jobs", "2", "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    payload = json.loads(out.read_text())
    assert payload["versions"]["transformers"] and payload["dtype"] == "float32"
    records = {r["type"]: r for r in payload["records"]}
    for name, kinds in (("llama", {"AddRMSNorm": 4, "RMSNorm": 1}), ("bert", {"AddLayerNorm": 4})):
        record = records[name]
        assert record["stage"] == "done", record.get("error")
        assert record["shapes"] == "dynamic"
        assert record["norm_calls"] == record["fused_norms"] == 5
        assert record["fused"]["onnxruntime"] == kinds
        assert record["validated"] and record["max_abs"] < 1e-4
    table = out.with_suffix(".md").read_text()
    assert "| ok | 2 |" in table and "| llama | dynamic | 5 | 5 | 4 AddRMSNorm, 1 RMSNorm |" in table


def test_an_unknown_type_is_a_one_line_error():
    done = subprocess.run([sys.executable, str(SCRIPT), "--types", "llama,no_such_model"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["transformers_sweep: error: not a base model type of transformers: "
                                                "no_such_model"]


def test_a_stage_that_fails_is_the_rows_reason(sweep, tmp_path):
    """A model whose forward needs inputs the sweep does not make stops there, saying which."""
    record = sweep.sweep_one("wav2vec2", "float32", tmp_path)
    assert record["stage"] == "forward" and "needs input_values" in record["error"], record


def test_verdicts(sweep):
    done = {"stage": "done", "validated": True, "norm_calls": 5, "fused_norms": 5, "rejected": []}
    assert sweep.verdict(done) == "ok"
    assert sweep.verdict({**done, "fused_norms": 4}) == "check"  # a norm unaccounted for
    assert sweep.verdict({**done, "fused_norms": 4, "rejected": ["not over the last axis"]}) == "ok"
    assert sweep.verdict({**done, "fused_norms": 9}) == "ok"  # functional norms have no module to count
    assert sweep.verdict({**done, "validated": False}) == "failed"
    assert sweep.verdict({"stage": "export"}) == "stopped at export"
    assert sweep.verdict({"stage": "timeout"}) == "timeout"


def test_per_layer_lists_are_cut_with_the_layers(sweep):
    from transformers import AutoConfig

    config = AutoConfig.for_model("gemma3n_text")
    sweep.shrink(config)
    assert config.num_hidden_layers == 2 and len(config.layer_types) == 2 and config.hidden_size == 64
    assert config.pad_token_id < config.vocab_size == 256


def test_only_layer_and_rms_kinds_of_norm_are_counted(sweep):
    import torch

    class LlamaLikeRMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))

    class RobertaPreLayerNormOutput(torch.nn.Module):  # a block named after its model
        def __init__(self):
            super().__init__()
            self.dense = torch.nn.Linear(8, 8)

    counted = [torch.nn.LayerNorm(8), torch.nn.RMSNorm(8), LlamaLikeRMSNorm()]
    not_counted = [torch.nn.BatchNorm2d(8), torch.nn.GroupNorm(2, 8), torch.nn.InstanceNorm1d(8),
                   RobertaPreLayerNormOutput(), torch.nn.Linear(8, 8)]
    assert [sweep.is_norm_module(m) for m in counted + not_counted] == [True] * 3 + [False] * 5


def test_update_sweeps_the_types_given_into_the_records(tmp_path):
    out = tmp_path / "sweep.json"
    out.write_text(json.dumps({"versions": {}, "dtype": "float32",
                               "records": [{"type": "zamba", "dtype": "float32", "stage": "model", "error": "kept"}]}))
    done = subprocess.run([sys.executable, str(SCRIPT), "--update", "--types", "bert", "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads(out.read_text())["records"]
    assert [(r["type"], r["stage"]) for r in records] == [("bert", "done"), ("zamba", "model")]
    assert records[1]["error"] == "kept"
    missing = subprocess.run([sys.executable, str(SCRIPT), "--update", "--json", str(tmp_path / "none.json")],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert missing.returncode == 2 and "--update needs an existing --json file" in missing.stderr
