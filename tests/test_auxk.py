"""AuxK's dense block over the dead latents' columns against its sparse codes (sae/topk.py)."""

from __future__ import annotations

import pytest
import torch

from distributed_sae.sae import TopKSAE
from distributed_sae.sae import topk as topk_module
from distributed_sae.sae.batchtopk import BatchTopKSAE


def loss_and_grads(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor, ratio: float,
                   monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    monkeypatch.setattr(topk_module, "AUX_BLOCK_RATIO", ratio)
    sae.zero_grad(set_to_none=True)
    out = sae.loss(x, dead)
    out.loss.backward()
    return [out.terms["auxk"].detach(), out.loss.detach()] + [p.grad.clone()
                                                             for p in sae.parameters()]


@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE])
@pytest.mark.parametrize("n_dead", [5, 40, 97])  # fewer than, near, and above k_aux = 48
def test_block_matches_sparse_codes(cls: type, n_dead: int,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    sae = cls(96, 211, 7, seed=3)  # odd shapes
    sae.train()
    with torch.no_grad():
        sae.b_dec.normal_()  # the block's (x - b) W rewrite is exercised
        sae.b_enc.normal_()
    x = torch.randn(131, 96) * 2
    dead = torch.zeros(211, dtype=torch.bool)
    dead[torch.randperm(211)[:n_dead]] = True
    sparse = loss_and_grads(sae, x, dead, 0.0, monkeypatch)
    block = loss_and_grads(sae, x, dead, float("inf"), monkeypatch)
    assert float(sparse[0]) > 0  # AuxK ran on both paths
    for a, b in zip(sparse, block):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_switch_follows_the_ratio() -> None:
    dead = torch.zeros(1000, dtype=torch.bool)
    dead[:600] = True
    k_aux = 100
    assert TopKSAE.aux_block(dead, k_aux) is (600 <= topk_module.AUX_BLOCK_RATIO * k_aux)
    assert TopKSAE.aux_block(None, k_aux) is False
    assert TopKSAE.aux_block(dead, 0) is False
