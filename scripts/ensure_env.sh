# Sourced by run.sh and test.sh: make .venv hold exactly the pinned requirements.
# Usage: ensure_env REQUIREMENTS_FILE
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
  want="$(cat requirements.txt "$req" | sha256sum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || ! grep -qx "$want" "$stamp"; then
    echo "Installing the pinned packages from $req (once; a few minutes) ..." >&2
    .venv/bin/python -m pip install --disable-pip-version-check -q -r "$req"
    echo "$want" >> "$stamp"
  fi
}
