"""The command line as a user runs it: reference values through `python -m cmil_core`.

Statistics commands must print the same numbers as the functions, which are
checked against R in test_stats.py and test_survival.py; here the values are
checked once more, end to end, from a CSV file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lifelines.datasets import load_g3, load_rossi

from cmil_core.cli import main

ROOT = Path(__file__).resolve().parents[1]
ASAH = ROOT / "tests" / "data" / "reference" / "asah.csv"


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_roc_reproduces_proc(capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(capsys, ["roc", "--csv", str(ASAH), "--label", "outcome", "--positive", "Poor",
                         "--score", "s100b", "--score", "wfns", "--json"])
    s100b, wfns = out["results"]
    # pROC: roc(aSAH$outcome, aSAH$s100b); ci.auc(...) DeLong
    assert s100b["auc"] == pytest.approx(0.73136856368563685, abs=1e-12)
    assert s100b["ci_low"] == pytest.approx(0.6301182117616227, abs=1e-6)
    assert s100b["ci_high"] == pytest.approx(0.8326189156096512, abs=1e-6)
    assert (s100b["n"], s100b["n_positive"], s100b["ci_method"]) == (113, 41, "delong")
    # pROC: coords(r.s100b, "best") -> threshold 0.205, specificity 58/72, sensitivity 26/41
    youden = s100b["youden"]
    assert youden["threshold"] == pytest.approx(0.205)
    assert youden["sensitivity"] == pytest.approx(26 / 41)
    assert youden["specificity"] == pytest.approx(58 / 72)
    assert youden["ppv"] == pytest.approx(0.65)
    assert youden["npv"] == pytest.approx(0.7945205479452054)
    # Wilson 95% CIs at that threshold (REFERENCE.md)
    assert youden["sensitivity_ci"] == pytest.approx([0.48121, 0.76410], abs=5e-6)
    assert youden["specificity_ci"] == pytest.approx([0.69967, 0.88049], abs=5e-6)
    # pROC: roc(aSAH$outcome, aSAH$wfns) AUC 0.8236788617886179
    assert wfns["auc"] == pytest.approx(0.8236788617886179, abs=1e-12)
    # pROC: roc.test(r.s100b, r.wfns) paired DeLong; REFERENCE gives roc.test(r.wfns, r.s100b)
    # Z = 2.20898359144091, p = 0.0271757822291882: same test, opposite sign of z.
    (comparison,) = out["comparisons"]
    assert (comparison["score_a"], comparison["score_b"]) == ("s100b", "wfns")
    assert comparison["z"] == pytest.approx(-2.20898359144091, abs=1e-6)
    assert comparison["p"] == pytest.approx(0.0271757822291882, abs=1e-6)


def test_roc_paired_difference_ci(capsys: pytest.CaptureFixture[str]) -> None:
    # pROC: roc.test(r.ndka, r.s100b) -> Z = -1.39077002573558, p = 0.164295175223054,
    # CI of the AUC difference -0.2876917446341914 to 0.0488706064228094
    out = _json(capsys, ["roc", "--csv", str(ASAH), "--label", "outcome", "--positive", "Poor",
                         "--score", "ndka", "--score", "s100b", "--json"])
    (c,) = out["comparisons"]
    assert c["z"] == pytest.approx(-1.39077002573558, abs=1e-6)
    assert c["p"] == pytest.approx(0.164295175223054, abs=1e-6)
    assert c["diff_ci"] == pytest.approx([-0.2876917446341914, 0.0488706064228094], abs=1e-6)
    assert out["results"][0]["ci_low"] == pytest.approx(0.501244999271703, abs=1e-6)


def test_roc_text_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["roc", "--csv", str(ASAH), "--label", "outcome", "--positive", "Poor",
                 "--score", "s100b"]) == 0
    text = capsys.readouterr().out
    assert "0.731 [0.630, 0.833]" in text and "0.205" in text


def test_survival_reproduces_survdiff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "g3.csv"
    load_g3().to_csv(csv, index=False)
    out = _json(capsys, ["survival", "--csv", str(csv), "--time", "time", "--event", "event",
                         "--group", "group", "--json"])
    # R: survdiff(Surv(time, event) ~ group, data = g3): chi2 = 6.0629, p = 0.0138
    assert out["logrank"]["statistic"] == pytest.approx(6.0629, abs=5e-5)
    assert out["logrank"]["p"] == pytest.approx(0.0138, abs=5e-5)
    assert out["logrank"]["df"] == 1
    assert out["cutoff"] is None
    assert {g["group"] for g in out["groups"]} == {"RIT", "Control"}
    assert out["cox"]["hr"] is not None and len(out["cox"]["ci"]) == 2


def test_survival_curves_at_times_reproduce_survfit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = tmp_path / "g3.csv"
    load_g3().to_csv(csv, index=False)
    out = _json(capsys, ["survival", "--csv", str(csv), "--time", "time", "--event", "event",
                         "--group", "group", "--times", "9,19,32,34", "--json"])
    groups = {g["group"]: g for g in out["at_risk"]["groups"]}
    assert out["at_risk"]["times"] == [9, 19, 32, 34]
    # R: summary(survfit(Surv(time, event) ~ 1, data = subset(g3, group != "RIT"),
    #            conf.type = "log-log"), times = c(9, 19, 32, 34))  (lifelines tests)
    control = groups["Control"]
    assert control["survival"] == pytest.approx([0.833, 0.667, 0.5, 0.333], abs=5e-4)
    assert [c[0] for c in control["survival_ci"]] == pytest.approx(
        [0.2731, 0.1946, 0.1109, 0.0461], abs=5e-5)
    assert [c[1] for c in control["survival_ci"]] == pytest.approx(
        [0.975, 0.904, 0.804, 0.676], abs=5e-4)
    # R: summary(survfit(...), data = subset(g3, group == "RIT")), times = c(25, 53))
    out = _json(capsys, ["survival", "--csv", str(csv), "--time", "time", "--event", "event",
                         "--group", "group", "--times", "25,53", "--json"])
    rit = {g["group"]: g for g in out["at_risk"]["groups"]}["RIT"]
    assert rit["survival"] == pytest.approx([0.909, 0.779], abs=5e-4)


def test_survival_by_score_cutoff_warns_on_same_patients(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = tmp_path / "rossi.csv"
    load_rossi().to_csv(csv, index=False)
    out = _json(capsys, ["survival", "--csv", str(csv), "--time", "week", "--event", "arrest",
                         "--score", "prio", "--cutoff", "median", "--json"])
    assert out["cutoff"]["method"] == "median"
    assert out["cutoff"]["value"] == pytest.approx(float(load_rossi()["prio"].median()))
    assert sum(g["n"] for g in out["groups"]) == 432
    assert any("same patients" in w for w in out["warnings"])


def test_cox_reproduces_coxph(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "rossi.csv"
    load_rossi().to_csv(csv, index=False)
    out = _json(capsys, ["cox", "--csv", str(csv), "--time", "week", "--event", "arrest",
                         "--covariates", "fin,age,race,wexp,mar,paro,prio", "--json"])
    # R: coxph(Surv(week, arrest) ~ fin + age + race + wexp + mar + paro + prio,
    #          data = rossi, ties = "efron")  (lifelines test_estimation.py)
    expected = [-0.3794222, -0.0574377, 0.3138998, -0.1497957, -0.4337039, -0.0848711, 0.0914971]
    assert [c["coef"] for c in out["coefficients"]] == pytest.approx(expected, abs=1e-6)
    # lifelines docs: 432 observations, 114 events, concordance 0.64
    assert (out["n"], out["events"]) == (432, 114)
    assert out["concordance"] == pytest.approx(0.64, abs=0.005)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["roc", "--csv", str(ASAH), "--label", "outcome", "--positive", "Bad", "--score", "s100b"],
         "'Bad'"),
        (["roc", "--csv", str(ASAH), "--label", "outcome", "--positive", "Poor", "--score", "nope"],
         "nope"),
        (["roc", "--csv", "/nonexistent/x.csv", "--label", "a", "--score", "b"], "x.csv: no such file"),
        (["survival", "--csv", str(ASAH), "--time", "age", "--event", "wfns", "--group", "gender"],
         "wfns"),
        (["survival", "--csv", str(ASAH), "--time", "age", "--event", "wfns", "--score", "s100b",
          "--cutoff", "highest"], "'highest' is not median"),
        (["cox", "--csv", str(ASAH), "--time", "age", "--event", "outcome", "--covariates", ""],
         "covariates"),
        (["survival", "--csv", str(ASAH), "--time", "age", "--event", "wfns", "--group", "gender",
          "--times", "a,b"], "not a list of numbers"),
    ],
)
def test_bad_input_is_one_error_line_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error:") and err.count("\n") == 1, err
    assert message in err
    if "--csv" in argv and "(see --help)" not in err:
        assert err.startswith(f"error: {Path(argv[argv.index('--csv') + 1]).name}: "), err
    assert "Traceback" not in err


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cmil_core", "--help"], capture_output=True, text=True, cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0
    for command in ("demo", "import-cohort", "roc", "survival", "cox"):
        assert command in done.stdout


def test_train_passes_aggregator_parameters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--param NAME=VALUE`` reaches modeling.train as numbers (what the Models page offers)."""
    from cmil_core.model import modeling

    calls: list[dict] = []

    def fake_train(db: str, cohort: str, **kwargs: object) -> str:
        calls.append({"db": db, "cohort": cohort, **kwargs})
        return "A-histogram-1"

    monkeypatch.setattr(modeling, "train", fake_train)
    from cmil_core import store

    store.open_store(tmp_path / "s.duckdb").close()  # train refuses a --db that names no store
    code = main(["train", "--db", str(tmp_path / "s.duckdb"), "--cohort", "A",
                 "--aggregator", "histogram", "--folds", "3", "--seed", "7",
                 "--param", "max_epochs=12", "--param", "lr=0.002", "--param", "n_bins=20"])
    assert code == 0
    assert capsys.readouterr().out.splitlines()[-1] == "A-histogram-1"
    (call,) = calls
    assert call["params"] == {"max_epochs": 12, "lr": 0.002, "n_bins": 20}
    assert type(call["params"]["max_epochs"]) is int
    assert (call["aggregator"], call["folds"], call["seed"]) == ("histogram", 3, 7)


@pytest.mark.parametrize(
    ("param", "message"),
    [
        ("max_epochs", "is not NAME=VALUE"),
        ("lr=fast", "'fast' is not a number"),
        ("depth=3", "unknown parameter 'depth' for the attention aggregator"),
        ("max_epochs=2.5", "max_epochs=2.5 must be an integer"),
        ("dropout=3", "dropout=3.0 must lie in [0, 0.95]"),
    ],
)
def test_bad_train_parameters_are_refused_before_any_work(
    tmp_path: Path, param: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "never.duckdb"
    try:
        code = main(["train", "--db", str(db), "--cohort", "A", "--param", param])
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1, err
    assert message in err
    assert not db.exists()  # refused before the store was opened


def test_report_writes_the_folder_and_prints_the_html_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_report import build_scored_store  # a scored store in a second, no slides

    db = tmp_path / "cmil.duckdb"
    model_id = build_scored_store(db, evil=False)
    out = tmp_path / "paper"
    code = main(["report", "--db", str(db), "--model", model_id, "--out", str(out),
                 "--endpoint", "efs", "--cutoff", "0.5"])
    assert code == 0
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed == str(out / "report.html") and Path(printed).exists()
    meta = json.loads((out / "report.json").read_text())
    assert meta["endpoint"]["key"] == "efs"
    assert meta["cutoff"] == {"method": "number", "value": 0.5, "description": "the number 0.5",
                              "scores": None}  # a number is chosen on no score set
    assert (out / "figures" / "km_external_b.svg").exists()
    # bad arguments and input: one error line, exit 2, nothing written
    for argv, message in [
        (["--cutoff", "best"], "'best' is not model, youden, median, maxstat or a number"),
        (["--endpoint", "pfs"], "invalid choice: 'pfs'"),
        (["--model", "nope"], "no model 'nope'"),
    ]:
        base = {"--db": str(db), "--model": model_id, "--out": str(tmp_path / "other")}
        base.update(dict(zip(argv[::2], argv[1::2], strict=True)))
        try:
            code = main(["report", *[x for kv in base.items() for x in kv]])
        except SystemExit as exc:
            code = int(exc.code or 0)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error:") and err.count("\n") == 1, err
        assert message in err
    assert not (tmp_path / "other").exists()


# --------------------------------------------------------------------------- quality control


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_qc_thresholds_decisions_and_tiling_mismatch_end_to_end(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cmil_core import store
    from cmil_core.ingest.quality import QCThresholds
    from qc_helpers import BLUR_THRESHOLD, photo_cohort, photo_study

    db, model_id = photo_study(tmp_path / "study", patients=6)
    slides = photo_cohort(db, tmp_path / "study", "C", 6, seed=11)
    base = ["ingest", "--db", db, "--cohort", "C", "--slides", slides, "--mpp", "0.5"]

    # A bad thresholds file: one error line naming the file and the key; nothing ingested.
    bad = tmp_path / "bad.toml"
    bad.write_text("max_dark_fraction = 0.4\nmin_blur = 2\n")
    code, _, err = _run(capsys, [*base, "--qc", bad])
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: bad.toml: unknown QC threshold 'min_blur'")
    code, _, err = _run(capsys, [*base, "--max-dark-fraction", "2"])
    assert code == 2 and err.startswith("error: --max-dark-fraction: ") and "[0, 1]" in err
    with store.open_store(db, read_only=True) as st:
        assert store.list_slides(st, "C") == []

    # A file, a flag over it, another patch size: ingested with those, decision recorded.
    good = tmp_path / "qc.toml"
    good.write_text("max_dark_fraction = 0.4\nmax_background_fraction = 0.9\n")
    code, out, _ = _run(capsys, [*base, "--patch-um", "40", "--qc", good,
                                 "--max-background-fraction", "0.95"])
    assert code == 0
    with store.open_store(db, read_only=True) as st:
        decision = store.current_qc_decisions(st)["C"]
    assert decision["source"] == "ingest"
    assert decision["thresholds"] == QCThresholds(max_dark_fraction=0.4,
                                                  max_background_fraction=0.95).to_dict()
    assert f"quality control: decision {decision['decision_id']} (new): " in out
    assert "max_background_fraction=0.95" in out

    # Scoring C with the model trained on A (56 um patches) is refused, then allowed.
    code, _, err = _run(capsys, ["score", "--db", db, "--model", model_id, "--cohort", "C"])
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: model {model_id} was trained on patches of cohort 'A' "
                          "that differ from cohort 'C': patch size (µm) 56 in training, 40 in "
                          "'C'; QC thresholds max_background_fraction 0.85 vs 0.95, "
                          "max_dark_fraction 0.5 vs 0.4 (training vs 'C');")
    assert "--allow-tiling-mismatch" in err
    with store.open_store(db, read_only=True) as st:
        assert "C" not in set(store.score_marks_frame(st)["cohort"])
    code, out, _ = _run(capsys, ["score", "--db", db, "--model", model_id, "--cohort", "C",
                                 "--allow-tiling-mismatch"])
    assert code == 0 and "C: 6 patients scored" in out
    with store.open_store(db, read_only=True) as st:
        marks = store.score_marks_frame(st).set_index("cohort")
    assert marks.loc["C", "tiling_mismatch"].startswith("patch size (µm) 56 in training")
    assert marks["tiling_mismatch"].isna().tolist() == [True, True, False]  # A, B, C

    # `qc`: counts under other thresholds, read-only; then --apply: a new decision.
    code, out, _ = _run(capsys, ["qc", "--db", db, "--cohort", "B",
                                 f"--{BLUR_THRESHOLD.replace('_', '-')}", "1e12"])
    assert code == 0 and "nothing written" in out and "rejected: blurred" in out
    with store.open_store(db, read_only=True) as st:
        before = store.current_qc_decisions(st)["B"]
        counts = store.qc_summary(st)
    kept_b = int(counts[(counts["cohort"] == "B") & counts["qc_reason"].isna()]["patches"].iloc[0])
    kept_line = next(line for line in out.splitlines() if line.startswith("kept"))
    assert kept_line.split()[1:] == [str(kept_b), "0"]  # now, under these thresholds
    code, out, _ = _run(capsys, ["qc", "--db", db, "--cohort", "B", "--apply",
                                 f"--{BLUR_THRESHOLD.replace('_', '-')}", "1e12", "--json"])
    assert code == 0
    applied = json.loads(out)
    assert applied["applied"] and applied["decision"]["decision_id"] > before["decision_id"]
    assert applied["decision"]["source"] == "cli" and applied["candidate"]["kept"] == 0
    assert applied["stale_scores"] == [model_id]
    assert any("lose every patch" in w for w in applied["candidate"]["warnings"])

    # check: warnings, not problems (exit 0); the stale scores and the mismatch named.
    code, out, _ = _run(capsys, ["check", "--db", db, "--no-hash"])
    assert code == 0
    assert f"warning: scores of cohort 'B' by model {model_id} are stale" in out
    assert f"warning: cohort 'C' was scored by model {model_id} despite a tiling" in out
    assert "warning: cohort 'B': 6 patient(s) lose every patch" in out

    # The report says so too.
    code, out, _ = _run(capsys, ["report", "--db", db, "--model", model_id, "--out",
                                 tmp_path / "report"])
    assert code == 0
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    notes = data["quality_control"]["model_notes"]
    assert any(n.startswith("Scores of cohort(s) 'B'") for n in notes)
    assert any(n.startswith("Cohort 'C' was scored") for n in notes)
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Quality control" in html and "despite a tiling or QC mismatch" in html


# --------------------------------------------------------------------------- clinical tables


def test_survival_keeps_a_categorical_none_group_and_counts_drops_per_column(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # rossi with aid = "aid"/"none" (fin 1/0): two groups, as lifelines' fin gives.
    rossi = load_rossi()
    table = rossi.assign(aid=rossi["fin"].map({1: "aid", 0: "none"})).astype(
        {"week": object, "arrest": object})
    table.loc[[3, 7], "week"] = "?"
    table.loc[11, "arrest"] = "NA"
    path = tmp_path / "rossi.csv"
    table.to_csv(path, index=False)
    out = _json(capsys, ["survival", "--csv", str(path), "--time", "week", "--event", "arrest",
                         "--group", "aid", "--json"])
    kept = rossi.drop(index=[3, 7, 11])
    assert {g["group"]: g["n"] for g in out["groups"]} == {
        "aid": int((kept["fin"] == 1).sum()), "none": int((kept["fin"] == 0).sum())}
    assert out["n_dropped"] == 3
    assert out["n_dropped_by_column"] == {"week": 2, "arrest": 1}
    assert out["missing_values"] == {"week": {"role": "numeric", "values": {"?": 2}},
                                     "arrest": {"role": "numeric", "values": {"NA": 1}}}
    assert out["table"] == {"source": "rossi.csv", "encoding": "utf-8", "sheet": None}
    assert out["levels_lost"] == []
    code, text, _ = _run(capsys, ["survival", "--csv", path, "--time", "week", "--event",
                                  "arrest", "--group", "aid"])
    assert code == 0
    assert ("note: 3 row(s) dropped for missing values; by column: 'week' 2 (numeric: '?' 2); "
            "'arrest' 1 (numeric: 'NA' 1)") in text


def test_a_group_level_lost_to_missing_values_needs_drop_missing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.csv"
    path.write_text("week,arrest,aid,score\n10,1,aid,0.3\n20,0,aid,0.5\n30,1,aid,0.2\n"
                    "?,1,none,0.9\n,0,none,0.1\n12,1,-,0.5\n7,0,-,0.4\n9,1,-,0.7\n")
    base = ["survival", "--csv", path, "--time", "week", "--event", "arrest", "--group", "aid"]
    code, out, err = _run(capsys, base)
    assert (code, out) == (2, "")
    assert err == ("error: t.csv: column 'aid': the level 'none' (2 row(s): 5, 6) would be "
                   "lost: every row of it misses a value in 'week' ('?' 1, empty 1); correct "
                   "the table, or pass --drop-missing to analyse without it\n")
    code, out, _ = _run(capsys, [*base, "--drop-missing", "--json"])
    result = json.loads(out)
    assert code == 0 and {g["group"]: g["n"] for g in result["groups"]} == {"-": 3, "aid": 3}
    assert result["levels_lost"] == [{"column": "aid", "level": "none", "rows": 2}]
    # roc: the score is numeric ('?' and '-' missing), the group keeps '-' as a level.
    roc = ["roc", "--csv", path, "--label", "arrest", "--score", "score", "--group", "aid"]
    path.write_text("arrest,aid,score\n1,aid,0.3\n0,aid,0.5\n1,none,?\n0,none,-\n"
                    "1,-,0.5\n0,-,0.4\n1,-,0.7\n0,aid,0.1\n")
    code, _, err = _run(capsys, roc)
    assert code == 2 and "the level 'none' (2 row(s): 4, 5)" in err and "'score' ('?' 1, '-' 1)" \
        in err
    code, out, _ = _run(capsys, [*roc, "--drop-missing", "--json"])
    assert code == 0
    assert [r["group"] for r in json.loads(out)["results"]] == ["-", "aid"]


def test_encoding_and_sheet_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import io

    from openpyxl import Workbook

    tiny = tmp_path / "gbk.csv"
    tiny.write_bytes("patient_id,性别\nP1,男\nP2,女\n".encode("gbk"))
    base = ["import-cohort", "--db", tmp_path / "s.duckdb", "--cohort", "A", "--dry-run"]
    code, _, err = _run(capsys, [*base, "--csv", tiny])
    assert code == 2 and err.startswith("error: gbk.csv: the encoding cannot be told for sure")
    code, out, _ = _run(capsys, [*base, "--csv", tiny, "--encoding", "gbk", "--json"])
    result = json.loads(out)
    assert code == 0 and (result["encoding"], result["patients"]) == ("gbk", 2)
    assert result["clinical_columns"] == ["性别"]

    book = Workbook()
    book.active.title = "Readme"
    book.active.append(["exported", "2024"])
    sheet = book.create_sheet("Cohort")
    for row in (["week", "arrest", "grp"], [5, 1, "a"], [8, 0, "a"], [3, 1, "b"], [9, 0, "b"]):
        sheet.append(row)
    buffer = io.BytesIO()
    book.save(buffer)
    xlsx = tmp_path / "cohort.xlsx"
    xlsx.write_bytes(buffer.getvalue())
    surv = ["survival", "--csv", xlsx, "--time", "week", "--event", "arrest", "--group", "grp"]
    code, _, err = _run(capsys, surv)  # the first sheet has no such columns
    assert code == 2 and "column 'week' not found" in err
    for choice in ("Cohort", "2"):
        code, out, _ = _run(capsys, [*surv, "--sheet", choice, "--json"])
        result = json.loads(out)
        assert code == 0 and result["table"] == {"source": "cohort.xlsx", "encoding": "xlsx",
                                                 "sheet": "Cohort"}
        assert [(g["group"], g["n"], g["events"]) for g in result["groups"]] == [
            ("a", 2, 1), ("b", 2, 1)]
    code, _, err = _run(capsys, [*surv, "--sheet", "3"])
    assert code == 2 and "sheet number 3 does not exist; the workbook has 2 sheet(s)" in err
