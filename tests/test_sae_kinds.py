"""The relu (two recipes), batchtopk, jumprelu and matryoshka SAEs: interface, files, training."""

from __future__ import annotations

import json
import math
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from distributed_sae.config import SAEConfig, TrainConfig
from distributed_sae.sae import (SAE_CLASSES, BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE, ReLUSAE,
                                 SparseAutoencoder, load_sae, save_sae)
from distributed_sae.sae.matryoshka import prefix_sizes
from distributed_sae.train.resampling import resample_dead

D_IN, D_SAE = 32, 96

# name -> (factory(d_in, d_sae), SAELens architecture)
KINDS: dict[str, tuple[Callable[[int, int], SparseAutoencoder], str]] = {
    "relu": (lambda d, m: ReLUSAE(d, m, l1_coefficient=0.05), "standard"),
    "relu_april": (lambda d, m: ReLUSAE(d, m, l1_coefficient=0.05, recipe="april_2024"),
                   "standard"),
    "batchtopk": (lambda d, m: BatchTopKSAE(d, m, k=3), "jumprelu"),
    "jumprelu": (lambda d, m: JumpReLUSAE(d, m, l0_coefficient=0.01, init_threshold=0.3,
                                          bandwidth=0.2), "jumprelu"),
    "matryoshka": (lambda d, m: MatryoshkaSAE(d, m, k=3, fractions=[0.25, 0.5, 1.0]), "jumprelu"),
}
THRESHOLDED = {"batchtopk", "jumprelu", "matryoshka"}


def sparse_data(n: int = 4096, d: int = D_IN, n_features: int = 96, k: int = 3,
                seed: int = 0) -> torch.Tensor:
    """Sums of k of n_features random unit directions with weights in [0.5, 1.5), scaled so
    E||x||^2 = d as the trainer scales its inputs. (n, d)"""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_features, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    idx = torch.randint(0, n_features, (n, k), generator=g)
    w = torch.rand(n, k, generator=g) + 0.5
    x = (w[..., None] * dirs[idx]).sum(1)
    return x * math.sqrt(d / float(x.pow(2).sum(1).mean()))


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return sparse_data()


def adam_step(sae: SparseAutoencoder, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One step honouring the kind's flags, as the trainer must."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if sae.unit_norm_decoder:
        sae.remove_parallel_grad()
    if sae.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), sae.grad_clip)
    opt.step()
    if sae.unit_norm_decoder:
        sae.normalize_decoder()


def fit(sae: SparseAutoencoder, x: torch.Tensor, steps: int = 300, lr: float = 1e-2,
        batch: int = 256, resample_at: tuple[int, ...] = (), window: int = 50) -> torch.Tensor:
    """Train on x with Adam; resample features idle for `window` steps at `resample_at`.
    Returns the features that did not fire in the last `window` steps (d_sae,) bool."""
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    idle = torch.zeros(sae.d_sae, dtype=torch.long)  # steps since each feature last fired
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        if step in resample_at:
            dead = idle >= window
            resample_dead(sae, opt, x[torch.randperm(x.shape[0], generator=gen)[:1024]], dead, gen)
            idle[dead] = 0
        start = (step * batch) % x.shape[0]
        out = sae.loss(x[start:start + batch], sparsity_scale=sae.sparsity_scale_at(step, steps))
        adam_step(sae, opt, out.loss)
        idle += 1
        idle[out.fired] = 0
    return idle >= window


@torch.no_grad()
def fvu_l0(sae: SparseAutoencoder, x: torch.Tensor) -> tuple[float, float]:
    """FVU and mean L0 of the inference function (eval mode) on x."""
    was_training = sae.training
    sae.eval()
    f = sae.encode(x)  # (n, d_sae)
    err = (sae.decode(f) - x).pow(2).sum()
    sae.train(was_training)
    return float(err / (x - x.mean(0)).pow(2).sum()), float((f != 0).sum(1).float().mean())


def perturbed(name: str) -> SparseAutoencoder:
    """A kind with non-trivial biases and thresholds, so round trips test every tensor."""
    sae = KINDS[name][0](16, 40)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(16, generator=g))
        sae.b_enc.copy_(torch.randn(40, generator=g) * 0.1)
        if isinstance(sae, BatchTopKSAE):
            sae.threshold.fill_(0.4)
        if isinstance(sae, JumpReLUSAE):
            sae.log_threshold.copy_(torch.randn(40, generator=g) * 0.3 - 1.0)
    return sae


# ---- the shared interface --------------------------------------------------------------------
def test_every_kind_is_registered():
    assert set(SAE_CLASSES) >= {"topk", "relu", "batchtopk", "jumprelu", "matryoshka"}


@pytest.mark.parametrize("name", KINDS)
def test_forward_shapes_and_loss_output(name):
    sae = KINDS[name][0](D_IN, D_SAE)
    x = torch.randn(64, D_IN)
    assert sae.encode(x).shape == (64, D_SAE) and sae(x).shape == (64, D_IN)
    out = sae.loss(x, dead=torch.ones(D_SAE, dtype=torch.bool))
    assert out.loss.shape == () and out.x_hat.shape == (64, D_IN)
    assert out.fired.shape == (D_SAE,) and out.fired.dtype == torch.bool and out.fired.any()
    assert all(v.shape == () for v in out.terms.values()) and "mse" in out.terms
    out.loss.backward()
    assert sae.W_enc.grad is not None and sae.W_dec.grad is not None


@pytest.mark.parametrize("name", KINDS)
def test_save_load_round_trip_and_saelens_format(name, tmp_path):
    sae = perturbed(name).eval()
    save_sae(sae, tmp_path / name)
    cfg = json.loads((tmp_path / name / "cfg.json").read_text())
    assert cfg["architecture"] == KINDS[name][1] and (cfg["d_in"], cfg["d_sae"]) == (16, 40)
    assert cfg["metadata"]["dsae_kind"] == sae.kind
    shapes = {k: tuple(v.shape) for k, v in
              load_file(str(tmp_path / name / "sae_weights.safetensors")).items()}
    want = {"W_enc": (16, 40), "b_enc": (40,), "W_dec": (40, 16), "b_dec": (16,)}
    if name in THRESHOLDED:
        want["threshold"] = (40,)
    assert shapes == want
    back, _ = load_sae(tmp_path / name)
    assert type(back) is type(sae) and not back.training
    assert back.extra_state() == sae.extra_state()
    x = torch.randn(50, 16) * 2
    assert torch.equal(back(x), sae(x))


@pytest.mark.parametrize("name", KINDS)
def test_fold_input_scale_gives_the_same_function_on_raw_inputs(name):
    sae = perturbed(name).eval()
    x = torch.randn(50, 16) * 7.0
    scale = 0.3
    f_scaled, out_scaled = sae.encode(x * scale), sae(x * scale) / scale
    assert (f_scaled != 0).any() and (f_scaled == 0).any()  # the thresholds matter here
    sae.fold_input_scale(scale)
    assert torch.allclose(sae.encode(x), f_scaled, atol=1e-5)
    assert torch.allclose(sae(x), out_scaled, atol=1e-4)


@pytest.mark.parametrize("name,max_l0", [("relu", 20), ("relu_april", 16), ("batchtopk", 3.6),
                                         ("jumprelu", 16), ("matryoshka", 3.6)])
def test_each_kind_learns_sparse_structure(name, max_l0, data):
    sae = KINDS[name][0](D_IN, D_SAE)
    before, _ = fvu_l0(sae, data)
    fit(sae, data)
    fvu, l0 = fvu_l0(sae, data)
    assert fvu < 0.3 < before and 1 <= l0 <= max_l0, (before, fvu, l0)


def test_from_config_fills_each_kind_from_the_run_config():
    sae_cfg = SAEConfig(widths=[64], k=5, l1_coefficient=0.2, recipe="april_2024",
                        l0_coefficient=0.03, jumprelu_threshold=0.2, jumprelu_bandwidth=0.1,
                        matryoshka_fractions=[0.25, 1.0])
    train = TrainConfig(auxk_coefficient=0.1)
    built = {kind: cls.from_config(16, 64, sae_cfg, train, seed=3) for kind, cls in
             SAE_CLASSES.items()}
    assert built["relu"].extra_state() == {"l1_coefficient": 0.2, "recipe": "april_2024"}
    assert built["jumprelu"].extra_state() == {"l0_coefficient": 0.03, "init_threshold": 0.2,
                                               "bandwidth": 0.1}
    assert built["matryoshka"].prefixes == [16, 64] and built["matryoshka"].k == 5
    assert built["batchtopk"].auxk_coefficient == 0.1 and built["topk"].k == 5
    assert MatryoshkaSAE.from_config(16, 64, sae_cfg, train, k=7).k == 7  # overrides win


# ---- relu --------------------------------------------------------------------------------------
def test_relu_recipes_loss_and_flags():
    x = torch.randn(32, 16)
    tm = ReLUSAE(16, 40, l1_coefficient=0.5)
    f = tm.encode(x)
    want = (tm.decode(f) - x).pow(2).mean() + 0.5 * f.abs().sum(1).mean()
    assert torch.allclose(tm.loss(x).loss, want)
    assert tm.unit_norm_decoder and tm.uses_resampling and tm.grad_clip is None
    assert tm.sparsity_scale_at(0, 100) == 1.0

    april = ReLUSAE(16, 40, l1_coefficient=0.5, recipe="april_2024")
    assert not april.unit_norm_decoder and not april.uses_resampling and april.grad_clip == 1.0
    assert torch.allclose(april.W_dec.norm(dim=1), torch.full((40,), 0.1))
    assert torch.equal(april.W_enc, april.W_dec.t())
    with torch.no_grad():
        april.W_dec[:20] *= 3.0  # the L1 term must see each row's norm
    f = april.encode(x)
    l1 = (f * april.W_dec.norm(dim=1)).sum(1).mean()
    assert torch.allclose(april.loss(x, sparsity_scale=0.5).loss,
                          (april.decode(f) - x).pow(2).mean() + 0.25 * l1)
    # λ warm-up: linear over the first 5% of the run, then full.
    assert april.sparsity_scale_at(0, 1000) == pytest.approx(1 / 50)
    assert april.sparsity_scale_at(24, 1000) == pytest.approx(0.5)
    assert april.sparsity_scale_at(60, 1000) == 1.0


def test_resampling_revives_dead_features(data):
    def crippled() -> ReLUSAE:
        sae = ReLUSAE(D_IN, D_SAE, l1_coefficient=0.05, seed=4)
        with torch.no_grad():  # half the features can never fire: no gradient reaches them
            sae.b_enc[: D_SAE // 2] = -50.0
        return sae

    dead_without = fit(crippled(), data, steps=240)
    dead_with = fit(crippled(), data, steps=240, resample_at=(60, 120))
    assert int(dead_without.sum()) >= D_SAE // 2
    assert int(dead_with.sum()) < int(dead_without.sum()) // 2, (dead_with, dead_without)


def test_resampling_resets_adam_state_of_exactly_the_resampled_features(data):
    sae = ReLUSAE(D_IN, D_SAE, l1_coefficient=0.05)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for step in range(5):
        adam_step(sae, opt, sae.loss(data[step * 64:(step + 1) * 64]).loss)
    before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in sae.parameters()}
    w_enc_before = sae.W_enc.detach().clone()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.tensor([3, 17, 50, 95])] = True
    n = resample_dead(sae, opt, data[:512], dead, torch.Generator().manual_seed(0))
    assert n == 4
    index = {sae.W_enc: (slice(None), dead), sae.W_dec: (dead,), sae.b_enc: (dead,)}
    keep = {sae.W_enc: (slice(None), ~dead), sae.W_dec: (~dead,), sae.b_enc: (~dead,)}
    for p, idx in index.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert (opt.state[p][key][idx] == 0).all()
            assert torch.equal(opt.state[p][key][keep[p]], before[p][key][keep[p]])
    for key in ("exp_avg", "exp_avg_sq"):  # b_dec is not a per-feature parameter
        assert torch.equal(opt.state[sae.b_dec][key], before[sae.b_dec][key])
    assert torch.allclose(sae.W_dec[dead].norm(dim=1), torch.ones(4))
    assert (sae.b_enc[dead] == 0).all()
    target = 0.2 * w_enc_before[:, ~dead].norm(dim=0).mean()
    assert torch.allclose(sae.W_enc[:, dead].norm(dim=0), target.expand(4))
    assert torch.allclose(sae.W_enc[:, dead].t() / target, sae.W_dec[dead])  # same direction
    centred = data[:512] - sae.b_dec.detach()  # each new direction is one centred input's
    cos = (sae.W_dec[dead] @ (centred / centred.norm(dim=1, keepdim=True)).t()).amax(1)
    assert torch.allclose(cos, torch.ones(4), atol=1e-5)
    assert resample_dead(sae, opt, data[:512], torch.zeros(D_SAE, dtype=torch.bool)) == 0


# ---- batchtopk and matryoshka ------------------------------------------------------------------
def test_batchtopk_training_l0_is_k_and_the_threshold_matches_it(data):
    sae = BatchTopKSAE(D_IN, D_SAE, k=3)
    f = sae.encode(data[:256])
    per_token = (f > 0).sum(1)
    assert float(per_token.float().mean()) == 3.0 and per_token.min() < per_token.max()
    fit(sae, data)
    assert float((sae.encode(data[:256]) > 0).sum(1).float().mean()) == 3.0  # train mode
    assert float(sae.threshold) > 0
    _, l0 = fvu_l0(sae, data)  # eval mode: the threshold
    assert abs(l0 - 3.0) < 0.45, l0


@pytest.mark.parametrize("cls,kw", [(BatchTopKSAE, {}), (MatryoshkaSAE, {"fractions": [0.25, 1.0]})])
def test_batchtopk_candidate_selection_is_the_dense_one_with_massive_rows(cls, kw):
    """Training selects among each token's 4k largest; rows that may hold more (here the 50x
    rows, like a residual stream's massive activations) are re-encoded over all latents. The
    loss, codes and gradients equal the dense selection's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    x[::64] *= 50
    sae = cls(16, 64, k=3, seed=1, **kw)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:8] = True
    _, values, _, extra = sae.sparse_select(x, dead, sae.k_aux(dead))
    assert extra is not None and set(extra.rows.tolist()) <= set(range(0, 256, 64))
    assert int((values > 0).sum() + (extra.values > 0).sum()) == 3 * 256
    outs, grads = [], []
    for sparse in (True, False):
        sae.sparse_training = sparse
        out = sae.loss(x, dead=dead)
        outs.append(out)
        grads.append(torch.autograd.grad(out.loss, [sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec]))
    (a, b), (ga, gb) = outs, grads
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.x_hat, b.x_hat)
    assert torch.equal(a.counts, b.counts) and a.terms.keys() == b.terms.keys()
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)


def test_matryoshka_loss_is_the_mean_of_prefix_errors():
    assert prefix_sizes(96, [0.0625, 0.25, 1.0]) == [6, 24, 96]
    sae = MatryoshkaSAE(16, 64, k=4, fractions=[0.25, 0.5, 1.0])
    x = torch.randn(32, 16)
    out = sae.loss(x)
    f = sae.batch_topk(sae.pre_acts(x))
    errs = [(f[:, :m] @ sae.W_dec[:m] + sae.b_dec - x).pow(2).mean() for m in (16, 32, 64)]
    assert torch.allclose(out.loss, torch.stack(errs).mean())
    assert torch.allclose(out.x_hat, sae.decode(f), atol=1e-5)


# ---- jumprelu ----------------------------------------------------------------------------------
def test_jumprelu_thresholds_get_gradients_from_both_terms():
    sae = JumpReLUSAE(D_IN, D_SAE, l0_coefficient=0.1, init_threshold=0.3, bandwidth=0.2)
    out = sae.loss(sparse_data(n=256))
    grads = [torch.autograd.grad(out.terms[t], sae.log_threshold, retain_graph=True)[0]
             for t in ("mse", "l0")]
    assert all(g.abs().sum() > 0 for g in grads)
    assert (grads[1] <= 0).all()  # raising θ can only lower L0
    f = sae.encode(torch.randn(8, D_IN))
    assert ((f == 0) | (f > sae.threshold)).all()


def test_jumprelu_l0_falls_as_the_l0_coefficient_grows(data):
    l0s = []
    for coef in (0.003, 0.03):
        sae = JumpReLUSAE(D_IN, D_SAE, l0_coefficient=coef, init_threshold=0.3, bandwidth=0.2)
        fit(sae, data, steps=200)
        l0s.append(fvu_l0(sae, data)[1])
    assert l0s[1] < 0.6 * l0s[0], l0s
