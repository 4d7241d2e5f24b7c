"""The normfuse kernels on a GPU, launched exactly as the TensorRT plugins launch them.

Every op x dtype is checked against the float64 references of normops with the per-dtype OP
tolerances. Outputs are poisoned with NaN before each launch so an unwritten element fails.
Large cases compare a sample of rows (the references are row-wise) and check every element
was written.
"""
from __future__ import annotations

import numpy as np
import pytest

from normops import OP, OPS, SUPPORTED_DTYPES, Tolerance, error_stats, run_reference

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
pytest.importorskip("cupy")

from plugins import launcher  # noqa: E402

HIDDEN = (1, 7, 64, 127, 768, 1024, 4096, 5120, 8192, 16384)
ROWS = (1, 3, 4096, 65537)
SAMPLED_ROWS = 384


def torch_dtype(name: str):
    return getattr(torch, name)


def make_inputs(op: str, dtype: str, rows: int, hidden: int, gamma_dtype: str | None = None,
                scale: float = 1.0, shift: float = 0.0, seed: int = 0) -> list:
    g = torch.Generator(device="cuda").manual_seed(seed)
    spec = OPS[op]
    t = torch_dtype(dtype)
    gt = torch_dtype(gamma_dtype or dtype)
    out = []
    for name in spec.inputs + (("beta",) if spec.centered else ()):
        if name in ("x", "residual"):
            v = torch.randn(rows, hidden, device="cuda", generator=g) * scale + shift
            out.append(v.to(t))
        elif name == "gamma":
            out.append((1 + 0.5 * torch.randn(hidden, device="cuda", generator=g)).to(gt))
        else:
            out.append((0.5 * torch.randn(hidden, device="cuda", generator=g)).to(gt))
    return out


def run_poisoned(op: str, inputs: list, epsilon: float = 1e-5, layout=None) -> tuple:
    x = inputs[0]
    outs = tuple(torch.full_like(x, float("nan")) for _ in OPS[op].outputs)
    launcher.run(op, *inputs, epsilon=epsilon, layout=layout, outputs=outs)
    torch.cuda.synchronize()
    return outs


def to_numpy(t) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(np.float64)


def check(op: str, inputs: list, outs: tuple, dtype: str, epsilon: float = 1e-5, rows_to_check=None,
          tol=None) -> None:
    spec = OPS[op]
    names = spec.inputs + (("beta",) if spec.centered else ())
    rows = inputs[0].shape[0]
    if rows_to_check is None and rows * inputs[0].shape[1] > (1 << 22):
        # every element written (inputs are finite, so NaN means the poison survived)
        for o in outs:
            assert not torch.isnan(o).any().item(), "unwritten output elements"
        rng = np.random.default_rng(rows)
        pick = np.unique(np.concatenate([[0, rows - 1], rng.integers(0, rows, SAMPLED_ROWS)]))
        rows_to_check = torch.as_tensor(pick, device="cuda")
    named = {}
    for name, t in zip(names, inputs):
        if name in ("x", "residual") and rows_to_check is not None:
            t = t.index_select(0, rows_to_check)
        named[name] = to_numpy(t)
    expected = run_reference(op, named, epsilon=epsilon)
    for out_name, got, exp in zip(spec.outputs, outs, expected):
        if rows_to_check is not None:
            got = got.index_select(0, rows_to_check)
        stats = error_stats(to_numpy(got), exp, tol or OP[dtype])
        assert stats["passed"], f"{op} {dtype} {out_name}: {stats}"


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype", list(SUPPORTED_DTYPES))
@pytest.mark.parametrize("op", list(OPS))
def test_against_reference(op, dtype, hidden, rows):
    inputs = make_inputs(op, dtype, rows, hidden, seed=hidden * 7 + rows)
    outs = run_poisoned(op, inputs)
    check(op, inputs, outs, dtype)
    del inputs, outs


@pytest.mark.parametrize("hidden", (127, 768, 4096, 8192))
@pytest.mark.parametrize("dtype", ("float16", "bfloat16"))
@pytest.mark.parametrize("op", list(OPS))
def test_fp32_gamma(op, dtype, hidden):
    inputs = make_inputs(op, dtype, 257, hidden, gamma_dtype="float32")
    check(op, inputs, run_poisoned(op, inputs), dtype)


@pytest.mark.parametrize("layout", [(32, 1), (64, 1), (128, 2), (1024, 1)])
@pytest.mark.parametrize("dtype", list(SUPPORTED_DTYPES))
@pytest.mark.parametrize("op", list(OPS))
def test_every_layout_and_the_streaming_path(op, dtype, layout):
    """Forced layouts: rows longer than the registers hold take the streaming path."""
    for hidden in (127, 4096, 5000):
        inputs = make_inputs(op, dtype, 33, hidden)
        check(op, inputs, run_poisoned(op, inputs, layout=layout), dtype)


@pytest.mark.parametrize("dtype", list(SUPPORTED_DTYPES))
@pytest.mark.parametrize("op", list(OPS))
def test_every_tensorrt_tactic_layout(op, dtype):
    """The layouts the TensorRT plugins offer as tactics besides the table's (config.tactic_layouts):
    TensorRT may pick any of them for an engine, so each must match the references."""
    from plugins import config

    for hidden in HIDDEN:
        for layout in config.tactic_layouts(op, dtype, hidden)[1:]:
            for rows in (1, 3, 4097):
                inputs = make_inputs(op, dtype, rows, hidden, seed=hidden + rows)
                check(op, inputs, run_poisoned(op, inputs, layout=layout), dtype)


# (threads per row, slots, rows per group): row-loop variants, forced (the table picks none yet)
LOOP_LAYOUTS = [(32, 1, 4), (64, 2, 2), (128, 1, 2), (256, 2, 2), (256, 4, 4)]


@pytest.mark.parametrize("layout", LOOP_LAYOUTS, ids=lambda lo: "x".join(map(str, lo)))
@pytest.mark.parametrize("dtype", list(SUPPORTED_DTYPES))
@pytest.mark.parametrize("op", list(OPS))
def test_row_loop_variants(op, dtype, layout):
    """Each group normalises K rows: against the references for rows that leave groups and
    blocks partly empty, and bit for bit the one-row kernel on the 16-byte register path (the same
    operations in the same order). Odd sizes and rows longer than the registers hold stream."""
    tpr, slots, _ = layout
    vector = 16 // inputs_itemsize(dtype)
    for hidden in (64, 768, 4096, 127, 5000):
        for rows in (1, 3, 4097):
            inputs = make_inputs(op, dtype, rows, hidden, seed=hidden + rows)
            looped = run_poisoned(op, inputs, layout=layout)
            check(op, inputs, looped, dtype)
            if hidden % vector == 0 and hidden <= slots * vector * tpr:
                one = run_poisoned(op, inputs, layout=(tpr, slots))
                for a, b in zip(looped, one):
                    assert torch.equal(a, b), (op, dtype, layout, hidden, rows)


def inputs_itemsize(dtype: str) -> int:
    return torch.empty(0, dtype=torch_dtype(dtype)).element_size()


def compile_in_parallel(op: str, dtype: str, variants: list) -> None:
    """Fill the PTX cache for these variants with one nvcc per core (the launcher compiles on first
    use, one module at a time)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from plugins import build

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(lambda v: build.get_ptx(op, dtype, dtype, variant=v), variants))


def needs_clusters() -> None:
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("split-row variants need thread block clusters (compute capability 9.0 or newer)")


@pytest.mark.parametrize("dtype", list(SUPPORTED_DTYPES))
@pytest.mark.parametrize("op", list(OPS))
def test_split_row_variants(op, dtype):
    """A cluster of S blocks per row (config.split_layouts): decode row counts and a few thousand
    rows, against the references, on every layout that holds the row in registers; a size that is
    not a whole number of vectors takes the scalar path; a row longer than the layout holds streams
    each slice; a row shorter than one slice leaves blocks with no elements."""
    from plugins import config

    needs_clusters()
    vector = 16 // inputs_itemsize(dtype)
    compile_in_parallel(op, dtype, config.split_variants(dtype))
    for hidden in (1024, 4096, 5120, 8192, 16384):
        for layout in config.split_layouts(dtype, hidden):
            for rows in (1, 3, 33, 4097):
                inputs = make_inputs(op, dtype, rows, hidden, seed=hidden + rows)
                check(op, inputs, run_poisoned(op, inputs, layout=layout), dtype)
    smallest = (128, 1, 1, 2)  # 2 x 128 x V elements
    for hidden in (1, 7, 4 * 128 * vector + 3, 3 * 128 * vector - 1):
        for layout in (smallest, (256, 2, 1, 8)):
            inputs = make_inputs(op, dtype, 5, hidden, seed=hidden)
            check(op, inputs, run_poisoned(op, inputs, layout=layout), dtype)


@pytest.mark.parametrize("dtype", list(SUPPORTED_DTYPES))
@pytest.mark.parametrize("op", list(OPS))
def test_split_row_variants_misaligned_and_fp32_gamma(op, dtype):
    needs_clusters()
    rows, hidden, layout = 3, 8192, (256, 1, 1, 4 if dtype != "float32" else 8)
    base = make_inputs(op, dtype, rows, hidden)
    shifted = []
    for t in base:
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
        view = flat[1:].view(t.shape)
        view.copy_(t)
        shifted.append(view)
    outs = tuple(torch.full((base[0].numel() + 1,), float("nan"), dtype=base[0].dtype, device="cuda")[1:]
                 .view(base[0].shape) for _ in OPS[op].outputs)
    launcher.run(op, *shifted, outputs=outs, layout=layout)
    torch.cuda.synchronize()
    check(op, shifted, outs, dtype)
    if dtype != "float32":
        inputs = make_inputs(op, dtype, rows, hidden, gamma_dtype="float32")
        check(op, inputs, run_poisoned(op, inputs, layout=layout), dtype)


@pytest.mark.parametrize("op", list(OPS))
def test_split_row_variants_propagate_nan_and_inf_and_keep_large_means(op):
    """A NaN or Inf in one block's slice reaches every block of its row through the merged
    statistics; the LayerNorm merge (Chan's rule over exact slice moments) keeps a mean of 1e4."""
    needs_clusters()
    hidden, layout = 8192, (128, 1, 1, 8)
    inputs = make_inputs(op, "bfloat16", 5, hidden)
    x = inputs[0]
    x[0, 100] = float("nan")  # in the first block's slice
    x[1, hidden - 1] = float("inf")  # in the last block's
    x[2, hidden // 2] = float("-inf")
    x[3, :] = 0
    outs = launcher.run(op, *inputs, layout=layout)
    torch.cuda.synchronize()
    check(op, inputs, outs, "bfloat16")
    assert torch.isnan(outs[0][0]).all()
    assert torch.isfinite(outs[0][4]).all()
    if OPS[op].centered:
        inputs = make_inputs(op, "float32", 17, hidden, shift=1e4 / (2 if OPS[op].has_residual else 1))
        check(op, inputs, run_poisoned(op, inputs, layout=(256, 2, 1, 4)), "float32",
              tol=Tolerance(atol=5e-3, rtol=1e-3))


@pytest.mark.parametrize("layout", [None, (256, 2, 4)], ids=["table", "row-loop"])
@pytest.mark.parametrize("dtype", list(SUPPORTED_DTYPES))
@pytest.mark.parametrize("op", list(OPS))
def test_misaligned_tensors_take_the_scalar_path(op, dtype, layout):
    rows, hidden = 17, 4096
    base = make_inputs(op, dtype, rows + 1, hidden)
    shifted = []
    for t in base:
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
        view = flat[1:].view(t.shape)  # 2 or 4 bytes off a 16-byte boundary
        view.copy_(t)
        shifted.append(view)
    x = base[0]
    outs = tuple(torch.full((x.numel() + 1,), float("nan"), dtype=x.dtype, device="cuda")[1:].view(x.shape)
                 for _ in OPS[op].outputs)
    launcher.run(op, *shifted, outputs=outs, layout=layout)
    torch.cuda.synchronize()
    check(op, shifted, outs, dtype)


@pytest.mark.parametrize("hidden", (4096, 8192))
@pytest.mark.parametrize("op", list(OPS))
def test_large_fp16_inputs_whose_squares_overflow(op, hidden):
    summands = 2 if OPS[op].has_residual else 1  # x (+ residual) must stay below fp16's max, 65504
    inputs = make_inputs(op, "float16", 64, hidden, scale=3e4 / summands)
    for t in inputs[:summands]:
        t.clamp_(-6e4 / summands, 6e4 / summands)
    outs = run_poisoned(op, inputs)
    assert torch.isfinite(outs[0]).all()
    check(op, inputs, outs, "float16")


@pytest.mark.parametrize("op", ("LayerNorm", "AddLayerNorm"))
def test_layer_norm_large_mean_is_stable(op):
    """mean 1e4, spread 1: E[x^2] - E[x]^2 in fp32 loses everything; ours keeps ~1e-3."""
    inputs = make_inputs(op, "float32", 64, 4096, shift=1e4 / (2 if OPS[op].has_residual else 1))
    outs = run_poisoned(op, inputs)
    # fp32 itself resolves x only to ulp(1e4) ~ 1e-3, so this is the bound, not OP's 1e-5
    check(op, inputs, outs, "float32", tol=Tolerance(atol=5e-3, rtol=1e-3))


@pytest.mark.parametrize("layout", [None, (128, 2, 4)], ids=["table", "row-loop"])
@pytest.mark.parametrize("hidden", (7, 1024, 4096, 16384))
@pytest.mark.parametrize("dtype", list(SUPPORTED_DTYPES))
@pytest.mark.parametrize("op", list(OPS))
def test_nan_and_inf_propagate(op, dtype, hidden, layout):
    if layout is not None and hidden > 4096:
        pytest.skip("the row-loop layout streams rows this long; the table's layout covers streaming")
    inputs = make_inputs(op, dtype, 5, hidden)
    x = inputs[0]
    x[0, hidden // 2] = float("nan")
    x[1, hidden - 1] = float("inf")
    x[2, 0] = float("-inf")
    x[3, :] = 0  # an all-zero row: y = beta (or 0)
    outs = launcher.run(op, *inputs, layout=layout)
    torch.cuda.synchronize()
    check(op, inputs, outs, dtype)
    assert torch.isnan(outs[0][0]).all()  # NaN poisons its row's statistics
    assert torch.isfinite(outs[0][4]).all()  # and no other row


def test_empty_launch_is_skipped():
    x = torch.empty(0, 64, device="cuda", dtype=torch.float16)
    g = torch.ones(64, device="cuda", dtype=torch.float16)
    (y,) = launcher.run("RMSNorm", x, g)
    assert y.shape == (0, 64)
