"""The walking skeleton end to end on the real SmolLM2, a real local Ray instance and real zarr.

One module-scoped run (2 harvest actors, ~8k tokens) feeds the checks; resuming, refusal of a
different store and Hydra sweeps reuse its store.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from distributed_sae.cli import run_stages, to_run_config
from distributed_sae.config import ConfigError
from distributed_sae.config.register import register_configs
from distributed_sae.data import load_contexts
from distributed_sae.models import load_tokenizer
from distributed_sae.sae import load_sae
from distributed_sae.store import ActivationStore
from conftest import HANG_S

TINY = ["debug=tiny", "data.n_tokens=8192", "harvest.num_actors=2", "sae.widths=[128,256]",
        "train.holdout_fraction=0.25"]


def compose_run(overrides):
    register_configs()
    with initialize_config_module("distributed_sae.conf", version_base=None):
        return to_run_config(compose("config", overrides=overrides))


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("run")
    cfg = compose_run(TINY + [f"out_dir={out}"])
    run_stages(cfg, ("harvest", "train", "eval", "export"))
    return cfg


def test_store_holds_the_corpus_tokens_in_order(done_run):
    store = ActivationStore.open(done_run.store.path)
    assert store.is_complete and store.n_tokens == 8192
    contexts = load_contexts(done_run.data, load_tokenizer(done_run.model), 8192 // 128)
    assert np.array_equal(store.tokens(0, 8192), contexts.reshape(-1))
    x = store.read("blocks.15.hook_resid_post", 0, 8192)
    assert x.shape == (8192, 576) and torch.isfinite(x).all() and x.abs().sum() > 0
    assert store.metadata["model_name"] == "smollm2-135m" and store.metadata["dtype"] == "float16"
    stats = store.stats("blocks.15.hook_resid_post")
    assert stats["count"] < 8192  # BOS rows are excluded from the statistics


def test_every_member_learned_something(done_run):
    summary = (Path(done_run.out_dir) / "eval" / "summary.md").read_text()
    for width in (128, 256):
        m = json.loads((Path(done_run.out_dir) / "eval" / f"topk_w{width}_k8_s{width // 256}"
                        / "metrics.json").read_text())
        assert m["fvu"] < 0.9 and 0 < m["l0"] <= 8 and m["n_tokens"] > 1000
        assert f"topk_w{width}_k8" in summary


def test_eval_reports_spliced_loss_features_and_dashboards(done_run):
    """dsae-eval on the real model: loss recovered and KL for every member, top contexts that
    are real CPython text, feature splitting across the two widths, and the HTML pages."""
    eval_dir = Path(done_run.out_dir) / "eval"
    tokenizer = load_tokenizer(done_run.model)
    for width in (128, 256):
        name = f"topk_w{width}_k8_s{width // 256}"
        m = json.loads((eval_dir / name / "metrics.json").read_text())
        # An SAE with FVU < 0.9 must beat zero-ablation; the clean model must beat both.
        assert m["ce_clean"] < m["ce_spliced"] < m["ce_zero"], m
        assert 0 < m["loss_recovered"] < 1 and m["kl_div"] > 0
        features = json.loads((eval_dir / name / "features.json").read_text())
        assert features["d_sae"] == width and len(features["features"]) == width
        live = [f for f in features["features"] if f["top_contexts"]]
        assert live, "no feature fired on the held-out tokens"
        ctx = max(live, key=lambda f: f["density"])["top_contexts"][0]
        text = "".join(ctx["tokens"])
        # The tokens decode back to the store's text: find the window in the held-out tokens.
        assert len(ctx["tokens"]) > 1 and text.strip()
        assert ctx["acts"][ctx["focus"]] == pytest.approx(ctx["activation"], rel=1e-4)
        assert text in tokenizer.decode(ActivationStore.open(done_run.store.path).tokens(0, 8192))
        page = (eval_dir / name / "dashboard.html").read_text()
        assert "application/json" in page and name in page
    assert (eval_dir / "index.html").is_file() and (eval_dir / "frontier.png").is_file()
    split = json.loads((eval_dir / "splitting.json").read_text())
    assert list(split) == ["topk_w128_k8_s0->topk_w256_k8_s1"]
    assert 0 < split["topk_w128_k8_s0->topk_w256_k8_s1"]["mean_max_cosine"] <= 1


def test_dsae_steer_changes_the_generation(done_run):
    """The console entry point with its short keys, on the real model: a strong feature added at
    layer 15 changes the greedy continuation; an out-of-range feature exits 2 with the range."""
    member = "topk_w128_k8_s0"
    feats = json.loads((Path(done_run.out_dir) / "eval" / member / "features.json").read_text())
    best = max(feats["features"], key=lambda f: f["density"])
    scale = 20 * best["quantiles"]["max"]
    entry = "from distributed_sae.cli import steer_main; steer_main()"
    args = [sys.executable, "-c", entry, *TINY, f"out_dir={done_run.out_dir}",
            f"member={member}", f"feature={best['index']}", f"scale={scale}", "max_new_tokens=6"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((Path(done_run.out_dir) / "steer" /
                      f"{member}_f{best['index']}_x{scale:g}.json").read_text())
    assert out["text_clean"] != out["text_steered"] and out["text_clean"].strip()
    bad = subprocess.run(args[:-3] + ["feature=128"], capture_output=True, text=True, timeout=HANG_S)
    assert bad.returncode == 2 and "steer.feature=128 is out of range" in bad.stderr + bad.stdout


def test_export_is_loadable_and_identical_to_the_trained_member(done_run):
    for folder in sorted(Path(done_run.export.path).iterdir()):
        exported, cfg = load_sae(folder)
        trained, _ = load_sae(Path(done_run.out_dir) / "train" / folder.name)
        x = ActivationStore.open(done_run.store.path).read("blocks.15.hook_resid_post", 0, 64)
        assert torch.equal(exported(x), trained(x))
        assert cfg["metadata"]["hook_name"] == "blocks.15.hook_resid_post"
        assert {p.name for p in folder.iterdir()} >= {
            "cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "metrics.json", "README.md"}


def test_restart_skips_committed_units_and_redoes_lost_ones(done_run, caplog):
    store = ActivationStore.open(done_run.store.path)
    before = store.read("blocks.15.hook_resid_post", 0, 8192)
    for unit in (2, 5):  # as if the job died after writing these units but before committing
        (Path(done_run.store.path) / "_commits" / f"u{unit:08d}.json").unlink()
    caplog.set_level("INFO")
    run_stages(done_run, ("harvest",))
    assert "harvesting 2 of 8 units" in caplog.text
    after = ActivationStore.open(done_run.store.path)
    assert after.is_complete and torch.equal(after.read("blocks.15.hook_resid_post", 0, 8192), before)
    caplog.clear()
    run_stages(done_run, ("harvest",))
    assert "nothing to harvest" in caplog.text


def test_a_store_made_with_other_settings_is_refused(done_run):
    other = compose_run(TINY + [f"out_dir={done_run.out_dir}", "harvest.hooks=[blocks.3.hook_mlp_out]"])
    with pytest.raises(ConfigError, match="was made with other settings.*hooks"):
        run_stages(other, ("harvest",))


def test_multirun_sweep_trains_one_bank_per_job(done_run, tmp_path):
    """`--multirun` through the real entry point: each job gets its own out_dir."""
    args = [f"store.path={done_run.store.path}", "debug=tiny", "train.holdout_fraction=0.25",
            "sae.widths=[64],[96]", f"out_dir={tmp_path}", "--multirun"]
    proc = subprocess.run(
        [sys.executable, "-c", "from distributed_sae.cli import train_main; train_main()", *args],
        capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    banks = sorted(tmp_path.glob("multirun/*/*/train/bank.json"))
    assert [json.loads(b.read_text())["members"] for b in banks] == [["topk_w64_k8_s0"], ["topk_w96_k8_s0"]]
