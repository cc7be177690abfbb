"""The package's shape: no import circle inside ``nst_lightning``, one job per file, files of a readable size."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "nst_lightning"
# A room's size is counted in statements, not lines: a line limit rewarded packing (24 '# fmt: skip' lines once
# kept files under it), while formatting and docstrings change no statement count. Within a file, ruff's
# complexity limit (C901, pyproject.toml) bounds each function. The LightningModule is the training loop only and
# keeps a tighter limit; FILE_LINES is the one-sitting bound on what a reader scrolls through, docstrings included.
MODULE_STATEMENTS, FILE_STATEMENTS, FILE_LINES = 200, 250, 500


def statements(source: str) -> int:
    """The statements of a file, nested ones included, docstrings not."""
    tree = ast.parse(source)
    docstring = (ast.Expr,)
    return sum(
        1
        for node in ast.walk(tree)
        if isinstance(node, ast.stmt)
        and not (isinstance(node, docstring) and isinstance(getattr(node, "value", None), ast.Constant))
    )


def imports_of(path: Path) -> set[str]:
    """The ``nst_lightning`` modules a file imports, at any depth of its code (an import inside a function
    is still an edge of the graph)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nst_lightning"):
            names = [node.module] if node.module != "nst_lightning" else [f"nst_lightning.{a.name}" for a in node.names]
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("nst_lightning"))
    return found


# The floors, bottom to top: a module imports only its own floor and those below (arrows point down). The
# errors and the package's own ``__init__`` are the ground every floor stands on; serve and video are extras
# side by side on one floor that never import each other; the dispatcher (main, with the checks it runs
# before torch loads) is the roof.
FLOORS = {
    "nst_lightning": 0,
    "nst_lightning.errors": 0,
    "nst_lightning.names": 0,
    "nst_lightning.io": 1,
    "nst_lightning.core": 2,
    "nst_lightning.run": 3,
    "nst_lightning.cli": 4,
    "nst_lightning.batch": 5,
    "nst_lightning.serve": 6,
    "nst_lightning.video": 6,
    "nst_lightning.cli.early": 7,
    "nst_lightning.main": 7,
    "nst_lightning.__main__": 7,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def floor(name: str) -> tuple[int, str]:
    """The floor of a module and the folder (or top-level room) it belongs to."""
    for depth in (2, 1):
        room = ".".join(name.split(".")[:depth])
        if room in FLOORS:
            return FLOORS[room], room
    raise AssertionError(f"{name} is on no floor: add its folder to FLOORS in {Path(__file__).name}")


def graph() -> dict[str, set[str]]:
    """Each module's imports of other modules of the package. The package's ``__init__`` is left out: its
    public names load their modules when first used (PEP 562), a facade over every floor."""
    found = modules()

    def resolve(target: str) -> str | None:
        while target and target not in found:  # ``from nst_lightning.run.module import X`` -> the module
            target = target.rpartition(".")[0]
        return target or None

    edges: dict[str, set[str]] = {}
    for name, path in found.items():
        if name == "nst_lightning":
            continue
        targets = {resolve(m) for m in imports_of(path)}
        edges[name] = {m for m in targets if m and m != name and not name.startswith(m + ".") and m != "nst_lightning"}
    return edges


def test_every_sub_package_is_walked_and_on_a_floor():
    names = set(modules())
    for sub in ("core", "io", "run", "cli", "batch", "serve", "video"):
        assert f"nst_lightning.{sub}" in names and any(n.startswith(f"nst_lightning.{sub}.") for n in names), sub
    for name in names:
        floor(name)


def test_no_import_circle():
    edges = graph()
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycle = path[path.index(target) :] + [target] if target in path else [node, target]
                pytest.fail(f"import circle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_arrows_point_down():
    wrong = []
    for name, targets in graph().items():
        level, room = floor(name)
        for target in targets:
            their_level, their_room = floor(target)
            across_extras = their_level == level == FLOORS["nst_lightning.serve"] and their_room != room
            if their_level > level or across_extras:
                wrong.append(f"{name} ({room}) imports {target} ({their_room})")
    assert not wrong, "imports that point up (or across the extras):\n" + "\n".join(sorted(wrong))


@pytest.mark.slow
def test_the_maths_loads_no_lightning_jsonargparse_or_pillow():
    """Importing every room of ``core`` loads neither Lightning nor jsonargparse; no core file imports Pillow
    (torchvision itself imports it, so ``sys.modules`` cannot tell)."""
    rooms = [n for n in modules() if n.startswith("nst_lightning.core.")]
    code = "import sys\n" + "".join(f"import {n}\n" for n in rooms)
    code += "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'jsonargparse') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
    for name, path in modules().items():
        if name.startswith("nst_lightning.core"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom | ast.Import):
                    imported = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                    assert not any(m.split(".")[0] == "PIL" for m in imported), f"{name} imports Pillow"


def test_files_are_short_and_say_their_job_first():
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        limit = MODULE_STATEMENTS if path.name == "module.py" else FILE_STATEMENTS
        where = path.relative_to(PACKAGE)
        assert statements(source) <= limit, f"{where} has {statements(source)} statements (at most {limit})"
        assert len(source.splitlines()) <= FILE_LINES, f"{where} has {len(source.splitlines())} lines"
        assert ast.get_docstring(ast.parse(path.read_text())), f"{where} has no docstring saying its job"


def test_python_dash_m_runs_the_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "nst_lightning", "--help"], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert "fit" in result.stdout and "batch" in result.stdout


def test_the_vocabulary_is_light():
    """names.py is read by the help and the early checks before torch loads: the standard library only."""
    heavy = "{'torch', 'lightning', 'jsonargparse', 'yaml', 'PIL'}"
    code = f"import sys, nst_lightning.names\nprint(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
