"""Imports point one way: apps -> api -> training -> evaluation -> checkpoint -> data, models -> config, runtime.

Every module of the package belongs to one part (its sub-package, or `api.py` / `checkpoint.py`);
a part may import itself and the parts `ALLOWED` lists, nothing else. The imports are read with
`ast`, top-level and lazy ones inside functions alike, so a test fails naming the file, the line
and the import that points the wrong way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "squarefuse"

# part -> the other parts it may import.
ALLOWED: dict[str, set[str]] = {
    "runtime": set(),
    "config": {"runtime"},
    "models": {"runtime"},
    "datasets": {"runtime", "config"},
    "report": {"runtime", "config"},  # reads run folders' files, never models or checkpoints
    "checkpoint": {"models", "runtime", "config", "datasets"},
    "evaluation": {"checkpoint", "datasets", "models", "runtime", "config"},
    "training": {"evaluation", "checkpoint", "datasets", "models", "runtime", "config"},
    "api": {"evaluation", "checkpoint", "datasets", "models", "runtime", "config"},
    "apps": {"api", "training", "evaluation", "checkpoint", "datasets", "models", "runtime", "config"},
    "squarefuse": {"api", "models"},  # squarefuse/__init__.py: the public names, imported lazily
}
# Single modules a part may import from a part it may not: the report reads eval folders, and which
# files make one complete, and which metrics there are, is said once, in modules free of torch.
ALLOWED_MODULES: dict[str, set[str]] = {"report": {"squarefuse.evaluation.eval_files", "squarefuse.evaluation.metrics"}}


def part_of(module: str) -> str:
    """`squarefuse.datasets.decoding.gpu` -> "datasets"; the package itself (and its names) -> "squarefuse"."""
    parts = module.split(".")
    assert parts[0] == "squarefuse", module
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "squarefuse"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imported_modules(source: str, module: str, *, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every import of the package in `source`, lazy ones included.

    `from squarefuse.x import y` counts as importing `squarefuse.x.y` (y may be a module), and
    relative imports are resolved against `module`.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name == "squarefuse" or name.startswith("squarefuse.")]


def violations(source: str, module: str, *, filename: str, is_package: bool = False) -> list[str]:
    """The imports of `source` (module `module`) that `ALLOWED` forbids, one message each."""
    part = part_of(module)
    allowed = ALLOWED[part] | {part}
    return [
        f"{filename}:{line}: {part} imports {name} ({part_of(name)}); {part} may import {', '.join(sorted(allowed))}"
        for line, name in imported_modules(source, module, is_package=is_package)
        if part_of(name) not in allowed and not _allowed_module(part, name)
    ]


def _allowed_module(part: str, name: str) -> bool:
    """`name` (a module, or a name imported from it) is one of `ALLOWED_MODULES[part]`."""
    return any(name == m or name.startswith(m + ".") for m in ALLOWED_MODULES.get(part, ()))


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_part():
    # A new top-level module must be given its place in ALLOWED, not fall under the package root.
    stray = [str(p.relative_to(ROOT)) for p in SOURCES if part_of(module_name(p)) == "squarefuse"]
    assert stray == ["squarefuse/__init__.py"]


def test_imports_point_one_way():
    found = []
    for path in SOURCES:
        name, filename = module_name(path), str(path.relative_to(ROOT))
        found += violations(path.read_text(), name, filename=filename, is_package=path.name == "__init__.py")
    assert not found, "imports against the layering (tests/test_architecture.py ALLOWED):\n" + "\n".join(found)


def test_allowed_parts_form_no_cycle():
    def reaches(start: str, target: str, seen: frozenset = frozenset()) -> bool:
        return any(p == target or (p not in seen and reaches(p, target, seen | {p})) for p in ALLOWED[start])

    assert [part for part in ALLOWED if reaches(part, part)] == []


@pytest.mark.parametrize(
    ("module", "source", "line", "target"),
    [
        ("squarefuse.models.x", "import torch\n\nfrom squarefuse.apps.evaluate import run_eval\n", 3, "apps.evaluate"),
        ("squarefuse.datasets.x", "def f():\n    import squarefuse.training.trainer\n", 2, "training.trainer"),
        ("squarefuse.api", "from squarefuse import apps\n", 1, "squarefuse.apps"),
        ("squarefuse.runtime.x", "from ..checkpoint import load_checkpoint\n", 1, "squarefuse.checkpoint"),
    ],
)
def test_the_check_catches_a_wrong_way_import(module, source, line, target):
    filename = module.replace(".", "/") + ".py"
    found = violations(source, module, filename=filename)
    assert len(found) == 1 and found[0].startswith(f"{filename}:{line}: ") and target in found[0], found


def test_the_check_allows_the_table():
    assert violations("from squarefuse.runtime import distributed\n", "squarefuse.models.x", filename="x") == []
    assert violations("from . import common\n", "squarefuse.models.fusion", filename="x", is_package=True) == []
    assert violations("from squarefuse.models import build_classifier\n", "squarefuse.apps.x", filename="x") == []
    assert (
        violations("from squarefuse.evaluation.eval_files import is_complete\n", "squarefuse.report.x", filename="x")
        == []
    )
    assert len(violations("from squarefuse.evaluation import results\n", "squarefuse.report.x", filename="x")) == 1


def test_the_report_reads_run_folders_without_torch():
    """`scripts/report.py` imports the metric registry (evaluation/metrics.py) but no torch: reading run
    folders on a laptop should not load a deep-learning stack (ALLOWED_MODULES)."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    code = "import sys, squarefuse.report.app; print([m for m in ('torch', 'timm') if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
