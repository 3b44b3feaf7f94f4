#!/usr/bin/env bash
# Bring up the cMIL dashboard (the address it listens on is printed once it answers).
#   first launch: installs the pinned packages into .venv, then builds the demo
#   study at once, in the server's process, without waiting for a browser: progress
#   in this terminal (a line at least every 5 s when the output is a log or a pipe),
#   and the same progress in the page whenever it is opened; the last line is
#   "demo ready: N patients scored". Later launches open at once.
# Extra arguments go to `streamlit run app.py` (for example --server.port 8600).
# CMIL_DB=path/to/store.duckdb shows another store (no demo is built then);
# CMIL_DEMO_SIZE=small builds the 30-patient demo instead of the paper-sized one.
# CMIL_SKIP_INSTALL=1 uses .venv as it is (tests, offline machines).
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${CMIL_SKIP_INSTALL:-}" ]; then
  . scripts/ensure_env.sh
  ensure_env requirements.txt
fi
echo "Starting the dashboard (Ctrl+C stops it) ..." >&2
exec .venv/bin/python -m scripts.serve "$@"
