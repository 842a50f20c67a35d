"""A real SLURM (Debian's slurm-wlm: munged, slurmctld, slurmd on loopback, started by
scripts/slurm_local.sh) runs a two-point `dsae-run --multirun cluster=slurm` sweep through
hydra-submitit-launcher: one SLURM job per point, each with its own out_dir, both complete.

In the `cluster` group (pytest -m cluster): it starts system daemons, so it runs on its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_S

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_local.sh"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    env = dict(os.environ, DSAE_SLURM_DIR=str(tmp_path_factory.mktemp("slurm")))
    up = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True,
                        timeout=600)
    if up.returncode == 3:  # the packages are missing and cannot be installed (no apt, no root)
        pytest.skip(up.stderr.strip())
    assert up.returncode == 0, up.stdout + up.stderr
    conf = subprocess.run(["bash", str(SCRIPT), "conf"], env=env, capture_output=True,
                          text=True).stdout.strip()
    yield dict(env, SLURM_CONF=conf)
    subprocess.run(["bash", str(SCRIPT), "stop"], env=env, timeout=HANG_S)


def sweep_args(model_dir: str, out: Path) -> list[str]:
    # Each job: a 3-layer 32-wide model, 30 units of 4 x 32 tokens; harvest, train, eval,
    # export. One CPU each, so the 2-CPU node runs both at once.
    return [f"model.name={model_dir}", f"out_dir={out}", "data.context_size=32",
            "data.n_tokens=3840", "harvest.hooks=[blocks.1.hook_resid_post]",
            "harvest.contexts_per_unit=4", "harvest.batch_size=2", "harvest.num_actors=1",
            "store.chunk_tokens=64", "sae.widths=[64]", "train.batch_size=128",
            "train.tokens=2560", "train.log_every=5", "eval.spliced_tokens=256",
            "cluster=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=4", "hydra.launcher.timeout_min=20", "sae.k=16,32",
            "--multirun"]


def test_a_slurm_sweep_runs_one_job_per_point_and_both_land(slurm, tiny_llama_dir, tmp_path):
    cmd = [sys.executable, "-c", "from distributed_sae.cli import run_main; run_main()",
           *sweep_args(tiny_llama_dir, tmp_path)]
    env = dict(slurm, RAY_AUTH_MODE="disabled")
    # The launcher submits a job array and waits for both results.
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    banks = sorted(tmp_path.glob("multirun/*/*/train/bank.json"))
    assert [json.loads(b.read_text())["members"] for b in banks] == [["topk_w64_k16_s0"],
                                                                     ["topk_w64_k32_s0"]]
    for bank in banks:
        job = bank.parent.parent
        assert (job / "eval" / "summary.md").is_file(), job
        assert any((job / "export").iterdir()), job
        # Its Ray instance took the CPU SLURM gave the job, not the node's two.
        assert "local Ray instance with 1 CPUs" in (job / "cli.log").read_text()
    # They ran as one SLURM job array, a task per point: submitit's folders are named by the
    # ids the controller handed out (<array>_<task>) and hold the tasks' logs.
    logs = sorted(tmp_path.glob("multirun/*/.submitit/*/*_log.out"))
    ids = [p.parent.name for p in logs]
    array = ids[0].split("_")[0] if ids else ""
    assert array.isdigit() and ids == [f"{array}_0", f"{array}_1"], ids
