"""Sharded harvesting: a DeepSpeed ZeRO-3 group of Ray actors (gloo, CPU) and HF device_map models
give the same activations as the plain single-process path, on a tiny random Llama saved to disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from distributed_sae.config import ModelConfig
from distributed_sae.harvest.deepspeed_worker import create_deepspeed_group, ds_config
from distributed_sae.harvest.worker import HarvestWorker
from distributed_sae.models import from_hf_model, load_model, run_with_hooks
from distributed_sae.models.hooks import is_partitioned
from distributed_sae.models.registry import truncate_layers
from distributed_sae.parallel import free_port
from distributed_sae.store import ActivationStore
from conftest import HANG_S

VOCAB, D_MODEL, D_MLP, N_LAYERS = 101, 64, 128, 4
CTX, N_CTX, BATCH = 16, 4, 2  # a unit is 4 contexts of 16 tokens: 2 forward passes of batch 2
UNIT_ROWS = CTX * N_CTX
# Two layers, and the MLP neurons: layer 3 is never needed, so the group cuts the model to 3 layers.
HOOKS = ["blocks.0.hook_resid_post", "blocks.2.mlp.hook_post"]


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _save_word_tokenizer(directory: Path) -> None:
    """A word-level tokenizer with VOCAB entries (load_model refuses a directory without one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, **{f"w{i}": i for i in range(1, VOCAB)}},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(directory)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    _tiny_llama().save_pretrained(directory)
    _save_word_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def contexts() -> np.ndarray:
    """Three units of contexts: (unit, n_ctx, ctx) int64."""
    return np.random.default_rng(0).integers(1, VOCAB, (3, N_CTX, CTX)).astype(np.int64)


def _make_store(path: Path, n_units: int = 3) -> str:
    ActivationStore.create(path, hook_dims={HOOKS[0]: D_MODEL, HOOKS[1]: D_MLP}, n_units=n_units,
                           unit_rows=UNIT_ROWS, chunk_rows=UNIT_ROWS, dtype="float32",
                           compression="none", metadata={"context_size": CTX, "exclude_token_ids": [0]})
    return str(path)


def test_deepspeed_group_matches_plain_worker(ray_local, model_dir: Path, contexts: np.ndarray,
                                              tmp_path: Path) -> None:
    cfg = ModelConfig(name=str(model_dir))
    # threads= the current count: HarvestWorker sets it process-wide, and this is the pytest process.
    plain = HarvestWorker(cfg, HOOKS, _make_store(tmp_path / "plain"), BATCH, [0],
                          threads=torch.get_num_threads())
    want = [plain.forward_unit(c) for c in contexts]  # unit -> hook -> (rows, d)
    path = _make_store(tmp_path / "ds")
    # Threshold 0 partitions every tensor: the tiny model's are all below DeepSpeed's default 1e5.
    actors = create_deepspeed_group(cfg, HOOKS, path, BATCH, [0], group_size=2, cpus_per_actor=1,
                                    gpus_per_actor=0, persistence_threshold=0)
    try:
        assert ray_local.get([a.ready.remote() for a in actors], timeout=HANG_S) == [True, True]
        info = ray_local.get([a.partition_info.remote() for a in actors])
        # Cut to 3 layers; each rank holds half of every tensor (+ padding to an even split).
        total = info[0]["total"]
        assert total == sum(p.numel() for p in truncate_layers(plain.loaded, 3).model.parameters())
        for rank_info in info:
            assert rank_info["total"] == total and rank_info["persistent"] == 0
            assert total / 2 <= rank_info["local"] <= total / 2 + 64
        # Round 1: one unit per rank. Round 2: the group's last round, rank 1 pads (writes nothing).
        records = ray_local.get([actors[0].run_unit.remote(0, contexts[0]),
                                 actors[1].run_unit.remote(1, contexts[1])])
        records += ray_local.get([actors[0].run_unit.remote(2, contexts[2]),
                                  actors[1].run_unit.remote(-1, contexts[0])])
        got = ray_local.get([a.forward_unit.remote(contexts[2 - r]) for r, a in enumerate(actors)])
    finally:
        ray_local.get([a.shutdown.remote() for a in actors], timeout=HANG_S)
        for actor in actors:
            ray_local.kill(actor)
    assert records[3] is None and all(r is not None for r in records[:3])
    store = ActivationStore.open(path)
    for unit in range(3):
        for hook in HOOKS:
            rows = store.read(hook, unit * UNIT_ROWS, (unit + 1) * UNIT_ROWS)  # (rows, d)
            torch.testing.assert_close(rows, want[unit][hook], rtol=0, atol=1e-5)
            assert records[unit]["stats"][hook]["count"] == UNIT_ROWS
    for rank, unit in ((0, 2), (1, 1)):  # a 5th and 6th consecutive pass still match
        for hook in HOOKS:
            torch.testing.assert_close(got[rank][hook], want[unit][hook], rtol=0, atol=1e-5)


def test_device_map_auto_matches_plain(model_dir: Path, contexts: np.ndarray) -> None:
    plain = load_model(ModelConfig(name=str(model_dir)))
    mapped = load_model(ModelConfig(name=str(model_dir), device_map="auto"))
    ids = torch.from_numpy(contexts[0])  # (n_ctx, ctx)
    want = run_with_hooks(plain, ids, HOOKS)
    got = run_with_hooks(mapped, ids, HOOKS)
    for hook in HOOKS:
        torch.testing.assert_close(got[hook], want[hook], rtol=0, atol=1e-6)


def test_accelerate_offload_dispatch_matches_plain(model_dir: Path, contexts: np.ndarray,
                                                   tmp_path: Path) -> None:
    # With one CPU, 'auto' puts everything on cpu and adds no hooks; disk offload does, with the
    # embedding on the meta device: run_with_hooks must follow accelerate's execution device.
    device_map = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map=device_map,
                                                 offload_folder=str(tmp_path / "offload"))
    assert model.model.embed_tokens.weight.device.type == "meta"
    offloaded = from_hf_model(model)
    plain = load_model(ModelConfig(name=str(model_dir)))
    ids = torch.from_numpy(contexts[1])  # (n_ctx, ctx)
    want = run_with_hooks(plain, ids, HOOKS)
    for _ in range(2):  # the early stop leaves accelerate's hooks usable for the next pass
        got = run_with_hooks(offloaded, ids, HOOKS)
        for hook in HOOKS:
            torch.testing.assert_close(got[hook], want[hook], rtol=0, atol=1e-6)


def _tiny_other(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=N_LAYERS, n_head=4,
                                          n_positions=64))
    return BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                num_hidden_layers=N_LAYERS, num_attention_heads=4,
                                max_position_embeddings=64))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_truncate_layers_keeps_activations(arch: str) -> None:
    loaded = from_hf_model(_tiny_llama() if arch == "llama" else _tiny_other(arch))
    cut = truncate_layers(loaded, 2)
    assert cut.n_layers == 2 and cut.model is not loaded.model and not cut.model.training
    assert not hasattr(cut.model, "lm_head") and loaded.n_layers == N_LAYERS  # original untouched
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))  # (batch, seq)
    hooks = ["blocks.0.hook_attn_out", "blocks.1.hook_resid_post", "blocks.1.mlp.hook_post"]
    want = run_with_hooks(loaded, ids, hooks)
    got = run_with_hooks(cut, ids, hooks, stop_early=False)
    for hook in hooks:
        torch.testing.assert_close(got[hook], want[hook], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="n_keep"):
        truncate_layers(loaded, N_LAYERS + 1)


def test_helpers() -> None:
    assert not is_partitioned(_tiny_llama())
    assert ds_config(torch.bfloat16)["bf16"] == {"enabled": True}
    assert "bf16" not in ds_config(torch.float32) and "fp16" in ds_config(torch.float16)
    assert 0 < free_port() < 65536


def test_failed_join_and_missing_peer_raise(ray_local, tmp_path: Path) -> None:
    # A rank that cannot load its model makes ready() raise instead of leaving the driver waiting.
    actors = create_deepspeed_group(ModelConfig(name=str(tmp_path / "no-such-model")), HOOKS,
                                    _make_store(tmp_path / "s"), BATCH, [0], group_size=2,
                                    cpus_per_actor=1, gpus_per_actor=0)
    try:
        with pytest.raises(Exception, match="failed to join its group"):
            ray_local.get(actors[0].ready.remote(), timeout=HANG_S)
    finally:
        for actor in actors:
            ray_local.kill(actor)

    # A peer that never joins fails the group after the timeout, not after torch's 30 min.
    @ray_local.remote(num_cpus=1)
    def lonely_rank(port: int) -> str:
        from distributed_sae.parallel import init_group

        try:
            init_group(0, 2, "127.0.0.1", port, timeout_s=3)
        except Exception as err:  # noqa: BLE001 - the type differs between torch versions
            return type(err).__name__
        return "joined"

    assert ray_local.get(lonely_rank.remote(free_port()), timeout=HANG_S) != "joined"
