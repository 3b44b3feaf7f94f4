"""Access rules: roles from configuration, audit rows, pseudonyms, pseudonymised reports."""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cmil_core import store as store_mod
from cmil_core.cli import main
from cmil_core.errors import InputError
from cmil_core.ops import access
from cmil_core.outputs import report
from test_report import MODEL, build_scored_store

CONFIG = access.RoleConfig.from_mapping({
    "editors": ["Alice@Hospital.org"],
    "viewers": ["bob@partner.edu", "carol@hospital.org"],
    "editor_domains": ["@hospital.org"],
    "viewer_domains": ["partner.edu"],
})


@pytest.mark.parametrize(("email", "role"), [
    ("alice@hospital.org", "editor"),            # listed editor
    ("ALICE@HOSPITAL.ORG ", "editor"),           # case and spaces do not matter
    ("dave@hospital.org", "editor"),             # editor domain
    ("carol@hospital.org", "viewer"),            # listed viewer in an editor domain stays a viewer
    ("bob@partner.edu", "viewer"),               # listed viewer
    ("erin@partner.edu", "viewer"),              # viewer domain
    ("mallory@lab.hospital.org", None),          # subdomains are not the domain
    ("mallory@evil-hospital.org", None),         # nor look-alikes
    ("mallory@hospital.org.evil.com", None),
    ("hospital.org", None),                      # not an address
    ("a@b@hospital.org", None),
    ("", None),
    (None, None),
    ("stranger@gmail.com", None),                # signed in but in neither list
])
def test_role_of(email: str | None, role: str | None) -> None:
    assert access.role_of(email, CONFIG) == role


def test_no_roles_configured_means_nobody_gets_in() -> None:
    empty = access.RoleConfig.from_mapping(None)
    assert empty.empty and access.role_of("alice@hospital.org", empty) is None
    assert access.can_edit("editor") and not access.can_edit("viewer") and not access.can_edit(None)


@pytest.mark.parametrize(("section", "message"), [
    ({"editor": ["a@b.org"]}, "unknown key 'editor'"),   # a typo is an error, not a lock-out
    ({"editors": 3}, "editors must be a list of strings"),
    ({"viewers": ["a@b.org", 7]}, "viewers must be a list of strings"),
])
def test_bad_role_configuration_is_refused(section: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        access.RoleConfig.from_mapping(section)


def test_a_single_address_may_be_a_string() -> None:
    assert access.RoleConfig.from_mapping({"editors": "A@b.org"}).editors == {"a@b.org"}


@pytest.mark.parametrize(("user", "email"), [
    ({"is_logged_in": True, "email": "Alice@Hospital.org"}, "alice@hospital.org"),
    ({"is_logged_in": True, "email": "a@b.org", "email_verified": True}, "a@b.org"),
    ({"is_logged_in": True, "email": "a@b.org", "email_verified": False}, None),
    ({"is_logged_in": True, "email": "a@b.org", "email_verified": "false"}, None),
    ({"is_logged_in": True, "sub": "123"}, None),
    ({"is_logged_in": True, "email": "not an address"}, None),
    ({"is_logged_in": True, "email": 5}, None),
])
def test_identity_email_trusts_only_verified_addresses(user: dict, email: str | None) -> None:
    assert access.identity_email(user) == email


# ---------------------------------------------------------------------------- pseudonyms

SALT = "a team salt that is long enough"


def test_pseudonym_is_hmac_sha256_of_the_id() -> None:
    expected = hmac.new(SALT.encode(), b"P001", hashlib.sha256).hexdigest()[:16]
    assert access.pseudonym("P001", SALT) == f"PSN-{expected}"
    assert access.pseudonym("P001", SALT) == access.pseudonym("P001", SALT.encode())
    assert access.pseudonym("P001", SALT) != access.pseudonym("P002", SALT)
    assert access.pseudonym("P001", SALT) != access.pseudonym("P001", SALT + "!")
    assert re.fullmatch(r"PSN-[0-9a-f]{16}", access.pseudonym("P001", SALT))


def test_salt_comes_from_configuration_then_environment_then_chance() -> None:
    env = {access.PSEUDONYM_SALT_ENV: "x" * 20}
    configured = access.make_pseudonymiser(SALT, env)
    assert configured.source == "configured" and configured("P1") == access.pseudonym("P1", SALT)
    from_env = access.make_pseudonymiser(None, env)
    assert from_env.source == "configured" and from_env("P1") == access.pseudonym("P1", "x" * 20)
    first, second = access.make_pseudonymiser(None, {}), access.make_pseudonymiser(None, {})
    assert first.source == second.source == "random"
    assert first("P1") != second("P1")  # each export its own salt: nothing links them
    assert repr(first) == "Pseudonymiser(source='random')"  # the salt never shows in logs


@pytest.mark.parametrize("where", ["configured", "environment"])
def test_a_short_salt_is_refused(where: str) -> None:
    with pytest.raises(InputError, match="at least 16"):
        if where == "configured":
            access.make_pseudonymiser("short", {})
        else:
            access.make_pseudonymiser(None, {access.PSEUDONYM_SALT_ENV: "short"})


def test_frame_maps_ids_and_hides_their_order() -> None:
    masker = access.make_pseudonymiser(SALT, {})
    frame = pd.DataFrame({"cohort": ["A", "A", "A", "B"],
                          "patient_id": ["P1", "P2", None, "P1"], "score": [0.1, 0.2, 0.3, 0.4]})
    out = masker.frame(frame)
    assert set(out["patient_id"].dropna()) == {masker("P1"), masker("P2")}
    assert out["patient_id"].isna().sum() == 1
    a = out[out["cohort"] == "A"].dropna()
    assert a["patient_id"].tolist() == sorted(a["patient_id"])  # ordered by pseudonym
    assert dict(zip(out["patient_id"], out["score"]))[masker("P2")] == 0.2  # rows stay whole
    assert frame["patient_id"].tolist()[:2] == ["P1", "P2"]  # the input is untouched


# ---------------------------------------------------------------------------- audit

def test_record_and_audited_write_rows(db_path: Path) -> None:
    store_mod.open_store(db_path).close()
    assert access.record(db_path, "a@b.org", "import", cohort="C", details={"n": 2}) is None
    job = access.audited(lambda x, progress=None: {"C": x}, db_path, "a@b.org", "score",
                         lambda done: [(c, "m1", {"patients": n}) for c, n in done.items()])
    assert job(3, progress=None) == {"C": 3}
    with store_mod.open_store(db_path, read_only=True) as st:
        trail = store_mod.audit_frame(st)
    assert trail["action"].tolist() == ["score", "import"]
    assert trail["who"].tolist() == ["a@b.org", "a@b.org"]
    assert json.loads(trail["details"][0]) == {"patients": 3}
    assert trail["model_id"][0] == "m1" and trail["cohort"][1] == "C"


def test_record_never_fails_the_action(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    problem = access.record(blocker / "cmil.duckdb", "a@b.org", "import", cohort="C")
    assert problem is not None and problem.startswith("the audit row could not be written")


def test_cli_user_falls_back_when_the_system_has_no_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert access.cli_user()

    def nameless() -> str:
        raise OSError("no username")

    monkeypatch.setattr(access.getpass, "getuser", nameless)
    assert access.cli_user() == "unknown"


def test_cli_commands_are_audited_as_the_os_user(
    db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(access.getpass, "getuser", lambda: "labtech")
    csv = tmp_path / "c.csv"
    csv.write_text("patient_id,bm_metastasis\nX1,1\nX2,0\n")
    base = ["import-cohort", "--db", str(db_path), "--cohort", "C", "--csv", str(csv)]
    assert main([*base, "--dry-run"]) == 0  # a dry run changes nothing: not audited
    assert main(base) == 0
    with store_mod.open_store(db_path, read_only=True) as st:
        trail = store_mod.audit_frame(st)
    assert len(trail) == 1
    row = trail.iloc[0]
    assert (row["who"], row["action"], row["cohort"]) == ("labtech", "import", "C")
    assert json.loads(row["details"])["patients"] == 2


# ---------------------------------------------------------------------------- reports

@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("access") / "cmil.duckdb"
    build_scored_store(db)
    return db


def _ids(db: Path) -> list[str]:
    with store_mod.open_store(db, read_only=True) as st:
        return store_mod.patients_frame(st)["patient_id"].astype(str).tolist()


def _leaks(folder: Path, ids: list[str]) -> dict[str, set[str]]:
    """Patient ids found in the folder's files, as written or HTML-escaped.

    Embedded base64 images are left out: their alphabet makes any short id
    appear there by chance, and they encode pixels, not text.
    """
    found: dict[str, set[str]] = {}
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        text = path.read_bytes().decode("latin-1")
        text = re.sub(r"base64,[A-Za-z0-9+/=]+", "base64,", text)
        for pid in ids:
            for form in {pid, html.escape(pid)}:
                if re.search(rf"(?<![A-Za-z0-9]){re.escape(form)}(?![A-Za-z0-9])", text):
                    found.setdefault(path.name, set()).add(pid)
    return found


@pytest.mark.slow
def test_pseudonymised_report_holds_no_patient_id(
    scored: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = _ids(scored)
    plain = report.write_report(scored, MODEL, tmp_path / "plain").parent
    assert _leaks(plain, ids)  # the check finds ids where they are
    monkeypatch.setenv(access.PSEUDONYM_SALT_ENV, SALT)
    masked = report.write_report(scored, MODEL, tmp_path / "masked", pseudonymise=True).parent
    assert _leaks(masked, ids) == {}
    for path in masked.rglob("*"):  # nor the salt
        assert not path.is_file() or SALT.encode() not in path.read_bytes()
    # Same salt, same pseudonyms: each row is the plain row under its pseudonym.
    before = pd.read_csv(plain / "tables" / "patient_scores.csv", keep_default_na=False)
    after = pd.read_csv(masked / "tables" / "patient_scores.csv", keep_default_na=False)
    before["patient_id"] = [access.pseudonym(p, SALT) for p in before["patient_id"]]
    key = ["cohort", "patient_id"]
    pd.testing.assert_frame_equal(before.sort_values(key).reset_index(drop=True),
                                  after.sort_values(key).reset_index(drop=True))
    for cohort, part in after.groupby("cohort", sort=False):
        assert part["patient_id"].tolist() == sorted(part["patient_id"]), cohort
    meta = json.loads((masked / "report.json").read_text())
    assert meta["pseudonymised"]["salt"] == "configured"
    assert meta["command"].endswith("--pseudonymise")
    # The numbers do not change.
    plain_meta = json.loads((plain / "report.json").read_text())
    assert meta["discrimination"] == plain_meta["discrimination"]
    assert np.isclose(after["score"].sum(), before["score"].sum())


@pytest.mark.slow
def test_report_command_pseudonymises_and_is_audited(
    scored: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(access.getpass, "getuser", lambda: "statistician")
    monkeypatch.delenv(access.PSEUDONYM_SALT_ENV, raising=False)
    out = tmp_path / "shared"
    assert main(["report", "--db", str(scored), "--model", MODEL, "--out", str(out),
                 "--pseudonymise"]) == 0
    assert _leaks(out, _ids(scored)) == {}
    assert json.loads((out / "report.json").read_text())["pseudonymised"]["salt"] == "random"
    with store_mod.open_store(scored, read_only=True) as st:
        row = store_mod.audit_frame(st).iloc[0]
    assert (row["who"], row["action"], row["model_id"]) == ("statistician", "export", MODEL)
    assert json.loads(row["details"])["pseudonymised"] is True
    # A salt too short to protect anything is refused before any work, as bad input.
    monkeypatch.setenv(access.PSEUDONYM_SALT_ENV, "short")
    capsys.readouterr()
    assert main(["report", "--db", str(scored), "--model", MODEL, "--out",
                 str(tmp_path / "other"), "--pseudonymise"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: $CMIL_PSEUDONYM_SALT") and "Traceback" not in err
    assert not (tmp_path / "other").exists()


# ---------------------------------------------------------------------------- deployment

ROOT = Path(__file__).resolve().parents[1]


def test_the_example_secrets_file_is_valid_and_holds_no_secret() -> None:
    import tomllib

    data = tomllib.loads((ROOT / ".streamlit" / "secrets.toml.example").read_text())
    assert {"redirect_uri", "cookie_secret", "client_id", "client_secret",
            "server_metadata_url"} <= set(data["auth"])
    assert all("REPLACE" in data["auth"][k] for k in ("cookie_secret", "client_secret"))
    config = access.RoleConfig.from_mapping(data["cmil"]["roles"])
    assert access.role_of("alice@hospital.example", config) == "editor"
    assert access.role_of("bob@partner-university.example", config) == "viewer"
    assert len(data["cmil"]["pseudonym_salt"]) >= access.MIN_SALT_LENGTH


def test_server_defaults_protect_a_default_launch() -> None:
    import subprocess
    import tomllib

    server = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())["server"]
    assert server["address"] == "localhost"  # not reachable from other machines by default
    assert server["enableXsrfProtection"] is True
    assert 0 < server["maxUploadSize"] <= 4096  # MB
    ignored = subprocess.run(["git", "check-ignore", "-q", ".streamlit/secrets.toml"], cwd=ROOT,
                             check=False)
    assert ignored.returncode in (0, 128)  # ignored (128: not a git checkout, nothing to check)
