"""The highest version of each adapter a client has ever accepted from a hub, across directories.

A pull into a directory that already holds a newer version refuses a rollback, but a fresh
directory has nothing to compare with: a hub (or anyone replaying its answers) could hand it
an older, validly signed version as the latest. This file, one per client account, remembers
per hub key the highest version accepted for each name and the newest adapter accepted under
each prefix (``global/<run>`` -> its last round), and a "latest" answer below either is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedlora.atomic import write_atomic

#: where the marks live unless this names another file
SEEN_ENV = "FEDLORA_HUB_SEEN"


def default_seen_path() -> Path:
    """``$FEDLORA_HUB_SEEN``, else ``$XDG_STATE_HOME/fedlora/hub-seen.json`` (``~/.local/state``)."""
    if os.environ.get(SEEN_ENV):
        return Path(os.environ[SEEN_ENV])
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "fedlora" / "hub-seen.json"


def prefix_rank(name: str, created: str) -> list[Any]:
    """How the hub orders adapters under a prefix: numeric last segment, then creation time."""
    last = name.rsplit("/", 1)[-1]
    return [int(last) if last.isdigit() else -1, created]


class SeenVersions:
    """High-water marks in one JSON file (0600, its directory 0700), updated under a lock."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def check(self) -> SeenVersions:
        """Fail now, naming the fix, if the record cannot be read or kept (before any pull)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            writable = os.access(self.path.parent, os.W_OK) and (
                not self.path.exists() or os.access(self.path, os.W_OK)
            )
        except OSError:
            writable = False
        if not writable:
            raise ValueError(
                f"cannot keep the record of hub versions seen at {self.path}: set {SEEN_ENV} to a file this "
                "account can write"
            )
        self._read()
        return self

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            raise ValueError(f"{self.path}: unreadable record of hub versions seen ({err}); fix or remove it") from None
        if not isinstance(data, dict):
            raise ValueError(f"{self.path}: not a record of hub versions seen; fix or remove it")
        return data

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path.parent / (self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = self._read()
            yield data
            write_atomic(self.path, (json.dumps(data, sort_keys=True, indent=1) + "\n").encode(), 0o600)
        finally:
            os.close(fd)

    def highest(self, hub_key: str, name: str) -> int:
        return int(self._read().get(hub_key, {}).get("names", {}).get(name, 0))

    def newest_under(self, hub_key: str, prefix: str) -> list[Any] | None:
        mark = self._read().get(hub_key, {}).get("prefixes", {}).get(prefix)
        return list(mark) if isinstance(mark, list) else None

    def accept(self, hub_key: str, name: str, version: int) -> None:
        with self._locked() as data:
            names = data.setdefault(hub_key, {}).setdefault("names", {})
            names[name] = max(int(names.get(name, 0)), int(version))

    def accept_under(self, hub_key: str, prefix: str, rank: list[Any]) -> None:
        with self._locked() as data:
            prefixes = data.setdefault(hub_key, {}).setdefault("prefixes", {})
            old = prefixes.get(prefix)
            if not isinstance(old, list) or rank > old:
                prefixes[prefix] = rank
