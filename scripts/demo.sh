#!/usr/bin/env bash
# Set up (first run only) and run the whole pipeline on the embedded default: SmolLM2-135M on
# CPython's own text. Extra arguments are Hydra overrides, e.g. scripts/demo.sh sae.widths=[1152].
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh" ""
OUT=${DSAE_OUT:-runs/demo}
dsae-run out_dir="$OUT" "$@"
echo
echo "results in $ROOT/$OUT:"
echo "  store/    activations (zarr)      train/   trained SAEs"
echo "  eval/     metrics, features, dashboards (open eval/index.html)    export/  SAELens-format folders"
