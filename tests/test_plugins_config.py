"""Launch table of the kernels: pure Python, shared by the TensorRT plugin and the launcher."""
from __future__ import annotations

import struct

import pytest

from normops import OPS, SUPPORTED_DTYPES
from plugins import config

HIDDEN = (1, 7, 64, 127, 768, 1024, 2048, 4096, 5120, 8192, 16384, 32768)


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_rows_up_to_32k_stay_in_registers(dtype, hidden):
    cfg = config.launch_config("RMSNorm", dtype, 4096, hidden)
    assert cfg.capacity >= hidden
    assert (cfg.threads_per_row, cfg.rows_per_block, cfg.slots) in config.variants(dtype)
    assert cfg.block == cfg.threads_per_row * cfg.rows_per_block <= 1024
    assert cfg.grid * cfg.rows_per_block >= 4096 > (cfg.grid - 1) * cfg.rows_per_block
    assert cfg.rows_per_group == 1  # the table picks no row-loop variant until one is measured faster


def test_longer_rows_use_the_widest_layout_and_stream():
    cfg = config.launch_config("LayerNorm", "bfloat16", 3, 100_000)
    assert cfg.threads_per_row == 1024 and cfg.capacity < 100_000


def test_unknown_hidden_gets_a_layout_right_for_any_size():
    cfg = config.launch_config("AddRMSNorm", "float16", 5, None)
    assert cfg.threads_per_row == 1024


@pytest.mark.parametrize("op", list(OPS))
def test_kernel_names_follow_the_family(op):
    cfg = config.launch_config(op, "float32", 10, 4096)
    assert cfg.kernel.startswith(f"normfuse_{config.FAMILY[op]}_t")


class FakeSym:
    """Stands in for TensorRT's symbolic row count: only +, // and (split-row layouts) * are used."""

    def __init__(self, expr):
        self.expr = expr

    def __add__(self, other):
        return FakeSym(f"({self.expr} + {other})")

    def __mul__(self, other):
        return FakeSym(f"({self.expr} * {other})")

    def __floordiv__(self, other):
        return FakeSym(f"({self.expr} // {other})")


def test_grid_is_symbolic_when_rows_are():
    cfg = config.launch_config("RMSNorm", "bfloat16", FakeSym("rows"), 1024)
    assert cfg.grid.expr == f"((rows + {cfg.rows_per_block - 1}) // {cfg.rows_per_block})"
    split = config.launch_config("RMSNorm", "bfloat16", FakeSym("rows"), 8192, layout=(128, 1, 1, 8))
    assert split.grid.expr == "(rows * 8)"


@pytest.mark.parametrize("eps", [1e-5, 1e-6, 1e-12, 0.0, 0.1])
def test_epsilon_bits_round_trip(eps):
    bits = config.epsilon_bits(eps)
    assert -(2**31) <= bits < 2**31
    assert struct.unpack("<f", struct.pack("<i", bits))[0] == pytest.approx(eps, rel=1e-7)


def test_gamma_dtype_rules():
    assert config.gamma_dtype_name("bfloat16", None) == "bfloat16"
    assert config.gamma_dtype_name("float16", "float32") == "float32"
    with pytest.raises(ValueError):
        config.gamma_dtype_name("float32", "float16")
    with pytest.raises(ValueError):
        config.launch_config("RMSNorm", "float64", 1, 8)


def test_forced_layout_must_be_compiled():
    with pytest.raises(ValueError):
        config.launch_config("RMSNorm", "bfloat16", 1, 64, layout=(48, 1))
    with pytest.raises(ValueError):
        config.launch_config("RMSNorm", "bfloat16", 1, 64, layout=(32, 8))  # 64 values a thread


def test_plugins_import_without_tensorrt_or_gpu():
    import plugins

    for name in ("launch_config", "get_ptx", "register_tensorrt_plugins", "ptx_for_launch"):
        assert callable(getattr(plugins, name))


def test_tuned_entries_are_compiled_and_hold_their_rows():
    for (op, dtype), table in config.TUNED.items():
        assert op in OPS and dtype in SUPPORTED_DTYPES
        for hidden, layout in table.items():
            cfg = config.launch_config(op, dtype, 1, hidden)
            assert (cfg.threads_per_row, cfg.slots, cfg.rows_per_group)[:len(layout)] == layout
            assert (cfg.threads_per_row, cfg.rows_per_block, cfg.slots) in config.variants(dtype)
            assert cfg.capacity >= hidden


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
def test_row_loop_variants_launch_fewer_blocks_of_the_same_size(dtype):
    """(TPR, C, K): each group normalises K rows, so a block covers K times the rows of the
    one-row variant with the same threads, and the grid shrinks by K."""
    rows = 4097
    for tpr in config.THREADS_PER_ROW:
        for c in config.slot_choices(dtype):
            one = config.launch_config("LayerNorm", dtype, rows, 1024, layout=(tpr, c))
            for k in config.row_loops(tpr)[1:]:
                cfg = config.launch_config("LayerNorm", dtype, rows, 1024, layout=(tpr, c, k))
                assert cfg.block == one.block == tpr * cfg.groups_per_block
                assert cfg.rows_per_block == k * one.rows_per_block and cfg.rows_per_group == k
                assert cfg.grid * cfg.rows_per_block >= rows > (cfg.grid - 1) * cfg.rows_per_block
                assert (tpr, cfg.rows_per_block, c) in config.variants(dtype)
                assert cfg.kernel == config.kernel_name("LayerNorm", tpr, cfg.rows_per_block, c) != one.kernel
                sym = config.launch_config("LayerNorm", dtype, FakeSym("rows"), 1024, layout=(tpr, c, k))
                assert sym.grid.expr == f"((rows + {cfg.rows_per_block - 1}) // {cfg.rows_per_block})"


def test_row_loop_variants_exist_for_groups_up_to_256_threads():
    assert config.row_loops(256) == (1, *config.ROW_LOOPS) and config.row_loops(512) == (1,)
    with pytest.raises(ValueError, match="rows per group"):
        config.launch_config("RMSNorm", "bfloat16", 8, 8192, layout=(512, 2, 2))
    with pytest.raises(ValueError, match="rows per group"):
        config.launch_config("RMSNorm", "bfloat16", 8, 4096, layout=(256, 2, 3))
    names = [config.kernel_name("RMSNorm", *v) for v in config.variants("bfloat16")]
    assert len(names) == len(set(names))  # no two variants share an entry point


HIDDEN_SIZES = (1, 7, 64, 127, 768, 1024, 2048, 4096, 5120, 8192, 16384, 100_000)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_split_row_layouts_launch_a_cluster_per_row(dtype):
    """(TPR, C, 1, S): S blocks of TPR threads per row, so the grid is rows * S; the row they hold
    in registers is S slices; the kernel name says S, and no two variants share one."""
    v = config.vector_width(dtype)
    names = set()
    for tpr, rpb, c, ctas in config.split_variants(dtype):
        assert rpb == 1 and ctas in config.SPLIT_CTAS and c in config.slot_choices(dtype)
        cfg = config.launch_config("AddLayerNorm", dtype, 5, 8192, layout=(tpr, c, 1, ctas))
        assert (cfg.grid, cfg.block, cfg.ctas_per_row, cfg.rows_per_block) == (5 * ctas, tpr, ctas, 1)
        assert cfg.capacity == c * v * tpr * ctas
        assert cfg.variant == (tpr, 1, c, ctas)
        assert cfg.kernel == f"normfuse_add_layer_norm_t{tpr}_r1_c{c}_s{ctas}"
        names.add(cfg.kernel)
    one_block = {config.kernel_name("AddLayerNorm", *var) for var in config.variants(dtype)}
    assert len(names) == len(config.split_variants(dtype)) and not names & one_block
    assert len(config.launch_config("RMSNorm", dtype, 2, 4096).variant) == 3  # a one-block kernel names no S
    with pytest.raises(ValueError, match="no split-row variant"):
        config.launch_config("RMSNorm", dtype, 1, 4096, layout=(512, 1, 1, 2))
    with pytest.raises(ValueError, match="no split-row variant"):
        config.launch_config("RMSNorm", dtype, 1, 4096, layout=(128, 1, 2, 2))  # no row loop as well
    with pytest.raises(ValueError, match="no split-row variant"):
        config.launch_config("RMSNorm", dtype, 1, 4096, layout=(128, 1, 1, 3))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_split_row_layouts_hold_the_row_and_use_most_of_the_cluster(dtype):
    for hidden in HIDDEN_SIZES:
        layouts = config.split_layouts(dtype, hidden)
        for layout in layouts:
            cfg = config.launch_config("RMSNorm", dtype, 1, hidden, layout=layout)
            assert cfg.capacity // 2 < hidden <= cfg.capacity, (hidden, layout)
        threads = [lo[0] * lo[3] for lo in layouts]
        assert threads == sorted(threads)
    # LLaMA-7B's row: 1024 16-byte vectors over 1024 threads, or 512 threads with two slots each
    assert config.split_layouts("bfloat16", 4096) == [(128, 2, 1, 2), (256, 1, 1, 2), (128, 1, 1, 4)]
    assert config.split_layouts("bfloat16", 8192) == [(256, 2, 1, 2), (128, 2, 1, 4), (256, 1, 1, 4), (128, 1, 1, 8)]
    assert config.split_layouts("bfloat16", 768) == []  # a block of 128 x 8 already holds it
    assert config.split_layouts("float32", 100_000) == []


def test_split_rows_need_sm_90():
    assert config.supports_split("sm_90") and config.supports_split("compute_100") and config.supports_split("120")
    assert not config.supports_split("sm_80") and not config.supports_split("sm_89")
    with pytest.raises(ValueError, match="not a CUDA architecture"):
        config.supports_split("hopper")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("op", ["RMSNorm", "LayerNorm", "AddRMSNorm", "AddLayerNorm"])
def test_tactic_layouts_are_compiled_variants_led_by_the_table(op, dtype):
    compiled = set(config.variants(dtype))
    for hidden in HIDDEN_SIZES:
        layouts = config.tactic_layouts(op, dtype, hidden)
        table = config.choose_layout(dtype, hidden, op)
        assert layouts[0] == table and len(layouts) == len(set(layouts)) <= len(config.TACTICS)
        for layout in layouts:
            cfg = config.launch_config(op, dtype, 3, hidden, layout=layout)
            assert (cfg.threads_per_row, cfg.rows_per_block, cfg.slots) in compiled
            assert cfg.rows_per_group == 1  # row-loop variants join once the GPU suite has passed them
            assert cfg.ctas_per_row == 1  # so do the split-row variants (and only on sm_90 engines)
            if layout != table:  # an alternative never takes the streaming path (x read twice)
                assert cfg.capacity >= hidden
        assert config.tactic_layout(op, dtype, hidden, 0) == table
        assert config.tactic_layout(op, dtype, hidden, 1) == table
        assert config.tactic_layout(op, dtype, hidden, len(layouts) + 1) == table  # past the candidates
        assert [config.tactic_layout(op, dtype, hidden, t) for t in range(1, len(layouts) + 1)] == layouts
    assert config.tactic_layouts(op, dtype, None) == [config.choose_layout(dtype, None, op)]


def test_decode_and_bandwidth_candidates_for_a_llama_row():
    assert config.tactic_layouts("RMSNorm", "bfloat16", 4096) == [(256, 2), (512, 1), (128, 4)]
