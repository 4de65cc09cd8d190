"""Process checks the tests share (Linux ``/proc``)."""

from __future__ import annotations

from pathlib import Path


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited: no such process, or only a zombie waiting for its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
