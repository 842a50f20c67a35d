"""Tests of patch_hook, the spliced LM loss and steering: tiny random models of each architecture,
hand-made SAEs (identity-like and zero), and one test of the real SmolLM2-135M."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import (
    BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM,
    LlamaConfig, LlamaForCausalLM,
)

from conftest import write_sparse_store
from distributed_sae.config import ModelConfig
from distributed_sae.eval.spliced import contexts_from_rows, spliced_loss
from distributed_sae.eval.steer import steer, steer_feature
from distributed_sae.models import LoadedModel, from_hf_model, hook_dim, load_model, run_with_hooks
from distributed_sae.models.hooks import patch_hook
from distributed_sae.sae import ReLUSAE, save_sae

VOCAB = 101
KINDS = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "mlp.hook_post")


def _tiny(arch: str) -> LoadedModel:
    """A 3-layer random model of `arch` (no tokenizer)."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=64)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, intermediate_size=80, num_key_value_heads=2))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4,
                                           n_positions=64, bos_token_id=0, eos_token_id=0))
    elif arch == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**common, intermediate_size=72))
    else:
        model = BertModel(BertConfig(**common, intermediate_size=48))
    return from_hf_model(model, name=f"tiny-{arch}")


@pytest.fixture(scope="module")
def models() -> dict[str, LoadedModel]:
    return {arch: _tiny(arch) for arch in ("llama", "gpt2", "gpt_neox", "bert")}


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(1, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))


def identity_sae(d: int) -> ReLUSAE:
    """x_hat == x exactly: features relu(x) and relu(-x), decoded by +I and -I."""
    sae = ReLUSAE(d, 2 * d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))  # (d, 2d)
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))  # (2d, d)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def zero_sae(d: int) -> ReLUSAE:
    sae = ReLUSAE(d, 4)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    return sae


def _output(loaded: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = loaded.model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "bert"])
@pytest.mark.parametrize("kind", KINDS)
def test_patch_hook_every_kind(models, ids, arch: str, kind: str) -> None:
    loaded, hook = models[arch], f"blocks.1.{kind}"
    clean = _output(loaded, ids)
    seen = []

    def identity(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return x

    with patch_hook(loaded, hook, identity):
        same = _output(loaded, ids)
    torch.testing.assert_close(same, clean, rtol=0, atol=0)
    # fn sees exactly what run_with_hooks captures there.
    torch.testing.assert_close(seen[0], run_with_hooks(loaded, ids, [hook])[hook])
    with patch_hook(loaded, hook, lambda x: x * 0.5 + 1.0):
        changed = _output(loaded, ids)
    assert (changed - clean).abs().max() > 1e-3
    # The torch hook is gone after the block: the model is clean again.
    torch.testing.assert_close(_output(loaded, ids), clean, rtol=0, atol=0)


def test_patch_hook_checks_shape_and_removes_on_error(models, ids) -> None:
    loaded = models["llama"]
    with pytest.raises(ValueError, match=r"shape \(3, 12, 32\)"):
        with patch_hook(loaded, "blocks.0.hook_resid_post", lambda x: x[..., :4]):
            _output(loaded, ids)
    blocks = loaded.model.model.layers
    assert not blocks[0]._forward_hooks and not blocks[0]._forward_pre_hooks


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("kind", ["hook_resid_pre", "hook_mlp_out", "mlp.hook_post"])
def test_spliced_identity_and_zero(models, ids, arch: str, kind: str) -> None:
    loaded, hook = models[arch], f"blocks.1.{kind}"
    d = hook_dim(loaded, hook)
    ident, zero = spliced_loss(loaded, [identity_sae(d), zero_sae(d)], hook, ids, batch_size=2)
    assert ident["n_tokens"] == 3 * 11
    assert abs(ident["ce_spliced"] - ident["ce_clean"]) < 1e-5
    assert abs(ident["loss_recovered"] - 1.0) < 1e-3 and abs(ident["kl_div"]) < 1e-6
    assert zero["ce_spliced"] == pytest.approx(zero["ce_zero"], abs=1e-6)
    assert abs(zero["loss_recovered"]) < 1e-3 and zero["kl_div"] > 0
    assert zero["ce_zero"] != pytest.approx(zero["ce_clean"])  # ablating this hook matters
    # Clean CE equals a direct computation with the model's own loss.
    with torch.no_grad():
        direct = loaded.model(input_ids=ids, labels=ids).loss
    assert ident["ce_clean"] == pytest.approx(float(direct), rel=1e-5)


def test_spliced_loss_draws_one_bar_for_the_bank(models, ids, capsys) -> None:
    """One progress bar on stderr over the batches (3 contexts / 2 = 2), shared by both SAEs;
    nothing on stdout."""
    loaded, hook = models["llama"], "blocks.1.hook_resid_post"
    spliced_loss(loaded, [identity_sae(32), zero_sae(32)], hook, ids, batch_size=2)
    out, err = capsys.readouterr()
    totals = re.findall(rf"spliced loss {re.escape(hook)}:.*?\d+/(\d+) ", err)
    assert totals and set(totals) == {"2"}, err
    assert "spliced loss" not in out


def test_spliced_ignores_tokens(models) -> None:
    loaded = models["llama"]
    ids = torch.randint(2, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = 1  # a BOS-like token: its position keeps its clean activation, never counted
    ids[0, 5] = 0
    hook = "blocks.0.hook_resid_post"
    res = spliced_loss(loaded, [zero_sae(32)], hook, ids, ignore_token_ids=[0, 1])[0]
    # 18 predictions, minus the 2 out of the BOS-like tokens and the 2 into and out of token 0
    assert res["n_tokens"] == 2 * 9 - 2 - 2
    # Zero-ablation only where the token is not ignored: ablating everything is different.
    everything = spliced_loss(loaded, [zero_sae(32)], hook, ids)[0]
    assert res["ce_zero"] != pytest.approx(everything["ce_zero"])


def test_spliced_keeps_positions_above_max_norm_clean(models, ids) -> None:
    loaded, hook = models["llama"], "blocks.0.hook_resid_post"
    norms = run_with_hooks(loaded, ids, [hook])[hook].float().norm(dim=-1)  # (batch, seq)
    everywhere = spliced_loss(loaded, [zero_sae(32)], hook, ids)[0]
    nowhere = spliced_loss(loaded, [zero_sae(32)], hook, ids, max_norm=float(norms.min()) / 2)[0]
    assert nowhere["ce_zero"] == pytest.approx(nowhere["ce_clean"], abs=1e-6)
    assert nowhere["kl_div"] == pytest.approx(0, abs=1e-7) and nowhere["n_tokens"] == 3 * 11
    some = spliced_loss(loaded, [zero_sae(32)], hook, ids, max_norm=float(norms.median()))[0]
    assert everywhere["ce_zero"] != pytest.approx(some["ce_zero"])
    assert some["ce_zero"] != pytest.approx(some["ce_clean"])  # the other half is ablated
    huge = spliced_loss(loaded, [zero_sae(32)], hook, ids, max_norm=float(norms.max()) * 2)[0]
    assert huge["ce_zero"] == pytest.approx(everywhere["ce_zero"], abs=1e-6)


def test_spliced_errors(models, ids) -> None:
    with pytest.raises(ValueError, match="causal LM"):
        spliced_loss(models["bert"], [zero_sae(32)], "blocks.0.hook_resid_post", ids)
    with pytest.raises(ValueError, match=r"seq >= 2"):
        spliced_loss(models["llama"], [zero_sae(32)], "blocks.0.hook_resid_post", ids[:, :1])


def test_contexts_from_rows(tmp_path) -> None:
    store = write_sparse_store(tmp_path / "s")  # context_size 64, 4096 rows
    ctx = contexts_from_rows(store, range(100, 1000))  # contexts 2..14 lie wholly inside
    assert ctx.shape == (13, 64) and ctx.dtype == torch.int64
    assert ctx.flatten().tolist() == store.tokens(128, 960).tolist()
    assert contexts_from_rows(store, range(100, 1000), max_contexts=2).shape == (2, 64)
    with pytest.raises(ValueError, match="no whole context"):
        contexts_from_rows(store, range(10, 100))


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir) -> LoadedModel:
    return load_model(ModelConfig(name=tiny_llama_dir))


def test_steer_scale_zero_and_huge(tiny_llama, tmp_path) -> None:
    hook = "blocks.1.hook_resid_post"
    direction = torch.randn(32, generator=torch.Generator().manual_seed(3))
    clean = steer(tiny_llama, None, hook, direction, 0.0, "def main():", max_new_tokens=4)
    assert clean["text_clean"] == clean["text_steered"] and clean["text_clean"]
    big = steer(tiny_llama, None, hook, direction, 1e3, "def main():", max_new_tokens=4)
    assert big["text_clean"] == clean["text_clean"] and big["text_steered"] != big["text_clean"]
    # steer_feature reads decoder row `feature` and the hook from the saved SAE.
    sae = ReLUSAE(32, 8)
    with torch.no_grad():
        sae.W_dec[5] = direction
    folder = save_sae(sae, tmp_path / "m", metadata={"hook_name": hook})
    by_feature = steer_feature(folder, 5, 1e3, "def main():", 4, tiny_llama)
    assert by_feature["text_steered"] == big["text_steered"]
    with pytest.raises(ValueError, match="out of range"):
        steer_feature(folder, 8, 1.0, "x", 4, tiny_llama)
    with pytest.raises(ValueError, match=r"\(32,\) vector"):
        steer(tiny_llama, None, hook, torch.zeros(31), 1.0, "x", 4)


def test_smollm2_spliced_loss(smollm2_tokenizer) -> None:
    """Real SmolLM2 on CPython docs: sane clean CE, zero-ablating a middle layer hurts."""
    from pydoc_data.topics import topics

    from distributed_sae.data.packing import pack_contexts

    loaded = load_model(ModelConfig())
    docs = [topics[k] for k in sorted(topics)[:20]]
    ctx = torch.from_numpy(pack_contexts(docs, smollm2_tokenizer, 64, 2))  # BOS + 63 tokens each
    special = [smollm2_tokenizer.bos_token_id, smollm2_tokenizer.eos_token_id]
    zero = spliced_loss(loaded, [zero_sae(576)], "blocks.15.hook_resid_post", ctx, batch_size=2,
                        ignore_token_ids=special)[0]
    assert 0.5 < zero["ce_clean"] < 6.0, zero
    assert zero["ce_spliced"] > zero["ce_clean"] + 1.0 and abs(zero["loss_recovered"]) < 1e-6
