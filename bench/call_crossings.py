"""How often one evaluation walk and one training run cross from one cmil_core module to another.

Issue 17, item 8: count, for ``clinical_cox`` (the Cox model of the cMIL risk
group adjusted for clinical factors) and ``train`` (one model on the demo's
training cohort), how many Python calls go from a function of one
``cmil_core`` module into a function of another ``cmil_core`` module, and how
many returns come back across a module boundary. The counts are taken with
:func:`sys.setprofile` (and :func:`threading.setprofile` for threads the run
starts): an event is a crossing when the caller's module (``__name__`` of its
globals) and the callee's differ and both start with ``cmil_core``. Calls
into the standard library, numpy, pandas, torch or C functions are not
counted; each resumption of a generator counts as a call, as Python reports it.

Usage (the demo store is built once by the first run and reused)::

    PYTHONPATH=. .venv/bin/python bench/call_crossings.py --db /tmp/cc-demo/cmil.duckdb
    PYTHONPATH=. .venv/bin/python bench/call_crossings.py --db /tmp/cc-demo/cmil.duckdb --json

It runs on both layouts of the package: the folders of issue 17
(``cmil_core.outputs.evaluation``, ``cmil_core.model.modeling``, the model's
scores read once by ``cmil_core.store.model_rules.read_model_scores``) and the
flat one before it (``cmil_core.evaluation``, ``cmil_core.modeling``). The
training run works on a copy of the store's folder (the demo's store is left
as it was) with the frozen encoder (the demo's aggregator and seed).
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

PACKAGE = "cmil_core"


def _exists(name: str) -> bool:
    """Whether the imported package's own folder holds module ``name``.

    Asked of the folder, not of the import system: an editable install of
    another checkout would otherwise answer for a module this one lacks.
    """
    root = Path(importlib.import_module(PACKAGE).__file__ or "").parent
    path = root.joinpath(*name.split(".")[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _module(*names: str) -> ModuleType:
    """The first of ``names`` this checkout holds (new layout first, then the flat one)."""
    for name in names:
        if _exists(name):
            return importlib.import_module(name)
    raise SystemExit(f"none of {', '.join(names)} is in {PACKAGE}: run from the repository "
                     "root with PYTHONPATH=.")


Crossings = Counter[tuple[str, str]]


def count_crossings(func: Callable[[], Any]) -> tuple[Crossings, Crossings, Crossings]:
    """``(calls, returns, callees)`` while ``func`` runs: crossings per (from module, to
    module), and calls per (pair as ``"from -> to"``, the called function's name)."""
    calls: Crossings = Counter()
    returns: Crossings = Counter()
    callees: Crossings = Counter()

    def name_of(frame: FrameType | None) -> str | None:
        if frame is None:
            return None
        name = frame.f_globals.get("__name__")
        return name if isinstance(name, str) and name.split(".")[0] == PACKAGE else None

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event not in ("call", "return"):
            return
        here, there = name_of(frame), name_of(frame.f_back)
        if here is None or there is None or here == there:
            return
        if event == "call":
            calls[(there, here)] += 1
            callees[(f"{there} -> {here}", frame.f_code.co_qualname)] += 1
        else:
            returns[(here, there)] += 1

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        func()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return calls, returns, callees


def _demo_store(db: Path) -> None:
    if db.exists():
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", PACKAGE, "demo", "--size", "small", "--db", str(db),
                    "-q"], check=True)


def _training(store_mod: ModuleType, store: Any) -> tuple[str, str]:
    """(the demo model's id, its training cohort)."""
    models = store_mod.list_models(store)
    if models.empty:
        raise SystemExit("the store holds no model: build it with `python -m cmil_core demo`")
    row = models.iloc[-1]  # the oldest: the demo's own model
    return str(row["model_id"]), str(row["train_cohorts"]).split(",")[0].strip()


def measure_clinical_cox(db: Path) -> tuple[Crossings, Crossings, Crossings]:
    """Crossings of one clinical Cox model (overall survival, the model's cutoff)."""
    store_mod = importlib.import_module(f"{PACKAGE}.store")
    evaluation = _module(f"{PACKAGE}.outputs.evaluation", f"{PACKAGE}.evaluation")
    store = store_mod.open_store(db, read_only=True) if _takes_read_only(store_mod) else \
        store_mod.open_store(db)
    model_id, _ = _training(store_mod, store)
    rules = (importlib.import_module(f"{PACKAGE}.store.model_rules")
             if _exists(f"{PACKAGE}.store.model_rules") else None)
    if rules is not None and hasattr(rules, "read_model_scores"):
        def run() -> Any:  # the walk from the store: read once, then pure functions
            scores = rules.read_model_scores(store, model_id)
            return evaluation.clinical_cox(scores, store_mod.patients_frame(store), "os", "model")
    else:
        def run() -> Any:
            return evaluation.clinical_cox(store, model_id, "os", "model")
    return count_crossings(run)


def _takes_read_only(store_mod: ModuleType) -> bool:
    import inspect

    return "read_only" in inspect.signature(store_mod.open_store).parameters


def measure_train(db: Path) -> tuple[Crossings, Crossings, Crossings]:
    """Crossings of one training run (frozen encoder) on a copy of the store's folder."""
    store_mod = importlib.import_module(f"{PACKAGE}.store")
    modeling = _module(f"{PACKAGE}.model.modeling", f"{PACKAGE}.modeling")
    with tempfile.TemporaryDirectory(prefix="crossings-") as tmp:
        copy = Path(tmp) / db.parent.name
        shutil.copytree(db.parent, copy, ignore=shutil.ignore_patterns("*.lock"))
        store = store_mod.open_store(copy / db.name)
        _, cohort = _training(store_mod, store)
        result = count_crossings(lambda: modeling.train(
            store, cohort, aggregator="attention", seed=0, encoder_training="frozen"))
        store.close()
    return result


def _table(title: str, calls: Crossings, returns: Crossings, callees: Crossings,
           top: int) -> str:
    lines = [f"{title}: {sum(calls.values())} calls and {sum(returns.values())} returns cross "
             f"between {PACKAGE} modules ({len(calls)} module pairs)",
             f"  {'calls':>7} {'returns':>7}  from -> to (the function called most)"]
    for (a, b), n in calls.most_common(top):
        short = [m.removeprefix(f"{PACKAGE}.") for m in (a, b)]
        pair = f"{a} -> {b}"
        name, most = max(((f, k) for (p, f), k in callees.items() if p == pair),
                         key=lambda item: item[1])
        lines.append(f"  {n:>7} {returns[(b, a)]:>7}  {short[0]} -> {short[1]} ({name} {most})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=Path(tempfile.gettempdir()) / "cc-demo"
                        / "cmil.duckdb", help="the small demo store (built when missing)")
    parser.add_argument("--top", type=int, default=12, help="module pairs shown per walk")
    parser.add_argument("--only", choices=("clinical_cox", "train"), help="measure one walk")
    parser.add_argument("--json", action="store_true", help="one JSON line with the totals")
    args = parser.parse_args(argv)
    db = args.db.resolve()
    _demo_store(db)
    walks = {"clinical_cox": measure_clinical_cox, "train": measure_train}
    out: dict[str, dict[str, int]] = {}
    for name, measure in walks.items():
        if args.only and name != args.only:
            continue
        calls, returns, callees = measure(db)
        out[name] = {"calls": sum(calls.values()), "returns": sum(returns.values()),
                     "pairs": len(calls)}
        if not args.json:
            print(_table(name, calls, returns, callees, args.top))
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
