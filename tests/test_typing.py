"""The package as type checkers and ``--doctest-modules`` see it: ``py.typed`` ships with
it, and importing every module of ``cmil_core`` (what collecting its docstring examples
does) starts neither Ray nor Streamlit and warns about nothing.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_py_typed_is_there_and_installed_with_the_package() -> None:
    assert (ROOT / "cmil_core" / "py.typed").is_file()
    assert PYPROJECT["tool"]["setuptools"]["package-data"]["cmil_core"] == ["py.typed"]


def test_mypy_is_strict_on_cmil_core() -> None:
    mypy = PYPROJECT["tool"]["mypy"]
    assert mypy["files"] == ["cmil_core"] and mypy["strict"] is True


def test_docstring_examples_of_cmil_core_are_collected() -> None:
    options = PYPROJECT["tool"]["pytest"]["ini_options"]
    assert "cmil_core" in options["testpaths"]
    assert "--doctest-modules" in options["addopts"].split()


_IMPORT_ALL = """
import importlib, pkgutil, sys, warnings
warnings.simplefilter("error")
import cmil_core
names = sorted(m.name for m in pkgutil.walk_packages(cmil_core.__path__, "cmil_core.")
               if not m.name.endswith("__main__"))
for name in names:
    importlib.import_module(name)
heavy = sorted(m for m in ("ray", "streamlit") if m in sys.modules)
print(len(names), heavy)
"""


def test_importing_every_module_starts_neither_ray_nor_streamlit() -> None:
    done = subprocess.run([sys.executable, "-c", _IMPORT_ALL], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    count, heavy = done.stdout.split(" ", 1)
    assert int(count) >= 50  # every module, not an empty walk
    assert heavy.strip() == "[]"
