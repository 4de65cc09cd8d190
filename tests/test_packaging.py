"""One import name: everything installs under ``fedlora``, nothing under a generic word."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

ROLE_FOLDERS = ["client", "hub", "privacy", "server", "simulations", "strategies"]
REPO = Path(__file__).resolve().parents[1]


def test_one_import_name() -> None:
    """The distribution provides ``fedlora`` and nothing else (Flower, PEFT and Opacus do the same)."""
    provided = {name for name, dists in importlib.metadata.packages_distributions().items() if "fedlora" in dists}
    assert provided == {"fedlora"}, provided


@pytest.mark.parametrize("folder", ROLE_FOLDERS)
def test_role_folders_at_the_top_are_the_package(folder: str) -> None:
    """The design card's folders stay at the repository's top; ``fedlora/<folder>`` links to them."""
    link = REPO / "fedlora" / folder
    assert link.is_symlink() and link.resolve() == (REPO / folder).resolve()
    assert (REPO / folder / "__init__.py").is_file()


def test_console_scripts_declared() -> None:
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert eps["fl-client"] == "fedlora.client.cli:main"
    assert eps["fl-server"] == "fedlora.server.cli:main"
    assert eps["fl-sim"] == "fedlora.simulations.cli:main"
    assert eps["fl-hub"] == "fedlora.hub.cli:main"
