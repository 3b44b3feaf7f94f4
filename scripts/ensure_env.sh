# Sourced by run.sh and test.sh: make .venv hold exactly the pinned requirements,
# and the project itself (editable), which gives .venv/bin/cmil.
# Usage: ensure_env REQUIREMENTS_FILE [MORE_REQUIREMENTS_FILES ...]
# (test.sh: requirements-dev.txt and requirements-cluster.txt, one pip resolve).
# Installs only when the requirements changed since the last install (a stamp in
# .venv), so later launches start at once. Python 3.11 or newer is required.

ensure_env() {
  local req="$1"
  local py=""
  for candidate in python3.11 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      py="$candidate"; break
    fi
  done
  if [ -z "$py" ]; then
    echo "error: Python 3.11 or newer is needed (python3.11 or python3 on PATH)" >&2
    exit 2
  fi
  if [ ! -x .venv/bin/python ]; then
    echo "Creating the virtual environment in .venv ..." >&2
    "$py" -m venv .venv
  fi
  local stamp=.venv/.cmil-installed
  local want
  want="$(cat requirements.txt "$@" | sha256sum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || ! grep -qx "$want" "$stamp"; then
    echo "Installing the pinned packages from $* (once; a few minutes) ..." >&2
    local req_args=()
    for req in "$@"; do req_args+=(-r "$req"); done
    .venv/bin/python -m pip install --disable-pip-version-check -q "${req_args[@]}"
    echo "$want" >> "$stamp"
  fi
  # The project itself, editable (the code stays here): .venv/bin/cmil, the same
  # entry point as python -m cmil_core. Redone when pyproject.toml changes.
  local project_stamp=.venv/.cmil-project
  local project_want
  project_want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  if [ ! -x .venv/bin/cmil ] || [ ! -f "$project_stamp" ] ||
     ! grep -qx "$project_want" "$project_stamp"; then
    echo "Installing the cmil command into .venv ..." >&2
    # Offline with .venv's own setuptools when it is recent enough (requirements-dev.txt
    # pins one); otherwise pip fetches setuptools>=77 for the build.
    local isolation=""
    if .venv/bin/python -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null; then
      isolation="--no-build-isolation"
    fi
    .venv/bin/python -m pip install --disable-pip-version-check -q --no-deps $isolation -e .
    echo "$project_want" > "$project_stamp"
  fi
}
