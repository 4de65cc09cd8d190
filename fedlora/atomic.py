"""Atomic, durable file writes: a crash leaves the old file or the new one, never half of one.

Privacy ledgers, checkpoints' metadata, run configs and private keys all go through here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a replaced or new file) survive power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes, mode: int = 0o644, *, prefix: str | None = None) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory, fsync, rename,
    fsync the directory.

    The temporary file is created by ``mkstemp`` (mode 0600, whatever the umask) and only then
    given ``mode``: a private key is never readable by others, not even for an instant.
    ``prefix`` names the temporary file (default ``.<name>.``; it always ends in ``.tmp``), so
    an owner can find leftovers of a crash.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix or f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if mode != 0o600:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: str | Path, data: Any, mode: int = 0o644) -> None:
    """:func:`write_atomic` of ``data`` as indented JSON."""
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode(), mode)


@contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling (yielded), fsync its files, then put it in place
    of ``out``: an existing ``out`` is first renamed aside (``.<name>.*.old``) and deleted only
    once the new one is in place, so a crash leaves the old directory or the new one (or the old
    one under its aside name), never half of one. An error inside the block removes the
    temporary directory and leaves ``out`` as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = tmp.with_name(tmp.name + ".old")
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
