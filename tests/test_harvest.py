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
from conftest import HANG_S

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


def _wait_loaded(caplog, n: int, timeout: float = 600.0) -> None:
    """Until n harvest workers have loaded their model (each then runs units; a kill before
    that is the died-while-loading path, tested on its own)."""
    deadline = time.time() + timeout
    while caplog.text.count("loaded its model") < n:
        assert time.time() < deadline, f"{n} harvest workers did not load in {timeout} s"
        time.sleep(0.05)


def _kill_an_actor_mid_harvest(harvest_fn, cfg: RunConfig, caplog) -> dict:
    """Run harvest_fn in a thread; once both actors have loaded and 3 units are committed,
    SIGKILL one actor; wait for the harvest to end. Returns {"out": its result} if it did."""
    caplog.set_level("INFO", logger="distributed_sae.harvest.pool")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("out", harvest_fn()))
    thread.start()
    _wait_loaded(caplog, 2)
    _wait_for_commits(Path(cfg.store.path), 3)
    victims = _actor_pids("HarvestWorker")
    assert len(victims) == 2, victims
    os.kill(victims[0], signal.SIGKILL)
    thread.join(timeout=900)
    return result


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
    result = _kill_an_actor_mid_harvest(lambda: harvest(cfg), cfg, caplog)
    assert "out" in result, "harvest did not finish after an actor was killed"
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
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_S)
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


def _drain_loading(pool) -> None:
    import ray

    while pool.loading:
        pool.loaded(ray.wait(list(pool.loading), num_returns=1)[0][0])


def test_an_actor_that_dies_while_loading_is_started_again(ray_local, caplog):
    """A worker whose actor dies before its `ready` returns (here: it exits in its constructor,
    as a SIGKILL while loading the model would) is started again, not fatal; a slot whose
    model dies MAX_ATTEMPTS times in a row is given up while another worker lives, and the job
    stops only when none is left."""
    import ray

    from distributed_sae.harvest.pool import MAX_ATTEMPTS, _Pool

    @ray.remote(num_cpus=0)
    class Flaky:
        def __init__(self, die: bool) -> None:
            if die:
                os._exit(1)  # dies while "loading"

        def ready(self) -> bool:
            return True

    caplog.set_level("WARNING")
    for deaths, alive in (([True, False, False], [0, 1]),  # slot 0 dies once, then lives
                          ([True, False, True, True], [1])):  # slot 0 dies 3 times: given up
        it = iter(deaths)
        pool = _Pool(lambda: [Flaky.remote(next(it))], iter([]))
        pool.launch(0)
        pool.launch(1)
        _drain_loading(pool)
        assert sorted(pool.idle) == alive and sorted(pool.workers) == alive
        assert all(ray.get(pool.workers[w][0].ready.remote()) for w in alive)
        pool.close(finished=False)
    assert "died while loading the model" in caplog.text
    assert "going on with 1 worker(s)" in caplog.text
    pool = _Pool(lambda: [Flaky.remote(True)], iter([]))
    pool.launch(0)
    with pytest.raises(RuntimeError, match=f"{MAX_ATTEMPTS} times and no other worker is left"):
        _drain_loading(pool)


def test_a_replacement_that_cannot_be_placed_does_not_stall_the_harvest(
        ray_local, tiny_llama_dir, tmp_path, smollm2_tokenizer, caplog):
    """As on a cluster whose node is lost for good: one of two actors is SIGKILLed and its
    replacement needs a resource no node has (so Ray never places it); the other actor
    harvests every unit, with nothing lost or duplicated, and the pending actor is cancelled."""
    import ray

    from distributed_sae.harvest.job import prepare, run_job

    @ray.remote(resources={"a_lost_node": 1})
    class Unplaceable:
        def ready(self) -> bool:
            return True

    cfg = tiny_cfg(tiny_llama_dir, tmp_path / "store", n_units=200, num_actors=2)
    with WriterLock(cfg.store.path):
        job = prepare(cfg)
        made, real = [], job.make_worker
        job.make_worker = lambda: made.append(1) or (real() if len(made) <= 2
                                                     else [Unplaceable.remote()])
        result = _kill_an_actor_mid_harvest(lambda: run_job(job), cfg, caplog)
    assert result["out"].retries == 1 and len(made) == 3  # one replacement, never placed
    assert "re-queueing" in caplog.text
    store = ActivationStore.open(cfg.store.path)
    assert store.is_complete and store.verify() == []
    assert np.array_equal(store.tokens(0, store.n_tokens), expected_tokens(cfg, smollm2_tokenizer))
    deadline = time.time() + 120  # none left behind (ray.kill returns before the exit)
    while _actor_pids("HarvestWorker") and time.time() < deadline:
        time.sleep(0.1)
    assert not _actor_pids("HarvestWorker")
