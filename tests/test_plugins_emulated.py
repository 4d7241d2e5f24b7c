"""The kernels' CUDA source run on the CPU (plugins/emulate.py): the cases of tests/gpu/test_kernels.py
at CPU-sized row counts, launched with the same launch_config and argument order, against the
float64 references. This proves the kernels' logic (indices, slices, statistics, barriers, launch
shapes) on a machine without a GPU, including the variants the GPU has never run (row-loop,
split-row); the PTX, the speed and the GPU's own rounding stay tests/gpu's to prove.

The last part holds the emulator to its job: edited copies of the kernels with a known bug (a
barrier removed, a cluster released too early, a slice shifted, an mbarrier expecting a word no one
pushes) must fail here.
"""
from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from normops import OP, OPS, Tolerance, error_stats, run_reference
from plugins import build, config, emulate

pytestmark = pytest.mark.skipif(emulate.unavailable_reason() is not None,
                                reason=f"cannot emulate the kernels: {emulate.unavailable_reason()}")

HIDDEN = (1, 7, 64, 127, 768, 1024, 4096, 5120, 8192, 16384)
ROWS = (1, 17)


def pair_id(pair: tuple[str, str]) -> str:
    return f"{config.SHORT[pair[0]]}-{config.SHORT[pair[1]]}"


def pairs(default: list[tuple[str, str]]) -> list:
    """(x dtype, gamma/beta dtype) pairs: `default` in the default run, every other under -m slow
    (each pair is one compiled module per op, and each emulated launch takes milliseconds)."""
    every = [("bfloat16", "float32"), ("float16", "float16"), ("float32", "float32"), ("bfloat16", "bfloat16"),
             ("float16", "float32")]
    return [pytest.param(p, id=pair_id(p), marks=() if p in default else pytest.mark.slow) for p in every]


PAIRS = [("bfloat16", "float32"), ("float16", "float16"), ("float32", "float32")]  # compiled up front
BROAD = pairs(PAIRS)  # the cheaper tests
FOCUSED = pairs(PAIRS[:1])  # the many-launch tests: bf16 x with fp32 gamma by default


@pytest.fixture(scope="module", autouse=True)
def compiled_modules():
    """Compile the default pairs' modules with one compiler per core first (seconds each)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(lambda w: emulate.library(*w), [(op, x, g) for op in OPS for x, g in PAIRS]))


def make_inputs(op: str, dtype: str, rows: int, hidden: int, gamma_dtype: str | None = None,
                scale: float = 1.0, shift: float = 0.0, seed: int = 0, bound: float = np.inf) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    spec = OPS[op]
    out = []
    for name in spec.inputs + (("beta",) if spec.centered else ()):
        if name in ("x", "residual"):
            v, t = np.clip(rng.standard_normal((rows, hidden)) * scale + shift, -bound, bound), dtype
        elif name == "gamma":
            v, t = 1 + 0.5 * rng.standard_normal(hidden), gamma_dtype or dtype
        else:
            v, t = 0.5 * rng.standard_normal(hidden), gamma_dtype or dtype
        out.append(v.astype(emulate.numpy_dtype(t)))
    return out


def check(op: str, inputs: list[np.ndarray], outs: tuple, dtype: str, epsilon: float = 1e-5, tol=None) -> None:
    names = OPS[op].inputs + (("beta",) if OPS[op].centered else ())
    with np.errstate(invalid="ignore"):  # the NaN/Inf cases
        expected = run_reference(op, {n: a.astype(np.float64) for n, a in zip(names, inputs)}, epsilon=epsilon)
    for out_name, got, exp in zip(OPS[op].outputs, outs, expected):
        stats = error_stats(got.astype(np.float64), exp, tol or OP[dtype])
        assert stats["passed"], f"{op} {dtype} {out_name}: {stats}"


def run(op: str, inputs: list[np.ndarray], **kwargs) -> tuple[np.ndarray, ...]:
    return emulate.run(op, *inputs, **kwargs)


def misaligned(a: np.ndarray) -> np.ndarray:
    """`a`'s values at an address one element past a 16-byte boundary."""
    flat = np.empty(a.size + 16, dtype=a.dtype)
    start = (-flat.__array_interface__["data"][0] % 16) // a.itemsize + 1
    view = flat[start:start + a.size].reshape(a.shape)
    view[...] = a
    assert view.__array_interface__["data"][0] % 16 != 0
    return view


# ---------------------------------------------------------------- the kernels
@pytest.mark.parametrize("pair", BROAD)
@pytest.mark.parametrize("op", list(OPS))
def test_table_layouts_against_reference(op, pair):
    dtype, gamma_dtype = pair
    for hidden in HIDDEN:
        for rows in ROWS:
            inputs = make_inputs(op, dtype, rows, hidden, gamma_dtype, seed=hidden * 7 + rows)
            check(op, inputs, run(op, inputs), dtype)


@pytest.mark.parametrize("pair", FOCUSED)
@pytest.mark.parametrize("op", list(OPS))
def test_forced_layouts_and_the_streaming_path(op, pair):
    dtype, gamma_dtype = pair
    for layout in [(32, 1), (64, 1), (128, 2), (1024, 1)]:
        for hidden in (127, 4096, 5000):
            inputs = make_inputs(op, dtype, 9, hidden, gamma_dtype)
            check(op, inputs, run(op, inputs, layout=layout), dtype)


@pytest.mark.parametrize("pair", FOCUSED)
@pytest.mark.parametrize("op", list(OPS))
def test_every_tensorrt_tactic_layout(op, pair):
    """What TensorRT may pick besides the table (config.tactic_layouts), at the sizes it is offered."""
    dtype, gamma_dtype = pair
    offered = 0
    for hidden in HIDDEN:
        for layout in config.tactic_layouts(op, dtype, hidden)[1:]:
            for rows in (1, 3, 33):
                offered += 1
                inputs = make_inputs(op, dtype, rows, hidden, gamma_dtype, seed=hidden + rows)
                check(op, inputs, run(op, inputs, layout=layout), dtype)
    assert offered > 0


# (threads per row, slots, rows per group), as tests/gpu: the table picks none of them yet
LOOP_LAYOUTS = [(32, 1, 4), (64, 2, 2), (128, 1, 2), (256, 2, 2), (256, 4, 4)]


@pytest.mark.parametrize("pair", FOCUSED)
@pytest.mark.parametrize("op", list(OPS))
def test_row_loop_variants(op, pair):
    """Against the references with groups and blocks left partly empty, and bit for bit the one-row
    kernel on the 16-byte path (their header promises the same operations in the same order)."""
    dtype, gamma_dtype = pair
    vector = config.vector_width(dtype)
    for layout in LOOP_LAYOUTS:
        tpr, slots, per_group = layout
        rows_per_block = config.rows_per_block(tpr, per_group)
        for hidden in (64, 768, 4096, 127, 5000):
            for rows in (1, 3, 2 * rows_per_block + 3):
                inputs = make_inputs(op, dtype, rows, hidden, gamma_dtype, seed=hidden + rows)
                looped = run(op, inputs, layout=layout)
                check(op, inputs, looped, dtype)
                if hidden % vector == 0 and hidden <= slots * vector * tpr:
                    for a, b in zip(looped, run(op, inputs, layout=(tpr, slots))):
                        assert a.tobytes() == b.tobytes(), (op, dtype, layout, hidden, rows)


@pytest.mark.parametrize("pair", BROAD)
@pytest.mark.parametrize("op", list(OPS))
def test_split_row_variants(op, pair):
    """A cluster of S blocks per row, every layout config.split_layouts offers, then the scalar
    path, slices streamed (a row longer than the layout holds) and blocks holding no element."""
    dtype, gamma_dtype = pair
    vector = config.vector_width(dtype)
    tried = 0
    for hidden in (1024, 5120, 16384):  # tests/gpu adds 4096 and 8192
        for layout in config.split_layouts(dtype, hidden):
            for rows in (1, 3):
                tried += 1
                inputs = make_inputs(op, dtype, rows, hidden, gamma_dtype, seed=hidden + rows)
                check(op, inputs, run(op, inputs, layout=layout), dtype)
    assert tried > 0
    for hidden in (1, 7, 4 * 128 * vector + 3, 3 * 128 * vector - 1):
        for layout in ((128, 1, 1, 2), (256, 2, 1, 8)):
            inputs = make_inputs(op, dtype, 2, hidden, gamma_dtype, seed=hidden)
            check(op, inputs, run(op, inputs, layout=layout), dtype)


@pytest.mark.parametrize("layout", [None, (256, 2, 4), (256, 1, 1, 4)], ids=["table", "row-loop", "split"])
@pytest.mark.parametrize("pair", BROAD)
@pytest.mark.parametrize("op", list(OPS))
def test_misaligned_tensors_take_the_scalar_path(op, pair, layout):
    dtype, gamma_dtype = pair
    inputs = [misaligned(a) for a in make_inputs(op, dtype, 5, 4096, gamma_dtype)]
    check(op, inputs, run(op, inputs, layout=layout), dtype)


@pytest.mark.parametrize("layout", [None, (128, 2, 4), (128, 1, 1, 8)], ids=["table", "row-loop", "split"])
@pytest.mark.parametrize("pair", BROAD)
@pytest.mark.parametrize("op", list(OPS))
def test_nan_and_inf_propagate(op, pair, layout):
    """A NaN or Inf poisons its own row (in every block of a split row) and no other."""
    dtype, gamma_dtype = pair
    for hidden in (7, 1024, 4096):
        inputs = make_inputs(op, dtype, 5, hidden, gamma_dtype)
        x = inputs[0]
        x[0, hidden // 2] = np.nan
        x[1, hidden - 1] = np.inf
        x[2, 0] = -np.inf
        x[3, :] = 0  # an all-zero row: y = beta (or 0)
        outs = run(op, inputs, layout=layout)
        check(op, inputs, outs, dtype)
        assert np.isnan(outs[0][0].astype(np.float32)).all()
        assert np.isfinite(outs[0][4].astype(np.float32)).all()


@pytest.mark.parametrize("op", list(OPS))
def test_large_fp16_inputs_whose_squares_overflow(op):
    summands = 2 if OPS[op].has_residual else 1  # x (+ residual) stays below fp16's max, 65504
    for layout in (None, (256, 1, 1, 4)):
        inputs = make_inputs(op, "float16", 8, 4096, scale=3e4 / summands, bound=6e4 / summands)
        outs = run(op, inputs, layout=layout)
        assert np.isfinite(outs[0].astype(np.float32)).all()
        check(op, inputs, outs, "float16")


@pytest.mark.parametrize("layout", [None, (128, 4, 2), (256, 2, 1, 4)], ids=["table", "row-loop", "split"])
@pytest.mark.parametrize("op", ("LayerNorm", "AddLayerNorm"))
def test_layer_norm_large_mean_is_stable(op, layout):
    """mean 1e4, spread 1: E[x^2] - E[x]^2 in fp32 loses everything; the kernels keep ~1e-3."""
    inputs = make_inputs(op, "float32", 5, 4096, shift=1e4 / (2 if OPS[op].has_residual else 1))
    check(op, inputs, run(op, inputs, layout=layout), "float32", tol=Tolerance(atol=5e-3, rtol=1e-3))


def test_epsilon_reaches_the_kernel_as_its_bits():
    inputs = make_inputs("RMSNorm", "float32", 3, 64, scale=1e-3)
    check("RMSNorm", inputs, run("RMSNorm", inputs, epsilon=0.5), "float32", epsilon=0.5)


@pytest.mark.parametrize("order", ["fifo", 7, 12345])
def test_other_thread_orders_give_the_same_bits(order):
    """The kernels' results may not depend on which thread the scheduler runs first."""
    for op, layout in (("AddLayerNorm", None), ("LayerNorm", (64, 2, 2)), ("AddRMSNorm", (128, 1, 1, 8))):
        inputs = make_inputs(op, "bfloat16", 5, 4096, "float32")
        first = run(op, inputs, layout=layout)
        again = run(op, inputs, layout=layout, order=order)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(first, again)), (op, order)


def test_an_empty_launch_writes_nothing():
    x = np.empty((0, 64), dtype=np.float16)
    (y,) = emulate.run("RMSNorm", x, np.ones(64, dtype=np.float16))
    assert y.shape == (0, 64)


# ---------------------------------------------------------------- the emulator catches bugs
def edited_sources(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of plugins/ kernel sources with one edit (which must apply)."""
    for f in list(build.SOURCE_DIR.glob("*.cu")) + [build.SOURCE_DIR / build.HEADER]:
        shutil.copy(f, tmp_path)
    header = tmp_path / build.HEADER
    text = header.read_text()
    assert text.count(old) == 1, old
    header.write_text(text.replace(old, new))
    return tmp_path


def run_edited(sources: Path, op: str, layout, rows: int = 5, hidden: int = 4096):
    inputs = make_inputs(op, "bfloat16", rows, hidden, "float32")
    return inputs, run(op, inputs, layout=layout, source_dir=sources, one_kernel=True)


def test_a_missing_barrier_gives_wrong_rows(tmp_path):
    """Without the barrier after reading the per-warp partials, the warp the scheduler runs first
    writes the next reduction's partial over one its peers have not read yet."""
    sources = edited_sources(tmp_path, "        __syncthreads();  // `partial` may be written again by the next reduction\n", "")
    inputs, outs = run_edited(sources, "LayerNorm", None)
    with pytest.raises(AssertionError, match="passed"):
        check("LayerNorm", inputs, outs, "bfloat16")


@pytest.mark.slow  # a compile each: the default run keeps four of the seven edits
def test_a_barrier_not_reached_by_every_thread_fails_the_launch(tmp_path):
    old = "        if ((threadIdx.x & 31) == 0) partial[group][warp % kWarps] = v;\n        __syncthreads();\n"
    new = ("        if ((threadIdx.x & 31) == 0) { partial[group][warp % kWarps] = v; __syncthreads(); }\n"
           "        else { __syncthreads(); }\n")
    sources = edited_sources(tmp_path, old, new)
    with pytest.raises(emulate.EmulationError, match=r"__syncthreads reached from norm_common.cuh:\d+ while others wait"):
        run_edited(sources, "RMSNorm", None)


def test_a_cluster_that_does_not_wait_for_its_peers_fails_the_launch(tmp_path):
    """cluster_release's wait keeps a block's shared memory alive while peers read it."""
    old = "__device__ __forceinline__ void cluster_release() { cg::this_cluster().barrier_wait(); }"
    sources = edited_sources(tmp_path, old, "__device__ __forceinline__ void cluster_release() {}")
    with pytest.raises(emulate.EmulationError, match="has exited, its shared memory is gone|barrier"):
        run_edited(sources, "RMSNorm", (256, 2, 1, 4), rows=2, hidden=8192)


def test_a_slice_past_the_row_reaches_the_guard_page(tmp_path):
    sources = edited_sources(tmp_path, "    const int base = rank * kSlice;", "    const int base = rank * kSlice + (rank == 1);")
    with pytest.raises(emulate.EmulationError, match="SIGSEGV"):
        run_edited(sources, "RMSNorm", (256, 2, 1, 4), rows=1, hidden=8192)


@pytest.mark.slow  # a compile each: the default run keeps four of the seven edits
def test_a_thread_stuck_at_a_barrier_is_a_deadlock_not_a_hang(tmp_path):
    old = "        if ((threadIdx.x & 31) == 0) partial[group][warp % kWarps] = v;\n        __syncthreads();\n"
    new = ("        if ((threadIdx.x & 31) == 0) partial[group][warp % kWarps] = v;\n"
           "        if (threadIdx.x != 5) __syncthreads();\n        else while (true) __shfl_xor_sync(0xffffffffu, 0.f, 1);\n")
    sources = edited_sources(tmp_path, old, new)
    with pytest.raises(emulate.EmulationError, match="deadlocked"):
        run_edited(sources, "RMSNorm", None)


MBARRIER = ("NORMFUSE_AB_SPLIT_MBARRIER",)


# LayerNorm's moments (three words a partial) by default, a float partial under -m slow
@pytest.mark.parametrize("op", ["AddLayerNorm", pytest.param("RMSNorm", marks=pytest.mark.slow)])
def test_the_mbarrier_exchange_computes_the_same_norms(op):
    """The A/B candidate for the split-row exchange: st.async pushes counted by an mbarrier. Its
    PTX runs here instruction by instruction (cuda_host.h), with the bytes it expects and pushes."""
    for layout, hidden in (((256, 2, 1, 4), 8192), ((256, 2, 1, 4), 8191), ((128, 1, 1, 8), 1000)):
        for order in ("lifo", 12345):
            inputs = make_inputs(op, "bfloat16", 3, hidden, "float32", seed=hidden)
            outs = run(op, inputs, layout=layout, order=order, defines=MBARRIER, one_kernel=True)
            check(op, inputs, outs, "bfloat16")


def mbarrier_edit(tmp_path: Path, change: str) -> Path:
    old = "mbarrier_arrive_expect_tx(full, static_cast<int>(S * sizeof(R)))"
    return edited_sources(tmp_path, old, f"mbarrier_arrive_expect_tx(full, static_cast<int>(S * sizeof(R)) {change})")


def test_an_mbarrier_expecting_bytes_never_pushed_fails_the_launch_not_hangs(tmp_path):
    """On the GPU, a phase waiting for a word no one pushes spins for ever."""
    inputs = make_inputs("RMSNorm", "bfloat16", 2, 8192, "float32")
    with pytest.raises(emulate.EmulationError, match=r"waits at an mbarrier phase .*4 transaction bytes outstanding\) "
                                                     "that its peers never complete"):
        run("RMSNorm", inputs, layout=(256, 2, 1, 4), source_dir=mbarrier_edit(tmp_path, "+ 4"), defines=MBARRIER,
            one_kernel=True)


@pytest.mark.slow  # a compile each: the default run keeps four of the seven edits
def test_an_mbarrier_expecting_too_few_bytes_fails_the_launch(tmp_path):
    """On the GPU, the phase would complete one word early: a partial read before it arrives."""
    inputs = make_inputs("AddLayerNorm", "bfloat16", 2, 8192, "float32")
    with pytest.raises(emulate.EmulationError, match="mid-phase|which has exited"):
        run("AddLayerNorm", inputs, layout=(128, 1, 1, 8), source_dir=mbarrier_edit(tmp_path, "- 4"),
            defines=MBARRIER, one_kernel=True)


def test_operands_the_kernel_would_misread_are_refused():
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match=r"gamma has shape \(4,\), expected \(8,\)"):
        emulate.run("RMSNorm", x, np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"residual is float16 \(2, 8\), x is float32"):
        emulate.run("AddRMSNorm", x, x.astype(np.float16), np.ones(8, np.float32))
    with pytest.raises(ValueError, match="must share one dtype"):
        emulate.run("LayerNorm", x.astype(np.float16), np.ones(8, np.float16), np.ones(8, np.float32))
    with pytest.raises(ValueError, match="must be contiguous"):
        emulate.run("RMSNorm", np.zeros((8, 2), np.float32).T, np.ones(8, np.float32))


def layout_of(variant: tuple[int, ...]) -> tuple[int, ...]:
    """The launch_config layout that runs a compiled variant (TPR, RPB, C[, S])."""
    if len(variant) == 4:
        return (variant[0], variant[2], 1, variant[3])
    tpr, rows_per_block, slots = variant
    return (tpr, slots, rows_per_block // config.groups_per_block(tpr))


def random_cases(dtype: str, cases: int, seed: int):
    """(description, op, inputs, layout, order) for any compiled variant, any row length (odd ones,
    ones past what the registers hold), any row count, misaligned or not, gamma in x's dtype or
    fp32, and a random thread order."""
    rng = np.random.default_rng(seed)
    every = config.variants(dtype) + config.split_variants(dtype)
    for case in range(cases):
        op = list(OPS)[rng.integers(len(OPS))]
        variant = every[rng.integers(len(every))]
        gamma_dtype = ("float32", dtype)[rng.integers(2)]
        hidden = int(rng.choice([rng.integers(1, 300), rng.integers(300, 20000)]))
        rows = int(rng.choice([1, 2, 3, rng.integers(4, 40)]))
        inputs = make_inputs(op, dtype, rows, hidden, gamma_dtype, seed=case)
        if rng.integers(3) == 0:
            inputs = [misaligned(a) for a in inputs]
        order = int(rng.integers(2, 1 << 30))
        where = f"case {case}: {op} {dtype} {variant} hidden {hidden} rows {rows} gamma {gamma_dtype} order {order}"
        yield where, op, inputs, layout_of(variant), order


@pytest.mark.parametrize("dtype, cases, seed", [
    ("bfloat16", 24, 0), pytest.param("bfloat16", 400, 1, marks=pytest.mark.slow),
    pytest.param("float16", 200, 2, marks=pytest.mark.slow), pytest.param("float32", 200, 3, marks=pytest.mark.slow)])
def test_random_variants_sizes_alignments_and_thread_orders(dtype, cases, seed):
    for where, op, inputs, layout, order in random_cases(dtype, cases, seed):
        try:
            check(op, inputs, run(op, inputs, layout=layout, order=order), dtype)
        except (AssertionError, emulate.EmulationError) as e:
            raise AssertionError(f"{where}: {e}") from None


# The A/B switches' candidates (norm_common.cuh): the two groups tests/test_plugins_ptx.py builds,
# less what the emulator cannot mean (a register cap), and the mbarrier exchange of the split rows.
SWITCH_GROUPS = [("NORMFUSE_AB_PLAIN_LOADS", "NORMFUSE_AB_NO_PREFETCH", "NORMFUSE_AB_NO_TRAILING_SYNC",
                  "NORMFUSE_AB_LN_ONE_REDUCTION", "NORMFUSE_AB_LOOP_PARAMS_PER_ROW"), ("NORMFUSE_AB_PARAMS_EARLY",),
                 MBARRIER]


@pytest.mark.slow
@pytest.mark.parametrize("defines", SWITCH_GROUPS, ids=lambda d: "+".join(x.removeprefix("NORMFUSE_AB_") for x in d))
def test_ab_switch_candidates_compute_the_same_norms(defines):
    """A switch is a candidate for the default kernels (bench/kernels.py --sources worktree+NAME
    times it): its logic holds on random cases before any GPU time is spent on it."""
    for where, op, inputs, layout, order in random_cases("bfloat16", 120, 11):
        try:
            check(op, inputs, run(op, inputs, layout=layout, order=order, defines=defines), "bfloat16")
        except (AssertionError, emulate.EmulationError) as e:
            raise AssertionError(f"{defines} {where}: {e}") from None
