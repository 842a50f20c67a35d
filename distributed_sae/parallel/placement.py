"""Placing the members of a bank on training workers by cost, not by count.

A bank mixes widths that differ 8-16x in cost (2304 .. 36864 latents), so giving each worker the
same NUMBER of members leaves most of them idle while one trains the widest. Each member's cost
per token is ~6·d_in·width FLOPs (2 for the encoder forward, 4 for its backward and the decoder,
the dense-path count; the sparse kernels shrink the decoder share but keep the proportion to
width) and its memory is 4 copies (weights, gradients, Adam's two moments) of 2·d_in·width + width
+ d_in fp32 numbers.

The plan: a member whose cost is at least one worker's fair share (total / workers) gets
floor(cost / share) workers of its own and trains data-parallel over them (each takes an equal
slice of every global batch); the other members are packed onto the remaining workers by
longest-processing-time-first (each to the least loaded worker that has the memory). Workers
still empty at the end extend the data-parallel group of the member with the highest load per
worker. Every worker reads the whole global batch stream (reading is ~1000x faster than training
on this machine, see docs/harvest.md) and slices what its members need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

BYTES_PER_NUMBER = 4  # fp32 master weights
STATE_COPIES = 4  # weights, gradients, Adam exp_avg, exp_avg_sq


@dataclass(frozen=True)
class MemberCost:
    """Training cost of one member: FLOPs per token and bytes of state."""

    flops_per_token: float
    state_bytes: int


def member_cost(d_in: int, width: int, d_out: int | None = None, skip: bool = False
                ) -> MemberCost:
    """The cost model of the module docstring for a member of `width` latents reading d_in and
    writing d_out numbers per token (None: d_in, an SAE). A transcoder, crosscoder or CLT has
    an encoder of d_in x width and a decoder of width x d_out: 3·(d_in + d_out)·width FLOPs per
    token (6·d_in·width when they are equal); a skip-transcoder adds its d_out x d_in map
    (6·d_in·d_out: its forward, backward and weight gradient)."""
    d_out = d_in if d_out is None else d_out
    numbers = (d_in + d_out) * width + width + d_out + (d_in * d_out if skip else 0)
    flops = 3.0 * (d_in + d_out) * width + (6.0 * d_in * d_out if skip else 0.0)
    return MemberCost(flops, STATE_COPIES * BYTES_PER_NUMBER * numbers)


@dataclass(frozen=True)
class Placement:
    """groups[i]: the worker ranks that train member i (data-parallel when several)."""

    groups: tuple[tuple[int, ...], ...]
    n_workers: int

    def members_of(self, rank: int) -> list[int]:
        """Indices of the members `rank` trains, in bank order."""
        return [i for i, g in enumerate(self.groups) if rank in g]

    def share(self, member: int, rank: int, batch: int) -> slice:
        """Rows of each global batch that `rank` feeds to `member`."""
        group = self.groups[member]
        part = batch // len(group)
        j = group.index(rank)
        return slice(j * part, (j + 1) * part)

    def loads(self, costs: Sequence[MemberCost]) -> list[float]:
        """FLOPs per global token each worker does."""
        out = [0.0] * self.n_workers
        for cost, group in zip(costs, self.groups):
            for r in group:
                out[r] += cost.flops_per_token / len(group)
        return out


def _group_sizes(flops: list[float], n_workers: int, batch: int, has_small: bool) -> list[int]:
    share = sum(flops) / n_workers
    sizes = [max(1, int(f / share + 1e-9)) for f in flops]
    # A group must split the batch evenly, and small members need at least one free worker.
    reserve = 1 if has_small else 0
    while sum(s for s in sizes if s > 1) > n_workers - reserve or any(batch % s for s in sizes):
        shrinkable = [i for i, s in enumerate(sizes) if s > 1]
        if not shrinkable:
            break
        # Shrink the group whose per-worker load grows least by losing a worker.
        i = min(shrinkable, key=lambda j: flops[j] / (sizes[j] - 1))
        sizes[i] -= 1
    return sizes


def place_members(costs: Sequence[MemberCost], n_workers: int, batch: int,
                  memory_per_worker: Optional[int] = None) -> Placement:
    """Assign every member to one or more of `n_workers` workers (see the module docstring)."""
    if n_workers < 1:
        raise ValueError(f"n_workers={n_workers} must be >= 1")
    for i, c in enumerate(costs):
        if memory_per_worker is not None and c.state_bytes > memory_per_worker:
            raise ValueError(
                f"member {i} needs {c.state_bytes / 2**30:.2f} GiB of weights, gradients and Adam "
                f"state, more than a worker's {memory_per_worker / 2**30:.2f} GiB: shard it over "
                f"latents (parallel/latent_shard.py) or use a smaller width")
    flops = [c.flops_per_token for c in costs]
    sizes = _group_sizes(flops, n_workers, batch, has_small=False)
    small = [i for i, s in enumerate(sizes) if s == 1]
    if small and sum(s for s in sizes if s > 1) >= n_workers:
        sizes = _group_sizes(flops, n_workers, batch, has_small=True)
        small = [i for i, s in enumerate(sizes) if s == 1]
    groups: list[list[int]] = [[] for _ in costs]
    nxt = 0
    for i, s in enumerate(sizes):
        if s > 1:
            groups[i] = list(range(nxt, nxt + s))
            nxt += s
    free = list(range(nxt, n_workers))
    load = {r: 0.0 for r in free}
    mem = {r: 0 for r in free}
    for i in sorted(small, key=lambda j: -flops[j]):  # longest first
        fits = [r for r in free if memory_per_worker is None
                or mem[r] + costs[i].state_bytes <= memory_per_worker]
        if not fits:
            raise ValueError(f"members do not fit the workers' memory ({memory_per_worker} bytes "
                             f"each): use more workers or smaller widths")
        r = min(fits, key=lambda w: (load[w], w))
        groups[i] = [r]
        load[r] += flops[i]
        mem[r] += costs[i].state_bytes
    _fill_idle(groups, flops, [r for r in free if load[r] == 0.0], batch)
    return Placement(tuple(tuple(g) for g in groups), n_workers)


def _fill_idle(groups: list[list[int]], flops: list[float], idle: list[int], batch: int) -> None:
    """Give idle workers to the members alone on their workers with the highest load per worker."""
    for r in idle:
        alone = [i for i, g in enumerate(groups)
                 if all(sum(r2 in g2 for g2 in groups) == 1 for r2 in g)
                 and batch % (len(g) + 1) == 0]
        if not alone:
            return
        i = max(alone, key=lambda j: flops[j] / len(groups[j]))
        groups[i].append(r)
