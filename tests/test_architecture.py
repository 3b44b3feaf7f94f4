"""The house rules of ``cmil_core``, checked on the source (issue 17).

The package's folders are layers that a reader follows from the store to the
command line; each folder imports only the folders below it (its ``__init__``
says so). The other rules: no Streamlit in the core, SQL only in the store, no
module reaching into another module's private names, no module too long to read.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "cmil_core"

#: Bottom to top. "" is the package's own top-level modules (errors, progress,
#: logs, _atomic): every folder may use them. ``cli`` (and ``__main__``) sit on top,
#: ``commands`` (each command's parser and call) just below it.
LAYERS = ["", "store", "analysis", "clinical", "ingest", "model", "ops", "outputs", "viewer",
          "demo", "commands", "cli"]

#: Imports that run upwards, each inside a function (never at import time) and why.
UPWARD_EXCEPTIONS = {
    ("cmil_core.store.qc", "cmil_core.ingest.quality"):
        "the QC rules are data (name, metric, comparison) the store turns into SQL",
    ("cmil_core.ingest.pipeline", "cmil_core.model.distributed"):
        "ingest --executor ray: the Ray executor is loaded only when asked for",
    ("cmil_core.ingest.pipeline", "cmil_core.ops.access"):
        "the audit row of an ingest names the user",
}

#: Lines a module may have; the synthetic smear renderer is one long drawing routine.
MAX_LINES = 850
LONG_ALLOWED = {"demo/_smear.py"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(CORE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return ""
    if parts[1] in ("cli", "__main__"):
        return "cli"
    is_folder = (CORE / parts[1]).is_dir()
    return parts[1] if is_folder else ""


def _imports(path: Path) -> list[tuple[str, list[str], bool, int]]:
    """(module imported, names taken from it, inside a function?, line) for each import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [a.name for a in node.names]
            is_folder = node.module in MODULES and (
                CORE / node.module.split(".", 1)[-1].replace(".", "/")).is_dir()
            if node.module == "cmil_core" or is_folder:
                # `from cmil_core.model import encoders`: each name is a module
                for name in names:
                    out.append((f"{node.module}.{name}", [], node.col_offset > 0, node.lineno))
            else:
                out.append((node.module, names, node.col_offset > 0, node.lineno))
        elif isinstance(node, ast.Import):
            out.extend((a.name, [], node.col_offset > 0, node.lineno) for a in node.names)
    return out


def test_every_module_is_found() -> None:
    assert "cmil_core.store.connection" in MODULES and "cmil_core.model.mil" in MODULES
    assert len(MODULES) > 60


@pytest.mark.parametrize("module", sorted(MODULES))
def test_folders_import_only_the_folders_below_them(module: str) -> None:
    here = LAYERS.index(_layer(module))
    wrong = []
    for target, _names, lazy, line in _imports(MODULES[module]):
        if not target.startswith("cmil_core.") or target.split(".")[1] == "__version__":
            continue
        there = LAYERS.index(_layer(target))
        if there <= here:
            continue
        key = (module, target)
        if key in UPWARD_EXCEPTIONS and lazy:
            continue
        wrong.append(f"line {line}: {target} ({_layer(target)} is above {_layer(module) or 'the top level'})")
    assert not wrong, f"{module} imports upwards: " + "; ".join(wrong)


def test_the_upward_exceptions_still_exist() -> None:
    """An exception that the code no longer needs is deleted from the list."""
    for module, target in UPWARD_EXCEPTIONS:
        assert any(t == target for t, _n, _lazy, _l in _imports(MODULES[module])), (module, target)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_takes_another_modules_private_names(module: str) -> None:
    wrong = []
    for target, names, _lazy, line in _imports(MODULES[module]):
        if not target.startswith("cmil_core"):
            continue
        if target != module:
            wrong += [f"line {line}: {target}.{n}" for n in names
                      if n.startswith("_") and not n.startswith("__")]
        # a private module belongs to its own folder (the top level's to the whole package)
        parts = target.split(".")
        if parts[-1].startswith("_") and not parts[-1].startswith("__"):
            owner = ".".join(parts[:-1])
            if not (module == owner or module.startswith(owner + ".")):
                wrong.append(f"line {line}: private module {target}")
    assert not wrong, f"{module} reaches into private names: " + "; ".join(wrong)


def test_the_core_never_imports_streamlit() -> None:
    wrong = [f"{m} line {line}" for m, p in MODULES.items() for t, _n, _lazy, line in _imports(p)
             if t.split(".")[0] == "streamlit"]
    assert not wrong


def test_sql_only_in_the_store() -> None:
    sources = [p for p in CORE.rglob("*.py") if "store" not in p.relative_to(CORE).parts[:1]]
    sources += [*(ROOT / "pages").glob("*.py"), ROOT / "app.py"]
    wrong = [str(p.relative_to(ROOT)) for p in sources
             if any(k in p.read_text(encoding="utf-8")
                    for k in (".execute(", "duckdb.connect", ".sql("))]
    assert not wrong


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_too_long_to_read(module: str) -> None:
    path = MODULES[module]
    if str(path.relative_to(CORE)) in LONG_ALLOWED:
        return
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_LINES})"


@pytest.mark.parametrize("folder", [f for f in LAYERS if f not in ("", "cli")])
def test_each_folder_says_what_it_holds_and_may_import(folder: str) -> None:
    doc = ast.get_docstring(ast.parse((CORE / folder / "__init__.py").read_text(encoding="utf-8")))
    assert doc and "may import" in doc, f"cmil_core/{folder}/__init__.py needs its paragraph"
