"""The collectives of a latent-sharded SAE, with a byte counter, and the exact global top-k.

Every collective a sharded member issues goes through one `ShardComm` (its tensor-parallel group),
which counts what this rank hands to the network, so benchmarks can show the traffic per step.
Two counts per call:
    payload  bytes of the tensor this rank contributes (all-reduce: the tensor; all-gather: its
             own slice; gather: its own slice);
    wire     what a ring implementation sends from this rank: all-reduce 2 (R-1)/R x payload
             (reduce-scatter + all-gather), all-gather (R-1) x payload, gather-to-one: payload
             (from every rank but the root).
With R = 1 (an unsharded member, or tp = 1) nothing is sent and nothing is counted.

Autograd: `sum_over_shards` (forward all-reduce, backward identity: every rank computes the same
loss from the summed tensor, so each rank's upstream gradient is already the full one) and
`reduce_grad_over_shards` (forward identity, backward all-reduce: a replicated tensor used by a
per-shard computation collects every shard's gradient). Megatron-LM calls this pair g and f.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    """Bytes this rank handed to collectives since the last reset, by operation."""

    payload_bytes: int = 0
    wire_bytes: float = 0.0
    calls: int = 0
    by_op: dict[str, int] = field(default_factory=dict)  # payload bytes per operation name

    def add(self, op: str, payload: int, wire: float) -> None:
        self.payload_bytes += payload
        self.wire_bytes += wire
        self.calls += 1
        self.by_op[op] = self.by_op.get(op, 0) + payload

    def reset(self) -> None:
        self.payload_bytes, self.wire_bytes, self.calls, self.by_op = 0, 0.0, 0, {}


class ShardComm:
    """A tensor-parallel group (the shards of one member) and its byte counter.

    group=None: the default group when torch.distributed is initialised, else a single process
    (size 1, every collective a no-op), so the same code runs sharded and unsharded.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None,
                 stats: Optional[CommStats] = None) -> None:
        self.group = group
        self.stats = stats if stats is not None else CommStats()
        if dist.is_available() and dist.is_initialized():
            self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        elif group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not initialised")
        else:
            self.size, self.rank = 1, 0

    @classmethod
    def single(cls) -> ShardComm:
        """A group of one (no collectives), usable with or without torch.distributed."""
        comm = cls.__new__(cls)
        comm.group, comm.stats, comm.size, comm.rank = None, CommStats(), 1, 0
        return comm

    def all_reduce_(self, t: torch.Tensor, op: str = "all_reduce") -> torch.Tensor:
        """Sum `t` over the shards in place; returns it."""
        if self.size == 1:
            return t
        payload = t.numel() * t.element_size()
        self.stats.add(op, payload, 2 * (self.size - 1) / self.size * payload)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, op: str = "all_gather") -> torch.Tensor:
        """(size, *t.shape): every shard's `t` (same shape on all shards), in shard order."""
        if self.size == 1:
            return t.unsqueeze(0)
        t = t.contiguous()
        payload = t.numel() * t.element_size()
        self.stats.add(op, payload, (self.size - 1) * payload)
        out = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(out, t, group=self.group)
        return torch.stack(out)

    def gather_to_first(self, t: torch.Tensor, op: str = "gather") -> list[torch.Tensor] | None:
        """Every shard's `t` on shard 0 (a list in shard order), None elsewhere."""
        t = t.contiguous()
        if self.size == 1:
            return [t]
        payload = t.numel() * t.element_size()
        self.stats.add(op, payload, 0.0 if self.rank == 0 else payload)
        out = [torch.empty_like(t) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(t, out, dst=dist.get_global_rank(self.group, 0) if self.group else 0,
                    group=self.group)
        return out

    def broadcast_from_first(self, t: torch.Tensor, op: str = "broadcast") -> torch.Tensor:
        """Shard 0's `t` on every shard (in place)."""
        if self.size == 1:
            return t
        payload = t.numel() * t.element_size()
        self.stats.add(op, payload, payload if self.rank == 0 else 0.0)
        dist.broadcast(t, src=dist.get_global_rank(self.group, 0) if self.group else 0,
                       group=self.group)
        return t

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.group)


class _SumOverShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, comm: ShardComm) -> torch.Tensor:
        return comm.all_reduce_(t.clone(), "sum_over_shards")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _ReduceGradOverShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, comm: ShardComm) -> torch.Tensor:
        ctx.comm = comm
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.comm.all_reduce_(grad.clone(), "reduce_grad"), None


def sum_over_shards(t: torch.Tensor, comm: ShardComm) -> torch.Tensor:
    """Σ over shards of `t` (each shard's partial); the gradient passes through unchanged."""
    return t if comm.size == 1 else _SumOverShards.apply(t, comm)


def reduce_grad_over_shards(t: torch.Tensor, comm: ShardComm) -> torch.Tensor:
    """`t` unchanged; its gradient is summed over the shards in the backward pass."""
    return t if comm.size == 1 else _ReduceGradOverShards.apply(t, comm)


@torch.no_grad()
def select_global_topk(candidates: torch.Tensor, k: int,
                       comm: ShardComm) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over all shards from each shard's local candidates.

    candidates: (rows, c) this shard's c largest values per row (the same c on every shard).
    Returns (mask (rows, c) bool: which of this shard's candidates are among the k largest of
    all shards' candidates in their row, top (rows, k) those k values, identical on every shard).

    Exact: an element among a row's k largest overall has fewer than k larger elements anywhere,
    so fewer than k in its own shard, hence it is among its shard's min(k, width) candidates.
    Only values travel (rows·c·R floats per shard): the winner's shard and slot follow from its
    position in the gathered (rows, R·c) array, so no indices need sending. Every shard runs the
    same topk on the same array, so ties break identically everywhere.
    """
    rows, c = candidates.shape
    gathered = comm.all_gather(candidates, "topk_candidates")  # (R, rows, c)
    flat = gathered.permute(1, 0, 2).reshape(rows, comm.size * c)  # (rows, R·c)
    top, pos = flat.topk(min(k, flat.shape[1]), dim=1, sorted=False)  # (rows, k)
    chosen = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, pos, True)
    return chosen[:, comm.rank * c:(comm.rank + 1) * c], top
