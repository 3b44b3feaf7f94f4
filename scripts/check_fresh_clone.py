"""Does a fresh ``git clone`` of this repository stand alone?

Run: ``.venv/bin/python -m scripts.check_fresh_clone [--working-tree] [--no-tests] [--keep DIR]``

Clones the repository (its committed ``HEAD``; with ``--working-tree``, plus
the uncommitted changes and the new files git does not ignore: what the
clone will be once they are committed) into an empty temporary folder, far
from the checkout, and checks there:

1. no file (text, tracked) mentions the folder that only existed beside the
   CI checkout (``shared/`` one level up, or under ``/work``: ``OUTSIDE``);
2. every file under the checkout's ``tests/data`` that git does not ignore is
   in the clone, byte for byte (a fixture used by the tests but never
   committed would be missing there), and the folders ``tests/conftest.py``
   reads (``tests/data``, ``fixtures``, ``reference``) exist;
3. unless ``--no-tests``, the clone imports its own ``cmil_core`` and a few
   test files that read ``tests/data`` pass in it (``test_packaging``'s fast
   tests, ``test_slides``, ``test_quality_real`` and the pROC reference test
   of ``test_cli``; not the whole suite).

Prints one line per check and exits 1 when one fails. ``tests/test_fresh_clone.py``
runs it (slow) with ``--working-tree``.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Written in two halves, so that this file does not report itself.
OUTSIDE = ("../" + "shared", "/work/" + "shared")
CLONE_TESTS = [
    "tests/test_packaging.py",
    "tests/test_slides.py",
    "tests/test_quality_real.py",
    "tests/test_cli.py::test_roc_reproduces_proc",
]


def _git(repo: Path, *args: str, input_bytes: bytes | None = None) -> bytes:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          input=input_bytes, timeout=600).stdout


def repository_files(root: Path) -> list[Path]:
    """The files git tracks or would track (not ignored), relative to ``root``."""
    out = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    return sorted({Path(p) for p in out.decode().split("\0") if p and (root / p).is_file()})


def outside_references(root: Path) -> list[str]:
    """``path:line: text`` of every line of a repository text file naming the outside folder."""
    found = []
    for rel in repository_files(root):
        data = (root / rel).read_bytes()
        if b"\0" in data[:8192]:  # binary: slides, photographs
            continue
        text = data.decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            if any(pattern in line for pattern in OUTSIDE):
                found.append(f"{rel}:{number}: {line.strip()[:120]}")
    return found


def clone(dest: Path, *, working_tree: bool) -> Path:
    """A clone of this repository in ``dest/cmil``, with the working tree's changes if asked."""
    target = dest / "cmil"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(target)],
                   check=True, capture_output=True, timeout=600)
    if working_tree:
        patch = _git(ROOT, "diff", "HEAD", "--binary")
        if patch:
            _git(target, "apply", "--whitespace=nowarn", input_bytes=patch)
        untracked = _git(ROOT, "ls-files", "-z", "--others", "--exclude-standard").decode()
        for rel in filter(None, untracked.split("\0")):
            source = ROOT / rel
            if source.is_file():
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                (target / rel).write_bytes(source.read_bytes())
    return target


def missing_test_data(target: Path) -> list[str]:
    """Files of the checkout's tests/data (not ignored) absent from, or different in, the clone."""
    problems = []
    for rel in repository_files(ROOT):
        if rel.parts[:2] != ("tests", "data"):
            continue
        there = target / rel
        if not there.is_file():
            problems.append(f"{rel}: missing (not committed?)")
        elif not filecmp.cmp(ROOT / rel, there, shallow=False):
            problems.append(f"{rel}: differs from the checkout's (not committed?)")
    for folder in ("tests/data", "tests/data/fixtures", "tests/data/reference"):
        if not (target / folder).is_dir():
            problems.append(f"{folder}/: missing")
    return problems


def run_clone_tests(target: Path) -> tuple[bool, str]:
    """The clone's own cmil_core, and a few data-reading test files, run in the clone."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CMIL_DB",
                                                             "CMIL_DATA_DIR")}
    where = subprocess.run([sys.executable, "-c", "import cmil_core; print(cmil_core.__file__)"],
                           cwd=target, env=env, capture_output=True, text=True, timeout=300)
    imported = Path(where.stdout.strip() or "/").resolve()
    if not imported.is_relative_to(target.resolve()):
        return False, f"the clone imports cmil_core from {imported}, not its own"
    tests = [t for t in CLONE_TESTS if (target / t.split("::")[0]).is_file()]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m",
         "not slow and not browser", *tests],
        cwd=target, env=env, capture_output=True, text=True, timeout=1200,
    )
    last = (run.stdout.strip().splitlines() or ["(no output)"])[-1]
    return run.returncode == 0, f"{' '.join(tests)}: {last}" + (
        "" if run.returncode == 0 else "\n" + run.stdout[-4000:] + run.stderr[-2000:])


def check(dest: Path, *, working_tree: bool, tests: bool) -> list[tuple[bool, str]]:
    """Clone into ``dest`` and run the checks; one (passed, line) per check."""
    target = clone(dest, working_tree=working_tree)
    results = []
    outside = outside_references(target)
    results.append((not outside, f"no file names {' or '.join(OUTSIDE)}"
                    + ("" if not outside else ":\n  " + "\n  ".join(outside))))
    count = sum(1 for p in (target / "tests" / "data").rglob("*") if p.is_file())
    missing = missing_test_data(target)
    results.append((not missing, f"tests/data complete in the clone ({count} files)"
                    + ("" if not missing else ":\n  " + "\n  ".join(missing))))
    if tests:
        results.append(run_clone_tests(target))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--working-tree", action="store_true",
                        help="clone HEAD, then add the uncommitted changes and new files")
    parser.add_argument("--no-tests", action="store_true", help="skip running tests in the clone")
    parser.add_argument("--keep", metavar="DIR", type=Path,
                        help="clone into this new folder and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.keep is not None:
        args.keep.mkdir(parents=True)
        results = check(args.keep, working_tree=args.working_tree, tests=not args.no_tests)
    else:
        with tempfile.TemporaryDirectory(prefix="cmil-clone-") as tmp:
            results = check(Path(tmp), working_tree=args.working_tree, tests=not args.no_tests)
    for passed, line in results:
        print(f"{'ok  ' if passed else 'FAIL'} {line}")
    return 0 if all(passed for passed, _ in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
