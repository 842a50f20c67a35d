#!/usr/bin/env bash
# Set up (first run only, with the dev extras) and run the test suite on CPU.
# Extra arguments go to pytest, e.g. scripts/test.sh -k store -x
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh" dev
# The dashboard test loads the page in a real headless browser: Debian's chromium.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing chromium for the dashboard test ..."
  apt-get install -y -q chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
fi
python -m pytest tests "$@"
