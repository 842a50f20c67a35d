"""The latent-sharded strategy of the plan: the 2-D layout of parallel/layout.py.

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
SAELens folders, so eval and export need no change. Checkpoints: replica 0's shard r writes
shard r of tp of every member (the plan's one format), so a job resumes under any tp.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from distributed_sae.config import RunConfig
from distributed_sae.parallel.collectives import ShardComm
from distributed_sae.parallel.data_parallel import DataParallel
from distributed_sae.parallel.latent_shard import LatentShardedSAE, shard_range, shard_seed
from distributed_sae.parallel.layout import ParallelLayout
from distributed_sae.parallel.plan import GroupCollectives, Plan, Writer
from distributed_sae.parallel.shard_checkpoint import gather_full
from distributed_sae.sae import MemberSpec, sae_class
from distributed_sae.train.bank_trainer import BankTrainer, Member
from distributed_sae.train.metrics_log import member_records

log = logging.getLogger(__name__)


def sharded_member_builder(comm: ShardComm) -> Callable[[MemberSpec, int], LatentShardedSAE]:
    """BankTrainer's `build_member`: this rank's shard of a member, built from the member's
    parameters at width / tp, never the whole member."""

    def build(spec: MemberSpec, dims: Mapping[str, int]) -> LatentShardedSAE:
        start, stop = shard_range(spec.width, comm.size, comm.rank)
        params = spec.params
        if spec.k is not None:  # the slice's class checks k <= its width; the wrapper's k is global
            params = dataclasses.replace(params, k=min(spec.k, stop - start))
        form = spec.build_form(dims)
        local = sae_class(spec.kind).from_params(form.d_in, stop - start, params,
                                                 seed=shard_seed(spec.seed, comm.rank), form=form)
        if form.groups:  # a CLT shard's latents keep the whole member's layer groups
            local.set_latent_groups(torch.arange(start, stop) % form.groups)
        return LatentShardedSAE(local, spec.width, comm, k=spec.k)

    return build


class LatentShardedPlan(GroupCollectives, Plan):
    """Every member split over the tp shards of a replica; dp replicas data-parallel."""

    name = "latent_sharded"

    def __init__(self, cfg: RunConfig, specs: list[MemberSpec]) -> None:
        super().__init__(cfg, specs)
        if cfg.train.data_parallel != "ddp":
            raise ValueError(f"train.latent_shards={cfg.train.latent_shards} needs "
                             f"train.data_parallel=ddp, got {cfg.train.data_parallel!r}")
        self.world = dist.get_world_size()
        layout = ParallelLayout.for_world(self.world, cfg.train.latent_shards)
        self.groups = layout.build()
        self.layout, self.rank = layout, self.groups.rank
        self.read_rank, self.read_world = self.groups.dp_rank, layout.dp
        if self.rank == 0:
            log.info("latent-sharded training: %d workers = dp %d x tp %d (every member split "
                     "over %d shards; train.placement=%s does not apply)", self.world, layout.dp,
                     layout.tp, layout.tp, cfg.train.placement)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "dp": self.layout.dp, "tp": self.layout.tp}

    def local_batch(self, batch_size: int) -> int:
        return self.layout.check_batch(batch_size)

    def build_bank(self, dims: Mapping[str, int] | int,
                   means: Any, total: int) -> BankTrainer:
        for spec in self.specs:
            self.layout.check_width(spec.width)
        micro = self.local_batch(self.cfg.train.batch_size)
        sync = (DataParallel("ddp", micro_batch=micro, group=self.groups.dp_group)
                if self.layout.dp > 1 else None)
        return BankTrainer(self.cfg, self.specs, dims, means, total, sync=sync,
                           build_member=sharded_member_builder(self.groups.shard_comm()))

    def writes(self, m: Member) -> tuple[int, int] | None:
        if self.groups.dp_rank != 0:
            return None  # replicas are identical: replica 0's shards speak for all
        return self.groups.tp_rank, self.layout.tp

    @torch.no_grad()
    def records(self, bank: BankTrainer, rate: float) -> list[dict[str, Any]]:
        """member_records over whole members: collective over replica 0's shards, which gather
        their since_fired and fire-count slices onto global rank 0. Every rank starts a new
        density window."""
        whole = []
        for m in bank.members:
            counts, tokens = m.take_density()  # (n/tp,) this shard's slice, this replica's tokens
            if self.groups.dp_rank != 0:
                continue
            if counts.numel() != m.since_fired.numel():
                counts = torch.zeros_like(m.since_fired)
            comm, device = m.sae.comm, m.sae.b_dec.device  # NCCL gathers device tensors only
            since = comm.gather_to_first(m.since_fired.to(device), "log_since_fired")
            fires = comm.gather_to_first(counts.to(device, torch.long), "log_fire_counts")
            if since is not None and fires is not None:
                whole.append(dataclasses.replace(m, since_fired=torch.cat(since).cpu(),
                                                 fire_counts=torch.cat(fires).cpu(),
                                                 window_tokens=tokens))
        return member_records(bank, rate, self.cfg, whole) if self.rank == 0 else []

    def save(self, bank: BankTrainer, write: Writer) -> list[Path] | None:
        """Replica 0's shards gather every member onto rank 0, which saves member folders."""
        whole: list[Member] = []
        if self.groups.dp_rank == 0:
            for m in bank.members:
                full = gather_full(m.sae)  # collective over the replica's shards
                if full is not None:
                    whole.append(dataclasses.replace(m, sae=full, sync=None))
        folders = write(whole, self.bank_ids) if self.rank == 0 else None
        self.barrier()  # the folders are written before any rank reports success
        return folders
