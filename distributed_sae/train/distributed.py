"""Data-parallel training of a bank: every rank trains replicas of every member on its share.

`train_rank(cfg, strategy)` runs on each rank of an already formed torch.distributed group: rank r
of W reads its own disjoint chunks of the store (`ActivationReader(rank=r, world_size=W)`) in
batches of train.batch_size / W rows, so one step consumes train.batch_size rows over the group,
as the single-process train stage does. Gradients are averaged (DDP) or reduce-scattered into
partitioned optimiser state (ZeRO-2, DeepSpeed), see parallel/data_parallel.py; dead-latent
counters and BatchTopK's threshold are kept identical on every rank. Rank 0 logs and saves the
members (same folders as `train`).

`train_ray(cfg, num_workers, strategy)` is the production entry: a Ray Train TorchTrainer whose
workers (gloo on CPU, NCCL with use_gpu) each run `train_rank`.

Not supported yet: checkpoint/resume (the ZeRO-2 optimiser state is partitioned) and neuron
resampling (ranks would need one shared resample batch); both are refused at start-up.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distributed_sae.config import RunConfig
from distributed_sae.parallel.data_parallel import STRATEGIES, DataParallel
from distributed_sae.sae import expand_bank
from distributed_sae.store import ActivationReader, ActivationStore, split_rows
from distributed_sae.train.bank_trainer import BankTrainer
from distributed_sae.train.trainer import _save_members, input_scale, log_progress

log = logging.getLogger(__name__)


def local_batch(batch_size: int, world_size: int) -> int:
    """Rows per rank per step; the global batch must split evenly (so averaging the ranks'
    mean losses is the global batch's mean loss)."""
    if batch_size % world_size:
        raise ValueError(f"train.batch_size={batch_size} must be divisible by the "
                         f"{world_size} data-parallel workers")
    return batch_size // world_size


def build_bank(cfg: RunConfig, d_in: int, b_dec_init: torch.Tensor, total_steps: int,
               strategy: str = "ddp") -> BankTrainer:
    """The bank of this rank, its members wrapped for `strategy` over the default group."""
    micro = local_batch(cfg.train.batch_size, dist.get_world_size())
    return BankTrainer(cfg, expand_bank(cfg.sae, cfg.sae_hook), d_in, b_dec_init, total_steps,
                       sync=DataParallel(strategy, micro_batch=micro))


def train_rank(cfg: RunConfig, strategy: str = "ddp") -> list[Path] | None:
    """Train on this rank of the default group; rank 0 returns the saved folders, others None."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} must be one of {STRATEGIES}")
    if cfg.train.checkpoint_every:
        raise ValueError("train.checkpoint_every is not supported with data-parallel training yet")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.train.seed)
    store = ActivationStore.open(cfg.store.path)
    train_rows, _ = split_rows(store, cfg.train.holdout_fraction)
    scale, mean = input_scale(store, cfg.sae_hook)
    reader = ActivationReader(store, cfg.sae_hook, train_rows,
                              local_batch(cfg.train.batch_size, world), seed=cfg.train.seed,
                              scale=scale, exclude_token_ids=store.metadata["exclude_token_ids"],
                              rank=rank, world_size=world)
    total = max(1, (cfg.train.tokens or len(train_rows)) // cfg.train.batch_size)
    bank = build_bank(cfg, store.d(cfg.sae_hook), mean, total, strategy)
    if any(m.sae.uses_resampling for m in bank.members) and cfg.train.resample_steps:
        raise ValueError("neuron resampling is not supported with data-parallel training yet")
    if rank == 0:
        log.info("data-parallel (%s, %d ranks) training of %s: %d steps of %d tokens",
                 strategy, world, [m.spec.member_id for m in bank.members], total,
                 cfg.train.batch_size)
    start = time.perf_counter()
    batches = reader.iter_batches()
    while bank.step_count < total:
        bank.step(next(batches).to(cfg.train.device), record=bank.logs_next())
        if rank == 0 and (bank.step_count % cfg.train.log_every == 0 or bank.step_count == total):
            log_progress(bank, bank.tokens_seen / (time.perf_counter() - start), cfg)
    if rank != 0:
        return None
    return _save_members(cfg, store, bank, scale)


def _ray_worker(config: dict[str, Any]) -> None:
    """Body of each Ray Train worker (the group is formed by Ray Train)."""
    from ray import train as ray_train

    logging.basicConfig(level=logging.INFO)
    folders = train_rank(config["cfg"], config["strategy"])
    ray_train.report({"saved": len(folders or [])})


def train_ray(cfg: RunConfig, num_workers: int = 2, strategy: str = "ddp",
              use_gpu: bool = False) -> list[Path]:
    """Data-parallel training over `num_workers` Ray Train workers; returns the saved folders."""
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _ray_worker, train_loop_config={"cfg": cfg, "strategy": strategy},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RayRunConfig(storage_path=str(Path(cfg.out_dir).resolve() / "train" / "ray"),
                                name="dp"))
    trainer.fit()  # raises if a worker failed
    # Rank 0 saved the members where `train` does (Ray Train v2 keeps metrics only with checkpoints).
    return [Path(cfg.out_dir) / "train" / spec.member_id
            for spec in expand_bank(cfg.sae, cfg.sae_hook)]
