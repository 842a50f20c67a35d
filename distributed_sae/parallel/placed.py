"""Two data-parallel strategies of the plan: members placed on workers by cost, or replicated.

PlacedPlan (train.placement=cost, the default): parallel/placement.py gives each member a group
of ranks by its FLOPs: several small members share a rank, a wide one trains over several; every
rank reads the whole global batch and feeds each of its members that member's slice, so one step
consumes train.batch_size rows per member, as one process does. The first rank of a member's
group leads it: it writes its checkpoint shard, logs and saves it.

ReplicatedPlan (train.placement=replicate): every member trains over all ranks and rank r of W
reads only its own disjoint chunks of the store (`ActivationReader(rank=r, world_size=W)`),
batches of train.batch_size / W rows; rank 0 writes, logs and saves every member.

Gradients are averaged (DDP) or reduce-scattered into partitioned optimiser state (ZeRO-2,
DeepSpeed, which cannot checkpoint: its Adam state is partitioned), see
parallel/data_parallel.py; dead-latent counters and BatchTopK's threshold stay identical on
every rank of a group.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch.distributed as dist

from distributed_sae.config import RunConfig
from distributed_sae.parallel.data_parallel import STRATEGIES, DataParallel
from distributed_sae.parallel.placement import MemberCost, Placement, member_cost, place_members
from distributed_sae.parallel.plan import GroupCollectives, Plan, Writer
from distributed_sae.sae import MemberSpec
from distributed_sae.train.bank_trainer import BankTrainer, Member
from distributed_sae.train.metrics_log import member_records

log = logging.getLogger(__name__)


def local_batch(batch_size: int, world_size: int) -> int:
    """Rows per rank per step; the global batch must split evenly (so averaging the ranks'
    mean losses is the global batch's mean loss)."""
    if batch_size % world_size:
        raise ValueError(f"train.batch_size={batch_size} must be divisible by the "
                         f"{world_size} data-parallel workers")
    return batch_size // world_size


class _GroupPlan(GroupCollectives, Plan):
    """What both data-parallel strategies share: the default group, its strategy."""

    def __init__(self, cfg: RunConfig, specs: list[MemberSpec]) -> None:
        super().__init__(cfg, specs)
        self.strategy = cfg.train.data_parallel
        if self.strategy not in STRATEGIES:
            raise ValueError(f"train.data_parallel={self.strategy!r} must be one of {STRATEGIES}")
        if cfg.train.checkpoint_every and self.strategy != "ddp":
            raise ValueError("train.checkpoint_every with several workers needs "
                             "train.data_parallel=ddp (ZeRO-2's optimiser state is partitioned)")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()


class ReplicatedPlan(_GroupPlan):
    """Every member data-parallel over all ranks; rank r reads share r of W of the store."""

    name = "replicate"

    def __init__(self, cfg: RunConfig, specs: list[MemberSpec]) -> None:
        super().__init__(cfg, specs)
        self.read_rank, self.read_world = self.rank, self.world

    def local_batch(self, batch_size: int) -> int:
        return local_batch(batch_size, self.world)

    def build_bank(self, dims: Mapping[str, int] | int,
                   means: Any, total: int) -> BankTrainer:
        micro = self.local_batch(self.cfg.train.batch_size)
        return BankTrainer(self.cfg, self.specs, dims, means, total,
                           sync=DataParallel(self.strategy, micro_batch=micro))

    def writes(self, m: Member) -> tuple[int, int] | None:
        return (0, 1) if self.rank == 0 else None  # replicas are identical

    def records(self, bank: BankTrainer, rate: float) -> list[dict[str, Any]]:
        return member_records(bank, rate, self.cfg) if self.rank == 0 else []

    def save(self, bank: BankTrainer, write: Writer) -> list[Path] | None:
        folders = write(bank.members, self.bank_ids) if self.rank == 0 else None
        self.barrier()  # the folders are written before any rank reports success
        return folders


def spec_cost(spec: MemberSpec, dims: Mapping[str, int] | int) -> MemberCost:
    """member_cost of a spec, from the widths of its hooks."""
    def width(hooks: tuple[str, ...]) -> int:
        return sum(dims if isinstance(dims, int) else dims[h] for h in hooks)

    return member_cost(width(spec.inputs), spec.width, width(spec.outputs),
                       skip=spec.form == "skip_transcoder")


class PlacedPlan(_GroupPlan):
    """Members placed on ranks by cost (parallel/placement.py); every rank reads every row."""

    name = "placed"

    def __init__(self, cfg: RunConfig, specs: list[MemberSpec]) -> None:
        super().__init__(cfg, specs)
        self.placement: Placement | None = None

    def build_bank(self, dims: Mapping[str, int] | int,
                   means: Any, total: int) -> BankTrainer:
        cfg, rank, world = self.cfg, self.rank, self.world
        costs = [spec_cost(s, dims) for s in self.specs]
        plan = place_members(costs, world, cfg.train.batch_size)
        placed, mine = {}, []
        for i, (spec, ranks) in enumerate(zip(self.specs, plan.groups)):
            if self.strategy == "zero2" and 1 < len(ranks) < world:
                raise ValueError(f"{spec.member_id} was placed on workers {list(ranks)} of "
                                 f"{world}: ZeRO-2 runs over all workers only; use "
                                 f"train.data_parallel=ddp or train.placement=replicate")
            # torch.distributed needs every rank to create every subgroup, in the same order; a
            # member over all ranks uses the default group.
            group = dist.new_group(list(ranks)) if 1 < len(ranks) < world else None
            if rank in ranks:
                share = plan.share(i, rank, cfg.train.batch_size)
                factory = None if len(ranks) == 1 else DataParallel(
                    self.strategy, micro_batch=share.stop - share.start, group=group)
                placed[spec.member_id] = (factory, share)
                mine.append(spec)
        if rank == 0:
            log.info("placement by cost over %d workers: %s; load per worker (GFLOP/token) %s",
                     world, {s.member_id: list(g) for s, g in zip(self.specs, plan.groups)},
                     [round(x / 1e9, 4) for x in plan.loads(costs)])
        self.placement = plan
        return BankTrainer(cfg, mine, dims, means, total, placed=placed)

    def _leads(self, m: Member) -> bool:
        assert self.placement is not None
        return self.placement.groups[self.bank_ids.index(m.spec.member_id)][0] == self.rank

    def led(self, bank: BankTrainer) -> list[Member]:
        """The members whose data-parallel group this rank leads (it saves and logs them)."""
        return [m for m in bank.members if self._leads(m)]

    def writes(self, m: Member) -> tuple[int, int] | None:
        return (0, 1) if self._leads(m) else None

    def records(self, bank: BankTrainer, rate: float) -> list[dict[str, Any]]:
        gathered = self.gather(member_records(bank, rate, self.cfg, self.led(bank)))
        if gathered is None:
            return []
        order = {name: i for i, name in enumerate(self.bank_ids)}
        return sorted((r for part in gathered for r in part), key=lambda r: order[r["member"]])

    def save(self, bank: BankTrainer, write: Writer) -> list[Path] | None:
        folders = write(self.led(bank), self.bank_ids if self.rank == 0 else [])
        self.barrier()
        return folders
