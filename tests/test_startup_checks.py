"""Start-up checks of the entry points: the store that train and eval read must exist and match
model.name and the bank's hooks; a harvest layer past the model's depth and a GPU index that Ray
cannot give an actor are refused before Ray starts; harvest.gpus_per_actor's default follows
model.device. Every check here is pure or a short subprocess: no Ray, no model weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HANG_S, write_sparse_store
from distributed_sae.cli import check_model, check_store
from distributed_sae.config import (
    ConfigError, HarvestConfig, ModelConfig, RunConfig, SAEConfig, StoreConfig,
)
from distributed_sae.harvest.job import actor_gpus

HOOK = "blocks.0.hook_resid_post"  # the hook of write_sparse_store's synthetic store


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("startup") / "store"
    write_sparse_store(path, n_units=2)  # model_name 'synthetic'
    return str(path)


def run_cfg(store: str = "/nowhere", model: str = "synthetic", hooks: tuple[str, ...] = (HOOK,),
            sae_hook: str | None = None, device: str = "cpu", members: list | None = None,
            **harvest) -> RunConfig:
    device_map = "auto" if harvest.get("sharding") == "device_map" else None
    return RunConfig(model=ModelConfig(name=model, device=device, device_map=device_map),
                     store=StoreConfig(path=store),
                     harvest=HarvestConfig(hooks=list(hooks), **harvest),
                     sae=SAEConfig(widths=[64], hook=sae_hook, members=members or []))


def entry(main: str, *overrides: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """A console entry point of cli.py in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-c", f"from distributed_sae.cli import {main}; {main}()",
         f"out_dir={tmp_path}/o", *overrides], capture_output=True, text=True, timeout=HANG_S)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    # Hydra's console log handler writes to stdout; a traceback would land on stderr.
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "ERROR" in line]


def test_a_matching_store_passes(store_path):
    check_store(run_cfg(store_path))
    check_store(run_cfg(store_path, hooks=(HOOK, "blocks.1.hook_resid_post"), sae_hook=HOOK))


@pytest.mark.parametrize("kwargs, message", [
    (dict(store="/nowhere/store"), "store.path=/nowhere/store holds no activation store: run "
                                   "dsae-harvest store.path=/nowhere/store first"),
    (dict(model="smollm2-135m"), "holds activations of 'synthetic' but model.name='smollm2-135m': "
                                 "set model.name=synthetic"),
    (dict(hooks=("blocks.3.hook_mlp_out",)),
     f"holds hooks [{HOOK}]; harvest.hooks wants blocks.3.hook_mlp_out: harvest it (dsae-harvest "
     f"harvest.hooks=[blocks.3.hook_mlp_out] into another store.path) or choose a stored hook "
     f"(harvest.hooks=[{HOOK}])"),
    (dict(hooks=(HOOK, "blocks.3.hook_mlp_out"), sae_hook="blocks.3.hook_mlp_out"),
     "sae.hook wants blocks.3.hook_mlp_out"),
    (dict(members=[{"width": 64}, {"width": 64, "hook": "blocks.3.hook_mlp_out"}]),
     # refused when the config is built: the member's hook is not among harvest.hooks
     "member l3_mlp_out.topk_w64_k32_s1 (sae) reads or reconstructs ['blocks.3.hook_mlp_out'], "
     "not harvested: add it to harvest.hooks="),
])
def test_a_store_that_does_not_match_is_refused(store_path, kwargs, message):
    with pytest.raises(ConfigError) as err:
        check_store(run_cfg(**{"store": store_path, **kwargs}))
    assert message in str(err.value)


def test_dsae_train_and_eval_exit_2_with_one_line(store_path, tmp_path):
    """Through the real entry points: exit status 2, one error line naming the bad value, and
    neither stage started (no train/ or eval/ folder)."""
    proc = entry("train_main", f"store.path={store_path}", "model.name=synthetic",
                 "harvest.hooks=[blocks.2.hook_resid_post]", tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = error_lines(proc)
    assert "harvest.hooks wants blocks.2.hook_resid_post" in line and store_path in line
    proc = entry("eval_main", f"store.path={tmp_path}/missing", tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = error_lines(proc)
    assert f"store.path={tmp_path}/missing holds no activation store" in line
    assert not (tmp_path / "o" / "train").exists() and not (tmp_path / "o" / "eval").exists()


def test_dsae_harvest_refuses_a_layer_past_the_depth_before_ray(tmp_path):
    """SmolLM2 has 30 layers (model_dims reads the registry, no weights): layer 40 exits 2 before
    Ray starts (no 'Ray instance' log line) and before the store is created."""
    proc = entry("harvest_main", "harvest.hooks=[blocks.40.hook_resid_post]", tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = error_lines(proc)
    assert "blocks.40.hook_resid_post: layer 40 is out of range for a 30-layer model" in line
    assert "Ray instance" not in proc.stdout + proc.stderr
    assert not (tmp_path / "o" / "store").exists()


@pytest.mark.parametrize("device, harvest, gpus", [
    ("cpu", {}, 0.0),
    ("cuda", {}, 1.0),
    ("cuda:0", {}, 1.0),
    ("cuda", {"gpus_per_actor": 0.5}, 0.5),  # set by hand: taken as it is
    ("cuda", {"gpus_per_actor": 0}, 0.0),
    ("cpu", {"gpus_per_actor": 2}, 2.0),
    ("cuda", {"sharding": "deepspeed"}, 1.0),  # one rank per GPU
    ("cuda", {"sharding": "device_map"}, 0.0),  # the GPUs one model spans are not known
    ("cuda", {"sharding": "device_map", "gpus_per_actor": 4}, 4.0),
    ("cuda:1", {"gpus_per_actor": 0}, 0.0),  # placed by the user, not by Ray
])
def test_gpus_per_actor_follows_model_device(device, harvest, gpus):
    assert actor_gpus(run_cfg(device=device, **harvest)) == gpus


def test_a_gpu_index_ray_cannot_give_is_refused_at_startup():
    """Ray shows an actor only its own GPU, as cuda:0; the harvest start-up check says so."""
    cfg = run_cfg(hooks=("blocks.15.hook_resid_post",), model="smollm2-135m", device="cuda:1")
    with pytest.raises(ConfigError, match=r"model.device='cuda:1'.*use model.device=cuda"):
        check_model(cfg)
    assert HarvestConfig().gpus_per_actor is None
    with pytest.raises(ConfigError, match="harvest.gpus_per_actor must be >= 0, got -1"):
        HarvestConfig(gpus_per_actor=-1)
