"""Cluster presets compose with today's schema, pick their Hydra launcher, and the Ray job
script refuses to run without a cluster address."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from distributed_sae.cli import to_run_config
from distributed_sae.config.register import register_configs

ROOT = Path(__file__).resolve().parents[1]
SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"


def compose_cluster(overrides: list[str], hydra_cfg: bool = True):
    register_configs()
    with initialize_config_module("distributed_sae.conf", version_base=None):
        return compose("config", overrides=overrides, return_hydra_config=hydra_cfg)


@pytest.mark.parametrize("preset, target, address", [
    ("slurm", SLURM, None), ("slurm-local", LOCAL, None), ("ray-cluster", None, "auto"),
])
def test_preset_composes(preset, target, address):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_cluster([f"cluster={preset}", "hydra.launcher.timeout_min=30"]
                          if target else [f"cluster={preset}"])
    if target:
        launcher = cfg.hydra.launcher
        assert launcher._target_ == target
        assert (launcher.nodes, launcher.tasks_per_node, launcher.timeout_min) == (1, 1, 30)
    run = to_run_config(compose_cluster([f"cluster={preset}"], hydra_cfg=False))
    assert run.cluster.address == address


def test_slurm_resources_override():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_cluster(["cluster=slurm", "hydra.launcher.gpus_per_node=4",
                           "hydra.launcher.partition=gpu"])
    assert cfg.hydra.launcher.gpus_per_node == 4 and cfg.hydra.launcher.partition == "gpu"


def test_submit_script_needs_an_address():
    res = subprocess.run(["bash", str(ROOT / "scripts" / "submit_ray_job.sh"), "sae.k=8"],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert res.returncode == 2 and "--address http://HEAD:8265" in res.stderr


def test_placement_and_slurm_cpus(monkeypatch):
    from distributed_sae.config import ClusterConfig, ConfigError
    from distributed_sae.parallel.cluster import local_cpus, ray_strategy

    assert ray_strategy(ClusterConfig()) == "SPREAD"
    assert ray_strategy(ClusterConfig(), packed=True) == "PACK"  # a latent-sharded bank
    assert ray_strategy(ClusterConfig(placement="pack")) == "PACK"
    with pytest.raises(ConfigError, match="cluster.placement='nodes'"):
        ClusterConfig(placement="nodes")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert local_cpus() == 3  # what SLURM gave the job, not the node's CPUs
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert 1 <= local_cpus() <= os.cpu_count()
