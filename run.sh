#!/usr/bin/env bash
# Bring up the cMIL dashboard on http://localhost:8501
#   first launch: installs the pinned packages into .venv, then builds the demo
#   study (progress in this terminal and in the page); later launches open at once.
# Extra arguments go to `streamlit run` (for example --server.port 8600).
# CMIL_DB=path/to/store.duckdb shows another store; CMIL_DEMO_SIZE=small builds
# the 30-patient demo instead of the paper-sized one.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/ensure_env.sh
ensure_env requirements.txt
echo "Starting the dashboard: open http://localhost:8501 (Ctrl+C stops it)" >&2
exec .venv/bin/python -m streamlit run app.py "$@"
