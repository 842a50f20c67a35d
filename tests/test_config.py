"""Config validation: every preset composes; every invalid value is refused with its message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from distributed_sae.cli import check_model, to_run_config
from distributed_sae.config import ConfigError, RunConfig, parse_hook
from distributed_sae.config.register import register_configs
from conftest import HANG_S

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())


def compose_run(overrides: list[str]) -> RunConfig:
    register_configs()
    with initialize_config_module("distributed_sae.conf", version_base=None):
        return to_run_config(compose("config", overrides=overrides))


def test_conf_has_every_stage_group():
    assert set(GROUPS) >= {"model", "data", "harvest", "store", "sae", "train", "eval", "export",
                           "cluster", "experiment", "debug"}


# Presets that need a value no preset can name: model-diff's second model exists only online
# (tests/test_model_diff.py checks the message without it).
REQUIRED = {"experiment=model-diff": ["model_b.name=HuggingFaceTB/SmolLM2-135M"]}


@pytest.mark.parametrize("preset", [f"{g}={p.stem}" for g in GROUPS
                                    for p in sorted((CONF / g).glob("*.yaml"))])
def test_every_preset_composes(preset):
    cfg = compose_run([preset, *REQUIRED.get(preset, [])])
    assert isinstance(cfg, RunConfig)
    group, name = preset.split("=")
    if group == "debug" and name == "tiny":
        assert cfg.sae.widths == [256, 512] and cfg.data.n_tokens == 16384


def test_default_config_and_user_keys():
    cfg = compose_run(["model=smollm2-135m", "sae.widths=[2304,4608]", "data.n_tokens=40000",
                       "harvest.hooks=[blocks.3.hook_resid_pre]", "harvest.num_actors=1",
                       "store.path=/tmp/x", "sae.kind=topk", "sae.k=16", "train.tokens=1000",
                       "out_dir=/tmp/o"])
    assert cfg.store.path == "/tmp/x" and cfg.export.path == "/tmp/o/export"
    assert cfg.sae_hook == "blocks.3.hook_resid_pre" and cfg.sae.widths == [2304, 4608]
    assert cfg.train.tokens == 1000 and cfg.harvest.num_actors == 1 and cfg.data.n_tokens == 40000
    default = compose_run([])
    assert default.store.path == "runs/default/store"


@pytest.mark.parametrize("override, message", [
    ("harvest.hooks=[blocks.3.hook_resid_middle]", "unknown hook point 'blocks.3.hook_resid_middle'"),
    ("harvest.hooks=[layer3]", "unknown hook point 'layer3'"),
    ("sae.widths=[2304,0]", "sae.widths has 0"),
    ("sae.widths=[-5]", "sae.widths has -5"),
    ("sae.k=4000", "sae.k=4000 is larger than width(s) [2304]"),
    ("sae.k=0", "sae.k must be positive, got 0"),
    ("model.dtype=float8", "model.dtype='float8' is not one of"),
    ("store.chunk_tokens=1000", "store.chunk_tokens=1000 must divide"),
    ("sae.hook=blocks.2.hook_resid_post", "sae.hook='blocks.2.hook_resid_post' is not harvested"),
    ("train.holdout_fraction=1.5", "train.holdout_fraction must be in (0, 1), got 1.5"),
    ("data.n_tokens=0", "data.n_tokens must be positive, got 0"),
    ("train.outlier_norm_ratio=0.8", "train.outlier_norm_ratio=0.8 would drop"),
])
def test_invalid_values_are_refused(override, message):
    with pytest.raises(ConfigError) as err:
        compose_run([override])
    assert message in str(err.value)


def test_layer_out_of_range_is_refused_at_startup():
    cfg = compose_run(["harvest.hooks=[blocks.40.hook_resid_post]"])
    with pytest.raises(ConfigError, match="40"):
        check_model(cfg)  # SmolLM2 has 30 layers; read from the registry, weights not loaded
    check_model(compose_run(["harvest.hooks=[blocks.29.hook_resid_post]"]))


def test_parse_hook():
    assert parse_hook("blocks.15.mlp.hook_post") == (15, "mlp.hook_post")
    assert parse_hook("blocks.0.hook_attn_out") == (0, "hook_attn_out")
    assert parse_hook("blocks.3.ln2.hook_normalized") == (3, "ln2.hook_normalized")
    for bad in ("blocks.3.ln2", "blocks.3.ln2.hook_normalised", "blocks.3.ln1.hook_normalized"):
        with pytest.raises(ConfigError, match="unknown hook point"):
            parse_hook(bad)


def test_cli_exits_nonzero_with_the_message(tmp_path):
    """The entry point prints the bad value and the fix, exits 2, and writes nothing."""
    proc = subprocess.run(
        [sys.executable, "-c", "from distributed_sae.cli import train_main; train_main()",
         "sae.widths=[16]", f"out_dir={tmp_path}/o"],
        capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 2, proc.stderr
    assert "sae.k=32 is larger than width(s) [16]" in proc.stderr + proc.stdout
    assert not (tmp_path / "o" / "train").exists()


@pytest.mark.parametrize("overrides, message", [
    (["train.workers=3"], "train.batch_size=1024 is not divisible by train.workers=3"),
    (["train.workers=2", "train.checkpoint_every=10", "train.data_parallel=zero2"],
     "train.checkpoint_every with train.workers > 1 needs train.placement=cost and "
     "train.data_parallel=ddp (got cost, zero2"),
    (["train.placement=spread"], "train.placement='spread' is not one of cost, replicate"),
    (["train.workers=2", "sae=relu"], "neuron resampling is not supported with train.workers > 1"),
    (["train.data_parallel=zero3"], "train.data_parallel='zero3' is not one of ddp, zero2"),
])
def test_data_parallel_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose_run(overrides)
    assert message in str(err.value)
    assert compose_run(["train.workers=2", "sae=relu", "train.resample_steps=[]"]).train.workers == 2


@pytest.mark.parametrize("overrides, message", [
    (["train.workers=3", "train.latent_shards=2"],
     "train.workers=3 is not a multiple of train.latent_shards=2"),
    (["train.workers=4", "train.latent_shards=2", "train.batch_size=1023"],
     "train.batch_size=1023 is not divisible by the 2 data-parallel replicas"),
    (["train.workers=2", "train.latent_shards=2", "train.data_parallel=zero2"],
     "train.latent_shards=2 needs train.data_parallel=ddp"),
    (["train.workers=2", "train.latent_shards=2", "sae.widths=[2304,4609]"],
     "sae.widths [4609] are not multiples of train.latent_shards=2"),
    (["train.workers=2", "train.latent_shards=2", "sae.kind=matryoshka"],
     "sae.kind=matryoshka cannot be latent-sharded"),
    (["train.latent_shards=0"], "train.latent_shards must be positive"),
])
def test_latent_shard_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose_run(overrides)
    assert message in str(err.value)


def test_latent_shards_split_the_batch_over_replicas_only():
    # 6 workers = 2 replicas x 3 shards: the batch (1024) splits over the 2 replicas, not over 6;
    # checkpoints are allowed whatever train.placement says (it does not apply when sharded).
    cfg = compose_run(["train.workers=6", "train.latent_shards=3", "train.checkpoint_every=10",
                       "train.placement=replicate"])
    assert (cfg.train.workers, cfg.train.latent_shards, cfg.train.batch_size) == (6, 3, 1024)
