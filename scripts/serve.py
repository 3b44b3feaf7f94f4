"""The dashboard's server as ``./run.sh`` starts it: the demo build first, then Streamlit.

Run: ``.venv/bin/python -m scripts.serve [streamlit run options]`` (from the
project folder; ``./run.sh`` does this). Options go to ``streamlit run app.py``
unchanged, for example ``--server.port 8600``.

In this one process: on a first launch (default store, no demo yet) the demo
build starts at once in the background (:func:`cmil_core.demo.launch.start_first_launch`),
printing its progress to stderr, without waiting for a browser; then Streamlit
serves ``app.py``, whose pages show the same build's progress; once the server
answers, the address it really listens on is printed (whatever
``--server.port``, ``STREAMLIT_SERVER_PORT`` or ``.streamlit/config.toml`` say).
"""

from __future__ import annotations

import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def server_url() -> str:
    """The address Streamlit serves on, from its (loaded) configuration."""
    from streamlit import config

    address = config.get_option("server.address") or "localhost"
    if address in ("0.0.0.0", "::"):
        address = "localhost"
    base = (config.get_option("server.baseUrlPath") or "").strip("/")
    return f"http://{address}:{config.get_option('server.port')}" + (f"/{base}" if base else "")


def announce_when_up(timeout: float = 600.0) -> None:
    """Print the dashboard's address once its health endpoint answers."""
    from streamlit.runtime import Runtime

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if not Runtime.exists():
            continue
        url = server_url()
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                if reply.status == 200:
                    print(f"The dashboard is at {url} (Ctrl+C stops it)", file=sys.stderr,
                          flush=True)
                    return
        except OSError:
            continue


def main(argv: list[str] | None = None) -> int:
    from cmil_core.demo import launch

    args = sys.argv[1:] if argv is None else argv
    if launch.using_default_store():
        try:
            launch.start_first_launch()
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    threading.Thread(target=announce_when_up, name="cmil-announce", daemon=True).start()
    from streamlit.web import cli

    return int(cli.main.main(args=["run", str(ROOT / "app.py"), *args], prog_name="streamlit",
                             standalone_mode=False) or 0)


# The demo's worker processes (spawn) import this module again as __mp_main__:
# they must not start a server.
if __name__ == "__main__":
    raise SystemExit(main())
