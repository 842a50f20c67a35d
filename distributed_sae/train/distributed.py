"""Training a bank over several workers: members placed by cost, each data-parallel over its group.

`train_rank(cfg, strategy)` runs on each rank of an already formed torch.distributed group. With
train.placement=cost (the default) parallel/placement.py gives each member a group of ranks by its
FLOPs: several small members share a rank, a wide one trains over several; every rank reads the
whole global batch and feeds each of its members that member's slice, so one step consumes
train.batch_size rows per member, as the single-process train stage does. With
train.placement=replicate every member trains over all ranks and rank r of W reads only its own
disjoint chunks of the store (`ActivationReader(rank=r, world_size=W)`), batches of
train.batch_size / W rows. Gradients are averaged (DDP) or reduce-scattered into
partitioned optimiser state (ZeRO-2, DeepSpeed), see parallel/data_parallel.py; dead-latent
counters and BatchTopK's threshold are kept identical on every rank of a group. The first rank of
each group saves its member (same folders as `train`); rank 0 gathers the metrics and logs.

`train_ray(cfg, num_workers, strategy)` is the production entry: a Ray Train TorchTrainer whose
workers (gloo on CPU, NCCL with use_gpu) each run `train_rank`.

train.latent_shards > 1 splits every member by latents instead (train/sharded.py: the 2-D
layout of parallel/layout.py; train.placement does not apply).

Checkpoints (placement=cost, ddp): each rank writes the members it leads, whole, so a job
resumes on any number of workers; Ray Train restarts a worker group that lost a worker
(train.max_failures) and the ranks resume from the newest checkpoint. Not supported yet:
checkpoints with ZeRO-2 (its optimiser state is partitioned) and neuron resampling (ranks would
need one shared resample batch); both are refused at start-up.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distributed_sae.config import RunConfig
from distributed_sae.parallel.data_parallel import STRATEGIES, DataParallel
from distributed_sae.parallel.placement import Placement, member_cost, place_members
from distributed_sae.sae import expand_bank
from distributed_sae.store import ActivationReader, ActivationStore, split_rows
from distributed_sae.train.bank_trainer import BankTrainer
from distributed_sae.train.checkpoint import (
    begin_checkpoint, finish_checkpoint, staging, write_part,
)
from distributed_sae.train.metrics_log import MetricsLog, member_records
from distributed_sae.train.trainer import _save_members, input_norm, resume

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


def build_placed_bank(cfg: RunConfig, d_in: int, b_dec_init: torch.Tensor, total_steps: int,
                      strategy: str = "ddp") -> tuple[BankTrainer, Placement]:
    """The members this rank trains under the cost placement; x fed to it is the global batch."""
    rank, world = dist.get_rank(), dist.get_world_size()
    specs = expand_bank(cfg.sae, cfg.sae_hook)
    plan = place_members([member_cost(d_in, s.width) for s in specs], world, cfg.train.batch_size)
    placed, mine = {}, []
    for i, (spec, ranks) in enumerate(zip(specs, plan.groups)):
        if strategy == "zero2" and 1 < len(ranks) < world:
            raise ValueError(f"{spec.member_id} was placed on workers {list(ranks)} of {world}: "
                             f"ZeRO-2 runs over all workers only; use train.data_parallel=ddp or "
                             f"train.placement=replicate")
        # torch.distributed needs every rank to create every subgroup, in the same order; a
        # member over all ranks uses the default group.
        group = dist.new_group(list(ranks)) if 1 < len(ranks) < world else None
        if rank in ranks:
            share = plan.share(i, rank, cfg.train.batch_size)
            factory = None if len(ranks) == 1 else DataParallel(
                strategy, micro_batch=share.stop - share.start, group=group)
            placed[spec.member_id] = (factory, share)
            mine.append(spec)
    if rank == 0:
        loads = plan.loads([member_cost(d_in, s.width) for s in specs])
        log.info("placement by cost over %d workers: %s; load per worker (GFLOP/token) %s",
                 world, {s.member_id: list(g) for s, g in zip(specs, plan.groups)},
                 [round(x / 1e9, 4) for x in loads])
    bank = BankTrainer(cfg, mine, d_in, b_dec_init, total_steps, placed=placed)
    return bank, plan


def train_rank(cfg: RunConfig, strategy: str = "ddp") -> list[Path] | None:
    """Train on this rank of the default group; rank 0 returns the saved folders, others None
    (with the cost placement every rank returns the folders of the members it led)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} must be one of {STRATEGIES}")
    if cfg.train.latent_shards > 1:  # every member split by latents: the 2-D layout
        if strategy != "ddp":
            raise ValueError(f"train.latent_shards={cfg.train.latent_shards} needs strategy "
                             f"ddp, got {strategy!r}: set train.data_parallel=ddp")
        from distributed_sae.train.sharded import train_sharded  # it imports this module

        return train_sharded(cfg)
    if cfg.train.checkpoint_every and (cfg.train.placement != "cost" or strategy != "ddp"):
        raise ValueError("train.checkpoint_every with several workers needs placement=cost, ddp")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.train.seed)
    store = ActivationStore.open(cfg.store.path)
    train_rows, _ = split_rows(store, cfg.train.holdout_fraction)
    norm = input_norm(cfg, store, train_rows)
    placed = cfg.train.placement == "cost"
    # Cost placement: every rank reads the whole global batch and slices what its members need.
    reader = ActivationReader(store, cfg.sae_hook, train_rows,
                              cfg.train.batch_size if placed else local_batch(cfg.train.batch_size, world),
                              seed=cfg.train.seed, scale=norm.scale, max_norm=norm.max_norm,
                              exclude_token_ids=store.metadata["exclude_token_ids"],
                              rank=0 if placed else rank, world_size=1 if placed else world)
    total = max(1, (cfg.train.tokens or len(train_rows)) // cfg.train.batch_size)
    d_in = store.d(cfg.sae_hook)
    plan = None
    if placed:
        bank, plan = build_placed_bank(cfg, d_in, norm.mean, total, strategy)
    else:
        bank = build_bank(cfg, d_in, norm.mean, total, strategy)
    if any(m.sae.uses_resampling for m in bank.members) and cfg.train.resample_steps:
        raise ValueError("neuron resampling is not supported with data-parallel training yet")
    if rank == 0:
        log.info("data-parallel (%s, %d ranks, placement %s) training: %d steps of %d tokens",
                 strategy, world, cfg.train.placement, total, cfg.train.batch_size)
    if plan is not None:
        latest = resume(cfg, bank, reader, Path(cfg.out_dir) / "train" / "checkpoints",
                        bank_ids=[s.member_id for s in expand_bank(cfg.sae, cfg.sae_hook)])
        if latest is not None and rank == 0:
            log.info("resumed from %s (step %d)", latest, bank.step_count)
    _loop(cfg, bank, reader, total, plan)
    if plan is None:
        return _save_members(cfg, store, bank, norm) if rank == 0 else None
    specs = expand_bank(cfg.sae, cfg.sae_hook)
    folders = _save_members(cfg, store, bank, norm, members=_led_members(bank, plan, specs, rank),
                            bank_ids=[s.member_id for s in specs] if rank == 0 else [])
    dist.barrier()
    return folders


def _led_members(bank: BankTrainer, plan: Placement, specs: list, rank: int) -> list:
    """The members of `bank` whose data-parallel group `rank` leads (saves and logs them)."""
    lead = {s.member_id for s, g in zip(specs, plan.groups) if g[0] == rank}
    return [m for m in bank.members if m.spec.member_id in lead]


def _loop(cfg: RunConfig, bank: BankTrainer, reader: ActivationReader, total: int,
          plan: Placement | None) -> None:
    """The step loop; metrics gathered to rank 0 every log_every steps."""
    rank, world = dist.get_rank(), dist.get_world_size()
    metrics = MetricsLog(cfg) if rank == 0 else None
    specs = expand_bank(cfg.sae, cfg.sae_hook)
    start = time.perf_counter()
    batches = reader.iter_batches()
    while bank.step_count < total:
        bank.step(next(batches).to(cfg.train.device), record=bank.logs_next())
        _inject_fault(cfg, bank.step_count, rank)
        every = cfg.train.checkpoint_every
        if plan is not None and every and bank.step_count % every == 0 and bank.step_count < total:
            _checkpoint(cfg, bank, reader, plan, specs)
        if bank.step_count % cfg.train.log_every and bank.step_count != total:
            continue
        rate = bank.tokens_seen / (time.perf_counter() - start)
        if plan is None:
            if metrics:
                metrics.write(bank, rate)
            continue
        mine = member_records(bank, rate, cfg, _led_members(bank, plan, specs, rank))
        gathered: list[Any] = [None] * world if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if metrics:
            order = {s.member_id: i for i, s in enumerate(specs)}
            records = sorted((r for part in gathered for r in part), key=lambda r: order[r["member"]])
            metrics.emit(records, bank.step_count)
    if metrics:
        metrics.close()


def _checkpoint(cfg: RunConfig, bank: BankTrainer, reader: ActivationReader, plan: Placement,
                specs: list) -> None:
    """Every rank writes the members it leads as one part; rank 0 adds state.json and renames
    the folder into place, so a checkpoint is complete or absent. Members are saved whole, so a
    job may resume on another number of workers."""
    rank = dist.get_rank()
    folder = Path(cfg.out_dir) / "train" / "checkpoints"
    if rank == 0:
        begin_checkpoint(folder, bank.step_count)
    dist.barrier()  # the folder exists before anyone writes into it
    tmp = staging(folder, bank.step_count)
    tensors, state = bank.state(_led_members(bank, plan, specs, rank), with_rng=rank == 0)
    write_part(tmp, tensors, f"rank{rank:05d}")
    windows: list[Any] = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(state["window_tokens"], windows, dst=0)
    if rank == 0:
        state.update(members=[s.member_id for s in specs], reader=reader.state_dict(),
                     window_tokens={k: v for part in windows for k, v in part.items()})
        finish_checkpoint(tmp, bank.step_count, state, keep=cfg.train.keep_checkpoints)
    dist.barrier()  # nobody runs ahead of a checkpoint that is not complete


def _inject_fault(cfg: RunConfig, step: int, rank: int) -> None:
    """A testing aid for the restart path: with DSAE_FAULT_AT_STEP=n (and DSAE_FAULT_RANK, default
    1), that rank dies hard (os._exit) at step n, once per out_dir, like a preempted worker."""
    at = os.environ.get("DSAE_FAULT_AT_STEP")
    if at is None or step != int(at) or rank != int(os.environ.get("DSAE_FAULT_RANK", "1")):
        return
    marker = Path(cfg.out_dir) / "train" / ".fault_injected"
    if marker.exists():
        return
    marker.write_text(f"rank {rank} killed at step {step}\n")
    log.warning("DSAE_FAULT_AT_STEP: rank %d exits at step %d", rank, step)
    os._exit(1)


def _ray_worker(config: dict[str, Any]) -> None:
    """Body of each Ray Train worker (the group is formed by Ray Train)."""
    from ray import train as ray_train

    logging.basicConfig(level=logging.INFO)
    os.environ.update(config.get("env", {}))  # the driver's DSAE_FAULT_* (see _inject_fault)
    folders = train_rank(config["cfg"], config["strategy"])
    ray_train.report({"saved": len(folders or [])})


def train_ray(cfg: RunConfig, num_workers: int = 2, strategy: str = "ddp",
              use_gpu: bool = False) -> list[Path]:
    """Data-parallel training over `num_workers` Ray Train workers; returns the saved folders."""
    from ray.train import FailureConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _ray_worker, train_loop_config={
            "cfg": cfg, "strategy": strategy,
            "env": {k: v for k, v in os.environ.items() if k.startswith("DSAE_FAULT_")}},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RayRunConfig(storage_path=str(Path(cfg.out_dir).resolve() / "train" / "ray"),
                                name="dp",
                                failure_config=FailureConfig(max_failures=cfg.train.max_failures)))
    trainer.fit()  # raises if a worker failed
    # The ranks saved the members where `train` does (Ray Train v2 keeps metrics only with
    # checkpoints, so the folders are named here rather than returned).
    return [Path(cfg.out_dir) / "train" / spec.member_id
            for spec in expand_bank(cfg.sae, cfg.sae_hook)]
