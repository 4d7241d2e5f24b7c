"""Command-line plumbing shared by every stage: user errors become one line and an exit code."""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from .errors import NormfuseError
from .files import NO_ROOM, unwritable

ERROR_PREFIX = "normfuse: error: "  # how a user error starts; export.bench recognises it in a child's stderr


def run_cli(job) -> int:
    """Run `job()`; a NormfuseError prints `normfuse: error: ...` and returns its exit code."""
    try:
        result = job()
    except NormfuseError as exc:
        print(f"{ERROR_PREFIX}{exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("normfuse: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in NO_ROOM:
            return internal_error(exc)
        # a write no path check could have foreseen, outside files.atomic_path (which names its target)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{ERROR_PREFIX}{where}cannot write ({exc.strerror})", file=sys.stderr)
        return 1
    except Exception as exc:
        return internal_error(exc)
    return int(result or 0)


def internal_error(exc: Exception) -> int:
    """A bug: still one line, with the traceback on request."""
    if os.environ.get("NORMFUSE_DEBUG"):
        traceback.print_exception(exc)
    where = traceback.extract_tb(exc.__traceback__)[-1]
    print(f"normfuse: internal error: {exc.__class__.__name__}: {exc} "
          f"(at {os.path.basename(where.filename)}:{where.lineno}; set NORMFUSE_DEBUG=1 for the traceback)",
          file=sys.stderr)
    return 3


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `normfuse: error: ...` and exit code 2, no usage dump."""

    def error(self, message):
        self.exit(2, f"{ERROR_PREFIX}{message} (see {self.prog} --help)\n")


def int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least {low}")
    return value


SUPPORTED_OPSETS = range(17, 24)  # LayerNormalization is opset 17; RMSNormalization, the newest op written, 23


def supported_opset(text: str) -> int:
    """An --opset in SUPPORTED_OPSETS."""
    value = int_at_least(text, 1)
    if value not in SUPPORTED_OPSETS:
        raise argparse.ArgumentTypeError(f"{value} is outside the supported range "
                                         f"{SUPPORTED_OPSETS[0]}..{SUPPORTED_OPSETS[-1]}")
    return value


def positive_int(text: str) -> int:
    return int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return int_at_least(text, 0)


def seed_value(text: str) -> int:
    """A seed torch's generators take: 0..2^63-1."""
    value = int_at_least(text, 0)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"{text} is past 2^63-1, the largest seed torch takes")
    return value


def writable(text: str, folder: bool) -> str:
    """`text` if the command can write it (a file, or a folder), checked before any work."""
    reason = unwritable(text, folder)
    if reason:
        raise argparse.ArgumentTypeError(f"{text} {reason}")
    return text


def output_file(text: str) -> str:
    """An argparse type: a path the command can write a file to."""
    return writable(text, folder=False)


def output_folder(text: str) -> str:
    """An argparse type: a folder the command can create or write into."""
    return writable(text, folder=True)


def _name_and_value(text: str, expected: str) -> tuple[str, str]:
    """`NAME=VALUE` split at its last '=' (a name such as 'past + seq' has none)."""
    name, sep, value = text.rpartition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
    return name.strip(), value.strip()


def dim_size(text: str) -> tuple[str, int]:
    """An argparse type: `NAME=SIZE`, the size of a named dynamic dimension (export.dims)."""
    name, size = _name_and_value(text, "NAME=SIZE, e.g. past_sequence_length=128")
    return name, int_at_least(size, 1)


def dim_range(text: str):
    """An argparse type: `NAME=SIZE` or `NAME=MIN:OPT:MAX`, a named dynamic dimension's size in
    ONNX Runtime runs (OPT) and its range in TensorRT's optimisation profile."""
    from .errors import UsageError
    from .tensorrt_engine import Range

    name, size = _name_and_value(text, "NAME=SIZE or NAME=MIN:OPT:MAX, e.g. past_sequence_length=1:128:2048")
    try:
        return name, Range.parse(size)
    except UsageError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=SIZE or NAME=MIN:OPT:MAX integers "
                                         "with 1 <= MIN <= OPT <= MAX") from None


_OTHER_DIMS = "other dynamic axes follow the batch (axis 0) or the sequence, and a name like 'past + seq' is worked out"
DIM_HELP = f"size of a named dynamic input dimension, e.g. past_sequence_length=128 (repeatable); {_OTHER_DIMS}"
DIM_RANGE_HELP = ("MIN:OPT:MAX (or one SIZE) of a named dynamic input dimension, e.g. past_sequence_length=1:128:2048 "
                  f"(repeatable); {_OTHER_DIMS}")
