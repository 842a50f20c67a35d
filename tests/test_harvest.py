"""Harvest fault tolerance and checks, on real Ray actors and real zarr stores.

The clean reference for "no token lost or stored twice" is the token stream itself: a complete
store must hold exactly the packed corpus contexts, in order (`load_contexts`), which is stronger
than equality as a multiset.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from distributed_sae.config import (
    DataConfig, HarvestConfig, ModelConfig, RunConfig, SAEConfig, StoreConfig,
)
from distributed_sae.data import load_contexts
from distributed_sae.harvest import HarvestWorker, NonFiniteActivationError, harvest
from distributed_sae.store import ActivationStore, StoreDamagedError, StoreLockedError, WriterLock
from distributed_sae.store.commits import record_path

HOOKS = ["blocks.1.hook_resid_post", "blocks.2.mlp.hook_post"]


def tiny_cfg(model_dir: str, store: Path, n_units: int = 12, **harvest_kw) -> RunConfig:
    return RunConfig(
        model=ModelConfig(name=model_dir),
        data=DataConfig(context_size=32, n_tokens=32 * 4 * n_units, seed=1),
        harvest=HarvestConfig(hooks=HOOKS, contexts_per_unit=4, batch_size=2, **harvest_kw),
        store=StoreConfig(path=str(store), chunk_tokens=64, dtype="float32"),
        sae=SAEConfig(widths=[64], k=4), out_dir=str(store.parent))


def expected_tokens(cfg: RunConfig, tokenizer) -> np.ndarray:
    n_ctx = cfg.data.n_tokens // cfg.data.context_size
    return load_contexts(cfg.data, tokenizer, n_ctx).reshape(-1)


def _actor_pids(name: str) -> list[int]:
    """PIDs of live Ray worker processes whose title names `name` (Ray sets 'ray::<Class>...')."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().decode(errors="ignore")
        except OSError:
            continue
        if cmd.startswith(f"ray::{name}"):
            pids.append(int(entry.name))
    return pids


def _wait_for_commits(store_path: Path, n: int, timeout: float = 600.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(list((store_path / "_commits").glob("u*.json"))) >= n:
            return
        time.sleep(0.05)
    raise TimeoutError(f"fewer than {n} units committed in {timeout} s")


def test_clean_harvest_holds_the_corpus_in_order(ray_local, tiny_llama_dir, tmp_path,
                                                 smollm2_tokenizer):
    cfg = tiny_cfg(tiny_llama_dir, tmp_path / "store", num_actors=2)
    store = harvest(cfg)
    assert store.is_complete and store.n_tokens == cfg.data.n_tokens
    assert np.array_equal(store.tokens(0, store.n_tokens), expected_tokens(cfg, smollm2_tokenizer))
    assert store.d("blocks.2.mlp.hook_post") == 64 and store.d("blocks.1.hook_resid_post") == 32
    worker = HarvestWorker(cfg.model, HOOKS, cfg.store.path, 2, [])
    ctx = store.tokens(4 * 128, 5 * 128).reshape(4, 32).astype(np.int64)
    acts = worker.forward_unit(ctx)
    for hook in HOOKS:  # what the actors wrote is what one process computes
        assert torch.allclose(store.read(hook, 4 * 128, 5 * 128), acts[hook], atol=1e-6)


def test_sigkill_of_an_actor_loses_and_duplicates_nothing(ray_local, tiny_llama_dir, tmp_path,
                                                          smollm2_tokenizer, caplog):
    # 400 tiny units: enough that the kill after 3 commits lands while most are still to run
    # (with 40, the harvest sometimes finished first and nothing died: 2 of 6 runs).
    cfg = tiny_cfg(tiny_llama_dir, tmp_path / "store", n_units=400, num_actors=2)
    caplog.set_level("WARNING")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("store", harvest(cfg)))
    thread.start()
    _wait_for_commits(Path(cfg.store.path), 3)
    victims = _actor_pids("HarvestWorker")
    assert victims, "no harvest actor process found"
    os.kill(victims[0], signal.SIGKILL)
    thread.join(timeout=300)
    assert "store" in result, "harvest did not finish after an actor was killed"
    assert "died" in caplog.text and "re-queueing" in caplog.text
    store = ActivationStore.open(cfg.store.path)
    assert store.is_complete
    assert np.array_equal(store.tokens(0, store.n_tokens), expected_tokens(cfg, smollm2_tokenizer))


def test_killed_and_restarted_job_resumes_to_the_same_store(tiny_llama_dir, tmp_path,
                                                            smollm2_tokenizer):
    """SIGKILL the whole job (driver + its Ray instance), start it again: same store."""
    store_path = tmp_path / "store"
    args = [f"model.name={tiny_llama_dir}", f"store.path={store_path}", f"out_dir={tmp_path}",
            "data.context_size=32", f"data.n_tokens={32 * 4 * 40}", "data.seed=1",
            f"harvest.hooks=[{','.join(HOOKS)}]", "harvest.contexts_per_unit=4",
            "harvest.batch_size=2", "harvest.num_actors=2", "store.chunk_tokens=64",
            "store.dtype=float32", "sae.widths=[64]", "sae.k=4"]
    cmd = [sys.executable, "-c", "from distributed_sae.cli import harvest_main; harvest_main()", *args]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    first = subprocess.Popen(cmd, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_commits(store_path, 3)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    partial = ActivationStore.open(store_path)
    assert 3 <= len(partial.commits) < 40
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "taking over the writer lock" in second.stdout + second.stderr
    store = ActivationStore.open(store_path)
    assert store.is_complete
    cfg = tiny_cfg(tiny_llama_dir, store_path, n_units=40)
    assert np.array_equal(store.tokens(0, store.n_tokens), expected_tokens(cfg, smollm2_tokenizer))


def test_harvest_on_a_damaged_store_re_harvests_exactly_the_damaged_units(
        ray_local, tiny_llama_dir, tmp_path, caplog):
    """A missing, a truncated and a bit-flipped shard file and a corrupt commit record: the next
    harvest finds them (verify), un-commits and re-harvests those 4 units, and the repaired store
    equals a clean one byte for byte."""
    cfg = tiny_cfg(tiny_llama_dir, tmp_path / "store", n_units=6, num_actors=2)
    store = harvest(cfg)
    clean = tmp_path / "clean"
    shutil.copytree(store.path, clean)
    store.unit_files(1)[f"acts/{HOOKS[0]}"].unlink()
    tokens = store.unit_files(2)["token_ids"]
    tokens.write_bytes(tokens.read_bytes()[:-3])
    acts = store.unit_files(3)[f"acts/{HOOKS[1]}"]
    data = bytearray(acts.read_bytes())
    data[len(data) // 3] ^= 0x04
    acts.write_bytes(bytes(data))
    record_path(store.path, 4).write_text('{"unit": 4, "stats": {"blo')
    kept = {u: record_path(store.path, u).stat().st_mtime_ns for u in (0, 5)}
    with pytest.raises(StoreDamagedError, match=r"unit 1: .* is missing .* run dsae-harvest"):
        ActivationStore.open(store.path).read(HOOKS[0], 128, 256)
    caplog.set_level("INFO")
    repaired = harvest(cfg)
    assert "un-committed damaged unit(s) [1, 2, 3, 4]" in caplog.text
    assert "harvesting 4 of 6 units" in caplog.text
    assert {u: record_path(store.path, u).stat().st_mtime_ns for u in (0, 5)} == kept
    assert repaired.is_complete and repaired.verify() == []
    want = ActivationStore.open(clean)
    n = want.n_tokens
    for hook in HOOKS:
        assert torch.equal(repaired.read(hook, 0, n), want.read(hook, 0, n))
    assert np.array_equal(repaired.tokens(0, n), want.tokens(0, n))
    for u in range(6):  # the very same bytes: the records' checksums match the clean store's
        assert repaired.commits[u] == want.commits[u]


def test_second_writer_is_refused(ray_local, tiny_llama_dir, tmp_path):
    cfg = tiny_cfg(tiny_llama_dir, tmp_path / "store")
    with WriterLock(cfg.store.path):  # as if another live job were writing
        with pytest.raises(StoreLockedError, match="being written by another job"):
            harvest(cfg)
    assert not (tmp_path / "store" / "_commits").exists()


def test_nan_activations_are_reported_with_their_unit(tiny_llama_dir, tmp_path):
    """NaN in a layer's weights poisons its output: the unit is refused, nothing is written."""
    cfg = tiny_cfg(tiny_llama_dir, tmp_path / "store")
    from distributed_sae.harvest.job import open_or_create, plan

    store = open_or_create(cfg, plan(cfg), [])
    worker = HarvestWorker(cfg.model, HOOKS, cfg.store.path, 2, [])
    with torch.no_grad():
        worker.loaded.model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    ctx = np.ones((4, 32), dtype=np.int64)
    with pytest.raises(NonFiniteActivationError, match="unit 7: .* blocks.1.hook_resid_post"):
        worker.run_unit(7, ctx)
    assert int(store.tokens(7 * 128, 8 * 128).max()) == -1  # the unit's rows were never written


def test_deepspeed_sharded_harvest_equals_the_plain_one(ray_local, tiny_llama_dir, tmp_path,
                                                        smollm2_tokenizer):
    """harvest.sharding=deepspeed through the driver: 2 ranks, 5 units (so one padded round)."""
    cfg = tiny_cfg(tiny_llama_dir, tmp_path / "ds", n_units=5, sharding="deepspeed",
                   num_actors=2, group_size=2)
    store = harvest(cfg)
    assert store.is_complete
    assert np.array_equal(store.tokens(0, store.n_tokens), expected_tokens(cfg, smollm2_tokenizer))
    worker = HarvestWorker(cfg.model, HOOKS, cfg.store.path, 2, [])
    ctx = store.tokens(0, store.n_tokens).reshape(-1, 32).astype(np.int64)
    plain = worker.forward_unit(ctx)
    for hook in HOOKS:
        assert torch.allclose(store.read(hook, 0, store.n_tokens), plain[hook], atol=1e-5)


def test_an_actor_that_dies_while_loading_is_started_again(ray_local, tmp_path, caplog):
    """A worker whose actor dies before its `ready` returns (here: the first one built exits in
    its constructor, as a SIGKILL while loading the model would) is replaced, not fatal."""
    import ray

    from distributed_sae.harvest.pool import start_workers

    @ray.remote(num_cpus=0)
    class Flaky:
        def __init__(self, die: bool) -> None:
            if die:
                os._exit(1)  # dies while "loading"

        def ready(self) -> bool:
            return True

    caplog.set_level("WARNING")
    dies = iter([True, False, False])  # the first actor built dies, its replacement lives
    workers = start_workers(lambda: [Flaky.remote(next(dies))], 2)
    assert len(workers) == 2 and all(ray.get(w[0].ready.remote()) for w in workers)
    assert "died while loading the model" in caplog.text
