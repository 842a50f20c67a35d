#!/usr/bin/env bash
# The GPU checks of the kernels (issue: Triton kernels), as one command for a lent GPU machine:
# the gpu-marked tests, then scripts/bench_kernels.py --gpu (tile sweep + grid). Logs and the
# JSON go to $OUT (default /tmp/gpu_out). Needs python3 with torch, triton and pytest, which the
# device image has; zarr, numcodecs, donfig and google-crc32c (the package imports its store at
# import time) are installed from wheels in .whl/ when present, fetched beforehand with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .whl zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
# Environment: DEADLINE (s; the grid starts no point after it, default 200), BENCH_TIMEOUT (s),
# SWEEP=0 keeps the committed tiles (no sweep), TESTS=0 skips the tests, EXPLORE=1 first runs scripts/explore_gpu_step.py (variants, profile).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
# The package laid out as setup.py installs it (kernels/ and conf/ inside distributed_sae/), so
# nothing is pip-installed over the image's torch; tests run from that copy.
rm -rf /tmp/pkg && mkdir -p /tmp/pkg
cp -r distributed_sae tests scripts pytest.ini /tmp/pkg/
cp -r kernels /tmp/pkg/distributed_sae/kernels && cp -r conf /tmp/pkg/distributed_sae/conf
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1
cd /tmp/pkg
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"
start=$(date +%s)
if [ "${TESTS:-1}" = 1 ]; then
  timeout "${TEST_TIMEOUT:-180}" python3 -m pytest tests/test_kernels.py -m gpu -q -rs \
    -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
  echo "gpu tests: $(( $(date +%s) - start )) s"
fi
if [ "${EXPLORE:-0}" = 1 ]; then
  timeout "${EXPLORE_TIMEOUT:-150}" python3 scripts/explore_gpu_step.py --json "$OUT/explore.json" \
    2>&1 | tee "$OUT/explore.log"
  echo "explore: $(( $(date +%s) - start )) s"
fi
sweep=$([ "${SWEEP:-1}" = 1 ] || echo --no-sweep)
timeout "${BENCH_TIMEOUT:-330}" python3 scripts/bench_kernels.py --gpu $sweep \
  --deadline "${DEADLINE:-200}" --json "$OUT/gpu.json" 2>&1 | tee "$OUT/bench.log"
echo "all: $(( $(date +%s) - start )) s"
