"""Exported folders load in the real SAELens 6.54.12 and compute what our loader computes.

scripts/_setup.sh dev installs SAELens beside the venv ($VENV/saelens, --no-deps: its import chain
without its pins); scripts/check_saelens_load.py saves every kind as an SAE and the transcoder
kinds SAELens has (transcoder, skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder),
loads each with SAELens's SAE.load_from_disk and compares the outputs (max |diff| < 1e-5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAELENS = Path(sys.prefix) / "saelens"


@pytest.mark.skipif(not (SAELENS / "sae_lens").is_dir(),
                    reason=f"SAELens could not be installed at {SAELENS} (scripts/_setup.sh dev)")
def test_exports_load_in_real_saelens() -> None:
    env = {**os.environ, "PYTHONPATH": f"{SAELENS}{os.pathsep}{ROOT}"}
    run = subprocess.run([sys.executable, str(ROOT / "scripts/check_saelens_load.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    ok = [line for line in run.stdout.splitlines() if line.startswith("ok ")]
    assert len(ok) == 11, run.stdout  # every case of the script
    assert any("JumpReLUSkipTranscoder" in line for line in ok)
