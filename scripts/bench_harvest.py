"""Store write overhead of harvest: harvest tokens/s against the bare forward pass's tokens/s.

Both runs use the same actors' code, model, hook points, batch size and units; the bare run calls
`run_unit(-1, ...)` (forward pass and host copy, no store write, no commit) with the same one-unit-
per-actor scheduling as the harvest pool. Model loading is excluded from both timings.

    python scripts/bench_harvest.py                         # the demo's defaults, 64k tokens
    python scripts/bench_harvest.py data.n_tokens=131072 harvest.num_actors=2 model.dtype=bfloat16

Arguments are the same Hydra overrides as dsae-harvest. Target (harvest issue): harvest >= 85% of
the bare forward pass.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections import deque

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from hydra import compose, initialize_config_module  # noqa: E402

from distributed_sae.cli import to_run_config  # noqa: E402
from distributed_sae.config.register import register_configs  # noqa: E402
from distributed_sae.data import iter_unit_contexts  # noqa: E402
from distributed_sae.harvest.job import _worker_factory, open_or_create, plan  # noqa: E402
from distributed_sae.harvest.pool import run_pool  # noqa: E402
from distributed_sae.models import load_tokenizer  # noqa: E402
from distributed_sae.parallel import init_ray  # noqa: E402


def bare_forward(units: list, make_worker, n_workers: int) -> float:
    """Seconds to run every unit's forward pass (no writes), one unit in flight per actor."""
    import ray

    workers = [make_worker()[0] for _ in range(n_workers)]
    ray.get([w.ready.remote() for w in workers])
    ray.get([w.run_unit.remote(-1, units[0][1]) for w in workers])  # warm-up, not timed
    queue, idle, in_flight = deque(units), deque(workers), {}
    start = time.perf_counter()
    while queue or in_flight:
        while idle and queue:
            worker = idle.popleft()
            in_flight[worker.run_unit.remote(-1, queue.popleft()[1])] = worker
        ref = ray.wait(list(in_flight), num_returns=1)[0][0]
        ray.get(ref)
        idle.append(in_flight.pop(ref))
    seconds = time.perf_counter() - start
    for w in workers:
        ray.kill(w)
    return seconds


def main(overrides: list[str]) -> None:
    register_configs()
    with tempfile.TemporaryDirectory() as tmp:
        with initialize_config_module("distributed_sae.conf", version_base=None):
            cfg = to_run_config(compose("config", overrides=[
                "data.n_tokens=65536", f"out_dir={tmp}", *overrides]))
        tokenizer = load_tokenizer(cfg.model)
        exclude = sorted(set(tokenizer.all_special_ids))
        want = plan(cfg)
        units = list(enumerate(iter_unit_contexts(cfg.data, tokenizer,
                                                  cfg.harvest.contexts_per_unit, want["n_units"])))
        init_ray(cfg.cluster)
        make_worker = _worker_factory(cfg, exclude)
        n = cfg.harvest.num_actors
        store = open_or_create(cfg, want, exclude)  # actors open it; the bare run writes nothing
        bare_s = bare_forward(units, make_worker, n)
        result = run_pool(store, iter(units), len(units), n, make_worker)
    tokens = len(units) * want["unit_rows"]
    bare = tokens / bare_s
    print(f"model {cfg.model.name} ({cfg.model.dtype}), hooks {list(cfg.harvest.hooks)}, "
          f"{n} actors x {cfg.harvest.cpus_per_actor} CPU, batch {cfg.harvest.batch_size} x "
          f"{cfg.data.context_size}, store {cfg.store.dtype}/{cfg.store.compression}, "
          f"{tokens} tokens in {len(units)} units")
    print(f"bare forward: {bare:8.0f} tokens/s ({bare_s:.1f} s)")
    print(f"harvest:      {result.tokens_per_s:8.0f} tokens/s ({result.seconds:.1f} s)")
    print(f"ratio harvest / bare forward = {result.tokens_per_s / bare:.3f} (target >= 0.85)")


if __name__ == "__main__":
    main(sys.argv[1:])
