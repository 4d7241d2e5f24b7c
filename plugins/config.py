"""Launch shapes of the normfuse kernels: one function used by the TensorRT plugins and the launcher.

A kernel variant is named by (threads per row TPR, rows per block RPB, register slots per thread C);
each slot holds one 16-byte vector, V = 16 / itemsize elements. A row of up to C * V * TPR
elements stays in registers and is read once; longer rows take the kernel's streaming path.

A block holds `groups_per_block(TPR)` row groups. When RPB is that number, each group normalises
one row. When RPB is K times it (a row-loop variant, K in ROW_LOOPS), each group normalises K rows,
one after the other: it keeps gamma/beta in registers across them and loads the next row while it
reduces and writes the current one, so a short row's latency is hidden by the next row's loads
instead of by more resident blocks. The launch table picks K = 1 unless a measured entry says
otherwise; `layout=(TPR, C, K)` forces one.

A split-row variant (sm_90 and newer) spreads each row over a cluster of S blocks of TPR threads,
each holding a slice of C * V * TPR elements; `layout=(TPR, C, 1, S)` forces one. It is meant for
decode (a few rows over thousands of elements), where one block per row leaves most SMs idle; the
launch table picks none until a GPU sweep says so.

`launch_config` works on plain ints (the launcher) and on TensorRT's symbolic shape expressions
(`aot_impl`, where the number of rows may be dynamic): it only adds and floor-divides `rows`, and
multiplies it by S for a split-row layout (TensorRT's symbolic expressions have +, * and //).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

from normops import OPS, SUPPORTED_DTYPES, OpSpec

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
CUDA_TYPE = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
GAMMA_DTYPES = ("same", "float32")

THREADS_PER_ROW = (32, 64, 128, 256, 512, 1024)
MAX_VALUES_PER_THREAD = 32  # fp32 values of x a thread keeps in registers (C * V <= this)
# Row groups of fewer threads are packed into blocks of this many threads (norm_common.cuh's
# kSmallRowBlock must agree; a CPU test reads each kernel's .maxntid from its PTX).
BLOCK_THREADS_SMALL_ROWS = 256
ROW_LOOPS = (2, 4)  # rows each group normalises in turn, in the row-loop variants
ROW_LOOP_MAX_THREADS = 256  # row-loop variants exist for groups of at most this many threads
# Split-row variants: a thread block cluster of S blocks of TPR threads shares each row (decode: a
# few long rows would otherwise keep a few SMs busy and the rest idle). Clusters need sm_90.
SPLIT_THREADS = (128, 256)
SPLIT_CTAS = (2, 4, 8)  # blocks per row (the cluster); 8 is the portable cluster size
SPLIT_SLOTS = (1, 2)  # registers for gamma/beta too, loaded before the statistics
SPLIT_MIN_ARCH = 90

# Register slots per thread the table aims for (each slot one 16-byte vector): more slots mean more
# loads in flight per thread and fewer threads per row; tuned on an H100 (bench/README.md).
TARGET_SLOTS = {"float32": 2, "float16": 2, "bfloat16": 2}

# The measured best layout for the hidden sizes of bench/kernels.py, per op and dtype:
# hidden -> (threads per row, slots). Other sizes follow the TARGET_SLOTS rule. From
# bench/results/h100-80gb-hbm3-kernels-quick-tune.json (16384 tokens, L2 flushed).
# An entry may name a third number, rows per group (a row-loop variant); none does until one wins on the GPU.
TUNED: dict[tuple[str, str], dict[int, tuple[int, ...]]] = {
    ("RMSNorm", "bfloat16"): {768: (128, 1), 1024: (128, 1), 2048: (256, 1), 4096: (256, 2), 8192: (256, 4), 16384: (512, 4)},
    ("RMSNorm", "float16"): {768: (128, 2), 1024: (128, 1), 2048: (256, 1), 4096: (256, 2), 8192: (256, 4), 16384: (512, 4)},
    ("RMSNorm", "float32"): {768: (256, 1), 1024: (256, 1), 2048: (256, 4), 4096: (256, 4), 8192: (512, 4), 16384: (1024, 8)},
    ("LayerNorm", "bfloat16"): {768: (128, 1), 1024: (128, 1), 2048: (256, 1), 4096: (256, 2), 8192: (256, 4), 16384: (512, 4)},
    ("LayerNorm", "float16"): {768: (32, 4), 1024: (128, 1), 2048: (256, 1), 4096: (256, 2), 8192: (256, 4), 16384: (512, 4)},
    ("LayerNorm", "float32"): {768: (256, 2), 1024: (256, 1), 2048: (256, 2), 4096: (256, 4), 8192: (256, 8), 16384: (512, 8)},
    ("AddRMSNorm", "bfloat16"): {768: (128, 1), 1024: (128, 2), 2048: (256, 1), 4096: (256, 2), 8192: (512, 2), 16384: (1024, 2)},
    ("AddRMSNorm", "float16"): {768: (128, 1), 1024: (128, 1), 2048: (256, 1), 4096: (256, 2), 8192: (512, 2), 16384: (1024, 2)},
    ("AddRMSNorm", "float32"): {768: (256, 1), 1024: (256, 1), 2048: (256, 4), 4096: (512, 4), 8192: (512, 8), 16384: (1024, 4)},
    ("AddLayerNorm", "bfloat16"): {768: (128, 1), 1024: (128, 1), 2048: (256, 1), 4096: (256, 2), 8192: (512, 4), 16384: (512, 4)},
    ("AddLayerNorm", "float16"): {768: (128, 1), 1024: (128, 1), 2048: (256, 1), 4096: (256, 2), 8192: (512, 4), 16384: (512, 4)},
    ("AddLayerNorm", "float32"): {768: (256, 1), 1024: (256, 1), 2048: (256, 2), 4096: (512, 2), 8192: (1024, 2), 16384: (1024, 4)},
}

FAMILY = {"RMSNorm": "rms_norm", "LayerNorm": "layer_norm", "AddRMSNorm": "add_rms_norm",
          "AddLayerNorm": "add_layer_norm"}


@dataclass(frozen=True)
class LaunchConfig:
    kernel: str  # entry point in the op's PTX module
    grid: Any  # int, or a TensorRT symbolic expression when rows is one
    block: int
    shared_mem: int  # dynamic shared memory in bytes (the kernels use static shared memory only)
    threads_per_row: int
    rows_per_block: int  # groups per block x rows per group
    slots: int
    vector: int  # elements per 16-byte vector
    rows_per_group: int = 1  # > 1: a row-loop variant
    ctas_per_row: int = 1  # > 1: a split-row variant, a cluster of this many blocks per row

    @property
    def groups_per_block(self) -> int:
        return self.rows_per_block // self.rows_per_group

    @property
    def capacity(self) -> int:
        """Longest row kept in registers; longer rows are streamed (read twice)."""
        return self.slots * self.vector * self.threads_per_row * self.ctas_per_row

    @property
    def variant(self) -> tuple[int, ...]:
        """The compiled variant that runs this launch (see `variants` and `split_variants`)."""
        base = (self.threads_per_row, self.rows_per_block, self.slots)
        return base if self.ctas_per_row == 1 else base + (self.ctas_per_row,)


def _spec(op: str | OpSpec) -> OpSpec:
    return op if isinstance(op, OpSpec) else OPS[op]


def _check_dtype(dtype: str) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {SUPPORTED_DTYPES}")


def vector_width(dtype: str) -> int:
    _check_dtype(dtype)
    return 16 // ITEMSIZE[dtype]


def slot_choices(dtype: str) -> tuple[int, ...]:
    """Slots per thread compiled for `dtype` (C * V <= MAX_VALUES_PER_THREAD)."""
    v = vector_width(dtype)
    return tuple(c for c in (1, 2, 4, 8) if c * v <= MAX_VALUES_PER_THREAD)


def groups_per_block(threads_per_row: int) -> int:
    return max(1, BLOCK_THREADS_SMALL_ROWS // threads_per_row)


def rows_per_block(threads_per_row: int, rows_per_group: int = 1) -> int:
    return groups_per_block(threads_per_row) * rows_per_group


def row_loops(threads_per_row: int) -> tuple[int, ...]:
    """Rows per group compiled for groups of `threads_per_row` threads (1: no loop)."""
    return (1,) + (ROW_LOOPS if threads_per_row <= ROW_LOOP_MAX_THREADS else ())


def variants(dtype: str) -> list[tuple[int, int, int]]:
    """Every (TPR, RPB, C) compiled into a module whose x dtype is `dtype`: the one-row-per-group
    variants first, then the row-loop ones."""
    one = [(t, rows_per_block(t), c) for t in THREADS_PER_ROW for c in slot_choices(dtype)]
    looped = [(t, rows_per_block(t, k), c) for k in ROW_LOOPS for t in THREADS_PER_ROW
              for c in slot_choices(dtype) if k in row_loops(t)]
    return one + looped


def split_variants(dtype: str) -> list[tuple[int, int, int, int]]:
    """Every split-row variant (TPR, 1, C, S) compiled into an sm_90+ module for x in `dtype`."""
    return [(t, 1, c, s) for s in SPLIT_CTAS for t in SPLIT_THREADS for c in SPLIT_SLOTS
            if c in slot_choices(dtype)]


def arch_number(arch: str) -> int:
    """90 for "sm_90", "compute_90" or "90"."""
    number = arch.removeprefix("sm_").removeprefix("compute_")
    if not number.isdigit():
        raise ValueError(f"not a CUDA architecture: {arch!r}")
    return int(number)


def supports_split(arch: str) -> bool:
    return arch_number(arch) >= SPLIT_MIN_ARCH


def kernel_name(op: str | OpSpec, threads_per_row: int, rows_per_block: int, slots: int,
                ctas_per_row: int = 1) -> str:
    split = f"_s{ctas_per_row}" if ctas_per_row > 1 else ""
    return f"normfuse_{FAMILY[_spec(op).name]}_t{threads_per_row}_r{rows_per_block}_c{slots}{split}"


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def choose_layout(dtype: str, hidden: int | None, op: str | OpSpec | None = None) -> tuple[int, ...]:
    """(threads per row, slots per thread[, rows per group]) for a row of `hidden` elements of `dtype`.

    `hidden=None` (not known when the engine is built) picks the widest layout, right for any size.
    """
    v = vector_width(dtype)
    max_slots = max(slot_choices(dtype))
    if hidden is None:
        return THREADS_PER_ROW[-1], max_slots
    if hidden < 1:
        raise ValueError(f"hidden must be positive, got {hidden}")
    if op is not None and hidden in TUNED.get((_spec(op).name, dtype), {}):
        return TUNED[(_spec(op).name, dtype)][hidden]
    vectors = -(-hidden // v)
    tpr = min(max(_pow2_at_least(-(-vectors // TARGET_SLOTS[dtype])), THREADS_PER_ROW[0]), THREADS_PER_ROW[-1])
    slots = min(_pow2_at_least(-(-vectors // tpr)), max_slots)
    return tpr, slots


# Custom tactics each plugin offers TensorRT's autotuner (tensorrt.plugin tactics are positive
# integers; 0 is TensorRT's default). Tactic t > 0 runs tactic_layouts(...)[t - 1] and tactic 0 the
# table's layout, so the table's layout is timed whether or not TensorRT times its default beside
# custom tactics; a tactic past a row size's candidates runs the table's layout too.
TACTICS = (1, 2, 3)


def tactic_layouts(op: str | OpSpec, dtype: str, hidden: int | None) -> list[tuple[int, ...]]:
    """The layouts TensorRT may time for a row of `hidden` elements, the table's first.

    The table is tuned on whole tensors of 16384 rows; an engine's profile may be built for decode
    (a handful of rows), where a row's latency, not bandwidth, decides. So TensorRT also times, at
    the profile's opt shape, twice the threads with half the slots (shorter per-thread chains: for
    few rows) and half the threads with twice the slots (more bytes in flight a thread), each a
    compiled one-row variant that holds the whole row in registers, as the table's does. (The
    row-loop variants join once the GPU suite has passed them: tests/gpu, test_row_loop_variants.)
    With `hidden` unknown there is one layout, the widest.
    """
    chosen = choose_layout(dtype, hidden, op)
    if hidden is None:
        return [chosen]
    tpr, slots = chosen[0], chosen[1]
    out: list[tuple[int, ...]] = [chosen]
    for t, c in ((tpr * 2, slots // 2), (tpr // 2, slots * 2)):
        if t in THREADS_PER_ROW and c in slot_choices(dtype) and c * vector_width(dtype) * t >= hidden:
            out.append((t, c))  # not the streaming path (x read twice) as an alternative
    return out


def tactic_layout(op: str | OpSpec, dtype: str, hidden: int | None, tactic: int) -> tuple[int, ...]:
    """The layout tactic `tactic` runs (0, and any tactic past the candidates: the table's)."""
    layouts = tactic_layouts(op, dtype, hidden)
    return layouts[tactic - 1] if 1 <= tactic <= len(layouts) else layouts[0]


def split_layouts(dtype: str, hidden: int) -> list[tuple[int, int, int, int]]:
    """The split-row layouts (TPR, C, 1, S) that hold a row of `hidden` elements in registers and
    use more than half of them (so fewer than half the blocks of a cluster hold no part of the
    row), fewest threads first."""
    v = vector_width(dtype)
    out = []
    for tpr, _, c, s in split_variants(dtype):
        capacity = c * v * tpr * s
        if capacity // 2 < hidden <= capacity:
            out.append((tpr, c, 1, s))
    return sorted(out, key=lambda lo: (lo[0] * lo[3], lo[1]))


def launch_config(op: str | OpSpec, dtype: str, rows: Any, hidden: int | None,
                  layout: tuple[int, ...] | None = None) -> LaunchConfig:
    """Kernel name and launch shape for `rows` rows of `hidden` elements.

    `layout` forces (threads per row, slots), (threads per row, slots, rows per group) or, for a
    split-row variant, (threads per row, slots, 1, blocks per row) (tests and tuning); by default
    the table decides.
    """
    spec = _spec(op)
    chosen = tuple(layout) if layout is not None else choose_layout(dtype, hidden, spec)
    tpr, slots = chosen[0], chosen[1]
    per_group = chosen[2] if len(chosen) > 2 else 1
    ctas = chosen[3] if len(chosen) > 3 else 1
    if ctas > 1:
        if (tpr, 1, slots, ctas) not in split_variants(dtype) or per_group != 1:
            raise ValueError(f"no split-row variant with {tpr} threads, {slots} slots and {ctas} blocks per row "
                             f"(and 1 row per group) for {dtype}")
        # one cluster of `ctas` blocks per row: the grid is rows * ctas blocks of tpr threads
        return LaunchConfig(kernel=kernel_name(spec, tpr, 1, slots, ctas), grid=rows * ctas, block=tpr,
                            shared_mem=0, threads_per_row=tpr, rows_per_block=1, slots=slots,
                            vector=vector_width(dtype), ctas_per_row=ctas)
    if tpr not in THREADS_PER_ROW or slots not in slot_choices(dtype) or per_group not in row_loops(tpr):
        raise ValueError(f"no compiled variant with {tpr} threads per row, {slots} slots and "
                         f"{per_group} rows per group for {dtype}")
    rpb = rows_per_block(tpr, per_group)
    grid = (rows + (rpb - 1)) // rpb
    return LaunchConfig(kernel=kernel_name(spec, tpr, rpb, slots), grid=grid,
                        block=tpr * groups_per_block(tpr), shared_mem=0, threads_per_row=tpr,
                        rows_per_block=rpb, slots=slots, vector=vector_width(dtype), rows_per_group=per_group)


def epsilon_bits(epsilon: float) -> int:
    """epsilon as the signed int32 whose bits are its fp32 value (kernel arguments are integers)."""
    return struct.unpack("<i", struct.pack("<f", float(epsilon)))[0]


def gamma_dtype_name(x_dtype: str, gamma_dtype: str | None) -> str:
    """Normalise a gamma dtype: None or 'same' mean x's dtype; otherwise it must be x's or float32."""
    _check_dtype(x_dtype)
    g = x_dtype if gamma_dtype in (None, "same") else gamma_dtype
    if g not in (x_dtype, "float32"):
        raise ValueError(f"gamma/beta dtype must be {x_dtype} or float32, got {g}")
    return g
