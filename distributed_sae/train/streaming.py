"""dsae-run stream=true: harvest and train at once, on one Ray cluster.

    harvest actors --commit units--> store (bounded by store.max_bytes) --follow--> the engine
         ^                                                                              |
         +---- wait while the store is full <--- consumed units deleted after checkpoints

The driver holds the store's writer lock, runs the harvest's actor pool in a thread and the one
training engine in its main thread (train.workers = 1) or on Ray Train workers (> 1). They share
only files (store/stream_files.py): commit records, consumed markers and a failure record, which stops a reader that waits for units the harvest will never write.

Faults: a harvest actor that dies is replaced and its unit redone (harvest/pool.py); the reader
reads committed units only, in an order fixed by the seed, so it never sees a partial unit, and
a lost or redone unit changes nothing it trains on. A killed job resumes as a whole: the harvest
skips committed (and consumed) units, the trainer starts from its newest checkpoint, and in a
bounded store every unit from that checkpoint's position on is still there.

Resources: harvest actors reserve their CPUs and GPUs from Ray; an in-driver trainer uses
train.cpus threads (default: the local cores the actors leave), Ray Train workers reserve
train.cpus each. What cannot fit is refused before any actor starts.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import replace
from pathlib import Path

from distributed_sae.config import ConfigError, RunConfig
from distributed_sae.harvest.job import HarvestJob, actor_gpus, prepare, run_job
from distributed_sae.store import ActivationReader, ActivationStore, WriterLock
from distributed_sae.store.budget import DiskBudget, store_bytes, unit_bytes_bound
from distributed_sae.store.stream_files import clear_stream_state, set_failed
from distributed_sae.train.stream_source import min_bytes

log = logging.getLogger(__name__)

def read_shares(cfg: RunConfig) -> int:
    """How many shares of the store the plan reads (parallel/plan.py's read_world): latent-
    sharded replicas, replicated ranks, or one for one process and for members placed by cost
    (every rank reads every row)."""
    t = cfg.train
    if t.latent_shards > 1:
        return t.workers // t.latent_shards
    return t.workers if t.workers > 1 and t.placement != "cost" else 1


def window_units(cfg: RunConfig, store: ActivationStore) -> int:
    """Units of one shuffling window of the followed reader (ActivationReader.window)."""
    need = read_shares(cfg) * ActivationReader.buffer_chunks * store.chunk_rows  # default
    return max(1, -(-need // store.unit_rows))


def check_bound(cfg: RunConfig, store: ActivationStore) -> None:
    """Refuse a store.max_bytes under min_bytes, saying what to set."""
    window = window_units(cfg, store)
    need = min_bytes(cfg, store, window, cfg.harvest.num_actors)
    if cfg.store.max_bytes < need:
        raise ConfigError(
            f"store.max_bytes={cfg.store.max_bytes} is under the {need} bytes this streamed run "
            f"needs (the held-out units, two shuffling windows of {window} units of at most "
            f"{unit_bytes_bound(store)} bytes, and {cfg.harvest.num_actors} unit(s) being "
            f"written): set store.max_bytes >= {need}, or 0 for no bound")


def train_cpus(cfg: RunConfig, job: HarvestJob) -> int:
    """CPU threads of the in-driver trainer, or per Ray Train worker; refuses what cannot fit."""
    h = cfg.harvest
    slots = job.n_workers * (h.group_size if h.sharding == "deepspeed" else 1)
    harvest_cpus = slots * h.cpus_per_actor if job.n_todo else 0.0
    if cfg.train.workers > 1:
        import ray

        from distributed_sae.parallel import init_ray

        init_ray(cfg.cluster)
        have = float(ray.cluster_resources().get("CPU", 0))
        cpus = cfg.train.cpus or 1
        where = "the Ray cluster"
        need = harvest_cpus + cfg.train.workers * cpus
    else:
        have = float(cfg.cluster.num_cpus or os.cpu_count() or 1)
        cpus = cfg.train.cpus or max(1, int(have - harvest_cpus))
        where = "this machine" if not cfg.cluster.address else "the driver's machine"
        need = (harvest_cpus if not cfg.cluster.address else 0.0) + cpus
    if need > have:
        raise ConfigError(
            f"stream=true: {slots} harvest actor(s) x harvest.cpus_per_actor={h.cpus_per_actor} "
            f"and training's {cfg.train.workers} x train.cpus={cpus} need {need:g} CPUs, "
            f"{where} has {have:g}: lower harvest.num_actors, harvest.cpus_per_actor or "
            f"train.cpus")
    if cfg.train.workers > 1 and cfg.train.device.startswith("cuda"):
        _check_gpus(cfg, slots * actor_gpus(cfg) if job.n_todo else 0.0)
    return cpus


def _check_gpus(cfg: RunConfig, harvest_gpus: float) -> None:
    """Ray Train workers on GPUs reserve one each beside the harvest actors' GPUs."""
    import ray

    have = float(ray.cluster_resources().get("GPU", 0))
    need = harvest_gpus + cfg.train.workers
    if need > have and not cfg.cluster.address:
        raise ConfigError(
            f"stream=true: the harvest's {harvest_gpus:g} GPU(s) and train.workers="
            f"{cfg.train.workers} GPU workers need {need:g} GPUs, the Ray instance has {have:g}: "
            f"lower harvest.num_actors or train.workers, or train on the CPU (train.device=cpu)")


def _harvest(job: HarvestJob, gate: DiskBudget, stop: threading.Event,
             failure: dict[str, BaseException]) -> None:
    """The harvest thread: run the pool; a failure is recorded for the readers that wait."""
    try:
        run_job(job, gate=gate, stop=stop)
    except BaseException as err:  # noqa: BLE001 - re-raised by the driver
        failure["error"] = err
        set_failed(job.store.path, f"{type(err).__name__}: {err}")


def stream(cfg: RunConfig) -> list[Path]:
    """Harvest and train at once; returns the trained members' folders once the harvest
    (held-out units included) has finished too."""
    from distributed_sae.train.trainer import train

    Path(cfg.store.path).parent.mkdir(parents=True, exist_ok=True)
    with WriterLock(cfg.store.path):
        job = prepare(cfg)
        clear_stream_state(job.store.path)
        cfg = replace(cfg, train=replace(cfg.train, cpus=train_cpus(cfg, job)))
        if cfg.store.max_bytes:
            check_bound(cfg, job.store)
        gate = DiskBudget(job.store, cfg.store.max_bytes)  # unbounded: reports the fill only
        stop, failure = threading.Event(), {}
        thread = threading.Thread(target=_harvest, args=(job, gate, stop, failure),
                                  name="stream-harvest", daemon=True)
        thread.start()
        log.info("streaming: %d unit(s) to harvest, training with %d CPU thread(s)%s",
                 job.n_todo, cfg.train.cpus,
                 f", store bound {cfg.store.max_bytes} bytes" if cfg.store.max_bytes else "")
        try:
            folders = train(cfg)
        except BaseException:
            stop.set()
            thread.join()
            if "error" in failure:  # the trainer stopped because the harvest did: say why
                raise failure["error"] from None
            raise
        thread.join()  # the held-out units may still be being harvested
        if "error" in failure:
            raise failure["error"]
        _report(cfg, job, gate)
    return folders


def _report(cfg: RunConfig, job: HarvestJob, gate: DiskBudget) -> None:
    now = store_bytes(job.store.path)
    if not cfg.store.max_bytes:
        log.info("streaming done: store %s holds %d bytes (unbounded: reusable as a cache)",
                 job.store.path, now)
        return
    log.info("streaming done: store peak %d bytes (bound %d), %d bytes now", gate.peak,
             cfg.store.max_bytes, now)
