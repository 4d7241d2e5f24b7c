"""Resident memory of this process and of the processes it has waited for (Linux's /proc, else getrusage).

The build reports each stage's peak: the kernel's high-water mark of this process, reset as the
stage starts, or the largest child's (a bench worker), whichever is larger. Where the mark cannot
be reset (no /proc), a stage's figure is this process's peak so far.
"""
from __future__ import annotations

import resource
import sys


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _maxrss_mb(who: int) -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS
    return resource.getrusage(who).ru_maxrss / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0)


def rss_mb() -> float:
    return _status_mb("VmRSS:") or 0.0


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark to the current RSS (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """This process's high-water mark since the last reset (its lifetime peak where none is possible)."""
    hwm = _status_mb("VmHWM:")
    return hwm if hwm is not None else _maxrss_mb(resource.RUSAGE_SELF)
