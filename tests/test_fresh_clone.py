"""A fresh ``git clone`` in an empty folder stands alone (scripts/check_fresh_clone.py).

The clone (HEAD plus this checkout's uncommitted changes and new files, i.e.
what it will be once they are committed) lies in a temporary folder with
nothing beside it. There: no file names the folder that only existed beside
the CI checkout, tests/data holds every data file of the checkout byte for
byte, the clone imports its own cmil_core, and the test files that read
tests/data (test_packaging, test_slides, test_quality_real, the pROC test of
test_cli; not the whole suite) pass.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from scripts.check_fresh_clone import check


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_a_fresh_clone_stands_alone(tmp_path: Path) -> None:
    results = check(tmp_path, working_tree=True, tests=True)
    failed = [line for passed, line in results if not passed]
    assert failed == []
    assert len(results) == 3
