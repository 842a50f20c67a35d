"""dsae-run stream=true: harvest and train at once, on real Ray actors, real zarr stores and the
tiny Llama (tests/conftest.py), with and without a bound on the store.

The reference for every fault is a clean bounded streamed run (module fixture): an interrupted
run must train on the same multiset of store rows (train/trained_rows.json, the reader's ledger:
nothing lost, nothing twice) and end with bit-identical weights.

Note: test_sigkill_of_a_harvest_actor kills a process titled ray::HarvestWorker, as
tests/test_harvest.py does: do not run it beside a real harvest on the same machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from safetensors.torch import load_file

from distributed_sae.cli import run_stages
from distributed_sae.config import ConfigError
from distributed_sae.store import ActivationStore, split_rows
from distributed_sae.store.budget import store_bytes
from distributed_sae.store.stream_files import consumed_units
from test_harvest import _actor_pids, _wait_for_commits
from test_pipeline import compose_run
from conftest import HANG_S

# bytes: 60% of the full store (60 units of ~8.9 kB + records: 0.59 MB), over the run's minimum
# (min_bytes: 336,937 here, 75 kB of it the 60 commit records' bound).
BOUND = 360_000
MEMBER = "topk_w64_k4_s0"


def overrides(model_dir: str, out: Path, bound: int = BOUND) -> list[str]:
    # 60 units of 4 contexts x 32 tokens; 40 steps of 128 rows: fewer than one pass holds once
    # the BOS rows are dropped, so bounded and unbounded runs train on the same batches.
    return [f"model.name={model_dir}", f"out_dir={out}", "stream=true",
            f"store.max_bytes={bound}", "data.context_size=32", "data.n_tokens=7680",
            "data.seed=1", "harvest.hooks=[blocks.1.hook_resid_post]",
            "harvest.contexts_per_unit=4", "harvest.batch_size=2", "harvest.num_actors=1",
            "store.chunk_tokens=64", "sae.widths=[64]", "sae.k=4", "train.batch_size=128",
            "train.tokens=5120", "train.cpus=1", "train.log_every=5"]


class PeakBytes:
    """Samples a store's bytes on disk every few milliseconds in a thread; .peak is the most."""

    def __init__(self, path: str) -> None:
        self.path, self.peak, self._stop = path, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if Path(self.path).exists():
                self.peak = max(self.peak, store_bytes(self.path))
            self._stop.wait(0.005)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, store_bytes(self.path))
        return self.peak


def weights(cfg) -> dict:
    return load_file(str(Path(cfg.out_dir) / "train" / MEMBER / "sae_weights.safetensors"))


def ledger(cfg) -> dict:
    return json.loads((Path(cfg.out_dir) / "train" / "trained_rows.json").read_text())


def assert_same_training(a, b) -> None:
    la, lb = ledger(a), ledger(b)
    assert (la["rows"], la["digest"], la["steps"]) == (lb["rows"], lb["digest"], lb["steps"])
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].equal(wb[k]), k


@pytest.fixture(scope="module")
def bounded(tmp_path_factory, ray_local, tiny_llama_dir):
    cfg = compose_run(overrides(tiny_llama_dir, tmp_path_factory.mktemp("bounded")))
    watch = PeakBytes(cfg.store.path)
    run_stages(cfg, ("harvest", "train", "eval", "export"))
    return cfg, watch.stop()


@pytest.fixture(scope="module")
def unbounded(tmp_path_factory, ray_local, tiny_llama_dir):
    cfg = compose_run(overrides(tiny_llama_dir, tmp_path_factory.mktemp("unbounded"), 0))
    run_stages(cfg, ("harvest", "train"))
    return cfg


def test_a_bounded_stream_completes_evaluates_and_exports_under_its_bound(bounded):
    cfg, peak = bounded
    assert 0 < peak <= BOUND
    out = Path(cfg.out_dir)
    assert (out / "eval" / "summary.md").is_file()
    assert (out / "export" / MEMBER).is_dir()
    store = ActivationStore.open(cfg.store.path)
    train_rows, held_out = split_rows(store, cfg.train.holdout_fraction)
    # Every unit wholly of training rows went once trained on; the held-out ones are all kept.
    assert consumed_units(store.path) == set(range(train_rows.stop // store.unit_rows))
    assert store.verify() == [] and store.is_complete
    assert store.read(cfg.sae.hook or "blocks.1.hook_resid_post", held_out.start,
                      held_out.stop).abs().sum() > 0
    assert ledger(cfg)["rows"] == ledger(cfg)["tokens_seen"] == 40 * 128


def test_a_bound_changes_nothing_that_is_trained(bounded, unbounded):
    assert_same_training(bounded[0], unbounded)


def test_an_unbounded_stream_keeps_a_store_the_cached_path_reuses(unbounded, tmp_path):
    store = ActivationStore.open(unbounded.store.path)
    assert store.is_complete and not consumed_units(store.path) and store.verify() == []
    cached = compose_run([a for a in overrides(unbounded.model.name, tmp_path, 0)
                          if not a.startswith("stream=")] + [f"store.path={store.path}"])
    run_stages(cached, ("train",))
    assert ledger(cached)["rows"] == 40 * 128  # another order (one global shuffle), same count


def test_sigkill_of_a_harvest_actor_while_streaming_changes_nothing_trained(
        bounded, tiny_llama_dir, tmp_path, caplog):
    cfg = compose_run(overrides(tiny_llama_dir, tmp_path))
    caplog.set_level("WARNING")
    failure: list[BaseException] = []

    def run() -> None:
        try:
            run_stages(cfg, ("harvest", "train"))
        except BaseException as err:  # noqa: BLE001 - reported below
            failure.append(err)

    thread = threading.Thread(target=run)
    watch = PeakBytes(cfg.store.path)
    thread.start()
    _wait_for_commits(Path(cfg.store.path), 3)
    victims = _actor_pids("HarvestWorker")
    assert victims, "no harvest actor process found"
    os.kill(victims[0], signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive() and not failure, failure
    assert "died" in caplog.text and "re-queueing" in caplog.text
    assert watch.stop() <= BOUND
    assert_same_training(cfg, bounded[0])


def test_sigkill_of_the_job_while_streaming_resumes_bit_identically(bounded, tiny_llama_dir,
                                                                     tmp_path):
    """The trainer (the driver process) SIGKILLs itself at step 12, after the checkpoint of step
    8, behind which the bounded store deleted units; its Ray instance is then killed too (the
    whole job is gone). Started again, it finishes with the clean run's rows and weights."""
    out = tmp_path / "job"
    args = overrides(tiny_llama_dir, out)
    cmd = [sys.executable, "-c", "from distributed_sae.cli import run_main; run_main()", *args]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", DSAE_FAULT_AT_STEP="12", DSAE_FAULT_RANK="0",
               DSAE_FAULT_SIGNAL="KILL")
    first = subprocess.Popen(cmd, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert first.wait(timeout=600) == -signal.SIGKILL
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)  # the harvest actor, raylet, GCS: the whole job
        except ProcessLookupError:  # nothing of it is left
            pass
    assert (out / "train" / ".fault_injected").is_file()
    assert consumed_units(out / "store")  # units behind the checkpoint are gone already
    assert not (out / "train" / MEMBER).exists()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    cfg = compose_run(args)
    assert_same_training(cfg, bounded[0])


@pytest.mark.parametrize("extra, message", [
    (["stream=false"], f"store.max_bytes={BOUND} bounds the store of a streamed run"),
    (["train.tokens=100000"], "a second epoch needs the units a bounded store deletes"),
    (["sae.kind=relu", "train.resample_steps=[10]"], "resamples dead features"),
    (["store.max_bytes=-1"], "store.max_bytes must be >= 0"),
])
def test_bounded_streaming_refuses_what_it_cannot_do(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        compose_run(overrides("/nowhere", tmp_path) + extra)


def test_a_bound_too_small_to_stream_is_one_line_and_exit_2(tiny_llama_dir, tmp_path):
    args = overrides(tiny_llama_dir, tmp_path, bound=50_000)
    cmd = [sys.executable, "-c", "from distributed_sae.cli import run_main; run_main()", *args]
    proc = subprocess.run(cmd, env=dict(os.environ, RAY_AUTH_MODE="disabled"),
                          capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "ERROR" in ln]
    assert len(lines) == 1 and "store.max_bytes=50000 is under the" in lines[0], lines
    assert not list((tmp_path / "store" / "_commits").glob("u*.json"))  # nothing harvested


def test_a_killed_ray_train_worker_of_a_bounded_stream_loses_and_repeats_nothing(
        bounded, tiny_llama_dir, tmp_path):
    """train.workers=2: the engine's ranks run as Ray Train workers beside the harvest actor on
    one Ray instance (3 logical CPUs: 1 actor + 2 workers); they agree each step on the end of
    the pass and on checkpoints, and rank 0 deletes. Rank 1 dies hard at step 12 (after the
    checkpoint of step 8, whose deleted units the restart must not need): Ray Train restarts
    the group, which resumes and trains on exactly the clean single-process run's rows (the
    placed member reads every row of each batch, in the same seeded order)."""
    out = tmp_path / "workers"
    args = overrides(tiny_llama_dir, out) + ["train.workers=2", "cluster.num_cpus=3"]
    cmd = [sys.executable, "-c", "from distributed_sae.cli import run_main; run_main()", *args]
    watch = PeakBytes(str(out / "store"))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", DSAE_FAULT_AT_STEP="12", DSAE_FAULT_RANK="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert (out / "train" / ".fault_injected").is_file()
    assert "resumed from" in proc.stdout + proc.stderr
    assert watch.stop() <= BOUND
    cfg = compose_run(args)
    store = ActivationStore.open(cfg.store.path)
    train_rows, _ = split_rows(store, cfg.train.holdout_fraction)
    assert consumed_units(store.path) == set(range(train_rows.stop // store.unit_rows))
    assert (out / "eval" / "summary.md").is_file()
    clean = ledger(bounded[0])
    got = ledger(cfg)
    assert (got["rows"], got["digest"], got["steps"]) == (clean["rows"], clean["digest"], 40)
