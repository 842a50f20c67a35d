"""Resuming the model at a block (models/resume.py) and the spliced loss built on it: a resumed
pass equals the full pass bit for bit, on tiny random models of each causal architecture and
for every kind of splice (SAE at each hook kind, its zero, a transcoder, a CLT, a crosscoder)."""

from __future__ import annotations

import pytest
import torch

from distributed_sae.eval.replacement import crosscoder_splices, mlp_splice
from distributed_sae.eval.spliced import sae_splice, splice_losses
from distributed_sae.models import hook_dim
from distributed_sae.models.architectures import arch_spec, layer_modules
from distributed_sae.models.hooks import patch_hook
from distributed_sae.models.resume import capture_block_inputs, resume_at
from distributed_sae.sae import ReLUSAE
from distributed_sae.sae.forms import Form
from test_eval_spliced import VOCAB, _tiny

CAUSAL = ("llama", "gpt2", "gpt_neox")


@pytest.fixture(scope="module")
def models():
    return {arch: _tiny(arch) for arch in CAUSAL}


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(1, VOCAB, (5, 12), generator=torch.Generator().manual_seed(3))


def _logits(loaded, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(input_ids=ids, use_cache=False).logits


def _random_sae(d_in: int, d_sae: int, seed: int, d_out: int | None = None, form=None) -> ReLUSAE:
    torch.manual_seed(seed)
    kwargs = {"form": form} if form is not None else {}
    sae = ReLUSAE(d_in, d_sae, **kwargs)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return sae


@pytest.mark.parametrize("arch", CAUSAL)
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_resumed_pass_equals_the_full_pass(models, ids, arch: str, layer: int) -> None:
    loaded = models[arch]
    blocks = layer_modules(loaded.model, arch_spec(loaded.arch))
    with capture_block_inputs(loaded, [layer]) as captured:
        full = _logits(loaded, ids)
    assert captured[layer].shape == (5, 12, 32)
    ran = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
               for i, b in enumerate(blocks)]
    try:
        with resume_at(loaded, layer, captured[layer]):
            resumed = _logits(loaded, ids)
    finally:
        for h in handles:
            h.remove()
    assert ran == list(range(layer, 3))  # the blocks below `layer` did not run
    torch.testing.assert_close(resumed, full, rtol=0, atol=0)
    # The layer list is back, unhooked: a later full pass is the clean model.
    assert layer_modules(loaded.model, arch_spec(loaded.arch)) is blocks
    assert not any(b._forward_pre_hooks for b in blocks)
    torch.testing.assert_close(_logits(loaded, ids), full, rtol=0, atol=0)


def test_resume_with_a_patch_on_the_same_block(models, ids) -> None:
    """A patch at hook_resid_pre of the resumed block sees the captured states (the feed runs
    first), so patched + resumed equals patched + full."""
    loaded, hook = models["llama"], "blocks.1.hook_resid_pre"
    with capture_block_inputs(loaded, [1]) as captured:
        _logits(loaded, ids)
    with patch_hook(loaded, hook, lambda x: x * 0.5 + 1.0):
        full = _logits(loaded, ids)
        with resume_at(loaded, 1, captured[1]):
            resumed = _logits(loaded, ids)
    torch.testing.assert_close(resumed, full, rtol=0, atol=0)


def test_resume_errors_name_the_values(models, ids) -> None:
    loaded = models["gpt2"]
    with pytest.raises(ValueError, match=r"layer 3 is not a block of tiny-gpt2 \(0\.\.2\)"):
        with resume_at(loaded, 3, torch.zeros(5, 12, 32)):
            pass
    with pytest.raises(ValueError, match=r"\(5, 12\) but the captured states are \(2, 12\)"):
        with resume_at(loaded, 1, torch.zeros(2, 12, 32)):
            _logits(loaded, ids)
    assert layer_modules(loaded.model, arch_spec(loaded.arch)) is loaded.model.transformer.h


@pytest.mark.parametrize("arch", CAUSAL)
def test_spliced_losses_resumed_equal_full(models, ids, arch: str) -> None:
    """Every splice kind, SAEs at several layers in one bank: the resumed run's numbers equal
    the full run's exactly (the same floats, so the same sums)."""
    loaded = models[arch]
    splices = []
    for i, kind in enumerate(("hook_resid_pre", "hook_resid_post", "hook_attn_out",
                              "hook_mlp_out", "mlp.hook_post")):
        hook = f"blocks.{i % 3}.{kind}"
        d = hook_dim(loaded, hook)
        splices.append(sae_splice(loaded, _random_sae(d, 48, seed=i), hook))
    mlp_in = Form("transcoder", (32,), (32,))
    splices.append(mlp_splice(loaded, _random_sae(32, 40, 7, form=mlp_in), [1]))
    hooks = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    xc = _random_sae(64, 40, 8, form=Form("crosscoder", (32, 32), (32, 32)))
    splices += crosscoder_splices(loaded, xc, hooks)
    resumed = splice_losses(loaded, splices, ids, batch_size=2)
    full = splice_losses(loaded, splices, ids, batch_size=2, resume=False)
    assert resumed == full
    assert len({r["ce_spliced"] for r in full}) == len(splices)  # the splices differ
