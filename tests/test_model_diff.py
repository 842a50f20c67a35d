"""Model diffing: two models with one tokenizer harvested into one store, a two-model crosscoder
trained on both, and its relative decoder norms (Lindsey et al. 2024, "Sparse Crosscoders").

Two tiny random Llamas (3 layers, 32 wide, different seeds) carry SmolLM2's tokenizer; harvests,
training and eval go through the real entry point (cli.run_stages) on the session's local Ray.
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

from distributed_sae.cli import check_model, check_store, run_stages, to_run_config
from distributed_sae.config import (
    ConfigError, DataConfig, EvalConfig, HarvestConfig, ModelBConfig, ModelConfig, RunConfig,
    SAEConfig, StoreConfig, TrainConfig, parse_hook,
)
from distributed_sae.config.checks import bare_hook, is_model_b
from distributed_sae.config.register import register_configs
from distributed_sae.data import load_contexts
from distributed_sae.eval.diffing import decoder_norm_report
from distributed_sae.harvest import harvest
from distributed_sae.models import load_model, run_with_hooks
from distributed_sae.sae import load_sae
from distributed_sae.sae.bank import build_sae, expand_bank, hook_tag, hooks_tag
from distributed_sae.store import ActivationStore
from conftest import HANG_S

A, B = "blocks.1.hook_resid_post", "b/blocks.1.hook_resid_post"
B_MLP = "b/blocks.2.mlp.hook_post"  # d_mlp wide: the second model's own shape sets the width
CROSSCODER = {"form": "crosscoder", "kind": "batchtopk", "width": 64, "k": 4, "inputs": [A, B]}
N_UNITS, CTX, PER_UNIT = 16, 32, 8  # 4096 tokens of 16 units


def tiny_llama(path: Path, tokenizer, seed: int) -> str:
    """A 3-layer, 32-wide random Llama (weights from `seed`) saved with `tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model_b_dir(tmp_path_factory, smollm2_tokenizer) -> str:
    """The second model: conftest's tiny Llama's shape and tokenizer, other random weights."""
    return tiny_llama(tmp_path_factory.mktemp("model_b"), smollm2_tokenizer, seed=1)


def diff_cfg(out: Path, model_a: str, model_b: str, hooks=(A, B), **train_kw) -> RunConfig:
    """A crosscoder over layer 1 of both models, trained and evaluated on a 4096-token store."""
    return RunConfig(
        model=ModelConfig(name=model_a), model_b=ModelBConfig(name=model_b),
        data=DataConfig(context_size=CTX, n_tokens=CTX * PER_UNIT * N_UNITS, seed=1),
        harvest=HarvestConfig(hooks=list(hooks), num_actors=1, contexts_per_unit=PER_UNIT,
                              batch_size=4),
        store=StoreConfig(path=str(out / "store"), chunk_tokens=64, dtype="float32"),
        sae=SAEConfig(members=[CROSSCODER]),
        train=TrainConfig(**{"batch_size": 128, "tokens": 60_000, "holdout_fraction": 0.25,
                             "log_every": 100, "lr": 3e-3, **train_kw}),
        eval=EvalConfig(spliced_tokens=256, features=False, dashboard=False),
        out_dir=str(out))


def crosscoder_dir(cfg: RunConfig) -> Path:
    return Path(cfg.out_dir) / "eval" / "crosscoder_batchtopk_w64_k4_s0"


@pytest.fixture(scope="module")
def diff_run(tmp_path_factory, ray_local, tiny_llama_dir, model_b_dir) -> RunConfig:
    """Harvest (both models), train and eval of the two-model crosscoder, plus B's MLP."""
    cfg = diff_cfg(tmp_path_factory.mktemp("diff"), tiny_llama_dir, model_b_dir,
                   hooks=(A, B, B_MLP))
    run_stages(cfg, ("harvest", "train", "eval"))
    return cfg


@pytest.fixture(scope="module")
def same_run(tmp_path_factory, ray_local, tiny_llama_dir) -> RunConfig:
    """The same crosscoder where model_b is model itself: both halves see the same rows."""
    cfg = diff_cfg(tmp_path_factory.mktemp("same"), tiny_llama_dir, tiny_llama_dir)
    run_stages(cfg, ("harvest", "train", "eval"))
    return cfg


# ---- names and config ------------------------------------------------------------------------


def test_second_model_hooks_parse_to_the_same_layer_and_kind():
    assert parse_hook("b/blocks.13.hook_resid_post") == parse_hook("blocks.13.hook_resid_post")
    assert parse_hook("b/blocks.3.ln2.hook_normalized") == (3, "ln2.hook_normalized")
    assert is_model_b(B) and not is_model_b(A) and bare_hook(B) == A == bare_hook(A)
    for bad in ("c/blocks.1.hook_resid_post", "b/b/blocks.1.hook_resid_post", "b/layer3",
                "B/blocks.1.hook_resid_post"):
        with pytest.raises(ConfigError, match="unknown hook point"):
            parse_hook(bad)
    # Folder names never collide with the first model's, and one model's layers still collapse.
    assert hook_tag(B) == "b_l1_resid_post" != hook_tag(A) == "l1_resid_post"
    assert hooks_tag([A, B]) == "l1_resid_post+b_l1_resid_post"
    assert hooks_tag(["b/blocks.1.hook_mlp_out", "b/blocks.2.hook_mlp_out"]) == "b_l1-2_mlp_out"
    # A transcoder named by a second-model hook replaces the second model's MLP.
    (spec,) = expand_bank(SAEConfig(members=[{"form": "transcoder", "width": 64, "k": 4,
                                              "hook": "b/blocks.2.hook_mlp_out"}]), [B])
    assert spec.inputs == ("b/blocks.2.ln2.hook_normalized",)
    assert spec.targets == ("b/blocks.2.hook_mlp_out",)


def test_a_second_model_hook_without_model_b_is_refused():
    with pytest.raises(ConfigError) as err:
        RunConfig(harvest=HarvestConfig(hooks=[A, B]), sae=SAEConfig(members=[CROSSCODER]))
    assert "'b/blocks.1.hook_resid_post'" in str(err.value)
    assert "set model_b.name=" in str(err.value)
    cfg = RunConfig(model_b=ModelBConfig(name="HuggingFaceTB/SmolLM2-135M"))
    assert not cfg.harvests_model_b  # a second model without 'b/' hooks is never loaded


def test_model_diff_preset_needs_model_b(tiny_llama_dir):
    register_configs()
    with initialize_config_module("distributed_sae.conf", version_base=None):
        with pytest.raises(ConfigError, match="model_b.name is not set: set model_b.name="):
            to_run_config(compose("config", overrides=["experiment=model-diff"]))
        cfg = to_run_config(compose("config", overrides=[
            "experiment=model-diff", "model_b.name=/some/finetune", "model.dtype=bfloat16"]))
    (spec,) = cfg.bank()
    assert spec.form == "crosscoder"
    assert spec.inputs == ("blocks.15.hook_resid_post", "b/blocks.15.hook_resid_post")
    assert cfg.model_b.dtype == "bfloat16"  # the preset follows model.dtype


def test_second_model_hooks_are_checked_against_its_layers(tiny_llama_dir, model_b_dir, tmp_path):
    check_model(diff_cfg(tmp_path, "smollm2-135m", model_b_dir, hooks=(A, B)))
    # blocks.5 exists in SmolLM2 (30 layers) but not in the 3-layer second model.
    with pytest.raises(ConfigError, match="b/blocks.5.hook_resid_post: layer 5 is out of range"):
        check_model(diff_cfg(tmp_path, "smollm2-135m", model_b_dir,
                             hooks=(A, B, "b/blocks.5.hook_resid_post")))


def test_a_member_of_the_second_model_steers_the_second_model(tmp_path, model_b_dir):
    from distributed_sae.eval.steer import _member_model

    member = {"metadata": {"hook_name": B, "model_b_name": model_b_dir}}
    cfg = diff_cfg(tmp_path, "smollm2-135m", model_b_dir)
    assert _member_model(cfg, member, tmp_path) is cfg.model_b
    assert _member_model(cfg, {"metadata": {"hook_name": A}}, tmp_path) is cfg.model
    with pytest.raises(ConfigError, match=f"set model_b.name={model_b_dir} to steer it"):
        _member_model(RunConfig(), member, tmp_path)


# ---- tokenizers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_tokenizer_dir(tmp_path_factory, tiny_llama_dir) -> str:
    """A model whose tokenizer is SmolLM2's plus one added token: ids no longer mean the same."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.add_tokens(["<dsae_extra_token>"])
    return tiny_llama(tmp_path_factory.mktemp("other_tok"), tokenizer, seed=2)


def test_different_tokenizers_are_refused_before_any_actor_starts(tiny_llama_dir,
                                                                   other_tokenizer_dir, tmp_path,
                                                                   monkeypatch):
    import distributed_sae.harvest.job as job

    def never(*args, **kwargs):
        raise AssertionError("the harvest went on to start Ray actors")

    monkeypatch.setattr(job, "init_ray", never)
    monkeypatch.setattr(job, "run_pool", never)
    cfg = diff_cfg(tmp_path, tiny_llama_dir, other_tokenizer_dir)
    with pytest.raises(ConfigError) as err:
        harvest(cfg)
    message = str(err.value)
    assert "\n" not in message and "different tokenizers" in message
    assert tiny_llama_dir in message and other_tokenizer_dir in message
    assert "'<dsae_extra_token>'" in message and "would not line up" in message
    assert not Path(cfg.store.path).exists()  # refused before the store is made


def test_the_cli_exits_2_with_the_one_line_message(tiny_llama_dir, other_tokenizer_dir, tmp_path):
    args = [sys.executable, "-c", "from distributed_sae.cli import harvest_main; harvest_main()",
            f"model.name={tiny_llama_dir}", f"model_b.name={other_tokenizer_dir}",
            f"harvest.hooks=[{A},{B}]", "sae.hook=" + A, "sae.widths=[64]", "sae.k=4",
            "data.n_tokens=1024", "data.context_size=32", "harvest.contexts_per_unit=8",
            "store.chunk_tokens=256", f"out_dir={tmp_path}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [l for l in (proc.stderr + proc.stdout).splitlines() if "different tokenizers" in l]
    assert len(lines) == 1 and "would not line up" in lines[0]
    assert not (tmp_path / "store").exists()


def test_other_bos_and_eos_with_the_same_vocabulary_only_warn(tmp_path, tiny_llama_dir,
                                                              smollm2_tokenizer, caplog):
    """A base model and its chat fine-tune: one vocabulary, other document markers. The rows
    still line up (warning), and the special tokens of both are excluded."""
    from transformers import AutoTokenizer

    from distributed_sae.harvest.job import check_model_b_tokenizer, excluded_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.bos_token = tokenizer.eos_token = "<|endoftext|>"  # id 0, already in the vocab
    assert tokenizer.get_vocab() == smollm2_tokenizer.get_vocab()
    other = tiny_llama(tmp_path / "chat", tokenizer, seed=3)
    cfg = diff_cfg(tmp_path, tiny_llama_dir, other)
    caplog.set_level("WARNING")
    tokenizer_b = check_model_b_tokenizer(cfg, smollm2_tokenizer)
    assert "share a vocabulary but not their (BOS, EOS) ids, (1, 2) and (0, 0)" in caplog.text
    assert excluded_ids(cfg, smollm2_tokenizer, tokenizer_b) == sorted(
        set(smollm2_tokenizer.all_special_ids) | set(tokenizer_b.all_special_ids))


# ---- the store -------------------------------------------------------------------------------


def test_store_holds_both_models_in_the_same_rows(diff_run, tiny_llama_dir, model_b_dir,
                                                  smollm2_tokenizer):
    store = ActivationStore.open(diff_run.store.path)
    n = store.n_tokens
    assert store.is_complete and n == CTX * PER_UNIT * N_UNITS
    assert store.hook_points == [A, B, B_MLP] and store.d(B) == 32 and store.d(B_MLP) == 64
    meta = store.metadata
    assert (meta["model_name"], meta["model_b_name"]) == (tiny_llama_dir, model_b_dir)
    assert "model_b_revision" in meta and meta["model_b_dtype"] == "float32"
    contexts = load_contexts(diff_run.data, smollm2_tokenizer, n // CTX)
    assert np.array_equal(store.tokens(0, n), contexts.reshape(-1))
    # Rows 3 units in: the second model run by hand on the stored ids gives the stored rows.
    rows = slice(3 * store.unit_rows, 4 * store.unit_rows)
    ids = torch.from_numpy(store.tokens(rows.start, rows.stop).astype(np.int64)).reshape(-1, CTX)
    by_hand = {}
    for name, hooks in ((tiny_llama_dir, [A]), (model_b_dir, [bare_hook(B), bare_hook(B_MLP)])):
        out = run_with_hooks(load_model(ModelConfig(name=name)), ids, hooks)
        by_hand.update({("b/" if name == model_b_dir else "") + h: x.reshape(-1, x.shape[-1])
                        for h, x in out.items()})
    for hook in (A, B, B_MLP):
        torch.testing.assert_close(store.read(hook, rows.start, rows.stop), by_hand[hook],
                                   rtol=1e-5, atol=1e-5)
    assert not torch.allclose(store.read(A, 0, 256), store.read(B, 0, 256))  # two models


def test_store_check_names_the_second_model(diff_run):
    check_store(diff_run)
    other = diff_cfg(Path(diff_run.out_dir), diff_run.model.name, "/elsewhere/model_b")
    with pytest.raises(ConfigError, match="second-model activations of .* model_b.name="
                                          "'/elsewhere/model_b'"):
        check_store(other)


# ---- training and eval -----------------------------------------------------------------------


def test_crosscoder_trains_and_eval_writes_relative_decoder_norms(diff_run, model_b_dir):
    out = crosscoder_dir(diff_run)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["form"] == "crosscoder" and metrics["fvu"] < 0.9
    assert set(metrics["fvu_by_hook"]) == {A, B}
    assert "ce_spliced" not in metrics  # the second model's splice is not run (FVU only)
    report = json.loads((out / "decoder_norms.json").read_text())
    assert report["hooks"] == [A, B] and report["space"] == "trained"
    r = torch.tensor(report["relative_norm"])
    assert r.shape == (64,) and bool(((r >= 0) & (r <= 1)).all())
    hist = report["histogram"]
    assert hist["bins"] == 20 and len(hist["edges"]) == 21
    assert sum(hist["counts"]) == report["n_counted"] > 0
    exclusive, shared = report["exclusive"], report["shared"]
    assert set(exclusive) == {A, B}
    total = exclusive[A] + exclusive[B] + shared
    assert all(0 <= v <= 1 for v in (*exclusive.values(), shared)) and total <= 1 + 1e-9
    live = torch.tensor(report["live"])
    assert exclusive[B] == pytest.approx(float((r[live] > 0.9).float().mean()))
    assert exclusive[A] == pytest.approx(float((r[live] < 0.1).float().mean()))
    assert metrics["decoder_norm_fractions"]["exclusive"] == exclusive
    assert metrics["decoder_norm_fractions"]["shared"] == shared
    assert (out / "decoder_norms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, cfg = load_sae(Path(diff_run.out_dir) / "train" / out.name)
    assert cfg["metadata"]["model_b_name"] == model_b_dir  # provenance of the member


def _distance_from_even(cfg: RunConfig) -> float:
    report = json.loads((crosscoder_dir(cfg) / "decoder_norms.json").read_text())
    r = torch.tensor(report["relative_norm"])[torch.tensor(report["live"])]
    return float((r - 0.5).abs().mean())


def test_one_model_twice_shares_its_features_two_models_do_not(diff_run, same_run):
    """Both halves of the same model's crosscoder see the same rows, so their decoder slices are
    pulled to the same values: r sits at 0.5; two unrelated models' features split up."""
    same, diff = _distance_from_even(same_run), _distance_from_even(diff_run)
    assert same < 0.05 and diff > 2 * same, (same, diff)
    shared_same = json.loads((crosscoder_dir(same_run) / "decoder_norms.json").read_text())
    assert shared_same["shared"] > 0.95


def test_decoder_norm_report_of_known_decoders():
    """Features written to A only, B only, both evenly, and 3:1 (in the trained space, where
    B's scale of 2 doubles its raw slice)."""
    spec = expand_bank(SAEConfig(members=[{**CROSSCODER, "width": 4}]), [A])[0]
    sae = build_sae(spec, {A: 2, B: 2})
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 3, 4], [0, 1, 0.5, 0],
                                      [3, 0, 0, 0.5]]))  # (4, d_A + d_B)
    report = decoder_norm_report(sae, [A, B], scales=[1.0, 2.0], member="known")
    assert report["relative_norm"] == pytest.approx([0.0, 1.0, 0.5, 0.25])
    assert report["exclusive"] == {A: 0.25, B: 0.25} and report["shared"] == 0.25
    raw = decoder_norm_report(sae, [A, B], live=torch.tensor([True, True, False, False]))
    assert raw["relative_norm"][2] == pytest.approx(0.5 / 1.5) and raw["n_counted"] == 2
    assert raw["exclusive"] == {A: 0.5, B: 0.5} and sum(raw["histogram"]["counts"]) == 2


def test_decoder_norm_report_of_three_hooks(tmp_path):
    """More hooks: each hook's share, exclusive per hook, shared = every share near 1/3."""
    hooks = [A, B, "b/blocks.2.hook_resid_post"]
    spec = expand_bank(SAEConfig(members=[{**CROSSCODER, "width": 4, "inputs": hooks}]), [A])[0]
    sae = build_sae(spec, {h: 1 for h in hooks})
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0, 0], [1, 1, 1], [0, 0, 2], [1, 1, 0]]))
    report = decoder_norm_report(sae, hooks, member="three")
    assert report["shares"][hooks[2]] == pytest.approx([0, 1 / 3, 1, 0])
    assert report["exclusive"] == {A: 0.25, B: 0.0, hooks[2]: 0.25}
    assert report["shared"] == 0.25 and "relative_norm" not in report
    assert set(report["histogram"]) == set(hooks)
    from distributed_sae.eval.diffing import plot_decoder_norms

    assert plot_decoder_norms(report, tmp_path / "three.png").stat().st_size > 1000
