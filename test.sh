#!/usr/bin/env bash
# Install what the tests need, check lint (ruff) and types (mypy), and run the tests
# (CI runs exactly this).
# Extra arguments go to pytest, e.g. ./test.sh -m "not slow" or ./test.sh tests/test_store.py
set -euo pipefail
cd "$(dirname "$0")"
. scripts/ensure_env.sh
# requirements-cluster.txt: Ray, so that tests/test_distributed.py runs on a real local
# Ray cluster (the app itself, run.sh, never needs it).
ensure_env requirements-dev.txt requirements-cluster.txt
# The browser tests drive Debian's Chromium (Playwright never downloads a browser).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing Chromium for the browser tests ..." >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "warning: /usr/bin/chromium missing and not root: browser tests will be skipped" >&2
  fi
fi
# The live R checks (tests/test_r_live.py) run R itself: in CI they must run, not skip.
R_DEBS="r-base-core r-cran-survival r-cran-maxstat r-cran-proc r-cran-jsonlite"
if ! command -v Rscript >/dev/null 2>&1 || ! Rscript -e 'for (p in c("jsonlite", "survival", "maxstat", "pROC", "mvtnorm")) stopifnot(requireNamespace(p, quietly = TRUE))' >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing R and its survival, maxstat, pROC, jsonlite packages for the live R checks ..." >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $R_DEBS >/dev/null
  else
    echo "warning: R or its packages missing and not root: install $R_DEBS" >&2
  fi
fi
# As root (CI) R was installed above, so the live R checks must run: a missing R
# fails them. Elsewhere (a laptop without R) they skip with one clear reason.
if [ "$(id -u)" = 0 ]; then
  export CMIL_REQUIRE_R="${CMIL_REQUIRE_R:-1}"
fi
# ./test.sh installs Ray (requirements-cluster.txt) itself, so the distributed tests must
# run, not skip, whoever runs it (CMIL_REQUIRE_RAY=0 lets them skip).
export CMIL_REQUIRE_RAY="${CMIL_REQUIRE_RAY:-1}"
# Lint and types first (settings in pyproject.toml): ruff over the repository, strict
# mypy over cmil_core. Either failing fails the run before the tests start.
echo "ruff check ..." >&2
.venv/bin/ruff check --quiet .
echo "mypy (strict, cmil_core) ..." >&2
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
