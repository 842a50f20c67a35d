#!/usr/bin/env bash
# Set up (first run only, with the dev extras) and run the test suite on CPU.
# Extra arguments go to pytest, e.g. scripts/test.sh -k store -x
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh" dev
python -m pytest tests "$@"
