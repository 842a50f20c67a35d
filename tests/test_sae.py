"""The TopK SAE, its training step, and its SAELens-format files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from distributed_sae.config import RunConfig, SAEConfig, TrainConfig
from distributed_sae.eval import evaluate_sae
from distributed_sae.sae import TopKSAE, sae_member, expand_bank, load_sae, save_sae
from distributed_sae.train import BankTrainer
from distributed_sae.train.optim import to_saved


def sparse_data(n=4096, d=32, n_features=96, k=3, seed=0):
    """Each row is a sum of k of n_features random unit directions with positive weights."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_features, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    idx = torch.randint(0, n_features, (n, k), generator=g)
    w = torch.rand(n, k, generator=g) + 0.5
    return (w[..., None] * dirs[idx]).sum(1)  # (n, d)


def test_encode_keeps_at_most_k_nonnegative_latents():
    sae = TopKSAE(20, 64, k=5, seed=1)
    f = sae.encode(torch.randn(30, 20))
    assert f.shape == (30, 64)
    assert ((f > 0).sum(1) <= 5).all() and (f >= 0).all()
    assert torch.allclose(sae(torch.randn(3, 20)).shape[-1] * torch.ones(1), torch.tensor([20.0]))


def test_k_out_of_range_is_refused():
    with pytest.raises(ValueError, match="k=65"):
        TopKSAE(20, 64, k=65)


def test_auxk_term_only_with_dead_latents_and_it_has_gradients_on_dead_rows():
    sae = TopKSAE(16, 48, k=4, seed=0)
    x = torch.randn(64, 16)
    assert "auxk" not in sae.loss(x).terms
    dead = torch.zeros(48, dtype=torch.bool)
    dead[:10] = True
    out = sae.loss(x, dead=dead)
    assert out.terms["auxk"] > 0
    sae.zero_grad()
    out.terms["auxk"].backward()
    assert sae.W_dec.grad[:10].abs().sum() > 0 and sae.W_dec.grad[10:].abs().sum() == 0


def test_fold_input_scale_gives_the_same_function_on_raw_inputs():
    sae = TopKSAE(16, 40, k=6, seed=3)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(50, 16) * 7.0
    scale = 0.3
    trained_on_scaled = sae(x * scale) / scale
    sae.fold_input_scale(scale)
    assert torch.allclose(sae(x), trained_on_scaled, atol=1e-4)


def test_decoder_constraint_keeps_unit_norm_rows():
    sae = TopKSAE(16, 40, k=4)
    sae.loss(torch.randn(32, 16)).loss.backward()
    sae.remove_parallel_grad()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(40), atol=1e-6)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(40), atol=1e-6)


def test_training_learns_sparse_structure():
    """A bank trained on synthetic sparse data ends far below the mean predictor (FVU 1)."""
    x = sparse_data()
    cfg = RunConfig(sae=SAEConfig(widths=[96, 192], k=3),
                    train=TrainConfig(batch_size=256, dead_tokens=2048))  # the default optimiser
    steps = 300
    bank = BankTrainer(cfg, expand_bank(cfg.sae, "blocks.0.hook_resid_post"), 32, x.mean(0), steps)
    members = bank.members
    before = evaluate_sae(members[0].sae, [x])["fvu"]
    for step in range(steps):
        bank.step(x[(step * 256) % 4096:(step * 256) % 4096 + 256])
    to_saved(members, cfg.train.signum_unit_decoder)  # the weights the trainer saves
    for m in members:
        after = evaluate_sae(m.sae, [x])
        assert after["fvu"] < 0.2 < before, (before, after["fvu"])
        assert after["l0"] <= 3


def test_bank_expands_one_member_per_width():
    specs = expand_bank(SAEConfig(widths=[64, 128, 256], k=8, seed=5), "blocks.0.hook_resid_post")
    assert [s.width for s in specs] == [64, 128, 256] and [s.seed for s in specs] == [5, 6, 7]
    assert len({s.member_id for s in specs}) == 3


def test_save_load_round_trip_and_saelens_keys(tmp_path):
    sae = TopKSAE(16, 40, k=6, seed=2)
    with torch.no_grad():
        sae.b_dec.normal_()
    save_sae(sae, tmp_path / "m", metadata={"hook_name": "blocks.0.hook_resid_post"})
    cfg = json.loads((tmp_path / "m" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 6 and cfg["d_in"] == 16
    assert cfg["d_sae"] == 40 and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["sae_lens_version"] >= "6"
    weights = load_file(str(tmp_path / "m" / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "W_enc": (16, 40), "b_enc": (40,), "W_dec": (40, 16), "b_dec": (16,)}
    back, _ = load_sae(tmp_path / "m")
    x = torch.randn(10, 16)
    assert torch.equal(back(x), sae(x))


def test_load_refuses_mismatched_shapes(tmp_path):
    save_sae(TopKSAE(16, 40, k=6), tmp_path / "m")
    weights = load_file(str(tmp_path / "m" / "sae_weights.safetensors"))
    weights["W_dec"] = weights["W_dec"][:30]
    save_file(weights, str(tmp_path / "m" / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=r"W_dec has shape \(30, 16\) but cfg.json says \(40, 16\)"):
        load_sae(tmp_path / "m")


def test_member_ids_are_stable():
    assert sae_member("h", "topk", 2304, seed=0, k=32).member_id == "topk_w2304_k32_s0"


def test_a_save_that_dies_midway_leaves_the_previous_member_loadable(tmp_path, monkeypatch):
    """Member files are written atomically (write, fsync, rename), weights first, cfg.json
    last: a crash inside the weights write leaves the old folder whole."""
    import distributed_sae.sae.serialization as ser

    old = TopKSAE(16, 40, k=6, seed=1)
    save_sae(old, tmp_path / "m")

    def dying_save(tensors, path):
        with open(path, "wb") as fh:
            fh.write(b"\0" * 100)  # a partial file, then the process dies
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ser, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_sae(TopKSAE(16, 40, k=6, seed=2), tmp_path / "m")
    back, _ = load_sae(tmp_path / "m")
    assert torch.equal(back.W_dec, old.W_dec)


def test_weights_at_odds_with_their_cfg_are_refused(tmp_path):
    """cfg.json records the weights' sha256: weights from another save (a crash between the two
    files, or a hand edit) are named, not loaded."""
    import shutil

    save_sae(TopKSAE(16, 40, k=6, seed=1), tmp_path / "a")
    save_sae(TopKSAE(16, 40, k=6, seed=2), tmp_path / "b")
    shutil.copyfile(tmp_path / "b" / "sae_weights.safetensors",
                    tmp_path / "a" / "sae_weights.safetensors")
    with pytest.raises(ValueError, match="not the file its cfg.json was saved with"):
        load_sae(tmp_path / "a")
