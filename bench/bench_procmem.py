"""Process memory as the kernel sees it, for the benchmarks' fresh-process measurements.

torch's allocations are invisible to tracemalloc, so peak memory is read from
``/proc/self/status`` (VmRSS, VmHWM) after resetting the peak with ``/proc/self/clear_refs``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path


def status_mb(field: str) -> float:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``) in MB; NaN where it does not exist."""
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 2**10 if match else math.nan


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
