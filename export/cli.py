"""Command-line plumbing shared by every stage: user errors become one line and an exit code."""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from .errors import NormfuseError
from .files import unwritable

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
    except Exception as exc:  # a bug: still one line, with the traceback on request
        if os.environ.get("NORMFUSE_DEBUG"):
            traceback.print_exc()
        where = traceback.extract_tb(exc.__traceback__)[-1]
        print(f"normfuse: internal error: {exc.__class__.__name__}: {exc} "
              f"(at {os.path.basename(where.filename)}:{where.lineno}; set NORMFUSE_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 3
    return int(result or 0)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `normfuse: error: ...` and exit code 2, no usage dump."""

    def error(self, message):
        self.exit(2, f"{ERROR_PREFIX}{message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 0")
    return value


def output_file(text: str) -> str:
    """An argparse type: a path the command can write a file to (checked before any work)."""
    reason = unwritable(text)
    if reason:
        raise argparse.ArgumentTypeError(f"{text} {reason}")
    return text


def output_folder(text: str) -> str:
    """An argparse type: a folder the command can create or write into (checked before any work)."""
    reason = unwritable(text, folder=True)
    if reason:
        raise argparse.ArgumentTypeError(f"{text} {reason}")
    return text
