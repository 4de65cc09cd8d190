"""Our top-level package names are generic words: make sure nobody else installs them."""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

import pytest

OURS = ["client", "hub", "privacy", "server", "simulations", "strategies"]
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", OURS)
def test_top_level_name_is_ours_alone(name: str) -> None:
    providers = importlib.metadata.packages_distributions().get(name, [])
    assert set(providers) <= {"fedlora"}, f"{name} is also provided by {providers}"
    module = importlib.import_module(name)
    assert Path(module.__file__ or "").resolve().is_relative_to(REPO), module.__file__


def test_console_scripts_declared() -> None:
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert eps["fl-client"] == "client.cli:main"
    assert eps["fl-hub"] == "hub.cli:main"


@pytest.mark.parametrize("package", ["strategies", "privacy"])
def test_core_packages_import_no_other_package_of_ours(package: str) -> None:
    """Dependencies point one way: the math and the privacy accounting never reach into the roles."""
    import ast

    others = set(OURS) - {package}
    for path in (REPO / package).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in others, f"{path.name} imports {name}"
