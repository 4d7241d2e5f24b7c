"""The op contract and its references, held against torch and against first principles."""
import numpy as np
import pytest
import torch

from normops import GRAPH, OP, OPS, error_stats, numpy_dtype, op_for, run_reference, within
from normops.reference import layer_norm, rms_norm
from normops.torch_modules import LayerNorm, RMSNorm


def test_contract_names_and_signatures():
    assert set(OPS) == {"RMSNorm", "LayerNorm", "AddRMSNorm", "AddLayerNorm"}
    assert OPS["AddRMSNorm"].outputs == ("y", "sum")
    assert OPS["LayerNorm"].optional_inputs == ("beta",)
    assert op_for(centered=True, residual=True).name == "AddLayerNorm"
    assert op_for(centered=False, residual=False).name == "RMSNorm"


@pytest.mark.parametrize("hidden", [1, 7, 64, 513])
def test_references_match_torch_float64(hidden):
    rng = np.random.default_rng(hidden)
    x = rng.standard_normal((3, 5, hidden)) * 3 + 1
    g, b = rng.standard_normal(hidden), rng.standard_normal(hidden)
    xt = torch.from_numpy(x)
    expected_ln = torch.nn.functional.layer_norm(xt, (hidden,), torch.from_numpy(g), torch.from_numpy(b), 1e-5)
    np.testing.assert_allclose(layer_norm(x, g, b, 1e-5), expected_ln.numpy(), rtol=1e-10, atol=1e-10)
    expected_rms = torch.nn.functional.rms_norm(xt, (hidden,), torch.from_numpy(g), 1e-5)
    np.testing.assert_allclose(rms_norm(x, g, 1e-5), expected_rms.numpy(), rtol=1e-10, atol=1e-10)


def test_add_forms_return_the_sum():
    rng = np.random.default_rng(0)
    x, r, g = rng.standard_normal((4, 16)), rng.standard_normal((4, 16)), rng.standard_normal(16)
    y, total = run_reference("AddRMSNorm", {"x": x, "residual": r, "gamma": g})
    np.testing.assert_array_equal(total, x + r)
    np.testing.assert_allclose(y, rms_norm(x + r, g))
    y, total = run_reference("AddLayerNorm", {"x": x, "residual": r, "gamma": g, "beta": None})
    np.testing.assert_array_equal(total, x + r)
    np.testing.assert_allclose(y, layer_norm(x + r, g))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_modules_keep_fp32_statistics(dtype):
    """fp16 values whose squares overflow fp16 still normalise: statistics are fp32."""
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    x = (torch.randn(2, 8, 64) * 1000).to(torch_dtype)  # 1000^2 > fp16 max (65504)
    for module, reference in ((RMSNorm(64), lambda a: rms_norm(a, np.ones(64))),
                              (LayerNorm(64), lambda a: layer_norm(a, np.ones(64), np.zeros(64)))):
        with torch.no_grad():
            y = module.to(torch_dtype)(x)
        assert y.dtype == torch_dtype
        expected = reference(x.float().numpy().astype(np.float64))
        assert OP[dtype].passes(y.float().numpy(), expected), f"{module.__class__.__name__} {dtype}"


def test_tolerances_are_ordered_and_used():
    for table in (OP, GRAPH):
        assert table["float32"].atol < table["float16"].atol < table["bfloat16"].atol
    stats = error_stats(np.array([1.0, 2.0, np.nan]), np.array([1.0, 2.5, np.nan]), OP["float32"])
    assert not stats["passed"] and stats["max_abs"] == pytest.approx(0.5) and stats["nan_mismatch"] == 0
    assert within(np.array([np.inf]), np.array([np.inf]), OP["float32"]).all()
    assert not within(np.array([np.inf]), np.array([-np.inf]), OP["float32"]).any()
    assert numpy_dtype("bfloat16").itemsize == 2
