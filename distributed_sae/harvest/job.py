"""The harvest driver: plan work units, create or resume the store, feed a pool of Ray actors.

Work unit u holds contexts [u * contexts_per_unit, (u + 1) * contexts_per_unit) of the seeded,
packed corpus, and its rows fill exactly one shard of every store array, so each shard has one
writer. A unit is committed (a record file) only after the actor's write returned, so a job killed
at any point restarts by re-running exactly the uncommitted units.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from distributed_sae.config import ConfigError, RunConfig, parse_hook
from distributed_sae.data import load_contexts
from distributed_sae.harvest.worker import HarvestWorker, NonFiniteActivationError
from distributed_sae.models import load_tokenizer, model_dims
from distributed_sae.parallel import check_fits, init_ray
from distributed_sae.store import ActivationStore, WriterLock, commit_unit

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # an actor death re-runs its unit; a unit that kills 3 actors is a bug


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
    n_layers, d_model, d_mlp = model_dims(cfg.model)
    hook_dims = {h: d_mlp if parse_hook(h)[1] == "mlp.hook_post" else d_model
                 for h in cfg.harvest.hooks}
    return ActivationStore.create(
        path, hook_dims=hook_dims, n_units=want["n_units"], unit_rows=want["unit_rows"],
        chunk_rows=want["chunk_rows"], dtype=want["dtype"], compression=want["compression"],
        metadata=dict(want, exclude_token_ids=exclude, n_layers=n_layers))


def _make_actor(cfg: RunConfig, exclude: list[int]) -> Any:
    import ray

    h = cfg.harvest
    remote = ray.remote(num_cpus=h.cpus_per_actor, num_gpus=h.gpus_per_actor)(HarvestWorker)
    return remote.remote(cfg.model, h.hooks, cfg.store.path, h.batch_size, exclude,
                         threads=max(1, int(h.cpus_per_actor)))


def harvest(cfg: RunConfig) -> ActivationStore:
    """Run the harvest stage; returns the complete store."""
    tokenizer = load_tokenizer(cfg.model)
    exclude = sorted(set(tokenizer.all_special_ids)) if cfg.data.exclude_special_tokens else []
    want = plan(cfg)
    Path(cfg.store.path).parent.mkdir(parents=True, exist_ok=True)
    with WriterLock(cfg.store.path):
        store = open_or_create(cfg, want, exclude)
        todo = [u for u in range(want["n_units"]) if u not in store.commits]
        if not todo:
            log.info("store %s is complete (%d tokens): nothing to harvest", store.path, store.n_tokens)
            return store
        log.info("harvesting %d of %d units (%d tokens) into %s", len(todo), want["n_units"],
                 len(todo) * want["unit_rows"], store.path)
        contexts = load_contexts(cfg.data, tokenizer, want["n_units"] * cfg.harvest.contexts_per_unit)
        _run_pool(cfg, store, todo, contexts, exclude)
    store.refresh()
    return store


def _run_pool(cfg: RunConfig, store: ActivationStore, todo: list[int], contexts: np.ndarray,
              exclude: list[int]) -> None:
    """Feed units to actors until all are committed, replacing actors that die."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    init_ray(cfg.cluster)
    n = min(cfg.harvest.num_actors, len(todo))
    check_fits(n, cfg.harvest.cpus_per_actor, cfg.harvest.gpus_per_actor, "harvest",
               on_cluster=bool(cfg.cluster.address))
    actors = [_make_actor(cfg, exclude) for _ in range(n)]
    ray.get([a.ready.remote() for a in actors])  # model loading is not harvest throughput
    cpu = cfg.harvest.contexts_per_unit
    pending, attempts, in_flight = deque(todo), {u: 0 for u in todo}, {}
    idle = list(range(n))
    bar = tqdm(total=len(todo) * store.unit_rows, unit="tok", unit_scale=True, desc="harvest")
    start = time.perf_counter()
    while pending or in_flight:
        while idle and pending:
            a, u = idle.pop(), pending.popleft()
            in_flight[actors[a].run_unit.remote(u, contexts[u * cpu:(u + 1) * cpu])] = (u, a)
        done, _ = ray.wait(list(in_flight), num_returns=1)
        u, a = in_flight.pop(done[0])
        try:
            record = ray.get(done[0])
        except RayActorError as err:
            attempts[u] += 1
            if attempts[u] >= MAX_ATTEMPTS:
                raise RuntimeError(f"unit {u} killed {attempts[u]} actors; last: {err}") from err
            log.warning("actor %d died on unit %d (%s); restarting it and re-queueing", a, u, err)
            actors[a] = _make_actor(cfg, exclude)
            pending.appendleft(u)
        except RayTaskError as err:
            if isinstance(err.cause, NonFiniteActivationError):
                raise err.cause from None
            raise
        else:
            commit_unit(store.path, u, record)
            bar.update(store.unit_rows)
        idle.append(a)
    bar.close()
    rate = len(todo) * store.unit_rows / (time.perf_counter() - start)
    log.info("harvested %d tokens at %.0f tokens/s", len(todo) * store.unit_rows, rate)
    for actor in actors:
        ray.kill(actor)
