"""The 2-D layout of a training job: data-parallel replicas x latent shards.

    world_size = dp x tp,   rank = dp_rank · tp + tp_rank

The tp shards of one replica are consecutive ranks: with 8 GPUs per node and tp <= 8 they share a
node, so the per-step collectives of a sharded member (top-k candidates, the reconstruction
all-reduce) run over NVLink; only the data-parallel gradient all-reduce (once per step, the size
of the member's slice) crosses nodes. Rank 3 of dp = 2 x tp = 2 is replica 1, shard 1.

Process groups: one tensor-parallel group per replica (the shards of that replica: the input
batch is shared inside it, the top-k and x_hat collectives run in it) and one data-parallel group
per shard index (the same slice in every replica: its gradients are averaged in it). Every rank
must create every group, in the same order (torch.distributed.new_group is collective), which
`ParallelLayout.build` does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from distributed_sae.parallel.collectives import CommStats, ShardComm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayoutGroups:
    """This rank's place in a built layout and its two process groups."""

    layout: ParallelLayout
    rank: int
    dp_rank: int  # which replica: picks this rank's share of the data
    tp_rank: int  # which shard: picks this rank's latents
    tp_group: Optional[dist.ProcessGroup]  # the shards of this replica
    dp_group: Optional[dist.ProcessGroup]  # this shard index in every replica

    def shard_comm(self, stats: Optional[CommStats] = None) -> ShardComm:
        """The ShardComm of this rank's tensor-parallel group."""
        if self.layout.tp == 1:
            return ShardComm.single()
        return ShardComm(self.tp_group, stats)


@dataclass(frozen=True)
class ParallelLayout:
    """world_size workers as dp data-parallel replicas of tp latent shards each."""

    world_size: int
    dp: int
    tp: int

    def __post_init__(self) -> None:
        for name in ("world_size", "dp", "tp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"layout {name}={value!r} must be a positive integer")
        if self.dp * self.tp != self.world_size:
            hint = (f"e.g. dp={self.world_size // self.tp} with tp={self.tp}"
                    if self.world_size % self.tp == 0 else
                    f"tp must divide world_size={self.world_size}: tp in "
                    f"{[t for t in range(1, self.world_size + 1) if self.world_size % t == 0]}")
            raise ValueError(f"layout dp={self.dp} x tp={self.tp} = {self.dp * self.tp} workers "
                             f"does not match world_size={self.world_size}: {hint}")

    @classmethod
    def for_world(cls, world_size: int, tp: int) -> ParallelLayout:
        """The layout with `tp` latent shards and as many replicas as fit: dp = world_size / tp."""
        if tp < 1 or world_size % tp:
            raise ValueError(f"latent shards tp={tp} must divide world_size={world_size} (tp in "
                             f"{[t for t in range(1, world_size + 1) if world_size % t == 0]})")
        return cls(world_size, world_size // tp, tp)

    def coords(self, rank: int) -> tuple[int, int]:
        """(dp_rank, tp_rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} is outside 0..{self.world_size - 1}")
        return divmod(rank, self.tp)

    def tp_ranks(self, dp_rank: int) -> list[int]:
        """Global ranks of the shards of replica `dp_rank`."""
        return [dp_rank * self.tp + t for t in range(self.tp)]

    def dp_ranks(self, tp_rank: int) -> list[int]:
        """Global ranks holding shard `tp_rank` in each replica."""
        return [d * self.tp + tp_rank for d in range(self.dp)]

    def split_replicas(self, node_of_rank: list[str]) -> dict[int, list[str]]:
        """Replicas whose shards sit on more than one node ({dp_rank: their nodes}): each of
        their steps' collectives then crosses the network instead of NVLink. Ray packs a
        latent-sharded job's workers and numbers ranks node by node, so this is empty when
        every node holds a multiple of tp workers."""
        split = {}
        for d in range(self.dp):
            nodes = sorted({node_of_rank[r] for r in self.tp_ranks(d)})
            if len(nodes) > 1:
                split[d] = nodes
        return split

    def check_width(self, d_sae: int) -> None:
        """Refuse a member width that does not split into tp equal slices."""
        if d_sae % self.tp:
            raise ValueError(f"width {d_sae} is not divisible by tp={self.tp} latent shards: use "
                             f"a multiple of {self.tp} (e.g. {d_sae - d_sae % self.tp + self.tp})")

    def check_batch(self, batch_size: int) -> int:
        """Rows per replica per step: the global batch splits over dp (not over tp: the shards
        of a replica share its batch)."""
        if batch_size % self.dp:
            raise ValueError(f"batch_size={batch_size} is not divisible by dp={self.dp} "
                             f"data-parallel replicas: use a multiple of {self.dp}")
        return batch_size // self.dp

    def build(self) -> LayoutGroups:
        """Create the process groups (collective: every rank of the default group calls it)."""
        if not dist.is_initialized():
            raise RuntimeError("ParallelLayout.build needs a torch.distributed group: init_group "
                               "first")
        world, rank = dist.get_world_size(), dist.get_rank()
        if world != self.world_size:
            raise ValueError(f"layout world_size={self.world_size} (dp={self.dp} x tp={self.tp}) "
                             f"but the process group has {world} ranks: build the layout with "
                             f"world_size={world}")
        dp_rank, tp_rank = self.coords(rank)
        tp_group = dp_group = None
        for d in range(self.dp):  # same order on every rank: new_group is collective
            group = dist.new_group(self.tp_ranks(d))
            if d == dp_rank:
                tp_group = group
        for t in range(self.tp):
            group = dist.new_group(self.dp_ranks(t))
            if t == tp_rank:
                dp_group = group
        log.info("rank %d: replica %d of %d, latent shard %d of %d", rank, dp_rank, self.dp,
                 tp_rank, self.tp)
        return LayoutGroups(self, rank, dp_rank, tp_rank, tp_group, dp_group)
