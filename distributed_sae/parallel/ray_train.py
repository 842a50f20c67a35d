"""Training over Ray Train workers: each worker runs the one engine under the plan for its rank.

`train_ray(cfg)` is the production entry of train.workers > 1: a Ray Train TorchTrainer whose
workers (gloo on CPU, NCCL with use_gpu) form the torch.distributed group and each run
`train.trainer.run(cfg, make_plan(cfg))`. Ray Train restarts a worker group that lost a worker
(train.max_failures); the ranks then resume from the newest checkpoint.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from distributed_sae.config import RunConfig
from distributed_sae.parallel.cluster import ray_strategy

log = logging.getLogger(__name__)


def _ray_worker(config: dict[str, Any]) -> None:
    """Body of each Ray Train worker (the group is formed by Ray Train)."""
    from ray import train as ray_train

    from distributed_sae.parallel.plan import make_plan
    from distributed_sae.train.trainer import run  # the engine (it imports this package)

    logging.basicConfig(level=logging.INFO)
    os.environ.update(config.get("env", {}))  # the driver's DSAE_FAULT_* (plan.inject_fault)
    cfg = config["cfg"]
    _check_replica_nodes(cfg)
    folders = run(cfg, make_plan(cfg))
    ray_train.report({"saved": len(folders or [])})


def _check_replica_nodes(cfg: RunConfig) -> None:
    """Warn (rank 0) when a latent-sharded replica's shards landed on several nodes (Ray Train
    has one placement group for the job, so PACK cannot promise it per replica)."""
    if cfg.train.latent_shards <= 1:
        return
    import ray
    import torch.distributed as dist

    from distributed_sae.parallel.layout import ParallelLayout

    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    split = ParallelLayout.for_world(len(nodes), cfg.train.latent_shards).split_replicas(nodes)
    if split and dist.get_rank() == 0:
        log.warning("the latent shards of replica(s) %s sit on several nodes (%s): their "
                    "per-step collectives cross the network; give each node a multiple of "
                    "train.latent_shards=%d workers", sorted(split),
                    {d: [n[:8] for n in ns] for d, ns in split.items()}, cfg.train.latent_shards)


def train_ray(cfg: RunConfig) -> list[Path]:
    """Train the bank over train.workers Ray Train workers; returns the saved folders."""
    from ray.train import FailureConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = cfg.train.device.startswith("cuda")
    trainer = TorchTrainer(
        _ray_worker, train_loop_config={
            "cfg": cfg,
            "env": {k: v for k, v in os.environ.items() if k.startswith("DSAE_FAULT_")}},
        scaling_config=ScalingConfig(
            num_workers=cfg.train.workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus or 1},
            # A latent-sharded replica's shards all_gather every step: keep them on one node.
            placement_strategy=ray_strategy(cfg.cluster, packed=cfg.train.latent_shards > 1)),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RayRunConfig(storage_path=str(Path(cfg.out_dir).resolve() / "train" / "ray"),
                                name="dp",
                                failure_config=FailureConfig(max_failures=cfg.train.max_failures)))
    trainer.fit()  # raises if a worker failed
    # The ranks saved the members where one process does (Ray Train v2 keeps metrics only with
    # checkpoints, so the folders are named here rather than returned).
    return [Path(cfg.out_dir) / "train" / spec.member_id for spec in cfg.bank()]
