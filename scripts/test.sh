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
# Two groups, one after the other: the suite, then the `cluster` group (tests/test_cluster_*.py:
# a two-node Ray cluster on loopback and a local SLURM, ~6 min), which starts Ray nodes and
# system daemons of its own and must not share the machine with the suite's local Ray instances.
python -m pytest tests -m "not cluster" "$@"
rc=0
python -m pytest tests -m cluster "$@" || rc=$?
[ "$rc" -eq 5 ] && rc=0  # exit 5: the arguments selected no cluster test
exit "$rc"
