"""The TopK encoder's bf16 screen (train.topk_screen, kernels/select.py: screened_topk).

The screen must select what the exact fp32 encoder selects and give the same values and
gradients up to fp32 rounding (its values are dot products, not a GEMM's: another summation
order), fall back to the exact path where it cannot apply, and be what the trainer uses under
each setting. bf16 GEMMs run on every CPU (emulated without AVX512-BF16), so none of this needs
particular hardware.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels import SHAPES, TOL, _by_index, rel_err

from distributed_sae.config import ConfigError, TrainConfig
from distributed_sae.kernels import autograd, screen_supported, select, topk_encode, torch_sparse
from distributed_sae.kernels.reference import topk_encode_reference
from distributed_sae.sae import sae_member
from distributed_sae.train import BankTrainer
from distributed_sae.train.bank_trainer import SCREEN_MARGIN, screen_margin
from test_train import HOOK, make_cfg


def _inputs(shape, seed=1):
    batch, d, n, _ = shape
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).requires_grad_() for s in [(batch, d), (d, n), (n,),
                                                                      (d,)]]


@pytest.fixture
def screened_calls(monkeypatch):
    """How many times TopKEncode took the screened path."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[3])
        return select.screened_topk(*args, **kwargs)

    monkeypatch.setattr(autograd, "screened_topk", spy)
    return calls


@pytest.mark.parametrize("shape", SHAPES)
def test_screened_encode_selects_and_differentiates_as_the_exact_one(shape, screened_calls):
    batch, d, n, k = shape
    margin = min(8, n // 4 - k)  # the screen applies while 4 (k + margin) <= n
    x, w_enc, b_enc, b_dec = _inputs(shape)
    weights = torch.randn(batch, n, generator=torch.Generator().manual_seed(2))

    def loss(values, indices):  # every (token, latent) pair weighs differently
        return (values * weights.gather(1, indices)).sum()

    code = topk_encode(x, w_enc, b_enc, b_dec, k, screen=margin)
    assert screened_calls == [k]
    grads = torch.autograd.grad(loss(code.values, code.indices), (x, w_enc, b_enc, b_dec))
    ref = topk_encode_reference(x, w_enc, b_enc, b_dec, k)
    ref_grads = torch.autograd.grad(loss(ref[0], ref[1]), (x, w_enc, b_enc, b_dec))
    got_i, got_v = _by_index(code.indices, code.values)
    want_i, want_v = _by_index(ref[1], ref[0])
    assert torch.equal(got_i, want_i)
    assert rel_err(got_v, want_v) < TOL[torch.float32]
    for name, got, want in zip(("x", "W_enc", "b_enc", "b_dec"), grads, ref_grads):
        assert rel_err(got, want) < TOL[torch.float32], name


def test_screen_recovers_latents_that_bf16_misranks():
    """Two latents whose pre-activations differ by less than bf16 can tell apart: with no
    margin the screen may keep the wrong one, with a margin it keeps the larger."""
    d, n = 64, 256
    x = torch.ones(1, d)
    w = torch.zeros(d, n)
    w[:, 0] = 1.0 / d  # pre 1.0
    w[:, 1] = (1.0 + 2e-3) / d  # pre 1.002: the same bf16 number as 1.0 (spacing 2^-7)
    b = torch.zeros(n)
    v, i = select.screened_topk(x, w, b, 1, 8, torch_sparse.gather_dot)
    assert i.tolist() == [[1]] and abs(float(v) - 1.002) < 1e-6


def test_screen_steps_aside_for_auxk_and_small_widths(screened_calls):
    shape = (32, 24, 200, 4)
    x, w_enc, b_enc, b_dec = _inputs(shape)
    dead = torch.zeros(200, dtype=torch.bool)
    dead[::3] = True
    code = topk_encode(x, w_enc, b_enc, b_dec, 4, dead=dead, k_aux=8, screen=8)
    assert code.aux_indices is not None and bool(dead[code.aux_indices].all())
    topk_encode(x, w_enc[:, :40], b_enc[:40], b_dec, 4, screen=8)  # 4 (4 + 8) > 40
    assert screened_calls == []  # both took the exact fp32 path


def test_topk_screen_setting_reaches_the_topk_members(tmp_path):
    with pytest.raises(ConfigError, match=r"train.topk_screen='fp16' is not one of auto, bf16"):
        TrainConfig(topk_screen="fp16")
    for mode, want in (("bf16", SCREEN_MARGIN), ("off", 0),
                       ("auto", SCREEN_MARGIN if screen_supported(torch.device("cpu")) else 0)):
        cfg = make_cfg(str(tmp_path), tmp_path / mode, topk_screen=mode)
        assert screen_margin(cfg) == want
        bank = BankTrainer(cfg, [sae_member(HOOK, "topk", 64, seed=0, k=4),
                                 sae_member(HOOK, "relu", 64, seed=0)], 32, torch.zeros(32), 10)
        assert bank.members[0].sae.screen == want
        assert not hasattr(bank.members[1].sae, "screen")
    assert not screen_supported(torch.device("meta"))


def test_a_screened_member_trains_like_the_exact_one(tmp_path):
    """Same batches, screen on and off: the same selection at every step up to rounding, so
    the losses agree closely (signum's sign steps can flip on gradients that round to ~0)."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(256, 32, generator=g) * torch.linspace(0.5, 2, 32) for _ in range(30)]
    losses = {}
    for mode in ("bf16", "off"):
        cfg = make_cfg(str(tmp_path), tmp_path / mode, topk_screen=mode)
        bank = BankTrainer(cfg, [sae_member(HOOK, "topk", 512, seed=0, k=8)], 32,
                           torch.zeros(32), len(batches))
        sae = bank.members[0].sae
        for x in batches:
            bank.step(x, record=False)
        with torch.no_grad():
            losses[mode] = float(sae.loss(batches[0]).loss)
    assert abs(losses["bf16"] - losses["off"]) < 0.02 * losses["off"], losses
