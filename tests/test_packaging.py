"""Packaging: pyproject.toml agrees with the pinned requirements, and ``pip install``
gives a working ``cmil`` command; the repository stands alone (licence, citation,
every test data file documented).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import cmil_core
from cmil_core.cli import main

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
DATA = ROOT / "tests" / "data"


def _pins(name: str) -> dict[str, Requirement]:
    """A requirements file's own lines (not its ``-r`` includes), by canonical name."""
    pins: dict[str, Requirement] = {}
    for line in (ROOT / name).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        pins[canonicalize_name(req.name)] = req
    return pins


def _ranges(requirements: list[str]) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, requirements)}


def test_dependencies_name_the_same_packages_as_requirements_txt() -> None:
    # requirements.txt is the pinned lock run.sh installs; pyproject's ranges must not drift.
    assert sorted(_ranges(PYPROJECT["project"]["dependencies"])) == sorted(_pins("requirements.txt"))


def test_dev_extra_names_the_same_packages_as_requirements_dev_txt() -> None:
    dev = _ranges(PYPROJECT["project"]["optional-dependencies"]["dev"])
    assert sorted(dev) == sorted(_pins("requirements-dev.txt"))


def test_cluster_extra_is_ray_default_and_matches_its_pin() -> None:
    (ray,) = map(Requirement, PYPROJECT["project"]["optional-dependencies"]["cluster"])
    assert (ray.name, ray.extras) == ("ray", {"default"})
    # requirements-cluster.txt: ray[default] pinned, and below it what it pulls in (a lock).
    pins = _pins("requirements-cluster.txt")
    assert pins["ray"].extras == {"default"}
    (pin,) = pins["ray"].specifier
    assert ray.specifier.contains(pin.version)


@pytest.mark.parametrize("extra", [None, "dev", "cluster"])
def test_every_pinned_version_is_inside_its_range(extra: str | None) -> None:
    if extra is None:
        ranges, pins = _ranges(PYPROJECT["project"]["dependencies"]), _pins("requirements.txt")
    else:
        ranges = _ranges(PYPROJECT["project"]["optional-dependencies"][extra])
        pins = _pins(f"requirements-{extra}.txt")
    outside = []
    for name, pin in pins.items():
        (spec,) = pin.specifier  # one == pin per line
        assert spec.operator == "==", f"{name}: requirements files pin with =="
        if name not in ranges:  # requirements-cluster.txt also locks ray's own dependencies
            assert extra == "cluster", f"{name} is pinned but not in pyproject.toml"
            continue
        if not ranges[name].specifier.contains(Version(spec.version)):
            outside.append(f"{name} {spec.version} not in {ranges[name].specifier}")
    assert outside == []


def test_the_version_is_written_once() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "cmil_core.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", cmil_core.__version__)


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == f"python -m cmil_core {cmil_core.__version__}\n"


def test_console_script_points_at_the_cli() -> None:
    assert PYPROJECT["project"]["scripts"] == {"cmil": "cmil_core.cli:console_main"}
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == [
        "cmil_core", "cmil_core.*"]


def test_tqdm_is_neither_pinned_nor_imported() -> None:
    # Progress bars are cmil_core.progress.TerminalProgress; tqdm was dropped from the pins.
    assert "tqdm" not in _pins("requirements.txt")
    used = [p for p in (ROOT / "cmil_core").rglob("*.py")
            if re.search(r"^\s*(import|from)\s+tqdm", p.read_text(encoding="utf-8"), re.M)]
    assert used == []


# --------------------------------------------------------------------------- stand-alone


def test_licence_and_citation_are_there() -> None:
    licence = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert licence.startswith("MIT License") and PYPROJECT["project"]["license"] == "MIT"
    assert "tests/data/SOURCES.md" in licence
    citation = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    assert "cff-version: 1.2.0" in citation
    assert f"version: {cmil_core.__version__}" in citation
    assert 'doi: "10.1186/s12967-026-08069-2"' in citation  # the study, as README cites it
    assert "NCT06703944" in citation


def _sources_text(folder: Path) -> str:
    """Every sources document from ``folder`` up to tests/data."""
    texts = []
    while True:
        texts += [p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.md"))]
        if folder == DATA:
            return "\n".join(texts)
        folder = folder.parent


def test_every_test_data_file_has_its_source_written_down() -> None:
    index = (DATA / "SOURCES.md").read_text(encoding="utf-8")
    undocumented = []
    for path in sorted(DATA.rglob("*")):
        if path.is_dir() or path.suffix == ".md" or "__pycache__" in path.parts:
            continue
        rel = path.relative_to(DATA)
        if len(rel.parts) == 1:  # a file at the top: a row of SOURCES.md names it
            if f"`{rel.name}`" not in index and f"`{rel.name}`," not in index:
                undocumented.append(str(rel))
        elif f"`{rel.parts[0]}/" not in index:  # a folder: SOURCES.md points at its sources
            undocumented.append(f"{rel.parts[0]}/ (folder not in SOURCES.md)")
        elif not re.search(r"source|licen[cs]e", _sources_text(path.parent), re.I):
            undocumented.append(str(rel))
    assert undocumented == []


def test_nothing_points_outside_the_repository() -> None:
    # What only existed beside the CI checkout; tests/test_fresh_clone.py checks a real clone.
    from scripts.check_fresh_clone import outside_references

    assert outside_references(ROOT) == []


# --------------------------------------------------------------------------- pip install


@pytest.mark.slow
def test_pip_install_gives_a_working_cmil_command(tmp_path: Path) -> None:
    """``pip install`` of a copy of the project (no network, no dependencies: they are
    this interpreter's) puts a ``cmil`` script that runs the installed package."""
    import setuptools

    assert int(setuptools.__version__.split(".")[0]) >= 77, "requirements-dev.txt pins setuptools"
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "cmil_core", source / "cmil_core",
                    ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "installed"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", "-q", "--target", str(target),
         str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    script = target / "bin" / "cmil"
    assert script.is_file()
    assert (target / "cmil_core" / "py.typed").is_file()  # PEP 561: annotations are used
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target), "HOME": str(tmp_path)}
    work = tmp_path / "elsewhere"  # not the checkout: the installed package must be used
    work.mkdir()

    def cmil(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(script), *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=300)

    version = cmil("--version")
    assert (version.returncode, version.stdout) == (0, f"cmil {cmil_core.__version__}\n")
    usage = cmil("--help")
    assert usage.returncode == 0 and usage.stdout.startswith("usage: cmil [-h] [--version] [-v | -q]")
    for command in ("demo", "import-cohort", "ingest", "train", "score", "roc", "survival"):
        assert command in usage.stdout
    # A real command, through the installed package (not the checkout's), on the repo's data.
    where = subprocess.run([sys.executable, "-c", "import cmil_core; print(cmil_core.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert Path(where.stdout.strip()).is_relative_to(target)
    # Installed, the default store is data/ in the current folder, not in site-packages.
    home = subprocess.run(
        [sys.executable, "-c", "from cmil_core.store import default_db_path as d; print(d())"],
        cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert Path(home.stdout.strip()) == work / "data" / "cmil.duckdb"
    roc = cmil("-q", "roc", "--csv", str(DATA / "asah.csv"), "--label", "outcome",
               "--positive", "Poor", "--score", "s100b")
    assert roc.returncode == 0 and "0.731 [0.630, 0.833]" in roc.stdout
    bad = cmil("roc", "--csv", str(work / "missing.csv"), "--label", "y", "--score", "s")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")
    # The metadata pip recorded: the same dependencies as requirements.txt, the licence.
    (info,) = target.glob("cmil_dashboard-*.dist-info")
    metadata = (info / "METADATA").read_text(encoding="utf-8")
    requires = {canonicalize_name(Requirement(line.split(": ", 1)[1]).name)
                for line in metadata.splitlines()
                if line.startswith("Requires-Dist: ") and "extra ==" not in line}
    assert requires == set(_pins("requirements.txt"))
    assert "License-Expression: MIT" in metadata
    assert "cmil = cmil_core.cli:console_main" in (info / "entry_points.txt").read_text()


def _third_party_imports(folders: list[str]) -> dict[str, str]:
    """Top-level modules imported in these folders' .py files that are neither the
    standard library nor this repository's own, mapped to one file that imports them."""
    import ast

    local = {p.stem for p in ROOT.iterdir() if p.suffix == ".py"} | {
        p.name for p in ROOT.iterdir() if p.is_dir()
    } | {p.stem for folder in folders for p in (ROOT / folder).glob("*.py")}
    found: dict[str, str] = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in local or top == "__future__":
                        continue
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_every_imported_package_is_pinned() -> None:
    # A test module importing a package that only this machine happens to have passes
    # here and fails collection in a fresh CI environment (it happened with geojson).
    from importlib.metadata import packages_distributions

    declared: set[str] = set()
    for name in ("requirements.txt", "requirements-dev.txt", "requirements-cluster.txt"):
        declared |= set(_pins(name))
    # Installed by a pinned package itself (playwright's greenlet, pytest's pluggy ...)
    # counts only when its distributor is pinned; these come with the pins above.
    implied = {"packaging"}  # setuptools, pytest and ray all require it
    dists = packages_distributions()
    missing = {}
    for module, where in _third_party_imports(["cmil_core", "pages", "scripts", "bench", "tests"]).items():
        names = {canonicalize_name(d) for d in dists.get(module, [module])}
        if not names & (declared | implied):
            missing[module] = where
    assert not missing, f"imported but not pinned in any requirements file: {missing}"
