"""Training a bank whose members are latent-sharded: the 2-D layout of parallel/layout.py.

With train.latent_shards = tp > 1 the train.workers = dp x tp ranks form dp replicas of tp
shards each (rank = dp_rank · tp + tp_rank). EVERY member is split by latents over the tp ranks of
a replica (parallel/latent_shard.py: shard r holds latents [r·n/tp, (r+1)·n/tp)) and replicated
over the dp replicas; train.placement does not apply. Replica d reads its own disjoint share of
the store (`ActivationReader(rank=d, world_size=dp)`, batch_size / dp rows per step); the shards
of a replica read the same rows. With dp > 1 each shard's gradients are averaged over its dp
group (DDPSync over the shard index's group; the gradient clip is the member's global one).

What is exact: with dp = 1 a sharded run is the unsharded member's run up to fp32 summation
order (tests/test_train_sharded.py), except that the initialisation differs: each shard draws its
own slice (seed shard_seed(member seed, r)), so the full member is never materialised on one rank.
With dp > 1 it is exact as data parallelism is (BatchTopK selects over the replica's rows).

Logging (global rank 0, which is replica 0's shard 0): loss, FVU and MSE come from the full
reconstruction (identical on every shard); the dead fraction and the density histogram are over
all latents (since_fired and fire counts gathered from replica 0's shards each log step).

Saving: replica 0's shards gather each member (`gather_full`) onto rank 0, which writes ordinary
SAELens folders (train/trainer.py's _save_members), so eval and export need no change.

Checkpoints (train.checkpoint_every): out_dir/train/checkpoints/step_<N>/<member>/step_<N>/ is
parallel/shard_checkpoint.py's format, written by replica 0's shards; state.json beside the
members holds the step, tokens seen and every replica's reader position. Resuming re-slices the
members for any tp (load_sharded) but needs the same dp (each replica's reader position is its
own). The density window restarts at a resume.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from distributed_sae.config import RunConfig
from distributed_sae.parallel.collectives import ShardComm
from distributed_sae.parallel.data_parallel import DataParallel
from distributed_sae.parallel.latent_shard import LatentShardedSAE, shard_range, shard_seed
from distributed_sae.parallel.layout import LayoutGroups, ParallelLayout
from distributed_sae.parallel.shard_checkpoint import gather_full, load_sharded, save_sharded
from distributed_sae.sae import MemberSpec, expand_bank, sae_class
from distributed_sae.store import ActivationReader, ActivationStore, split_rows
from distributed_sae.train.bank_trainer import BankTrainer, Member
from distributed_sae.train.checkpoint import (
    STATE, begin_checkpoint, finish_checkpoint, latest_checkpoint, staging,
)
from distributed_sae.train.distributed import _inject_fault  # (it imports this module lazily)
from distributed_sae.train.metrics_log import MetricsLog, member_records
from distributed_sae.train.trainer import InputNorm, _save_members, input_norm

log = logging.getLogger(__name__)


def sharded_member_builder(cfg: RunConfig,
                           comm: ShardComm) -> Callable[[MemberSpec, int], LatentShardedSAE]:
    """BankTrainer's `build_member`: this rank's shard of a member, built from the run config
    (the kind's hyperparameters as build_sae takes them) at width / tp, never the whole member."""

    def build(spec: MemberSpec, d_in: int) -> LatentShardedSAE:
        start, stop = shard_range(spec.width, comm.size, comm.rank)
        cls = sae_class(spec.kind)
        # The slice's k is clipped to its width (its class checks k <= d_sae); the member's
        # global k is the wrapper's.
        has_k = "k" in inspect.signature(cls.__init__).parameters
        local = cls.from_config(d_in, stop - start, cfg.sae, cfg.train,
                                seed=shard_seed(spec.seed, comm.rank), dtype=torch.float32,
                                **({"k": min(spec.k, stop - start)} if has_k else {}))
        return LatentShardedSAE(local, spec.width, comm, k=spec.k if has_k else None)

    return build


def build_sharded_bank(cfg: RunConfig, d_in: int, b_dec_init: torch.Tensor, total_steps: int,
                       groups: LayoutGroups) -> BankTrainer:
    """This rank's shards of every member; with dp > 1 each is data-parallel (DDP) over its dp
    group. x fed to the bank is this replica's share (batch_size / dp rows) of the global batch."""
    layout = groups.layout
    specs = expand_bank(cfg.sae, cfg.sae_hook)
    for spec in specs:
        layout.check_width(spec.width)
    micro = layout.check_batch(cfg.train.batch_size)
    sync = (DataParallel("ddp", micro_batch=micro, group=groups.dp_group)
            if layout.dp > 1 else None)
    return BankTrainer(cfg, specs, d_in, b_dec_init, total_steps, sync=sync,
                       build_member=sharded_member_builder(cfg, groups.shard_comm()))


def train_sharded(cfg: RunConfig) -> list[Path] | None:
    """train_rank for train.latent_shards > 1: build the layout's groups, train, save; global
    rank 0 returns the saved folders, the other ranks None."""
    world = dist.get_world_size()
    layout = ParallelLayout.for_world(world, cfg.train.latent_shards)
    groups = layout.build()
    torch.manual_seed(cfg.train.seed)
    store = ActivationStore.open(cfg.store.path)
    train_rows, _ = split_rows(store, cfg.train.holdout_fraction)
    norm = input_norm(cfg, store, train_rows)
    # The shards of a replica read the same rows: the reader's rank is the replica's.
    reader = ActivationReader(store, cfg.sae_hook, train_rows,
                              layout.check_batch(cfg.train.batch_size), seed=cfg.train.seed,
                              scale=norm.scale, max_norm=norm.max_norm,
                              exclude_token_ids=store.metadata["exclude_token_ids"],
                              rank=groups.dp_rank, world_size=layout.dp)
    total = max(1, (cfg.train.tokens or len(train_rows)) // cfg.train.batch_size)
    bank = build_sharded_bank(cfg, store.d(cfg.sae_hook), norm.mean, total, groups)
    if groups.rank == 0:
        log.info("latent-sharded training: %d workers = dp %d x tp %d (every member split over "
                 "%d shards; train.placement=%s does not apply): %d steps of %d tokens",
                 world, layout.dp, layout.tp, layout.tp, cfg.train.placement, total,
                 cfg.train.batch_size)
    _maybe_resume(cfg, bank, reader, groups)
    _loop(cfg, bank, reader, total, groups)
    return _save(cfg, store, bank, norm, groups)


def _loop(cfg: RunConfig, bank: BankTrainer, reader: ActivationReader, total: int,
          groups: LayoutGroups) -> None:
    """The step loop; global metrics logged on rank 0 every log_every steps."""
    metrics = MetricsLog(cfg) if groups.rank == 0 else None
    start, start_tokens = time.perf_counter(), bank.tokens_seen
    batches = reader.iter_batches()
    while bank.step_count < total:
        bank.step(next(batches).to(cfg.train.device), record=bank.logs_next())
        _inject_fault(cfg, bank.step_count, groups.rank)
        every = cfg.train.checkpoint_every
        if every and bank.step_count % every == 0 and bank.step_count < total:
            _checkpoint(cfg, bank, reader, groups)
        if bank.step_count % cfg.train.log_every and bank.step_count != total:
            continue
        rate = (bank.tokens_seen - start_tokens) / (time.perf_counter() - start)
        records = sharded_records(bank, rate, cfg, groups)
        if metrics is not None:
            metrics.emit(records, bank.step_count)
    if metrics is not None:
        metrics.close()


@torch.no_grad()
def sharded_records(bank: BankTrainer, rate: float, cfg: RunConfig,
                    groups: LayoutGroups) -> list[dict[str, Any]]:
    """metrics_log.member_records over whole members: collective over replica 0's shards,
    which gather their since_fired and fire-count slices onto global rank 0. Returns the records
    there, [] elsewhere; every rank starts a new density window."""
    whole = []
    for m in bank.members:
        counts, tokens = m.take_density()  # (n/tp,) this shard's slice, this replica's tokens
        if groups.dp_rank != 0:
            continue  # replicas are identical: replica 0's counters speak for all
        if counts.numel() != m.since_fired.numel():
            counts = torch.zeros_like(m.since_fired)
        comm, device = m.sae.comm, m.sae.b_dec.device  # NCCL gathers device tensors only
        since = comm.gather_to_first(m.since_fired.to(device), "log_since_fired")
        fires = comm.gather_to_first(counts.to(device, torch.long), "log_fire_counts")
        if since is not None and fires is not None:
            whole.append(dataclasses.replace(m, since_fired=torch.cat(since).cpu(),
                                             fire_counts=torch.cat(fires).cpu(),
                                             window_tokens=tokens))
    return member_records(bank, rate, cfg, whole) if groups.rank == 0 else []


def _save(cfg: RunConfig, store: ActivationStore, bank: BankTrainer, norm: InputNorm,
          groups: LayoutGroups) -> list[Path] | None:
    """Replica 0's shards gather every member onto rank 0, which saves ordinary member folders."""
    whole: list[Member] = []
    if groups.dp_rank == 0:
        for m in bank.members:
            full = gather_full(m.sae)  # collective over the replica's shards
            if full is not None:
                whole.append(dataclasses.replace(m, sae=full, sync=None))
    folders = _save_members(cfg, store, bank, norm, members=whole) if groups.rank == 0 else None
    dist.barrier()  # the folders are written before any rank reports success
    return folders


def _checkpoint(cfg: RunConfig, bank: BankTrainer, reader: ActivationReader,
                groups: LayoutGroups) -> None:
    """Replica 0's shards write every member (shard_checkpoint format) into the staging folder;
    rank 0 adds state.json (with every replica's reader position) and renames it into place."""
    folder = Path(cfg.out_dir) / "train" / "checkpoints"
    step = bank.step_count
    if groups.rank == 0:
        begin_checkpoint(folder, step)
    dist.barrier()  # the staging folder exists before anyone writes into it
    tmp = staging(folder, step)
    if groups.dp_rank == 0:
        for m in bank.members:
            save_sharded(tmp / m.spec.member_id, step, m.sae, m.opt, m.since_fired)
    readers: list[Any] = [None] * dist.get_world_size() if groups.rank == 0 else None
    dist.gather_object(reader.state_dict(), readers, dst=0)
    if groups.rank == 0:
        tp = groups.layout.tp
        state = {"tokens_seen": bank.tokens_seen,
                 "members": [m.spec.member_id for m in bank.members], "latent_shards": tp,
                 "dp": groups.layout.dp, "readers": readers[::tp]}  # one per replica
        finish_checkpoint(tmp, step, state, keep=cfg.train.keep_checkpoints)
    dist.barrier()  # nobody runs ahead of a checkpoint that is not complete


def _maybe_resume(cfg: RunConfig, bank: BankTrainer, reader: ActivationReader,
                  groups: LayoutGroups) -> None:
    """Every rank loads its shard of every member (any saved tp) and its replica's reader."""
    folder = Path(cfg.out_dir) / "train" / "checkpoints"
    latest = latest_checkpoint(folder) if cfg.train.resume else None
    if latest is None:
        return
    state = json.loads((latest / STATE).read_text())
    ids = [m.spec.member_id for m in bank.members]
    if "latent_shards" not in state:
        raise ValueError(f"checkpoint {latest} was written without latent sharding: resume it "
                         f"with train.latent_shards=1, or use another out_dir")
    if state["members"] != ids or int(state["dp"]) != groups.layout.dp:
        raise ValueError(f"checkpoint {latest} holds members {state['members']} over dp="
                         f"{state['dp']} replicas; this job has {ids} over dp={groups.layout.dp}: "
                         f"resume with the same sae config and train.workers / "
                         f"train.latent_shards, or use another out_dir")
    step = int(state["step"])
    for m in bank.members:
        load_sharded(latest / m.spec.member_id / f"step_{step:09d}", m.sae, m.opt, m.since_fired)
    reader.load_state_dict(state["readers"][groups.dp_rank])
    bank.step_count, bank.tokens_seen = step, int(state["tokens_seen"])
    if groups.rank == 0:
        log.info("resumed from %s (step %d, saved with %d latent shards)", latest, step,
                 state["latent_shards"])
