"""The actor pool of a harvest job: hand out units, commit results, replace dead workers.

A *worker* is a group of Ray actors that run units in lockstep: one actor for a plain or
device_map-sharded model, `group_size` actors for a DeepSpeed ZeRO-3 group (one process group,
each rank feeding its own unit; a round with fewer units than ranks is padded with unit -1, which
runs the forward pass but writes nothing, because ZeRO-3's all-gathers are collective).

Each worker slot is *loading* (its actors' `ready` calls in flight), idle or busy. Nothing waits
on one slot: a worker that dies (SIGKILL, out of memory, a lost node; for a group: any of its
actors) is killed whole, its units go back to the front of the queue, and its replacement loads
while the other workers go on. A replacement that Ray cannot place (its node is gone and no
other node has room) stays *loading* and the harvest finishes on the workers left; the job only
stops for a unit that has killed MAX_ATTEMPTS workers (the unit is then the likely cause), or
when every slot's model died while loading MAX_ATTEMPTS times in a row.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
from tqdm.auto import tqdm

from distributed_sae.harvest.worker import NonFiniteActivationError
from distributed_sae.store.integrity import is_disk_full
from distributed_sae.store import ActivationStore, commit_unit

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
WAIT_S = 0.5  # seconds between looks at the disk bound or the stop flag while waiting
STALL_LOG_S = 60.0  # how often to say that no worker is running while replacements wait
Unit = tuple[int, np.ndarray]  # (unit index, contexts (n_ctx, ctx) int64)


@dataclass
class PoolResult:
    """What a pool run did: units committed and the harvest rate (model loading excluded)."""

    units: int
    tokens: int
    seconds: float
    retries: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


@dataclass
class _Pool:
    make_worker: Callable[[], list[Any]]
    units: Iterator[Unit]
    workers: dict[int, list[Any]] = field(default_factory=dict)  # slot -> its actors
    loading: dict[Any, int] = field(default_factory=dict)  # an actor's `ready` ref -> slot
    load_failures: dict[int, int] = field(default_factory=dict)  # slot -> deaths in a row
    idle: deque = field(default_factory=deque)  # loaded slots without units
    retry: deque = field(default_factory=deque)  # units to run again, first
    attempts: dict[int, int] = field(default_factory=dict)
    in_flight: dict[Any, tuple[int, np.ndarray, int]] = field(default_factory=dict)
    outstanding: dict[int, int] = field(default_factory=dict)
    started: float | None = None  # when the first worker finished loading

    def launch(self, w: int) -> None:
        """Start slot w's actors; the slot turns idle once every actor's `ready` returns."""
        self.workers[w] = self.make_worker()
        self.outstanding[w] = 0
        for actor in self.workers[w]:
            self.loading[actor.ready.remote()] = w

    def is_loaded(self, w: int) -> bool:
        return w in self.workers and w not in self.loading.values()

    def loaded(self, ref: Any) -> None:
        """One `ready` call of a loading slot returned (or its actor died)."""
        import ray
        from ray.exceptions import RayActorError

        w = self.loading.pop(ref)
        try:
            ray.get(ref)
        except RayActorError as err:
            self._load_failed(w, err)
            return
        if self.is_loaded(w):
            self.load_failures.pop(w, None)
            self.started = self.started or time.perf_counter()
            self.idle.append(w)
            log.info("harvest worker %d loaded its model", w)

    def _load_failed(self, w: int, err: BaseException) -> None:
        import ray

        self.loading = {r: s for r, s in self.loading.items() if s != w}
        for actor in self.workers.pop(w):
            ray.kill(actor)
        n = self.load_failures[w] = self.load_failures.get(w, 0) + 1
        if n < MAX_ATTEMPTS:
            log.warning("harvest worker %d died while loading the model (%s); starting it "
                        "again (try %d of %d)", w, type(err).__name__, n + 1, MAX_ATTEMPTS)
            self.launch(w)
        elif not self.workers:
            raise RuntimeError(f"harvest worker {w} died while loading the model "
                               f"{MAX_ATTEMPTS} times and no other worker is left; last "
                               f"error: {err}") from err
        else:
            log.warning("harvest worker %d died while loading the model %d times; going on "
                        "with %d worker(s)", w, n, len(self.workers))

    def has_units(self) -> bool:
        """Whether any unit is left to hand out (peeks one from the iterator into retry)."""
        if not self.retry:
            unit = next(self.units, None)
            if unit is not None:
                self.retry.append(unit)
        return bool(self.retry)

    def take(self, n: int) -> list[Unit]:
        out = []
        while len(out) < n and self.has_units():
            out.append(self.retry.popleft())
        return out

    def submit(self, w: int, batch: list[Unit]) -> None:
        for rank, actor in enumerate(self.workers[w]):
            unit, ctx = batch[rank] if rank < len(batch) else (-1, batch[0][1])  # padding
            self.in_flight[actor.run_unit.remote(unit, ctx)] = (unit, ctx, w)
            self.outstanding[w] += 1

    def rebuild(self, w: int, cause: BaseException) -> None:
        """Kill worker w whole, requeue its units, start loading a new one."""
        import ray

        lost = [(u, c) for ref, (u, c, g) in list(self.in_flight.items()) if g == w]
        self.in_flight = {r: v for r, v in self.in_flight.items() if v[2] != w}
        for actor in self.workers[w]:
            ray.kill(actor)
        for unit, ctx in lost:
            if unit < 0:
                continue
            self.attempts[unit] = self.attempts.get(unit, 0) + 1
            if self.attempts[unit] >= MAX_ATTEMPTS:
                raise RuntimeError(f"unit {unit} was lost with {MAX_ATTEMPTS} workers; last "
                                   f"error: {cause}") from cause
            self.retry.appendleft((unit, ctx))
        log.warning("worker %d died (%s); restarting it and re-queueing units %s", w,
                    type(cause).__name__, [u for u, _ in lost if u >= 0])
        self.launch(w)

    def close(self, finished: bool) -> None:
        """Kill every actor; after a finished run the loaded ones first leave their group
        (a ZeRO-3 rank). Units in flight of a stopped run are dropped with their actors, and a
        replacement still waiting to be placed is cancelled."""
        import ray
        from ray.exceptions import RayActorError

        if finished:
            live = [a for w, actors in self.workers.items() if self.is_loaded(w) for a in actors]
            for ref in [actor.shutdown.remote() for actor in live]:
                try:
                    ray.get(ref)
                except RayActorError:  # died idle (its node was lost after its last unit)
                    pass
        for actors in self.workers.values():
            for actor in actors:
                ray.kill(actor)


def _fill(pool: _Pool, gate: Any) -> bool:
    """Give units to idle workers while the gate admits them; True if the gate refused."""
    while pool.idle:
        n = len(pool.workers[pool.idle[0]])
        if gate is not None and not gate.admit(len(pool.in_flight), n):
            return True
        batch = pool.take(n)
        if not batch:
            return False
        pool.submit(pool.idle.popleft(), batch)
    return False


def _lost(pool: _Pool, ref: Any, err: BaseException) -> None:
    """A unit's call failed: a dead actor (or a group whose peer died) rebuilds its worker;
    non-finite activations and a plain worker's own exception (a bug) stop the job."""
    from ray.exceptions import RayTaskError

    unit, ctx, w = pool.in_flight[ref]
    cause = getattr(err, "cause", None)
    if is_disk_full(cause):  # another actor would meet the same: stop with the message
        raise OSError(cause.errno, cause.strerror, f"unit {unit} of the store") from None
    if isinstance(cause, NonFiniteActivationError):
        raise cause from None
    if isinstance(err, RayTaskError) and len(pool.workers[w]) == 1:
        raise err
    pool.rebuild(w, err)  # requeues this unit with the worker's others


def _stalled(pool: _Pool, last: float) -> float:
    """Say, once a minute, that no worker is running while replacements wait for a node."""
    now = time.perf_counter()
    if pool.started is None or pool.in_flight or pool.idle or now - last < STALL_LOG_S:
        return last
    waiting = sorted(set(pool.loading.values()))
    log.warning("no harvest worker is running: worker(s) %s wait for Ray to place them (a lost "
                "node not replaced yet? `ray status` lists the pending demand)", waiting)
    return now


def run_pool(store: ActivationStore, units: Iterator[Unit], n_todo: int, n_workers: int,
             make_worker: Callable[[], list[Any]], gate: Any = None,
             stop: threading.Event | None = None) -> PoolResult:
    """Run every unit of `units` on `n_workers` workers and commit each into `store`.

    gate: a streamed run's disk bound (store/budget.py's DiskBudget: admit(in_flight, n) before
    units start, committed(unit, record) after); stop: set by a streamed run whose trainer failed,
    which ends the harvest early (units in flight are dropped, uncommitted).
    """
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    pool = _Pool(make_worker, units)
    for w in range(n_workers):  # every worker loads at once; each starts work once loaded
        pool.launch(w)
    bar = tqdm(total=n_todo * store.unit_rows, unit="tok", unit_scale=True, desc="harvest",
               position=0)
    done_units, retries, stall_logged = 0, 0, time.perf_counter()
    while stop is None or not stop.is_set():
        blocked = _fill(pool, gate)
        if not pool.in_flight and not blocked and not pool.has_units():
            break  # every unit is done
        refs = [*pool.in_flight, *pool.loading]
        if not refs:
            (stop or threading.Event()).wait(WAIT_S)  # for the trainer to free room
            continue
        ready = ray.wait(refs, num_returns=1, timeout=WAIT_S if blocked or stop is not None
                         else STALL_LOG_S)[0]
        if not ready:
            stall_logged = _stalled(pool, stall_logged)
            continue
        ref = ready[0]
        if ref in pool.loading:
            pool.loaded(ref)
            continue
        try:
            record = ray.get(ref)
        except (RayActorError, RayTaskError) as err:
            _lost(pool, ref, err)
            retries += 1
            continue
        unit, _, w = pool.in_flight.pop(ref)
        pool.outstanding[w] -= 1
        if unit >= 0:
            commit_unit(store.path, unit, record)
            done_units += 1
            bar.update(store.unit_rows)
            if gate is not None:
                gate.committed(unit, record)
                bar.set_postfix_str(gate.describe(), refresh=False)
        if pool.outstanding[w] == 0:
            pool.idle.append(w)
    bar.close()
    pool.close(finished=not pool.in_flight)
    seconds = time.perf_counter() - (pool.started or time.perf_counter())
    return PoolResult(done_units, done_units * store.unit_rows, seconds, retries)
