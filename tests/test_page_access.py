"""Sign-in, roles and the audit trail in the dashboard, with AppTest's user mock.

AppTest (Streamlit 1.67) seeds ``st.user`` from ``at.user`` (a dict: set
``"is_logged_in"`` and the claims, e.g. ``"email"``) and ``st.secrets`` from
``at.secrets``; the app reads whether sign-in is on from ``st.secrets``, so the
two together stand for a signed-in session of a configured deployment. A
viewer's write controls are disabled, and a click forged on them (AppTest
refuses to touch a disabled widget, so the test forges it: :func:`_forge`) changes
nothing: Streamlit 1.67 discards values sent for a widget drawn disabled, and the
handlers check the role again themselves (tested apart, since the first layer
stops every forged click before it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from cmil_core import store
from cmil_core.clinical.cohort_import import import_cohort
from conftest import plain_text as _plain, run_app as _run

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
EDITOR, VIEWER, STRANGER = "ed@hospital.org", "vi@partner.edu", "eve@elsewhere.com"
SECRETS: dict[str, Any] = {
    "auth": {
        "redirect_uri": "http://localhost:8501/oauth2callback",
        "cookie_secret": "not-a-real-secret-used-only-in-tests",
        "client_id": "cmil-test", "client_secret": "not-a-real-secret",
        "server_metadata_url": "https://idp.example.org/.well-known/openid-configuration",
    },
    "cmil": {"contact": "Dr Admin (admin@hospital.org)",
             "roles": {"editors": [EDITOR], "viewers": [VIEWER]}},
}
TABLE = b"patient_id,bm_metastasis\nN1,1\nN2,0\n"


def _app(email: str | None, page: str | None = None, secrets: dict | None = None) -> AppTest:
    """The app as ``email`` (None: not signed in), on ``page``."""
    at = AppTest.from_file(APP, default_timeout=60)
    at.secrets = json.loads(json.dumps(secrets or SECRETS))
    at.user = {"is_logged_in": False} if email is None else {
        "is_logged_in": True, "email": email, "email_verified": True, "name": email.split("@")[0]}
    _run(at)
    if page is not None:
        at.switch_page(page)
        _run(at)
    return at


def _forge(widget: Any) -> Any:
    """The widget as a tampered client would send it, though it was drawn disabled.

    AppTest 1.67 refuses to touch a disabled widget; dropping the flag on the
    test's copy makes it send the value anyway, as a hand-made websocket
    message would.
    """
    widget.proto.disabled = False
    return widget


def _trail(db: Path) -> list[dict[str, Any]]:
    with store.open_store(db, read_only=True) as handle:
        return store.audit_frame(handle).to_dict(orient="records")


@pytest.fixture(autouse=True)
def fresh_runner() -> Iterator[None]:
    st.cache_resource.clear()
    yield
    from pages import _common

    for job in list(_common.job_runner()._jobs.values()):
        job.wait(120)
    st.cache_resource.clear()


@pytest.fixture
def study(db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    csv = tmp_path / "seed.csv"
    csv.write_bytes(b"patient_id,bm_metastasis\nS1,1\nS2,0\n")
    import_cohort(db_path, "existing", csv, role="train")
    monkeypatch.setenv("CMIL_DB", str(db_path))
    monkeypatch.delenv("CMIL_SLIDE_ROOT", raising=False)
    return db_path


def test_sign_in_is_required_when_configured(study: Path) -> None:
    at = _app(None)
    assert at.title[0].value == "Sign in"
    assert [b.label for b in at.button] == ["Sign in"]
    assert not at.dataframe and not at.sidebar.selectbox  # nothing of the study shows
    with pytest.raises(ValueError):
        at.switch_page("pages/cohorts.py")  # no page is registered for a visitor


def test_signed_in_without_a_role_is_told_whom_to_ask(study: Path) -> None:
    at = _app(STRANGER)
    assert at.title[0].value == "No access yet"
    text = _plain(" ".join(m.value for m in at.markdown))
    assert "eve@elsewhere.com" in text and "Dr Admin" in text
    assert not at.dataframe


def test_unverified_address_gets_no_role(study: Path) -> None:
    at = AppTest.from_file(APP, default_timeout=60)
    at.secrets = SECRETS
    at.user = {"is_logged_in": True, "email": EDITOR, "email_verified": False}
    _run(at)
    assert at.title[0].value == "No access yet"
    assert "verified" in " ".join(m.value for m in at.markdown)


def test_broken_roles_configuration_fails_closed(study: Path) -> None:
    broken = {**SECRETS, "cmil": {"roles": {"editor": [EDITOR]}}}  # typo: editor
    at = _app(EDITOR, secrets=broken)
    assert at.title[0].value == "Access is misconfigured"
    assert "unknown key 'editor'" in _plain(at.error[0].value)


def test_viewer_sees_cohorts_but_cannot_import_or_delete(study: Path) -> None:
    at = _app(VIEWER, "pages/cohorts.py")
    assert at.title[0].value == "Cohorts"
    assert "viewer" in at.info[0].value
    assert at.dataframe[0].value["Cohort"].tolist() == ["existing"]  # sees everything
    assert at.file_uploader[0].disabled
    assert at.button(key="delete_button").disabled
    assert at.button(key="ingest_run").disabled
    # Forged clicks change nothing.
    at.text_input(key="delete_confirm").set_value("existing")
    _forge(at.button(key="delete_button")).click()
    _run(at)
    _forge(at.file_uploader[0]).set_value(("new.csv", TABLE, "text/csv"))
    _run(at)
    assert "import_confirm" not in [b.key for b in at.button]  # the upload was discarded
    with store.open_store(study, read_only=True) as handle:
        assert [c.cohort for c in store.list_cohorts(handle)] == ["existing"]
        assert store.table_counts(handle)["patients"] == 2
    assert _trail(study) == []


def _guarded_write(root: str) -> None:
    """A page whose write handler is reached (the second layer of the role check)."""
    import sys

    import streamlit as st

    sys.path.insert(0, root)
    from pages import _common

    if _common.require_editor("delete-cohort", cohort="existing"):
        st.write("deleted")


@pytest.mark.parametrize(("email", "allowed"), [(EDITOR, True), (VIEWER, False)])
def test_require_editor_checks_the_role_server_side(study: Path, email: str, allowed: bool) -> None:
    at = AppTest.from_function(_guarded_write, args=(str(ROOT),), default_timeout=60)
    at.secrets = SECRETS
    at.user = {"is_logged_in": True, "email": email}
    _run(at)
    assert [m.value for m in at.markdown] == (["deleted"] if allowed else [])
    trail = _trail(study)
    if allowed:
        assert not at.error and trail == []
        return
    assert "only editors may delete cohorts" in _plain(at.error[0].value)
    assert "Dr Admin" in _plain(at.error[0].value)
    assert [(r["who"], r["action"], r["cohort"]) for r in trail] == [
        (VIEWER, "delete-cohort", "existing")]
    assert json.loads(trail[0]["details"]) == {"outcome": "denied", "role": "viewer"}


def test_editor_imports_and_deletes_and_the_trail_names_them(study: Path) -> None:
    at = _app(EDITOR)
    assert _plain(at.sidebar.caption[-1].value) == f"Signed in as {EDITOR} · editor"
    assert [b.label for b in at.sidebar.button] == ["Sign out"]
    at.switch_page("pages/cohorts.py")
    _run(at)
    assert not at.info or "viewer" not in at.info[0].value
    at.file_uploader[0].set_value(("new.csv", TABLE, "text/csv"))
    _run(at)
    at.text_input(key="import_cohort_name_0").set_value("new")
    at.button(key="import_confirm").click()
    _run(at)
    at.selectbox(key="delete_cohort").set_value("existing")
    at.text_input(key="delete_confirm").set_value("existing")
    _run(at)
    at.button(key="delete_button").click()
    _run(at)
    with store.open_store(study, read_only=True) as handle:
        assert [c.cohort for c in store.list_cohorts(handle)] == ["new"]
    trail = _trail(study)
    assert [(r["who"], r["action"], r["cohort"]) for r in trail] == [
        (EDITOR, "delete-cohort", "existing"), (EDITOR, "import", "new")]
    assert json.loads(trail[1]["details"]) == {
        "source": "new.csv", "patients": 2, "role": "train", "via": "dashboard",
        "encoding": "utf-8", "sheet": None}
    assert json.loads(trail[0]["details"])["patients"] == 2

    # The audit page is the editor's, with filters.
    at.switch_page("pages/audit.py")
    _run(at)
    assert at.title[0].value == "Audit trail"
    table = at.dataframe[0].value
    assert table["Who"].tolist() == [EDITOR, EDITOR]
    assert table["Action"].tolist() == ["delete-cohort", "import"]
    at.multiselect(key="audit_action").set_value(["import"])
    _run(at)
    assert at.dataframe[0].value["Cohort"].tolist() == ["new"]
    # Details are cut in the grid at 1280 px: a selected row's are written out below it.
    assert "Select a row to read its details in full." in [c.value for c in at.caption]


def test_viewer_has_no_audit_page(study: Path) -> None:
    at = _app(VIEWER)
    with pytest.raises(ValueError):
        at.switch_page("pages/audit.py")


def test_without_sign_in_the_local_user_edits_and_is_audited(study: Path) -> None:
    at = AppTest.from_file(APP, default_timeout=60)  # no secrets: one local user
    _run(at)
    at.switch_page("pages/cohorts.py")
    _run(at)
    assert not at.file_uploader[0].disabled
    at.file_uploader[0].set_value(("new.csv", TABLE, "text/csv"))
    _run(at)
    at.text_input(key="import_cohort_name_0").set_value("new")
    at.button(key="import_confirm").click()
    _run(at)
    assert [(r["who"], r["action"]) for r in _trail(study)] == [("local", "import")]


def _masked_table(root: str, switch: bool) -> None:
    """What a CSV download of a patient table holds, with the sidebar switch as given."""
    import sys

    import pandas as pd
    import streamlit as st

    sys.path.insert(0, root)
    from pages import _common

    st.session_state[_common.PSEUDONYMISE_KEY] = switch
    st.dataframe(_common.masked(pd.DataFrame({"Cohort": ["A", "A"], "Patient": ["N1", "N2"],
                                              "cMIL score": [0.9, 0.1]})))


@pytest.mark.parametrize(("email", "switch", "masked"), [
    (EDITOR, False, False), (EDITOR, True, True),
    (VIEWER, False, True),  # pseudonymise_viewers: always, whatever the switch
])
def test_csv_downloads_follow_the_switch_and_the_viewer_rule(
    study: Path, email: str, switch: bool, masked: bool
) -> None:
    from cmil_core.ops.access import pseudonym

    salt = "a configured salt, long enough"
    secrets = json.loads(json.dumps(SECRETS))
    secrets["cmil"].update(pseudonymise_viewers=True, pseudonym_salt=salt)
    at = AppTest.from_function(_masked_table, args=(str(ROOT), switch), default_timeout=60)
    at.secrets = secrets
    at.user = {"is_logged_in": True, "email": email}
    _run(at)
    table = at.dataframe[0].value
    expected = ([pseudonym("N1", salt), pseudonym("N2", salt)] if masked else ["N1", "N2"])
    assert sorted(table["Patient"]) == sorted(expected)
    assert table.set_index("Patient").loc[expected[0], "cMIL score"] == 0.9


@pytest.fixture
def scored(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from test_report import build_scored_store

    build_scored_store(db_path, evil=False)
    monkeypatch.setenv("CMIL_DB", str(db_path))
    return db_path


def test_viewer_cannot_train_score_or_delete_models(scored: Path) -> None:
    at = _app(VIEWER, "pages/models.py")
    assert at.title[0].value == "Models"
    for key in ("train_button", "score_button", "delete_model_button"):
        assert at.button(key=key).disabled, key
    at.text_input(key="delete_model_confirm").set_value("m-test")
    _forge(at.button(key="delete_model_button")).click()
    _run(at)
    _forge(at.button(key="score_button")).click()
    _run(at)
    _forge(at.button(key="train_button")).click()
    _run(at)
    from pages import _common

    assert _common.job_runner().get("train") is None  # no job was started
    with store.open_store(scored, read_only=True) as handle:
        assert store.list_models(handle)["model_id"].tolist() == ["m-test"]
    assert _trail(scored) == []


@pytest.mark.slow
def test_viewer_reports_are_pseudonymised_when_configured(
    scored: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    salt = "a configured salt, long enough"
    secrets = json.loads(json.dumps(SECRETS))
    secrets["cmil"].update(pseudonymise_viewers=True, pseudonym_salt=salt)
    at = _app(VIEWER, "pages/report.py", secrets=secrets)
    box = at.checkbox[0]
    assert box.label == "Pseudonymise patient ids" and box.value and box.disabled
    next(b for b in at.button if b.label == "Write the report").click()
    _run(at)
    folder = Path(at.session_state["report:m-test"]).parent
    csv = (folder / "tables" / "patient_scores.csv").read_text()
    from cmil_core.ops.access import pseudonym

    assert "T000" not in csv and pseudonym("T000", salt) in csv
    (row,) = _trail(scored)
    assert (row["who"], row["action"], row["model_id"]) == (VIEWER, "export", "m-test")
    assert json.loads(row["details"])["pseudonymised"] is True


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cmil_core.demo.generator import generate_demo

    db = tmp_path_factory.mktemp("access-demo") / "cmil.duckdb"
    generate_demo(db, size="small", seed=3)
    return db


@pytest.mark.slow
def test_editor_scoring_job_is_audited_when_it_finishes(
    demo_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CMIL_DB", str(demo_db))
    with store.open_store(demo_db, read_only=True) as handle:
        (model_id,) = store.list_models(handle)["model_id"]
        before = len(store.audit_frame(handle))
    at = _app(EDITOR, "pages/models.py")
    at.multiselect(key="score_cohorts").set_value(["external_a"])
    _run(at)
    at.button(key="score_button").click()
    _run(at)
    from pages import _common

    job = _common.job_runner().get(f"score:{model_id}")
    assert job is not None
    job.wait(300)
    assert job.state == "done", job.error
    rows = _trail(demo_db)[: len(_trail(demo_db)) - before]
    assert [(r["who"], r["action"], r["cohort"], r["model_id"]) for r in rows] == [
        (EDITOR, "score", "external_a", model_id)]
    assert json.loads(rows[0]["details"]) == {"patients": 8, "via": "dashboard",
                                              "allow_tiling_mismatch": False}
