"""The dashboard, page by page, with Streamlit's AppTest against a real store."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from cmil_core import store
from cmil_core.analysis import display
from cmil_core.clinical.cohort_import import import_cohort
from cmil_core.ingest.slides import file_sha256, open_slide
from cmil_core.store.model_rules import read_model_scores
from conftest import run_app as _run

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")


def _study(db: Path, tmp_path: Path, fixtures_dir: Path) -> None:
    """Three cohorts with labels, follow-up and real smear photographs as slides."""
    tables = {
        "train": b"patient_id,bm_metastasis,os_months,os_event\nT1,1,10,1\nT2,0,50,0\nT3,1,20,0\nT4,0,30,1\n",
        "extA": b"patient_id,bm_metastasis,os_months,os_event\nA1,1,5,1\nA2,0,60,0\n",
        "extB": b"patient_id,bm_metastasis\nB1,1\nB2,\nB3,0\n",
    }
    roles = {"train": "train", "extA": "validation", "extB": "test"}
    for cohort, data in tables.items():
        csv = tmp_path / f"{cohort}.csv"
        csv.write_bytes(data)
        import_cohort(db, cohort, csv, role=roles[cohort], center=f"Centre {cohort}")
    smears = sorted((fixtures_dir / "smears" / "bccd").glob("*.jpg"))[:3]
    with store.open_store(db) as st:
        for i, path in enumerate(smears):
            with open_slide(path, mpp=0.3) as slide:
                store.register_slide(
                    st, cohort="extB", patient_id=f"B{i + 1}", path=str(path),
                    sha256=file_sha256(path), kind=slide.kind, width=slide.width,
                    height=slide.height, mpp=slide.mpp, size_bytes=path.stat().st_size,
                )


@pytest.fixture
def study_db(db_path: Path, tmp_path: Path, fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _study(db_path, tmp_path, fixtures_dir)
    monkeypatch.setenv("CMIL_DB", str(db_path))
    return db_path


def test_overview_counts_equal_the_store(study_db: Path) -> None:
    at = _run(AppTest.from_file(APP, default_timeout=60))
    assert at.title[0].value == "Study overview"
    with store.open_store(study_db, read_only=True) as st:
        counts = store.table_counts(st)
        overview = store.cohort_overview(st)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Cohorts"] == "3"
    assert metrics["Patients"] == str(counts["patients"]) == "9"
    assert metrics["Slides"] == str(counts["slides"]) == "3"
    table = at.table[0].value  # an HTML table (wraps at 1280 px), indexed by cohort
    assert table.index.tolist() == ["train", "extA", "extB"]  # training first
    for row in overview.itertuples():
        assert table.loc[row.cohort, "Patients"] == f"{row.patients:,}"
        labels = table.loc[row.cohort, "BM metastasis + / − / unknown"]
        assert labels.split(" / ")[1:] == [f"{row.negatives:,}", f"{row.unlabelled:,}"]
        assert table.loc[row.cohort, "Slides"].split(" ")[0] == f"{row.slides:,}"
    assert table.loc["train", "BM metastasis + / − / unknown"].startswith("2 (50%) / ")
    assert table.loc["extB", "BM metastasis + / − / unknown"].endswith(" / 1")
    assert table.loc["train", "Role"] == "Training"
    assert table.loc["extB", "Median follow-up (months)"] == "—"
    # Reverse Kaplan-Meier: censored at 50 and 20 (T2, T3) -> median follow-up 50.
    assert table.loc["train", "Median follow-up (months)"] == "50.0"
    images = at.get("image")  # the thumbnail strip: only extB has slides
    assert len(images) == 3


def test_sidebar_names_the_store_and_has_no_model_yet(study_db: Path) -> None:
    at = _run(AppTest.from_file(APP, default_timeout=60))
    assert str(study_db) in at.sidebar.code[0].value
    picker = at.sidebar.selectbox[0]
    assert picker.label == "Model" and picker.disabled


def test_empty_store_explains_and_offers_the_demo(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.open_store(db_path).close()
    monkeypatch.setenv("CMIL_DB", str(db_path))
    at = _run(AppTest.from_file(APP, default_timeout=60))
    assert at.title[0].value == "This store is empty"
    assert any(b.label == "Build the demo study" for b in at.button)
    assert "import-cohort" in at.markdown[1].value


def _until(at: AppTest, title: str, seconds: float = 420) -> AppTest:
    """Rerun the app until the page title is ``title`` (a background job finishing).

    A deadline, not a speed target: on a loaded machine the small demo's build can
    take several minutes (pytest's own timeout, 600 s, is the outer bound)."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        _run(at)
        if at.title and at.title[0].value == title:
            return at
        if time.monotonic() > deadline:
            raise AssertionError(f"page never became {title!r}; last: {[t.value for t in at.title]}")
        time.sleep(0.5)


@pytest.mark.slow
def test_first_launch_builds_the_demo_with_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CMIL_DB", raising=False)
    monkeypatch.setenv("CMIL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CMIL_DEMO_SIZE", "small")
    at = _run(AppTest.from_file(APP, default_timeout=60))
    assert at.title[0].value == "Building the demo study"
    assert "Nothing is downloaded" in at.markdown[0].value
    at = _until(at, "Study overview")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Cohorts"] == "3" and metrics["Patients"] == "30"
    with store.open_store(tmp_path / "data" / "cmil.duckdb", read_only=True) as st:
        passed = int(store.cohort_overview(st)["patches_passed"].sum())
    assert passed > 0 and metrics["Patches passing QC"] == f"{passed:,}"
    table = at.table[0].value
    assert table.index.tolist() == ["training", "external_a", "external_b"]
    assert "Synthetic demo study (small" in at.info[0].value
    assert len(at.get("image")) == 18  # six thumbnails per cohort
    # The demo is scored: the sidebar picks its model and the overview shows its AUCs.
    with store.open_store(tmp_path / "data" / "cmil.duckdb", read_only=True) as st:
        (model_id,) = store.list_models(st)["model_id"]
        scored = store.patient_scores_frame(st, model_id)
    assert at.sidebar.selectbox[0].value == model_id
    auc = next(t.value for t in at.table if "AUC (95% CI)" in t.value.columns)
    # The training row holds the out-of-fold scores, and says so.
    assert auc.index.tolist() == ["training (out-of-fold)", "external_a", "external_b"]
    shown = dict(zip(auc.index.str.replace(" (out-of-fold)", ""),
                     auc["Patients scored"].astype(int)))
    assert shown == scored.groupby("cohort").size().to_dict() == {
        "training": 14, "external_a": 8, "external_b": 8}
    assert all(" (" in text for text in auc["AUC (95% CI)"])
    # Sensitivity and specificity with their Wilson CIs, as on the Discrimination page.
    assert all(re.fullmatch(r"\d\.\d\d \(\d\.\d\d-\d\.\d\d\)", text)
               for text in auc["Sensitivity (95% CI)"])


@pytest.mark.slow
def test_empty_store_builds_the_demo_on_request(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.open_store(db_path).close()
    monkeypatch.setenv("CMIL_DB", str(db_path))
    at = _run(AppTest.from_file(APP, default_timeout=60))
    at.radio[0].set_value("small")
    next(b for b in at.button if b.label == "Build the demo study").click()
    _run(at)
    at = _until(at, "Study overview")
    with store.open_store(db_path, read_only=True) as st:
        assert store.table_counts(st)["patients"] == 30


@pytest.fixture(scope="module")
def scored_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cmil_core.demo.generator import generate_demo

    db = tmp_path_factory.mktemp("scored") / "cmil.duckdb"
    generate_demo(db, size="small", seed=2)
    return db


def _page(db: Path, monkeypatch: pytest.MonkeyPatch, page: str) -> tuple[AppTest, str]:
    """The app on ``db``, switched to ``page``; with the id of the store's only model."""
    monkeypatch.setenv("CMIL_DB", str(db))
    at = _run(AppTest.from_file(APP, default_timeout=60))
    at.switch_page(page)
    _run(at)
    with store.open_store(db, read_only=True) as st:
        (model_id,) = store.list_models(st)["model_id"]
    return at, str(model_id)


@pytest.mark.slow
def test_discrimination_page_shows_the_models_numbers(
    scored_demo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from cmil_core.outputs.evaluation import metrics_table, roc_curves

    at, model_id = _page(scored_demo, monkeypatch, "pages/discrimination.py")
    assert at.title[0].value == "Discrimination"
    with store.open_store(scored_demo, read_only=True) as st:
        curves = roc_curves(read_model_scores(st, model_id))
        table = metrics_table(read_model_scores(st, model_id))
    assert model_id in at.caption[0].value and "fixed on the training cohort" in at.caption[0].value
    figure = json.loads(at.get("plotly_chart")[0].proto.spec)
    names = [trace["name"] for trace in figure["data"]]
    assert names[0] == "chance"
    assert names[1:] == [
        name for c in curves for name in (
            f"{c['cohort']} 95% CI band",
            f"{c['label']}: AUC {c['auc']:.2f} ({c['ci_low']:.2f}-{c['ci_high']:.2f})")]
    assert curves[0]["label"] == "training (out-of-fold)"  # the honest training row
    # Every figure and table offers its download.
    labels = [b.proto.label for b in at.get("download_button")]
    assert labels[:3] == ["PNG", "SVG", "CSV"] and labels.count("PNG") == 3  # ROC, calibration, decision
    # Unpaired DeLong between cohorts, as evaluation computes it.
    from cmil_core.outputs.evaluation import cohort_comparisons

    with store.open_store(scored_demo, read_only=True) as st:
        tests = cohort_comparisons(read_model_scores(st, model_id))
    between = next(d.value for d in at.dataframe if "Cohorts" in d.value.columns)
    assert between["Cohorts"].tolist() == [f"{a} vs {b}" for a, b in zip(tests["a"], tests["b"])]
    assert between["p (DeLong)"].tolist() == [display.p_cell(p) for p in tests["p"]]
    shown = at.table[0].value
    for row in table.itertuples():
        assert int(shown.loc[row.label, "Patients"]) == row.n
        assert shown.loc[row.label, "TP / FN / TN / FP"] == f"{row.tp} / {row.fn} / {row.tn} / {row.fp}"
        assert shown.loc[row.label, "Sensitivity"].startswith(f"{row.sensitivity:.2f} (")
    # Calibration: the legend carries each cohort's Brier score, as evaluation computes it
    # (on scores moved to the training prevalence, which the page says).
    from cmil_core.outputs.evaluation import calibration as calibration_entries

    calibration = json.loads(at.get("plotly_chart")[1].proto.spec)
    assert calibration["layout"]["title"]["text"] == "Calibration"
    legend = [t["name"] for t in calibration["data"] if t.get("mode") == "markers"]
    with store.open_store(scored_demo, read_only=True) as st:
        entries = calibration_entries(read_model_scores(st, model_id))
    # Only cohorts whose every score bin holds 10 patients are drawn; the page names the rest.
    drawn = [e for e in entries if int(e["bins"]["n"].min()) >= 10]
    assert legend == [f"{e['label']} (Brier {e['brier']:.3f})" for e in drawn]
    left_out = [e for e in entries if e not in drawn]
    if left_out:
        notice = next(i.value for i in at.info if "Calibration not drawn" in i.value)
        assert all(f"{e['label']}: {e['n']} patients" in notice for e in left_out)
    assert any("training prevalence" in c.value for c in at.caption)
    decision = json.loads(at.get("plotly_chart")[2].proto.spec)
    assert decision["layout"]["title"]["text"] == "Decision curve"


@pytest.mark.slow
def test_survival_page_draws_each_cohort_with_its_log_rank(
    scored_demo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from cmil_core.outputs.evaluation import risk_survival

    at, model_id = _page(scored_demo, monkeypatch, "pages/survival.py")
    assert at.title[0].value == "Survival"
    with store.open_store(scored_demo, read_only=True) as st:
        entries = risk_survival(read_model_scores(st, model_id), "os")
    drawn = [e for e in entries if "result" in e]
    charts = {c.key: c for c in at.get("plotly_chart") if c.key}
    assert len(charts) == len(drawn) > 0
    assert drawn[-1]["cohort"] == "pooled validation"
    for entry in drawn:
        chart = charts[f"km-{entry['cohort']}-os-model"]
        title = json.loads(chart.proto.spec)["layout"]["title"]["text"]
        # Long titles wrap (a plotly title is cut, not wrapped, at the plot's width).
        assert all(len(line) <= 44 for line in title.split("<br><sup>")[0].split("<br>"))
        title = title.replace("<br>", " ")
        assert title.startswith(f"{entry['label']}: overall survival by cMIL risk group")
        assert display.p_value(entry["result"]["logrank"]["p"]) in title
    # The multivariable Cox model: the forest plot shows clinical_cox's hazard ratios.
    from cmil_core.outputs.evaluation import clinical_cox

    with store.open_store(scored_demo, read_only=True) as st:
        cox = clinical_cox(read_model_scores(st, model_id), store.patients_frame(st), "os", "model")
    forest = json.loads(at.get("plotly_chart")[-1].proto.spec)
    assert "cMIL risk group and clinical factors" in forest["layout"]["title"]["text"]
    rows = forest["data"][0]["y"]
    assert rows[0].startswith("cMIL high risk  ·  HR " + f"{cox['coefficients'][0]['hr']:.2f}")
    at.radio(key="survival_endpoint").set_value("efs")
    _run(at)
    assert "event-free survival" in json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]["title"]["text"]


@pytest.mark.slow
def test_survival_cutoff_choices_are_fixed_on_training(
    scored_demo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cmil_core.analysis.risk_groups import risk_cutoff
    from cmil_core.outputs.evaluation import survival_cutoff

    at, model_id = _page(scored_demo, monkeypatch, "pages/survival.py")
    with store.open_store(scored_demo, read_only=True) as st:
        model = store.get_model(st, model_id)
        frame = read_model_scores(st, model_id).scores
        train = frame[frame["cohort"] == "training"]  # its out-of-fold scores
        assert set(train["scores"]) == {"out-of-fold"}
        median = survival_cutoff(read_model_scores(st, model_id), "median")
        assert survival_cutoff(read_model_scores(st, model_id), "model")["value"] == model.cutoff
        assert survival_cutoff(read_model_scores(st, model_id), 0.3)["value"] == 0.3
    assert median["value"] == pytest.approx(risk_cutoff(train, "score", "median").value)
    at.selectbox(key="survival_cutoff").set_value("median")
    _run(at)
    assert f"score at or above {median['value']:.3f} is high: training median" in at.caption[0].value
    assert "optimistic" in at.warning[0].value
    # maxstat: R maxstat's statistic, cut, group sizes and corrected p, labelled apart from the
    # classic (uncorrected) log-rank test of the chosen groups drawn on each plot
    with store.open_store(scored_demo, read_only=True) as st:
        chosen = survival_cutoff(read_model_scores(st, model_id), "maxstat")
    at.selectbox(key="survival_cutoff").set_value("maxstat")
    _run(at)
    caption = at.caption[0].value
    assert f"maximally selected log-rank statistic M = {chosen['statistic']:.3f}" in caption
    assert f"{chosen['n_low']} low / {chosen['n_high']} high" in caption
    assert "classic test of the chosen groups (not corrected for choosing the cutoff)" in caption
    assert "it is not the p of the curves below" in at.caption[1].value


@pytest.mark.slow
def test_overview_shows_quality_control_per_cohort(
    scored_demo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from cmil_core.outputs.study import qc_table

    monkeypatch.setenv("CMIL_DB", str(scored_demo))
    at = _run(AppTest.from_file(APP, default_timeout=60))
    with store.open_store(scored_demo, read_only=True) as st:
        expected = qc_table(st).set_index("cohort")
        hist = store.qc_metric_histogram(st, "blur_variance")
    shown = next(t.value for t in at.table if "Kept" in t.value.columns)
    assert shown.index.tolist() == ["training", "external_a", "external_b"]
    for cohort, row in expected.iterrows():
        assert shown.loc[cohort, "Patches"] == f"{int(row['patches']):,}"
        assert shown.loc[cohort, "Kept"] == (
            f"{int(row['kept']):,} of {int(row['patches']):,} ({row['kept_share']:.0%})")
        assert shown.loc[cohort, "Rejected: background"] == f"{int(row['background']):,}"
    at.selectbox(key="qc_metric").set_value("blur_variance")
    _run(at)
    from conftest import plotly_values

    figure = next(f for f in (json.loads(c.proto.spec) for c in at.get("plotly_chart"))
                  if f["layout"]["title"]["text"] == "Sharpness (Laplacian variance) per cohort")
    trace = next(t for t in figure["data"] if t["name"] == "training")
    totals = plotly_values(trace["y"])
    part = hist[hist["cohort"] == "training"]
    assert len(totals) == len(part)
    assert sum(totals) == pytest.approx(1.0)


def test_an_empty_store_leads_to_the_cohorts_page(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CMIL_DB", str(db_path))  # not created yet
    at = _run(AppTest.from_file(APP, default_timeout=60))
    assert at.title[0].value == "This store is empty"
    at.switch_page("pages/cohorts.py")
    _run(at)
    assert at.title[0].value == "Cohorts"
    assert db_path.exists()  # created empty, ready for the import
    with store.open_store(db_path, read_only=True) as st:
        assert store.list_cohorts(st) == []


def test_a_store_of_an_older_version_is_upgraded_when_opened(
    db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store written by the previous release opens on the overview, not on a busy page."""
    with monkeypatch.context() as m:
        m.setattr(store.schema, "MIGRATIONS", store.schema.MIGRATIONS[:3])
        m.setattr(store.schema, "SCHEMA_VERSION", 3)
        csv = tmp_path / "t.csv"
        csv.write_bytes(b"patient_id,bm_metastasis\nP1,1\nP2,0\n")
        import_cohort(db_path, "old", csv, role="train")
    monkeypatch.setenv("CMIL_DB", str(db_path))
    at = _run(AppTest.from_file(APP, default_timeout=60))
    assert at.title[0].value == "Study overview"
    assert {m.label: m.value for m in at.metric}["Patients"] == "2"
    with store.open_store(db_path, read_only=True) as st:
        assert store.schema_version(st) == store.SCHEMA_VERSION
