"""The launcher's operand checks: the kernel takes raw pointers, so what it would misread is refused
before any launch (these checks run on CPU tensors; the launches themselves are in tests/gpu)."""
import pytest
import torch

from plugins.launcher import check_operands


def operands(op, dtype=torch.float16, gamma_dtype=None, beta_dtype=None, rows=3, hidden=8):
    named = {"x": torch.zeros(rows, hidden, dtype=dtype)}
    if op.startswith("Add"):
        named["residual"] = torch.zeros(rows, hidden, dtype=dtype)
    named["gamma"] = torch.ones(hidden, dtype=gamma_dtype or dtype)
    if op.endswith("LayerNorm"):
        named["beta"] = torch.zeros(hidden, dtype=beta_dtype or gamma_dtype or dtype)
    return named


@pytest.mark.parametrize("op", ("RMSNorm", "LayerNorm", "AddRMSNorm", "AddLayerNorm"))
@pytest.mark.parametrize("gamma_dtype", (None, torch.float32))
def test_what_the_kernels_read_is_accepted(op, gamma_dtype):
    check_operands(op, operands(op, gamma_dtype=gamma_dtype))


@pytest.mark.parametrize("change,message", [
    (lambda n: n.update(gamma=torch.ones(7, dtype=torch.float16)), "gamma has shape (7,), expected (8,)"),
    (lambda n: n.update(gamma=torch.ones(8, dtype=torch.bfloat16), beta=torch.ones(8, dtype=torch.bfloat16)),
     "gamma is bfloat16; it must be x's dtype (float16) or float32"),
    (lambda n: n.update(beta=torch.zeros(8, dtype=torch.float32)), "gamma is float16 and beta float32"),
    (lambda n: n.update(residual=torch.zeros(3, 8, dtype=torch.float32)), "residual is float32 (3, 8), x is float16"),
    (lambda n: n.update(residual=torch.zeros(1, 8, dtype=torch.float16)), "residual is float16 (1, 8)"),
    (lambda n: n.update(x=torch.zeros(8, 3, dtype=torch.float16).t(), residual=torch.zeros(3, 8, dtype=torch.float16)),
     "x must be contiguous"),
    (lambda n: n.update(x=torch.zeros(3, 8, dtype=torch.int32)), "unsupported dtype torch.int32"),
])
def test_what_the_kernels_would_misread_is_refused(change, message):
    named = operands("AddLayerNorm")
    change(named)
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
        check_operands("AddLayerNorm", named)


def test_caller_outputs_are_checked_like_inputs():
    from plugins.launcher import check_outputs

    x = torch.zeros(3, 8, dtype=torch.float16)
    check_outputs("AddRMSNorm", x, (torch.empty_like(x), torch.empty_like(x)))
    with pytest.raises(TypeError, match="writes"):
        check_outputs("AddRMSNorm", x, (torch.empty_like(x),))
    with pytest.raises(ValueError, match="output sum must be a contiguous"):
        check_outputs("AddRMSNorm", x, (torch.empty_like(x), torch.empty(3, 8, dtype=torch.float32)))
    with pytest.raises(ValueError, match="a strided"):
        check_outputs("RMSNorm", x, (torch.empty(8, 3, dtype=torch.float16).t(),))


def test_tensors_off_the_gpu_are_refused_before_any_launch():
    """run() on CPU tensors: a one-line refusal, not a crash inside the driver."""
    from plugins.launcher import run

    named = operands("RMSNorm")
    with pytest.raises(ValueError, match="x is on cpu; every tensor must be on x's CUDA device"):
        run("RMSNorm", named["x"], named["gamma"])
