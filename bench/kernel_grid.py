"""The cells the kernel benchmarks run over: the token counts, hidden sizes and dtypes the options
select, the launch layouts --tune tries, the epsilon, and the bytes a cell must move. No GPU.

Imported by bench/kernels.py (`python bench/kernels.py ...`) and its sibling modules
kernel_ab and kernel_static.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from normops import DEFAULT_EPSILON, OPS  # noqa: E402
from plugins import config  # noqa: E402

TOKENS = (1, 32, 512, 4096, 16384, 65536)
HIDDEN = (768, 1024, 2048, 4096, 8192, 16384)
DTYPES = ("bfloat16", "float16", "float32")
TARGET_TOKENS = (4096, 16384, 65536)
TARGET_HIDDEN = (4096, 8192)

EPS = DEFAULT_EPSILON


def shapes(args) -> tuple[tuple[int, ...], tuple[int, ...], tuple[str, ...]]:
    """(tokens, hidden sizes, dtypes) the options select, as in the default run."""
    tokens_list = TARGET_TOKENS if args.quick else TOKENS
    hidden_list = tuple(args.hidden) if args.hidden else (TARGET_HIDDEN if args.quick else HIDDEN)
    dtypes = tuple(args.dtypes) if args.dtypes else (("bfloat16",) if args.quick else DTYPES)
    if args.quick:
        tokens_list = (1, 32) + tokens_list
    if args.tokens:
        tokens_list = tuple(args.tokens)
    return tokens_list, hidden_list, dtypes


def candidate_layouts(dtype: str, hidden: int) -> list[tuple[int, ...]]:
    """(threads per row, slots) that hold the row in registers without leaving most threads idle,
    then the same with 2 or 4 rows per group (the row-loop variants), where compiled."""
    v = config.vector_width(dtype)
    vectors = -(-hidden // v)
    one: list[tuple[int, ...]] = []
    for tpr in config.THREADS_PER_ROW:
        for c in config.slot_choices(dtype):
            if c * tpr >= vectors and c * tpr < 2 * vectors + tpr:
                one.append((tpr, c))
    looped = [(tpr, c, k) for tpr, c in one for k in config.row_loops(tpr)[1:]]
    return one + looped


def layout_label(layout: tuple[int, ...]) -> str:
    """The impl name of a --tune cell: normfuse[TPRxC], or normfuse[TPRxCxK] for a row-loop layout."""
    return f"normfuse[{'x'.join(map(str, layout))}]"


def layout_of_label(impl: str) -> tuple[int, ...] | None:
    """The layout a --tune cell's impl name holds (K = 1 written out is the one-row layout); None
    for every other impl."""
    m = re.fullmatch(r"normfuse\[(\d+(?:x\d+){1,2})\]", impl)
    if not m:
        return None
    layout = tuple(int(n) for n in m.group(1).split("x"))
    return layout[:2] if len(layout) == 3 and layout[2] == 1 else layout


SPLIT_MAX_TOKENS = 512  # --split times the split-row layouts up to this many rows (decode, short prefill)


def split_label(layout: tuple[int, ...]) -> str:
    """The impl name of a --split cell: split[TPRxCxS], S blocks (a cluster) of TPR threads per row."""
    tpr, c, _, ctas = layout
    return f"split[{tpr}x{c}x{ctas}]"


def moved_bytes(op: str, dtype: str, tokens: int, hidden: int) -> int:
    spec = OPS[op]
    item = config.ITEMSIZE[dtype]
    rows_io = (2 if spec.has_residual else 1) + len(spec.outputs)
    params = 2 if spec.centered else 1
    return item * hidden * (tokens * rows_io + params)
