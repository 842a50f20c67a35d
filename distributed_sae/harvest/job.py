"""The harvest driver: plan work units, create or resume the store, feed a pool of Ray actors.

Work unit u holds contexts [u * contexts_per_unit, (u + 1) * contexts_per_unit) of the seeded,
packed corpus, and its rows fill exactly one shard of every store array, so each shard has one
writer. A unit is committed (a record file) only after the actor's write returned, so a job killed
at any point restarts by re-running exactly the uncommitted units. Contexts are packed as a
stream, one unit at a time, so the driver never holds the whole token array.

A run on an existing store first verifies its committed units against their commit records
(ActivationStore.verify: sizes and crc32c of every shard file, and records that cannot be read),
un-commits the damaged ones with a warning naming them, and re-harvests exactly those: this is the
repair that StoreDamagedError's message names.

Model diffing (RunConfig.model_b, hooks 'b/...'): the contexts are packed with model's tokenizer
and the same ids run through both models, so model_b's tokenizer must have the same vocabulary;
that is checked before the store is touched or any actor starts. The store's metadata records
model_b's name and revision next to model's.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from distributed_sae.config import ConfigError, RunConfig, parse_hook
from distributed_sae.config.checks import is_model_b
from distributed_sae.data import iter_unit_contexts
from distributed_sae.data.packing import bos_eos_ids
from distributed_sae.harvest.pool import PoolResult, run_pool
from distributed_sae.harvest.worker import HarvestWorker
from distributed_sae.models import load_tokenizer, model_dims
from distributed_sae.parallel import check_fits, init_ray
from distributed_sae.parallel.cluster import ray_strategy
from distributed_sae.store import ActivationStore, WriterLock

log = logging.getLogger(__name__)


def plan(cfg: RunConfig) -> dict[str, Any]:
    """Unit geometry and the provenance that identifies a store (a resumed job must match it)."""
    n_contexts = math.ceil(cfg.data.n_tokens / cfg.data.context_size)
    n_units = math.ceil(n_contexts / cfg.harvest.contexts_per_unit)
    d = cfg.data
    return {
        "model_name": cfg.model.name, "model_revision": cfg.model.revision,
        "model_dtype": cfg.model.dtype, "hooks": list(cfg.harvest.hooks),
        "corpus": {"name": d.name, "subset": d.subset, "split": d.split,
                   "text_field": d.text_field, "seed": d.seed, "prepend_bos": d.prepend_bos},
        "context_size": d.context_size, "contexts_per_unit": cfg.harvest.contexts_per_unit,
        "n_units": n_units, "unit_rows": cfg.harvest.contexts_per_unit * d.context_size,
        "dtype": cfg.store.dtype, "chunk_rows": cfg.store.chunk_tokens,
        "compression": cfg.store.compression,
        # Only stores with the second model's hooks name it, so older stores still match.
        **({"model_b_name": cfg.model_b.name, "model_b_revision": cfg.model_b.revision,
            "model_b_dtype": cfg.model_b.dtype} if cfg.harvests_model_b else {}),
    }


def _mismatch(meta: dict[str, Any], want: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}


def open_or_create(cfg: RunConfig, want: dict[str, Any], exclude: list[int]) -> ActivationStore:
    """Resume a store made with the same plan, or create it; refuse a different one."""
    path = Path(cfg.store.path)
    if (path / "zarr.json").is_file():
        store = ActivationStore.open(path)
        diff = _mismatch(store.metadata, want)
        if not diff:
            return store
        if not cfg.store.overwrite:
            shown = ", ".join(f"{k}: store has {a!r}, config asks {b!r}" for k, (a, b) in diff.items())
            raise ConfigError(
                f"store {path} was made with other settings ({shown}): use another store.path, "
                f"or store.overwrite=true to delete it")
        log.warning("deleting store %s (store.overwrite=true)", path)
        shutil.rmtree(path)
    n_layers = model_dims(cfg.model)[0]
    hook_dims = _hook_dims(cfg)
    return ActivationStore.create(
        path, hook_dims=hook_dims, n_units=want["n_units"], unit_rows=want["unit_rows"],
        chunk_rows=want["chunk_rows"], dtype=want["dtype"], compression=want["compression"],
        metadata=dict(want, exclude_token_ids=exclude, n_layers=n_layers))


def _hook_dims(cfg: RunConfig) -> dict[str, int]:
    """The width of every harvested hook, each from its own model's shape (weights not loaded)."""
    dims = {"": model_dims(cfg.model)}
    if cfg.harvests_model_b:
        dims["b"] = model_dims(cfg.model_b)
    out = {}
    for h in cfg.harvest.hooks:
        _, d_model, d_mlp = dims["b" if is_model_b(h) else ""]
        out[h] = d_mlp if parse_hook(h)[1] == "mlp.hook_post" else d_model
    return out


def tokenizer_difference(a: Any, b: Any) -> str | None:
    """Why two tokenizers would not read the same token ids as the same tokens, or None: their
    vocabularies (every token string and its id, added and special tokens included) differ."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va == vb:
        return None
    differ = set(va.items()) ^ set(vb.items())  # (token, id) pairs in one vocabulary only
    token, idx = min(differ, key=lambda t: (t[1], t[0]))
    return (f"vocabularies of {len(va)} and {len(vb)} tokens differ in {len(differ)} (token, id) "
            f"pairs, e.g. {token!r} = {idx} in only one")


def check_model_b_tokenizer(cfg: RunConfig, tokenizer: Any) -> Any:
    """model_b's tokenizer, refused (a one-line ConfigError) unless it reads the ids that
    model's `tokenizer` packs as the same tokens; None without the second model's hooks.

    With the same vocabulary, other BOS and EOS tokens (a base model and its chat fine-tune) only
    warn: packing inserts model's (data/packing.py), the same strings in both vocabularies, so
    the rows still line up; model_b then reads model's document markers instead of its own, and
    the rows of every special token of either tokenizer are excluded (`excluded_ids`)."""
    if not cfg.harvests_model_b:
        return None
    other = load_tokenizer(cfg.model_b)
    diff = tokenizer_difference(tokenizer, other)
    if diff is not None:
        raise ConfigError(
            f"model.name={cfg.model.name!r} and model_b.name={cfg.model_b.name!r} have different "
            f"tokenizers ({diff}): the same token ids would not line up as the same tokens in "
            f"both models; give model_b a model with model.name's tokenizer")
    if bos_eos_ids(tokenizer) != bos_eos_ids(other):
        log.warning("model %s and model_b %s share a vocabulary but not their (BOS, EOS) ids, %s "
                    "and %s: contexts carry model's, which model_b reads too", cfg.model.name,
                    cfg.model_b.name, bos_eos_ids(tokenizer), bos_eos_ids(other))
    return other


def excluded_ids(cfg: RunConfig, *tokenizers: Any) -> list[int]:
    """Special-token ids whose rows training and eval skip: every tokenizer's (a row one model
    treats as special is skipped for both); [] without data.exclude_special_tokens."""
    if not cfg.data.exclude_special_tokens:
        return []
    return sorted({i for t in tokenizers if t is not None for i in t.all_special_ids})


def repair(store: ActivationStore) -> list[int]:
    """Verify the committed units; un-commit the damaged ones so that this run re-harvests them.

    Reads every committed byte (integrity.py has the measured rate). Returns the units.
    """
    start = time.perf_counter()
    damage = store.verify()
    log.info("verified the committed units of %s in %.1f s: %d damaged file(s)", store.path,
             time.perf_counter() - start, len(damage))
    if not damage:
        return []
    for d in damage:
        log.warning("store %s is damaged: %s", store.path, d)
    units = store.uncommit(damage)
    log.warning("un-committed damaged unit(s) %s of %s: they are harvested again", units,
                store.path)
    return units


def actor_gpus(cfg: RunConfig) -> float:
    """GPUs one harvest actor reserves from Ray: harvest.gpus_per_actor when set, else 1.0 for
    a model on a GPU (model.device 'cuda...') and 0.0 for one on the CPU.

    With harvest.sharding=device_map the unset value is 0.0: model.device is ignored then and
    the GPUs one model spreads over are not in the config (an actor without a reservation sees
    every GPU). Ray shows an actor only the GPUs it reserved, numbered from 0, so an unset value
    refuses model.device='cuda:1'. Pure: the start-up checks call it before Ray starts.
    """
    h, device = cfg.harvest, cfg.model.device
    if h.gpus_per_actor is not None:
        return float(h.gpus_per_actor)
    on_gpu = device.startswith("cuda")
    if h.sharding == "device_map":
        return 0.0
    if on_gpu and device not in ("cuda", "cuda:0"):
        raise ConfigError(
            f"model.device={device!r}: Ray gives each harvest actor its own GPU, which the actor "
            f"sees as cuda:0; use model.device=cuda, or harvest.gpus_per_actor=0 to place the "
            f"actors on {device} yourself")
    return 1.0 if on_gpu else 0.0


def _worker_factory(cfg: RunConfig, exclude: list[int]) -> Callable[[], list[Any]]:
    """A function that starts one worker: a list of Ray actors that run units in lockstep."""
    import ray

    h, gpus = cfg.harvest, actor_gpus(cfg)
    if h.sharding == "deepspeed":
        from distributed_sae.harvest.deepspeed_worker import create_deepspeed_group

        return lambda: create_deepspeed_group(
            cfg.model, list(h.hooks), cfg.store.path, h.batch_size, exclude, h.group_size,
            h.cpus_per_actor, gpus)
    # SPREAD: Ray places each new actor on the least loaded node, so a replacement for an actor
    # of a lost node lands on a live one; cluster.placement=pack keeps Ray's default (fill a
    # node before the next).
    strategy = "SPREAD" if ray_strategy(cfg.cluster) == "SPREAD" else "DEFAULT"
    remote = ray.remote(num_cpus=h.cpus_per_actor, num_gpus=gpus,
                        scheduling_strategy=strategy)(HarvestWorker)
    model_b = cfg.model_b if cfg.harvests_model_b else None
    return lambda: [remote.remote(cfg.model, list(h.hooks), cfg.store.path, h.batch_size,
                                  exclude, threads=max(1, int(h.cpus_per_actor)),
                                  model_b=model_b)]


@dataclass
class HarvestJob:
    """A harvest ready to run: its store (writer lock held by the caller), the units to do in
    order, and how many workers of which actors run them."""

    store: ActivationStore
    units: Iterator[tuple[int, Any]]
    n_todo: int
    n_workers: int
    make_worker: Callable[[], list[Any]]


def prepare(cfg: RunConfig) -> HarvestJob:
    """Open or create the store, repair it, plan the units left and start Ray; the caller holds
    the store's WriterLock."""
    tokenizer = load_tokenizer(cfg.model)
    tokenizer_b = check_model_b_tokenizer(cfg, tokenizer)  # before the store or any actor
    exclude = excluded_ids(cfg, tokenizer, tokenizer_b)
    want = plan(cfg)
    store = open_or_create(cfg, want, exclude)
    repair(store)
    committed = set(store.commits)
    n_todo = want["n_units"] - len(committed)
    blocks = iter_unit_contexts(cfg.data, tokenizer, cfg.harvest.contexts_per_unit,
                                want["n_units"])
    units = ((u, c) for u, c in enumerate(blocks) if u not in committed)
    h = cfg.harvest
    slots = h.group_size if h.sharding == "deepspeed" else 1
    n_workers = max(1, min(h.num_actors // slots, math.ceil(n_todo / slots)))
    if n_todo:
        init_ray(cfg.cluster)
        gpus = actor_gpus(cfg)
        log.info("harvesting %d of %d units (%d tokens) into %s: %d worker(s) of %d actor(s), "
                 "each reserving %s CPU and %s GPU", n_todo, want["n_units"],
                 n_todo * want["unit_rows"], store.path, n_workers, slots, h.cpus_per_actor, gpus)
        check_fits(n_workers * slots, h.cpus_per_actor, gpus, "harvest",
                   on_cluster=bool(cfg.cluster.address))
    return HarvestJob(store, units, n_todo, n_workers, _worker_factory(cfg, exclude))


def run_job(job: HarvestJob, gate: Any = None, stop: threading.Event | None = None
            ) -> PoolResult:
    """Harvest the job's units (see run_pool for gate and stop)."""
    result = run_pool(job.store, job.units, job.n_todo, job.n_workers, job.make_worker,
                      gate=gate, stop=stop)
    log.info("harvested %d tokens at %.0f tokens/s (%d worker restarts)", result.tokens,
             result.tokens_per_s, result.retries)
    job.store.refresh()
    return result


def harvest(cfg: RunConfig) -> ActivationStore:
    """Run the harvest stage; returns the complete store."""
    Path(cfg.store.path).parent.mkdir(parents=True, exist_ok=True)
    with WriterLock(cfg.store.path):
        job = prepare(cfg)
        if job.n_todo == 0:
            log.info("store %s is complete (%d tokens): nothing to harvest", job.store.path,
                     job.store.n_tokens)
            return job.store
        gate = None
        if cfg.stream and cfg.store.max_bytes:  # a dsae-train stream=true job frees the room
            from distributed_sae.store.budget import DiskBudget

            gate = DiskBudget(job.store, cfg.store.max_bytes)
        run_job(job, gate=gate)
    return job.store
