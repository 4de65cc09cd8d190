"""One import name: everything installs under ``fedlora``, nothing under a generic word, and a
user's own ``client/`` or ``server/`` folder (Flower puts an app's folder first on ``sys.path``)
shadows nothing of ours."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROLE_FOLDERS = ["client", "hub", "privacy", "server", "simulations", "strategies"]
GENERIC_NAMES = [*ROLE_FOLDERS, "core", "atomic"]
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


@pytest.mark.slow
def test_pip_install_into_a_fresh_virtualenv_installs_fedlora_alone(tmp_path: Path) -> None:
    """``pip install .`` of a wheel built from this checkout, into a new virtualenv: the wheel holds
    ``fedlora/`` (the linked role folders as real files, the embedded model included) and nothing
    else at its top; there ``import fedlora.client`` works and ``import client`` does not."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        check=True,
        timeout=600,
        capture_output=True,
    )
    (wheel,) = wheels.glob("fedlora-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith((".dist-info", ".data"))} == {"fedlora"}, tops
    for folder in ROLE_FOLDERS:
        assert f"fedlora/{folder}/__init__.py" in names
    assert "fedlora/core/embedded/base-model/model.safetensors" in names

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], capture_output=True, text=True
    ).stdout.strip()
    # the new environment has no pip of its own: this pip installs into it, dependencies aside
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", site, str(wheel)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    probe = (
        "import importlib, importlib.metadata, json, fedlora.client, fedlora.server, fedlora.hub.sdk\n"
        "missing = []\n"
        f"for name in {GENERIC_NAMES!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError:\n"
        "        missing.append(name)\n"
        "tops = sorted(n for n, d in importlib.metadata.packages_distributions().items() if 'fedlora' in d)\n"
        "print(json.dumps({'file': fedlora.client.__file__, 'missing': missing, 'tops': tops}))\n"
    )
    out = subprocess.run(
        [python, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin"}
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["file"].startswith(site), seen
    assert seen["missing"] == GENERIC_NAMES  # `import client` and friends fail: only `fedlora` is installed
    assert seen["tops"] == ["fedlora"]


def _shadowing_project(root: Path) -> Path:
    """A user's project whose own packages carry our old generic names and refuse to be imported."""
    for name in GENERIC_NAMES:
        pkg = root / name
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text(f"raise ImportError('the user project\\'s own {name!r} was imported')\n")
        (pkg / "app.py").write_text("raise ImportError('the user project\\'s own app module was imported')\n")
    return root


@pytest.mark.slow
@pytest.mark.flower
def test_a_user_project_with_client_and_server_folders_shadows_nothing(tmp_path: Path) -> None:
    """A real simulation from inside a user's project that has its own ``client/``, ``server/``...
    packages, with that folder first on every process's path (as Flower does for an app's folder):
    the run completes on our apps and writes its adapter."""
    project = _shadowing_project(tmp_path / "project")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(project), os.environ.get("PYTHONPATH", "")]).rstrip(":"))
    run = tmp_path / "run"
    argv = [
        "--clients", "2", "--rounds", "1", "--local-steps", "2", "--num-train", "32", "--num-test", "8",
        "--tasks", "adddigit-4,rotate-2", "--partition", "tasks-per-client", "--no-dp", "--quiet", "--out", str(run),
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "fedlora.simulations.cli", *argv],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (run / "adapters" / "global" / "adapter_model.safetensors").is_file()
    assert "was imported" not in done.stdout + done.stderr
