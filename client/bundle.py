"""Which Flower app bundles (FABs) a node accepts: a fedlora server's configuration-only bundle,
or one whose SHA-256 its operator pinned. Nothing else.

A FAB is a zip the server sends with every run. Flower's own client runtime installs it and puts
its folder first on ``sys.path``, so a bundle that ships ``fedlora/client/app.py`` (or any module
the client imports) runs the server's code on the node. A fedlora node never installs or imports
a bundle: it reads the zip in memory, checks it here, and runs its own installed ClientApp.
"""

from __future__ import annotations

import hashlib
import io
import tomllib
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass

#: fedlora's own apps, the only components a configuration-only bundle may name
COMPONENTS = {"serverapp": "fedlora.server.app:app", "clientapp": "fedlora.client.app:app"}
#: what ``flwr build`` puts in a bundle of a directory holding only pyproject.toml
EXPECTED_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})
MAX_PYPROJECT_BYTES = 1 << 20


@dataclass(frozen=True)
class BundleVerdict:
    """Whether to run a task of this bundle, and why (for the node's log and the server)."""

    sha256: str
    accepted: bool
    reason: str


def sha256_of(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def check_bundle(content: bytes, pinned: Iterable[str] = ()) -> BundleVerdict:
    """Accept ``content`` if its SHA-256 is pinned or it is a configuration-only fedlora bundle."""
    digest = sha256_of(content)
    if digest in {p.lower() for p in pinned}:
        return BundleVerdict(digest, True, "pinned by this node's operator")
    problem = config_only_problem(content)
    if problem is None:
        return BundleVerdict(digest, True, "configuration-only fedlora bundle")
    return BundleVerdict(digest, False, f"bundle sha256:{digest} refused: {problem}")


def config_only_problem(content: bytes) -> str | None:
    """What makes ``content`` other than a configuration-only fedlora bundle (None: nothing)."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            infos = fab.infolist()
            names = [i.filename for i in infos]
            extra = sorted(set(names) - EXPECTED_FILES)
            if extra:
                return f"it ships files besides pyproject.toml: {extra[:5]}{' ...' if len(extra) > 5 else ''}"
            if sorted(names) != sorted(EXPECTED_FILES):
                return f"it holds {sorted(names)}, not exactly {sorted(EXPECTED_FILES)}"
            info = fab.getinfo("pyproject.toml")
            if info.file_size > MAX_PYPROJECT_BYTES:
                return f"its pyproject.toml is {info.file_size} bytes"
            project = tomllib.loads(fab.read(info).decode("utf-8"))
    except (zipfile.BadZipFile, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, ValueError) as err:
        return f"not a readable bundle ({err})"
    return _pyproject_problem(project)


def _pyproject_problem(project: dict[str, object]) -> str | None:
    if set(project) - {"project", "tool", "build-system"}:
        return f"its pyproject.toml has sections {sorted(set(project) - {'project', 'tool', 'build-system'})}"
    tool = project.get("tool")
    if not isinstance(tool, dict) or set(tool) != {"flwr"} or not isinstance(tool["flwr"], dict):
        return "its pyproject.toml configures tools besides Flower"
    flwr = tool["flwr"]
    app = flwr.get("app") if set(flwr) == {"app"} else None
    if not isinstance(app, dict) or set(app) - {"publisher", "components", "config"}:
        return "its [tool.flwr] holds more than the app's publisher, components and config"
    components = app.get("components")
    if components != COMPONENTS:
        return f"its components are {components!r}, not fedlora's own {COMPONENTS!r}"
    return None
