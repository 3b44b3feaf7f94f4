"""kill -9 at random points of `demo`, `train` and `score`, rerun, compare with an uninterrupted run.

Each test runs the real command line in a subprocess, kills it (SIGKILL, no
cleanup) at points drawn with a fixed seed: a random delay after the start,
or after a stage's progress line appears on stderr; reruns it until it
finishes, and checks the end state against an uninterrupted run in another
folder: the same rows (keys, statuses, patient and patch scores to 1e-9), no
duplicate keys, no temporary file left, every model row with its files, a
clean `check`, and no process of a killed run left behind. `ingest` is killed
inside the demo here, and on its own in test_pipeline.py.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pytest
import torch

from cmil_core import store
from cmil_core.ops.maintenance import check_store, temporary_leftovers

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SEED = 4
TIMEOUT = 600  # seconds any one command may take (a loaded CI machine), not a timing assert


class _Run:
    """``python -m cmil_core ARGV`` in its own session, stderr lines watched as they come."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cmil_core", *argv], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        self.lines: list[str] = []
        self.stdout = ""
        self._seen = threading.Condition()
        self._readers = [threading.Thread(target=self._read_err, daemon=True),
                         threading.Thread(target=self._read_out, daemon=True)]
        for t in self._readers:
            t.start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout.read()

    def wait_for(self, text: str | None) -> bool:
        """Until a stderr line contains ``text``; False when the command ended first."""
        deadline = time.monotonic() + TIMEOUT
        with self._seen:
            while text is not None and not any(text in line for line in self.lines):
                if self.proc.poll() is not None and not self._readers[0].is_alive():
                    return False
                if time.monotonic() > deadline:
                    return False
                self._seen.wait(0.05)
        return self.proc.poll() is None

    def kill_after(self, text: str | None, delay: float) -> bool:
        """SIGKILL the command ``delay`` seconds after ``text`` appears; whether it was killed."""
        if self.wait_for(text):
            end = time.monotonic() + delay
            while time.monotonic() < end and self.proc.poll() is None:
                time.sleep(0.01)
        killed = self.proc.poll() is None
        if killed:
            os.kill(self.proc.pid, signal.SIGKILL)  # the command itself, as `kill -9 PID`
        self.finish()
        if killed:
            _no_process_left(self.proc.pid)
        return killed

    def finish(self) -> int:
        self.proc.wait(timeout=TIMEOUT)
        for t in self._readers:
            t.join(timeout=30)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return int(self.proc.returncode)


def _no_process_left(session: int) -> None:
    """No live process of the killed command's session (e.g. slide-rendering workers) remains."""
    deadline = time.monotonic() + 30
    while True:
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if len(fields) > 3 and int(fields[3]) == session and fields[0] != "Z":
                alive.append(stat.parent.name)
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not alive, f"processes of a killed run left behind: {alive}"


def _kill_and_rerun(argv: Sequence[str], points: Sequence[tuple[str | None, float]],
                    rng: random.Random) -> tuple[int, str]:
    """Kill ``argv`` once per point (after the text, plus a random delay), then run it to the end.

    Returns how many runs were killed and the last run's standard output.
    """
    kills = 0
    for text, longest in points:
        delay = rng.uniform(0.0, longest)
        killed = _Run(argv).kill_after(text, delay)
        print(f"{argv[0]}: {'killed' if killed else 'missed'} {delay:.2f} s after {text!r}")
        kills += killed
    final = _Run(argv)
    code = final.finish()
    assert code == 0, "".join(final.lines[-20:])
    return kills, final.stdout


def _cli(*argv: str) -> str:
    done = subprocess.run([sys.executable, "-m", "cmil_core", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _assert_sound(db: Path) -> None:
    """No temporary file, every model row with its files, `check` clean (after safe repairs)."""
    assert temporary_leftovers(db) == []
    report = check_store(db, hash_files=False)
    kinds = {f.kind for f in report.problems}
    # a train killed between renaming its folder and recording it leaves a folder without a
    # row: the only problem a kill may leave, reported, and removed by --repair
    assert kinds <= {"model-folders-without-row"}, [f.message for f in report.problems]
    if kinds:
        assert check_store(db, hash_files=False, repair=True).ok
    with store.open_store(db, read_only=True) as st:
        for row in store.model_artifacts_frame(st).itertuples():
            folder = Path(row.artifact_path)
            assert (folder / "model.pt").is_file() and (folder / "config.json").is_file()


def _frames(db: Path, folder: Path | None = None) -> dict[str, pd.DataFrame]:
    """The store's rows keyed by what does not depend on the run.

    Slide paths are made relative to ``folder`` (default: the store's, where the demo is).
    """
    base = str((folder or db.parent).resolve()) + "/"
    with store.open_store(db, read_only=True) as st:
        cur = st.cursor()
        out = {
            "counts": pd.DataFrame([store.table_counts(st)]),
            "cohorts": cur.execute("SELECT cohort, role, center FROM cohorts ORDER BY cohort").df(),
            "patients": cur.execute("SELECT * FROM patients ORDER BY cohort, patient_id").df(),
            "slides": cur.execute(
                """SELECT cohort, patient_id, replace(path, ?, '') AS path, sha256, kind, width,
                          height, mpp, status, error, size_bytes, tiling_key
                   FROM slides ORDER BY cohort, path""", [base]).df(),
            "patches": cur.execute(
                """SELECT replace(s.path, ?, '') AS path, p.* EXCLUDE (patch_id, slide_id)
                   FROM patches p JOIN slides s USING (slide_id)
                   ORDER BY path, g_row, g_col""", [base]).df(),
            "regions": cur.execute(
                """SELECT replace(s.path, ?, '') AS path, r.* EXCLUDE (slide_id)
                   FROM demo_tumor_regions r JOIN slides s USING (slide_id)
                   ORDER BY path, y, x, width, height""", [base]).df(),
            "patient_scores": cur.execute(
                """SELECT cohort, patient_id, score, risk_group FROM patient_scores
                   ORDER BY cohort, patient_id""").df(),
            "patch_scores": cur.execute(
                """SELECT replace(s.path, ?, '') AS path, p.g_row, p.g_col, c.probability,
                          c.attention, c.attention_raw
                   FROM patch_scores c JOIN patches p USING (patch_id)
                        JOIN slides s USING (slide_id)
                   ORDER BY path, g_row, g_col""", [base]).df(),
            "models": cur.execute(
                """SELECT aggregator, encoder, train_cohorts, cutoff,
                          json_extract(metrics, '$.cv_auc')::DOUBLE AS cv_auc,
                          json_extract(metrics, '$.cv_fold_aucs')::VARCHAR AS fold_aucs
                   FROM models ORDER BY model_id""").df(),
        }
        # keys that the schema does not make unique
        (dup_patches,) = cur.execute(
            "SELECT count(*) - count(DISTINCT (slide_id, g_col, g_row)) FROM patches").fetchone()
        (dup_regions,) = cur.execute(
            """SELECT count(*) - count(DISTINCT (slide_id, x, y, width, height))
               FROM demo_tumor_regions""").fetchone()
    assert dup_patches == 0 and dup_regions == 0
    return out


def _assert_same(got: dict[str, pd.DataFrame], want: dict[str, pd.DataFrame]) -> None:
    for name, frame in want.items():
        exact = name not in ("patient_scores", "patch_scores", "models")
        pd.testing.assert_frame_equal(got[name], frame, check_exact=exact, rtol=0, atol=1e-9,
                                      obj=name)


_STAGE_LINE = re.compile(r"^\[\d+/\d+\] (?P<stage>.+?): \d+/\d+ .*\((?P<s>[\d.]+) s\)$")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    """An uninterrupted `demo` (slides, ingest, train, score), run as a user runs it.

    With how long each stage took on this machine now (from its progress
    lines), so that kill points land inside the stage they aim at, on a fast
    machine as on a loaded one.
    """
    db = tmp_path_factory.mktemp("reference") / "cmil.duckdb"
    run = _Run(["demo", "--db", str(db), "--size", "small", "--seed", str(SEED)])
    assert run.finish() == 0, "".join(run.lines[-20:])
    seconds: dict[str, float] = {}
    for line in run.lines:
        m = _STAGE_LINE.match(line.strip())
        if m:
            seconds[m["stage"]] = max(seconds.get(m["stage"], 0.0), float(m["s"]))
    return db, seconds


def _model_state(folder: Path) -> dict:  # type: ignore[type-arg]
    return torch.load(folder / "model.pt", weights_only=True)


def _same_state(a: object, b: object) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b, strict=True))
    if torch.is_tensor(a) and torch.is_tensor(b):
        return torch.equal(a, b)
    return a == b


def test_killed_demo_resumes_to_the_same_study(
        reference: tuple[Path, dict[str, float]], tmp_path: Path) -> None:
    reference, took = reference
    rng = random.Random(7001)
    db = tmp_path / "killed" / "cmil.duckdb"
    argv = ["demo", "--db", str(db), "--size", "small", "--seed", str(SEED)]
    points = [  # (after this stderr line, kill within this many seconds): what is cut short
        (None, 2.0 + 0.7 * took["slides"]),   # starting, importing tables, rendering slides
        ("[2/5] slides", 0.7 * took["patches"]),  # ingest: tiling, quality control
        ("[3/5] patches", 0.7 * (took["training (features)"]
                                 + took["training (cross-validation)"])),  # features, CV
        ("[4/5] training (training)", 0.7 * (took["scoring (scoring external_a)"]
                                             + took["scoring (scoring external_b)"])),  # scoring
    ]
    kills, out = _kill_and_rerun(argv, points, rng)
    assert kills >= 2, "the demo finished before it could be killed"
    assert "demo study (small, seed 4)" in out
    _assert_sound(db)
    _assert_same(_frames(db), _frames(reference))
    with store.open_store(db, read_only=True) as st:
        assert json.loads(store.get_meta(st, "demo") or "{}")["complete"] is True


def test_killed_train_resumes_to_the_same_model(
        reference: tuple[Path, dict[str, float]], tmp_path: Path) -> None:
    reference, took = reference
    rng = random.Random(7002)
    db = tmp_path / "killed" / "cmil.duckdb"
    db.parent.mkdir()
    shutil.copy2(reference, db)  # without features/: train computes them again
    with store.open_store(reference, read_only=True) as st:
        (ref_id,) = store.list_models(st)["model_id"]
        ref_model = store.get_model(st, ref_id)
    argv = ["train", "--db", str(db), "--cohort", "training", "--seed", str(SEED)]
    points = [
        (None, 2.0 + took["training (features)"]),  # starting, features of the training slides
        ("[1/3] features", 0.7 * took["training (cross-validation)"]),  # cross-validation
        ("[2/3] cross-validation", 0.7 * took["training (training)"]),  # final fit, model files
    ]
    kills, out = _kill_and_rerun(argv, points, rng)
    assert kills >= 2, "train finished before it could be killed"
    model_id = out.strip().splitlines()[-1]
    _assert_sound(db)
    with store.open_store(db, read_only=True) as st:
        new = store.get_model(st, model_id)
        ids = set(store.list_models(st)["model_id"])
    assert new is not None and ref_id in ids and model_id != ref_id
    assert new.cutoff == pytest.approx(ref_model.cutoff, abs=1e-12)
    assert new.metrics["cv_auc"] == pytest.approx(ref_model.metrics["cv_auc"], abs=1e-12)
    assert new.metrics["cv_fold_aucs"] == pytest.approx(ref_model.metrics["cv_fold_aucs"],
                                                        abs=1e-12)
    assert new.config["cv"]["folds"] == ref_model.config["cv"]["folds"]
    assert _same_state(_model_state(Path(new.artifact_path)),
                       _model_state(Path(ref_model.artifact_path)))
    # and it scores the training patients as the uninterrupted model did
    _cli("score", "--db", str(db), "--model", model_id, "--cohort", "training")
    with store.open_store(db, read_only=True) as st:
        got = store.patient_scores_frame(st, model_id, "training")
        want = store.patient_scores_frame(st, ref_id, "training")
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=0, atol=1e-9)


def test_killed_score_resumes_to_the_same_scores(
        reference: tuple[Path, dict[str, float]], tmp_path: Path) -> None:
    reference, took = reference
    rng = random.Random(7003)
    db = tmp_path / "killed" / "cmil.duckdb"
    db.parent.mkdir()
    shutil.copy2(reference, db)  # the model's files stay with the reference; features do not
    with store.open_store(db) as st:
        (model_id,) = store.list_models(st)["model_id"]
        st.cursor().execute("DELETE FROM patch_scores")
        st.cursor().execute("DELETE FROM patient_scores")
    argv = ["score", "--db", str(db), "--model", model_id]
    points = [
        (None, 2.0 + took["training (features)"]),  # starting, features of the training cohort
        ("[1/3] scoring training", 0.7 * took["scoring (scoring external_a)"]),  # external_a
        ("[2/3] scoring external_a", 0.7 * took["scoring (scoring external_b)"]),  # external_b
    ]
    kills, _ = _kill_and_rerun(argv, points, rng)
    assert kills >= 2, "score finished before it could be killed"
    _assert_sound(db)
    got, want = _frames(db, reference.parent), _frames(reference)
    for name in ("patient_scores", "patch_scores", "counts"):
        pd.testing.assert_frame_equal(got[name], want[name], check_exact=False, rtol=0,
                                      atol=1e-9, obj=name)
    assert len(list((db.parent / "features").glob("*/*.npz"))) == 46
