"""The import layering: core <- storage <- annotators <- backend <- app, and jobs never reach the database.

Read from the source with ``ast`` (lazy imports inside functions count too), so an arrow against the
layers fails here before it becomes a habit. The README's "Where things live" section is checked
against the real folders the same way.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.helpers import REPO

LAYERS = ("core", "storage", "annotators", "backend", "app")
"""Lowest first: a package may import its own layer and the ones before it, never a later one."""
JOB_PACKAGE = "backend.jobs"
"""Job entry points run as subprocesses and never open the database: no path from them to `storage`."""


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules(root: Path) -> dict[str, Path]:
    return {module_name(root, p): p for pkg in LAYERS for p in sorted((root / pkg).rglob("*.py"))}


def imports_of(path: Path, name: str, known: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, module) for every project module that ``path`` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from backend import dpo` imports the module backend.dpo; `from core.errors import X` the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found += [(node.lineno, t) for t in targets if t.split(".")[0] in LAYERS]
    return found


def layer_violations(root: Path) -> list[str]:
    known = project_modules(root)
    bad = []
    for name, path in known.items():
        rank = LAYERS.index(name.split(".")[0])
        for line, target in imports_of(path, name, known):
            if LAYERS.index(target.split(".")[0]) > rank:
                bad.append(f"{path.relative_to(root)}:{line} imports {target} (a later layer)")
    return bad


def job_paths_to_storage(root: Path) -> list[str]:
    """For each job entry point, the first import chain that reaches `storage`, if any."""
    known = project_modules(root)
    graph = {name: [t for _, t in imports_of(path, name, known)] for name, path in known.items()}
    bad = []
    for start in sorted(n for n in known if n.startswith(JOB_PACKAGE + ".")):
        seen, stack = {start}, [[start]]
        while stack:
            chain = stack.pop()
            for nxt in graph.get(chain[-1], []):
                if nxt.split(".")[0] == "storage":
                    bad.append(" -> ".join([*chain, nxt]))
                    stack = []
                    break
                mod = nxt if nxt in known else nxt.rpartition(".")[0]
                if mod in known and mod not in seen:
                    seen.add(mod)
                    stack.append([*chain, mod])
    return bad


def test_no_import_points_against_the_layers():
    assert layer_violations(REPO) == []


def test_job_entry_points_never_reach_the_database_layer():
    assert any(n.startswith(JOB_PACKAGE + ".") for n in project_modules(REPO)), "no job entry points found"
    assert job_paths_to_storage(REPO) == []


@pytest.fixture
def toy_tree(tmp_path: Path) -> Path:
    files = {
        "core/__init__.py": "", "core/errors.py": "class E(Exception): ...\n",
        "storage/__init__.py": "", "storage/db.py": "from core.errors import E\n",
        "annotators/__init__.py": "", "annotators/judge.py": "from core import errors\n",
        "backend/__init__.py": "", "backend/helper.py": "from annotators import judge\n",
        "backend/jobs/__init__.py": "", "backend/jobs/train.py": "from backend import helper\n",
        "app/__init__.py": "", "app/cli.py": "import storage.db\nfrom backend.jobs import train\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_the_checks_pass_a_clean_tree_and_name_each_violation(toy_tree: Path):
    assert layer_violations(toy_tree) == [] and job_paths_to_storage(toy_tree) == []
    # an upward arrow, hidden in a function body
    (toy_tree / "storage/db.py").write_text("def f():\n    from app import cli\n")
    assert layer_violations(toy_tree) == ["storage/db.py:2 imports app.cli (a later layer)"]
    # a job that reaches storage through two hops, with a relative import on the way
    (toy_tree / "storage/db.py").write_text("")
    (toy_tree / "annotators/judge.py").write_text("from storage import db\n")
    assert job_paths_to_storage(toy_tree) == [
        "backend.jobs.train -> backend.helper -> annotators.judge -> storage.db"]
    (toy_tree / "annotators/judge.py").write_text("")
    (toy_tree / "backend/jobs/train.py").write_text("from ..helper import x\nimport storage\n")
    assert job_paths_to_storage(toy_tree) == ["backend.jobs.train -> storage"]


def _readme_section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    m = re.search(r"^## Where things live\n(.*?)(?=^## )", text, flags=re.DOTALL | re.MULTILINE)
    assert m, "README.md has no '## Where things live' section"
    return m.group(1)


def test_readme_where_things_live_matches_the_folders():
    section = _readme_section()
    listed = set(re.findall(r"^\| `([a-z_/]+/)` \|", section, flags=re.MULTILINE))
    real = {f"{p.relative_to(REPO).as_posix()}/" for pkg in (*LAYERS, "tests", "bench")
            for p in [REPO / pkg, *(REPO / pkg).rglob("*")]
            if p.is_dir() and not ({"__pycache__", "out"} & set(p.parts)) and not p.name.startswith(".")}
    assert listed == real, f"README lists {sorted(listed - real)} that do not exist; misses {sorted(real - listed)}"
