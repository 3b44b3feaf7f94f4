"""Sign-in in a real browser against a real server: the gate, and the hand-off to st.login.

A server started with an ``[auth]`` secrets file (``--secrets.files``, so the
repository's own ``.streamlit/`` is untouched) shows only the sign-in page,
for the home page and for a deep link alike; its button starts Streamlit's
OpenID Connect flow (``/auth/login``), which needs Authlib installed. The
identity provider is unreachable here, so the flow stops there.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cmil_core.clinical.cohort_import import import_cohort
from conftest import skip_without_chromium
from scripts.dashboard_server import ROOT, DashboardServer, free_port

pytestmark = [pytest.mark.browser, pytest.mark.slow]

skip_without_chromium()

from playwright.sync_api import Browser  # noqa: E402

SECRETS = """
[auth]
redirect_uri = "http://localhost:{port}/oauth2callback"
cookie_secret = "not-a-real-secret-used-only-in-this-test"
client_id = "cmil-test"
client_secret = "not-a-real-secret"
server_metadata_url = "http://127.0.0.1:9/.well-known/openid-configuration"

[cmil.roles]
editors = ["ed@hospital.org"]
"""


def test_sign_in_gates_every_page_and_hands_over_to_the_provider(tmp_path: Path,
                                                                chromium: Browser) -> None:
    db = tmp_path / "cmil.duckdb"
    csv = tmp_path / "seed.csv"
    csv.write_bytes(b"patient_id,bm_metastasis\nSECRET-PATIENT-1,1\nSECRET-PATIENT-2,0\n")
    import_cohort(db, "existing", csv, role="train")
    port = free_port()
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(SECRETS.format(port=port))
    url = f"http://localhost:{port}"
    server = DashboardServer({"CMIL_DB": str(db)}, tmp_path / "server.log", port=port,
                             args=["--secrets.files", str(secrets)])
    try:
        page = chromium.new_page()
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        for path in ("/", "/cohorts", "/patients?patient=existing/SECRET-PATIENT-1"):
            page.goto(url + path)
            page.get_by_role("heading", name="Sign in").wait_for(timeout=120_000)
            time.sleep(1.0)  # let the page finish drawing: nothing else may appear
            body = page.inner_text("body")
            assert "SECRET-PATIENT" not in body and "existing" not in body, path
        page.goto(url)
        button = page.get_by_role("button", name="Sign in")
        button.wait_for(timeout=60_000)
        button.click()
        deadline = time.monotonic() + 60
        while not any("/auth/login" in seen for seen in requests):
            assert time.monotonic() < deadline, requests
            page.wait_for_timeout(200)
        page.close()
    finally:
        server.stop()
    # The log holds the provider's connection error (unreachable here), and nothing of ours.
    log = (tmp_path / "server.log").read_text()
    assert str(ROOT / "pages") not in log and str(ROOT / "cmil_core") not in log
    assert str(ROOT / "app.py") not in log
