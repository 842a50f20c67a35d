"""The actor pool of a harvest job: hand out units, commit results, replace dead workers.

A *worker* is a group of Ray actors that run units in lockstep: one actor for a plain or
device_map-sharded model, `group_size` actors for a DeepSpeed ZeRO-3 group (one process group,
each rank feeding its own unit; a round with fewer units than ranks is padded with unit -1, which
runs the forward pass but writes nothing, because ZeRO-3's all-gathers are collective).

A worker that dies (SIGKILL, out of memory, preemption; for a group: any of its actors) is
killed whole and rebuilt, and its units go back to the front of the queue; a unit that has killed
MAX_ATTEMPTS workers stops the job, since the unit itself is then the likely cause.
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
from distributed_sae.store import ActivationStore, commit_unit

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
WAIT_S = 0.5  # seconds between looks at the disk bound or the stop flag while waiting
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
    workers: list[list[Any]]
    units: Iterator[Unit]
    retry: deque = field(default_factory=deque)  # units to run again, first
    attempts: dict[int, int] = field(default_factory=dict)
    in_flight: dict[Any, tuple[int, np.ndarray, int]] = field(default_factory=dict)
    outstanding: list[int] = field(default_factory=list)

    def take(self, n: int) -> list[Unit]:
        out = []
        while len(out) < n and self.retry:
            out.append(self.retry.popleft())
        while len(out) < n:
            unit = next(self.units, None)
            if unit is None:
                break
            out.append(unit)
        return out

    def submit(self, w: int, batch: list[Unit]) -> None:
        for rank, actor in enumerate(self.workers[w]):
            unit, ctx = batch[rank] if rank < len(batch) else (-1, batch[0][1])  # padding
            self.in_flight[actor.run_unit.remote(unit, ctx)] = (unit, ctx, w)
            self.outstanding[w] += 1

    def rebuild(self, w: int, cause: BaseException) -> None:
        """Kill worker w whole, requeue its units, start a new one."""
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
        self.workers[w] = start_workers(self.make_worker, 1)[0]
        self.outstanding[w] = 0


def start_workers(make_worker: Callable[[], list[Any]], n: int) -> list[list[Any]]:
    """n workers whose actors have all loaded the model (in parallel). A worker with an actor
    that dies while it loads (preemption, out of memory, SIGKILL: before its `ready` returns) is
    killed whole and started again, up to MAX_ATTEMPTS rounds; loading is not harvest time."""
    import ray
    from ray.exceptions import RayActorError

    workers = [make_worker() for _ in range(n)]
    for attempt in range(1, MAX_ATTEMPTS + 1):
        waits = [[a.ready.remote() for a in w] for w in workers]  # every worker loads at once
        failed = []
        for i, refs in enumerate(waits):
            try:
                ray.get(refs)
            except RayActorError as err:
                failed.append((i, err))
        if not failed:
            return workers
        for i, err in failed:
            for actor in workers[i]:
                ray.kill(actor)
            if attempt == MAX_ATTEMPTS:
                raise RuntimeError(f"harvest worker {i} died while loading the model "
                                   f"{MAX_ATTEMPTS} times; last error: {err}") from err
            log.warning("harvest worker %d died while loading the model (%s); starting it "
                        "again (round %d of %d)", i, type(err).__name__, attempt + 1,
                        MAX_ATTEMPTS)
            workers[i] = make_worker()
    return workers


def _fill(pool: _Pool, idle: deque, gate: Any) -> bool:
    """Give units to idle workers while the gate admits them; True if the gate refused."""
    while idle:
        n = len(pool.workers[idle[0]])
        if gate is not None and not gate.admit(len(pool.in_flight), n):
            return True
        batch = pool.take(n)
        if not batch:
            return False
        pool.submit(idle.popleft(), batch)
    return False


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

    workers = start_workers(make_worker, n_workers)
    pool = _Pool(make_worker, workers, units, outstanding=[0] * n_workers)
    idle = deque(range(n_workers))
    bar = tqdm(total=n_todo * store.unit_rows, unit="tok", unit_scale=True, desc="harvest",
               position=0)
    start, done_units, retries = time.perf_counter(), 0, 0
    while stop is None or not stop.is_set():
        blocked = _fill(pool, idle, gate)
        if not pool.in_flight:
            if not blocked:
                break  # every unit is done
            (stop or threading.Event()).wait(WAIT_S)  # for the trainer to free room
            continue
        ready = ray.wait(list(pool.in_flight), num_returns=1,
                         timeout=WAIT_S if blocked or stop is not None else None)[0]
        if not ready:
            continue
        ref = ready[0]
        unit, ctx, w = pool.in_flight.pop(ref)
        pool.outstanding[w] -= 1
        try:
            record = ray.get(ref)
        except (RayActorError, RayTaskError) as err:
            pool.in_flight[ref] = (unit, ctx, w)  # rebuild() requeues it with the others
            cause = getattr(err, "cause", None)
            if isinstance(cause, NonFiniteActivationError):
                raise cause from None
            if isinstance(err, RayTaskError) and len(pool.workers[w]) == 1:
                raise  # a plain worker's exception is a bug, not a lost machine
            pool.rebuild(w, err)  # a dead actor, or a group whose peer died
            retries += 1
            idle.append(w)
            continue
        if unit >= 0:
            commit_unit(store.path, unit, record)
            done_units += 1
            bar.update(store.unit_rows)
            if gate is not None:
                gate.committed(unit, record)
                bar.set_postfix_str(gate.describe(), refresh=False)
        if pool.outstanding[w] == 0:
            idle.append(w)
    bar.close()
    actors = [actor for worker in pool.workers for actor in worker]
    if not pool.in_flight:  # stopped early: units in flight are dropped with their actors
        ray.get([actor.shutdown.remote() for actor in actors])  # a ZeRO-3 rank leaves its group
    for actor in actors:
        ray.kill(actor)
    return PoolResult(done_units, done_units * store.unit_rows, time.perf_counter() - start, retries)
