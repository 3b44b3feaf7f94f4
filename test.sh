#!/usr/bin/env bash
# Install what the tests need and run them all (CI runs exactly this).
# Extra arguments go to pytest, e.g. ./test.sh -m "not slow" or ./test.sh tests/test_store.py
set -euo pipefail
cd "$(dirname "$0")"
. scripts/ensure_env.sh
ensure_env requirements-dev.txt
# The browser tests drive Debian's Chromium (Playwright never downloads a browser).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing Chromium for the browser tests ..." >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "warning: /usr/bin/chromium missing and not root: browser tests will be skipped" >&2
  fi
fi
exec .venv/bin/python -m pytest "$@"
