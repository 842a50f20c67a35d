"""The replacement model (eval/replacement.py) against a hand-built one: a tiny Llama whose MLP
modules are swapped for modules that compute the transcoder's (or CLT's) output, run without any
hook. The spliced CE and KL of splice_losses must equal what that model gives."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from distributed_sae.eval.replacement import crosscoder_splices, member_splices, mlp_splice
from distributed_sae.eval.spliced import splice_losses
from distributed_sae.models import from_hf_model, run_with_hooks
from distributed_sae.models.registry import LoadedModel
from distributed_sae.sae import JumpReLUSAE, ReLUSAE
from distributed_sae.sae.forms import Form

VOCAB, D = 101, 32


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=80, max_position_embeddings=64))


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(1, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))


def _random(sae: nn.Module) -> nn.Module:
    """Biases and W_skip away from their zero starts, so a missing term would show."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name in ("b_enc", "b_dec", "W_skip"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        if hasattr(sae, "latent_group"):
            sae.set_latent_groups(sae.latent_group)
    return sae.eval()


class _Replaced(nn.Module):
    """An MLP module of layer `layer` replaced by a member of the layers `layers`: it stores its
    input in the shared dict and returns the member's output block of this layer."""

    def __init__(self, sae: nn.Module, layers: list[int], layer: int, seen: dict) -> None:
        super().__init__()
        self.sae, self.layers, self.layer, self.seen = sae, layers, layer, seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, seq, d)
        self.seen[self.layer] = x
        xs = [self.seen.get(l, torch.zeros_like(x)) if l <= self.layer else torch.zeros_like(x)
              for l in self.layers]
        y = self.sae(torch.cat(xs, -1).reshape(-1, D * len(self.layers)))  # (batch*seq, d_out)
        j = self.layers.index(self.layer)
        return y[:, j * D:(j + 1) * D].reshape(x.shape)


def _hand_built(sae: nn.Module, layers: list[int]) -> LoadedModel:
    model = copy.deepcopy(_llama())
    seen: dict = {}
    for layer in layers:
        model.model.layers[layer].mlp = _Replaced(sae, layers, layer, seen)
    return from_hf_model(model, name="hand")


def _ce_kl(replaced: LoadedModel, clean: LoadedModel, ids: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        lp = torch.log_softmax(replaced.model(input_ids=ids).logits.float(), -1)[:, :-1]
        lc = torch.log_softmax(clean.model(input_ids=ids).logits.float(), -1)[:, :-1]
    ce = -lp.gather(-1, ids[:, 1:, None]).squeeze(-1).mean()
    kl = (lc.exp() * (lc - lp)).sum(-1).mean()
    return float(ce), float(kl)


@pytest.mark.parametrize("form", ["transcoder", "skip_transcoder"])
def test_transcoder_replacement_equals_the_swapped_mlp(form: str, ids: torch.Tensor) -> None:
    sae = _random(ReLUSAE(D, 64, form=Form(form, (D,), (D,))))
    clean = from_hf_model(_llama(), name="clean")
    got = splice_losses(clean, [mlp_splice(clean, sae, [2])], ids, batch_size=2)[0]
    ce, kl = _ce_kl(_hand_built(sae, [2]), clean, ids)
    assert got["ce_spliced"] == pytest.approx(ce, rel=1e-5)
    assert got["kl_div"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert got["kl_div"] > 1e-4  # the replacement changed something: the check can fail


def test_clt_replacement_equals_the_swapped_mlps(ids: torch.Tensor) -> None:
    layers = [1, 2, 3]
    sae = _random(JumpReLUSAE(3 * D, 48, init_threshold=0.05,
                              form=Form("clt", (D,) * 3, (D,) * 3)))
    clean = from_hf_model(_llama(), name="clean")
    cfg = {"metadata": {"dsae_inputs": [f"blocks.{l}.ln2.hook_normalized" for l in layers],
                        "dsae_targets": [f"blocks.{l}.hook_mlp_out" for l in layers]}}
    (label, splice), = member_splices(clean, sae, cfg)
    assert label is None and splice.zero_key == ("mlp", (1, 2, 3))
    got = splice_losses(clean, [splice], ids, batch_size=3)[0]
    ce, kl = _ce_kl(_hand_built(sae, layers), clean, ids)
    assert got["ce_spliced"] == pytest.approx(ce, rel=1e-5)
    assert got["kl_div"] == pytest.approx(kl, rel=1e-4, abs=1e-7)


def test_crosscoder_splice_uses_clean_activations_of_every_hook(ids: torch.Tensor) -> None:
    hooks = [f"blocks.{l}.hook_resid_post" for l in (0, 1, 2)]
    sae = _random(ReLUSAE(3 * D, 64, form=Form("crosscoder", (D,) * 3)))
    clean = from_hf_model(_llama(), name="clean")
    splices = crosscoder_splices(clean, sae, hooks)
    got = splice_losses(clean, splices, ids, batch_size=3)
    # By hand: the reconstruction of hook j from the clean pass, written at hook j only.
    acts = run_with_hooks(clean, ids, hooks)
    recon = sae(torch.cat([acts[h] for h in hooks], -1).reshape(-1, 3 * D))  # (b*s, 3D)
    for j, hook in enumerate(hooks):
        model = copy.deepcopy(_llama())
        block_j = recon[:, j * D:(j + 1) * D].reshape(acts[hook].shape)

        def swap(_m, _a, out, block_j=block_j):
            return (block_j, *out[1:]) if isinstance(out, tuple) else block_j

        model.model.layers[j].register_forward_hook(swap)
        ce, kl = _ce_kl(from_hf_model(model, name="hand"), clean, ids)
        assert got[j]["ce_spliced"] == pytest.approx(ce, rel=1e-5)
        assert got[j]["kl_div"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    # Each hook has its own ablation baseline (zeroing a residual stream gives the same CE at
    # every layer, so compare the keys, not the losses).
    assert len({s.zero_key for s in splices}) == 3
