"""Model presets build, run and export with dynamic batch and sequence axes."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models import PRESET_NAMES, build_model, count_norms, preset


def test_presets():
    assert {"tiny", "small", "llama-7b", "gpt2-xl"} <= set(PRESET_NAMES)
    llama = preset("llama-7b", "rmsnorm")
    assert (llama.layers, llama.hidden, llama.heads, llama.ffn) == (32, 4096, 32, 11008)
    assert count_norms(llama) == (65, 64)
    with pytest.raises(ValueError, match="not divisible"):
        preset("tiny", "rmsnorm", heads=5)


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_forward_and_dtypes(norm):
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model = build_model(preset("tiny", norm, dtype=dtype))
        y = model(torch.randn(2, 5, 64, dtype=torch_dtype))
        assert y.shape == (2, 5, 64) and y.dtype == torch_dtype and torch.isfinite(y).all()


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_runs_at_new_shapes_and_matches_torch(exported, norm, exporter):
    path = exported(norm, "float32", exporter)
    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert not dims[0].HasField("dim_value") and not dims[1].HasField("dim_value"), "batch and seq must be dynamic"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    torch_model = build_model(preset("tiny", norm))
    for batch, seq in ((1, 3), (3, 17)):  # neither is the export's example shape
        x = np.random.default_rng(seq).standard_normal((batch, seq, 64)).astype(np.float32)
        (y,) = session.run(None, {"hidden_states": x})
        expected = torch_model(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
