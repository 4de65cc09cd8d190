"""The layer contract: roles never import each other (the hub's client SDK excepted), roles sit on
the core, the core on strategies and privacy, and those on nothing of ours but the leaf utilities.

import-linter checks the contract (``[tool.importlinter]`` in pyproject.toml, every import
statement, function-level ones included); the AST checks below add what it does not: no own-module
import hides inside a function unless it is a declared lazy import of something heavy, and the
import graph has no cycles.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fedlora"
LAZY_MARK = "# lazy:"


def _lint_imports(package_parent: Path) -> subprocess.CompletedProcess[str]:
    """import-linter on the ``fedlora`` package found in ``package_parent``, with our contracts."""
    env = dict(os.environ, PYTHONPATH=str(package_parent))
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run(
        [sys.executable, "-c", code, "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=package_parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_layer_contract_is_kept() -> None:
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout and result.stdout.count("KEPT") >= 2, result.stdout


@pytest.mark.parametrize(
    ("module", "wrong_import", "complaint"),
    [
        ("core/tasks.py", "import fedlora.server.app", "fedlora.core is not allowed to import fedlora.server"),
        ("client/app.py", "from fedlora.simulations import cli", "fedlora.client is not allowed to import"),
        ("strategies/linalg.py", "from fedlora.core import config", "fedlora.strategies is not allowed to import"),
        ("hub/sdk/names.py", "from fedlora.hub import store", "fedlora.hub.sdk is not allowed to import"),
    ],
)
def test_a_wrong_way_import_breaks_the_contract(tmp_path: Path, module: str, wrong_import: str, complaint: str) -> None:
    """The contract can fail: the same check on a copy of the package with one wrong-way import
    added (inside a function, where a hidden import would go) reports it by name."""
    copy = tmp_path / "fedlora"
    shutil.copytree(PACKAGE, copy, symlinks=False, ignore=shutil.ignore_patterns("__pycache__", "embedded"))
    target = copy / module
    target.write_text(target.read_text() + f"\n\ndef _sneaky() -> None:\n    {wrong_import}  # noqa\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert complaint in result.stdout, result.stdout


def _python_files() -> list[Path]:
    """Every module of the package, through the links to the role folders."""
    found = []
    for root, _, files in os.walk(PACKAGE, followlinks=True):
        found += [Path(root) / f for f in files if f.endswith(".py")]
    return sorted(found)


def _function_level_own_imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, imported module, source lines) of every ``fedlora`` import inside a function body."""
    source = path.read_text()
    lines = source.splitlines()
    found: list[tuple[int, str, str]] = []

    tree = ast.parse(source)
    import_lines = {
        n for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
        for n in range(node.lineno, (node.end_lineno or node.lineno) + 1)
    }  # fmt: skip

    def with_comments_above(lineno: int) -> str:
        """The import's first line and the comment and import lines right above it (one comment
        may explain a block of lazy imports)."""
        block = [lines[lineno - 1]]
        k = lineno - 1
        while k >= 1 and (k in import_lines or lines[k - 1].strip().startswith("#")):
            block.append(lines[k - 1])
            k -= 1
        return "\n".join(block)

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                names = ["fedlora"] if child.level else [child.module or ""]
            if in_function and any(n == "fedlora" or n.startswith("fedlora.") for n in names):
                found.append((child.lineno, names[0], with_comments_above(child.lineno)))
            visit(child, inside)

    visit(tree, False)
    return found


def test_own_imports_inside_functions_are_declared_lazy() -> None:
    """An own-module import inside a function hides a cycle unless it defers a heavy dependency
    (torch, flwr, transformers...) from a light path such as a CLI's start: those say so with
    ``# lazy: <why>`` on the line, or in a comment right above it (one comment may head a block)."""
    undeclared = [
        f"{path.relative_to(PACKAGE)}:{line}: {text.strip()}"
        for path in _python_files()
        for line, _, text in _function_level_own_imports(path)
        if LAZY_MARK not in text
    ]
    assert not undeclared, "own imports inside functions without a '# lazy: why' comment:\n" + "\n".join(undeclared)


def test_no_import_cycles() -> None:
    """Among all our modules (function-level imports included), no module reaches itself."""
    graph = grimp.build_graph("fedlora", cache_dir=None)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strongly_connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strongly_connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(edges):
        if module not in index:
            strongly_connect(module)
    assert not cycles, f"import cycles: {cycles}"
