"""Command-line plumbing shared by every stage: user errors become one line and an exit code."""
from __future__ import annotations

import os
import sys
import traceback

from .errors import NormfuseError


def run_cli(job) -> int:
    """Run `job()`; a NormfuseError prints `normfuse: error: ...` and returns its exit code."""
    try:
        result = job()
    except NormfuseError as exc:
        print(f"normfuse: error: {exc}", file=sys.stderr)
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
