"""Every third-party import of the package, its apps and scripts is a declared dependency.

A user installs with `pip install -e .` into a fresh environment; a module that imports a package
no dependency declares works on a developer's machine that happens to have it and fails for them
(scipy did). These tests read the imports with `ast` and the declared requirements from
pyproject.toml, so they fail whatever the test machine has installed.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

# pyproject.toml is read with the standard library's reader, new in Python 3.11.
tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "train.py", ROOT / "eval.py", *sorted((ROOT / "squarefuse").rglob("*.py"))]
SCRIPTS = sorted((ROOT / "scripts").rglob("*.py"))
# Imports that are optional by design: each module imports them lazily and names the extra when missing.
OPTIONAL = {"onnx": "export", "onnxruntime": "export", "torchcodec": "torchcodec"}


def top_level_imports(path: Path) -> set[str]:
    """Top-level names of the absolute imports in a file (lazy ones inside functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def declared() -> tuple[set[str], dict[str, set[str]]]:
    """(core requirements, {extra: requirements}) from this tree's pyproject.toml.

    Read from the file, not from the installed metadata: an editable install keeps the metadata of
    when it was installed, so a new extra would be invisible until the package is reinstalled.
    """
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {requirement_name(r) for r in project.get("dependencies", [])}
    extras = {
        extra: {requirement_name(r) for r in requirements}
        for extra, requirements in project.get("optional-dependencies", {}).items()
    }
    return core, extras


def local_names() -> set[str]:
    """Modules of this repository (the package, scripts that import each other, the entry points)."""
    return {"squarefuse", "train", "eval", "helpers"} | {p.stem for p in SCRIPTS}


@functools.cache
def installed_distributions() -> dict[str, list[str]]:
    """{top-level module: [distributions]}; reading every installed package's metadata takes seconds."""
    return importlib.metadata.packages_distributions()


def distribution_of(module: str) -> str | None:
    """The installed distribution that provides a top-level module, or None for the standard library."""
    if module in sys.stdlib_module_names or module == "__future__":
        return None
    dists = installed_distributions().get(module)
    if not dists:
        # Not installed here: the name itself is the best guess, and it will not be declared.
        return module.lower()
    return dists[0].lower().replace("_", "-")


def undeclared(paths: list[Path], core: set[str] | None = None) -> dict[str, list[str]]:
    """{module (distribution): [files]} for imports that no requirement declares."""
    declared_core, extras = declared()
    core = declared_core if core is None else core
    missing: dict[str, list[str]] = {}
    for path in paths:
        for module in sorted(top_level_imports(path) - local_names()):
            dist = distribution_of(module)
            if dist is None or dist in core:
                continue
            if module in OPTIONAL and dist in extras.get(OPTIONAL[module], set()):
                continue
            missing.setdefault(f"{module} ({dist})", []).append(str(path))
    return missing


def test_package_and_apps_import_only_declared_dependencies():
    assert undeclared(SOURCES) == {}, "imported but not in pyproject.toml's dependencies"


def test_scripts_import_only_declared_dependencies():
    assert undeclared(SCRIPTS) == {}, "imported by scripts/ but not in pyproject.toml's dependencies"


def test_the_check_sees_an_undeclared_import(tmp_path):
    # The check must be able to fail: scipy, imported lazily, was the dependency that slipped through.
    module = tmp_path / "uses_scipy.py"
    module.write_text("import json\n\ndef f():\n    from scipy.stats import binomtest\n")
    core, _ = declared()
    assert undeclared([module], core=core - {"scipy"}) == {"scipy (scipy)": [str(module)]}
    assert undeclared([module], core=core) == {}


@pytest.mark.slow
def test_every_module_and_script_imports_in_a_fresh_interpreter():
    # Most tests run the scripts in the test process (helpers/scripts.py), which has imported much
    # already; here one fresh interpreter loads the package's modules, then every script with
    # sys.path[0] set as `python SCRIPT` sets it (top-level code only: not `__main__`).
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "squarefuse").rglob("*.py")
    )
    scripts = sorted(str(p) for p in [*ROOT.glob("*.py"), *(ROOT / "scripts").glob("*.py")])
    assert {"train.py", "eval.py", "predict.py"} <= {Path(s).name for s in scripts}
    code = (
        "import importlib, os, runpy, sys\n"
        "for m in sys.argv[1:]:\n"
        "    if m.endswith('.py'):\n"
        "        sys.path[0] = os.path.dirname(m)  # as `python SCRIPT` sets it\n"
        "        runpy.run_path(m, run_name='loaded')\n"
        "    else:\n"
        "        importlib.import_module(m)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, *modules, *scripts], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
