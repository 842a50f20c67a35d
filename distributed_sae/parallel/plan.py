"""The plan: how one training engine (train/trainer.py) runs a bank on one process or many.

The engine pulls a batch, steps every member, logs, checkpoints and saves; everything that
depends on the layout is asked of its Plan:
    build_bank      which members this process holds, whole or as latent shards, and how their
                    gradients are combined (data parallelism)
    local_batch, read_rank, read_world
                    which rows of each global batch this process reads
    records         the metrics of every member, gathered to the logging process
    checkpoint, resume
                    one checkpoint format for every layout (train/checkpoint.py: each member as
                    shards of its latents, a whole member being shard 0 of 1)
    save            the members as ordinary SAE folders, written once
Strategies: Plan (this file, one process), PlacedPlan and ReplicatedPlan (parallel/placed.py:
members placed on workers by cost, or every member data-parallel over all), LatentShardedPlan
(parallel/sharded_plan.py: every member split by latents, replicas data-parallel). Every
torch.distributed call of training lives in those files.

Resuming across layouts: members are re-sliced to whatever the new layout holds (exact: the
weights, Adam moments and counters are the same numbers). The data position is one reader
state per share of the store (read_world); a checkpoint resumes where read_world is the same:
one process, placed workers and dp = 1 latent-sharded jobs all read the whole global batch, so
they resume one another; a job whose batch is split over W replicas resumes under W replicas.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load_file

from distributed_sae.config import RunConfig
from distributed_sae.sae import MemberSpec
from distributed_sae.train.bank_trainer import BankTrainer, Member
from distributed_sae.train.checkpoint import (
    STATE, begin_checkpoint, finish_checkpoint, latest_checkpoint, read_member, rng_tensors,
    load_rng_tensors, staging, write_member, write_part,
)
from distributed_sae.train.metrics_log import member_records

log = logging.getLogger(__name__)

# save(members, bank_ids) -> folders: the engine's writer of member folders (train/saving.py).
Writer = Callable[[list[Member], list[str]], list[Path]]
CHECKPOINT_FORMAT = 2  # 1: the per-layout formats before the one engine (refused, see resume)


def counters(m: Member) -> dict[str, torch.Tensor]:
    """A member's per-latent counters that a checkpoint holds (fire counts once sized)."""
    out = {"since_fired": m.since_fired}
    if m.fire_counts.numel() == m.since_fired.numel():
        out["fire_counts"] = m.fire_counts
    return out


class Plan:
    """One process holds and trains every member whole; the base of the other strategies."""

    name = "single"
    rank, world, read_rank, read_world = 0, 1, 0, 1

    def __init__(self, cfg: RunConfig, specs: list[MemberSpec]) -> None:
        self.cfg, self.specs = cfg, specs
        self.bank_ids = [s.member_id for s in specs]

    @property
    def is_logger(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        return {"plan": self.name, "workers": self.world, "read_world": self.read_world}

    # ---- collectives (none on one process) -----------------------------------------------
    def barrier(self) -> None:
        pass

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on rank 0 (None elsewhere)."""
        return [obj]

    def agree(self, flag: bool) -> bool:
        """Whether every rank's `flag` is set (collective): ranks that act on what each sees
        for itself (a file, its own reader position) must act alike."""
        return flag

    # ---- the bank and its data -----------------------------------------------------------
    def local_batch(self, batch_size: int) -> int:
        return batch_size

    def build_bank(self, dims: Mapping[str, int] | int,
                   means: Any, total: int) -> BankTrainer:
        return BankTrainer(self.cfg, self.specs, dims, means, total)

    def writes(self, m: Member) -> tuple[int, int] | None:
        """(shard, shards) of member m that this process writes into a checkpoint, or None."""
        return 0, 1

    def records(self, bank: BankTrainer, rate: float) -> list[dict[str, Any]]:
        """Every member's metrics record on the logging process ([] elsewhere)."""
        return member_records(bank, rate, self.cfg)

    def save(self, bank: BankTrainer, write: Writer) -> list[Path] | None:
        return write(bank.members, self.bank_ids)

    def after_step(self, step: int) -> None:
        inject_fault(self.cfg, step, self.rank)

    # ---- checkpoints ---------------------------------------------------------------------
    def checkpoint(self, bank: BankTrainer, reader: Any) -> None:
        """Checkpoint `bank.step_count` (collective): each process writes the member shards it
        owns (`writes`), rank 0 the RNG and state.json, then renames the folder into place, so a
        checkpoint is complete or absent."""
        folder, step = checkpoint_dir(self.cfg), bank.step_count
        if self.rank == 0:
            begin_checkpoint(folder, step)
        self.barrier()  # the staging folder exists before anyone writes into it
        tmp = staging(folder, step)
        for m in bank.members:
            part = self.writes(m)
            if part is not None:
                write_member(tmp / m.spec.member_id, m.sae, m.opt, counters(m), *part,
                             extra={"window_tokens": m.window_tokens})
        readers = self.gather((self.read_rank, reader.state_dict()))
        if self.rank == 0:
            by_share = dict(reversed(readers))  # one reader state per share of the store
            write_part(tmp, rng_tensors(), "rng")
            state = {"format": CHECKPOINT_FORMAT, "tokens_seen": bank.tokens_seen,
                     "members": self.bank_ids, "layout": self.describe(),
                     "readers": [by_share[r] for r in range(self.read_world)]}
            finish_checkpoint(tmp, step, state, keep=self.cfg.train.keep_checkpoints)
        self.barrier()  # nobody runs ahead of a checkpoint that is not complete

    def resume(self, bank: BankTrainer, reader: Any) -> Path | None:
        """Load the newest checkpoint (unless train.resume=false) into this process's members
        and reader; returns it, or None when there is none."""
        latest = latest_checkpoint(checkpoint_dir(self.cfg)) if self.cfg.train.resume else None
        if latest is None:
            return None
        state = json.loads((latest / STATE).read_text())
        check_resumable(latest, state, self.bank_ids, self.describe())
        for m in bank.members:
            if m.fire_counts.numel() != m.since_fired.numel():
                m.fire_counts = torch.zeros_like(m.since_fired)
            meta = read_member(latest / m.spec.member_id, m.sae, m.opt, counters(m))
            m.window_tokens = int(meta.get("window_tokens", 0))
        reader.load_state_dict(state["readers"][self.read_rank])
        load_rng_tensors(load_file(str(latest / "rng.safetensors")))
        bank.step_count, bank.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        if self.is_logger:
            log.info("resumed from %s (step %d, written by %s)", latest, bank.step_count,
                     state["layout"])
        return latest


class GroupCollectives:
    """The collectives of a plan over the default torch.distributed group (a mixin)."""

    rank: int
    world: int

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def gather(self, obj: Any) -> list[Any] | None:
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def agree(self, flag: bool) -> bool:
        import torch.distributed as dist

        t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())


def check_resumable(path: Path, state: dict[str, Any], bank_ids: list[str],
                    layout: dict[str, Any]) -> None:
    """Refuse, naming the difference, a checkpoint this job cannot continue."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} was written in an older format (before the one "
                         f"training engine): restart without it (train.resume=false) or use "
                         f"another out_dir")
    if state["members"] != bank_ids:
        raise ValueError(f"checkpoint holds members {state['members']}, this bank is {bank_ids}: "
                         f"resume with the same sae config or use another out_dir")
    saved = int(state["layout"]["read_world"])
    if saved != layout["read_world"]:
        raise ValueError(
            f"checkpoint {path} was written by a job reading the store as {saved} share(s) "
            f"({state['layout']}), this one reads {layout['read_world']} ({layout}): the data "
            f"position cannot be carried over; resume with train.workers / train.latent_shards "
            f"giving {saved} data-parallel share(s), or use another out_dir")


def checkpoint_dir(cfg: RunConfig) -> Path:
    return Path(cfg.out_dir) / "train" / "checkpoints"


def inject_fault(cfg: RunConfig, step: int, rank: int) -> None:
    """A testing aid for the restart path: with DSAE_FAULT_AT_STEP=n (and DSAE_FAULT_RANK, default
    1), that rank dies hard (os._exit; SIGKILL of itself with DSAE_FAULT_SIGNAL=KILL) at step n,
    once per out_dir, like a preempted worker. DSAE_FAULT_SIGNAL=HOLD makes it hang there
    instead, so that a test can take its node (or another rank's) away at a known step."""
    at = os.environ.get("DSAE_FAULT_AT_STEP")
    if at is None or step != int(at) or rank != int(os.environ.get("DSAE_FAULT_RANK", "1")):
        return
    marker = Path(cfg.out_dir) / "train" / ".fault_injected"
    if marker.exists():
        return
    marker.write_text(f"rank {rank} killed at step {step}\n")
    log.warning("DSAE_FAULT_AT_STEP: rank %d exits at step %d", rank, step)
    how = os.environ.get("DSAE_FAULT_SIGNAL")
    if how == "KILL":  # as the kernel's OOM killer or a preemption
        os.kill(os.getpid(), signal.SIGKILL)
    while how == "HOLD":  # until this process is killed (its group restarted)
        time.sleep(1)
    os._exit(1)


def make_plan(cfg: RunConfig, specs: list[MemberSpec] | None = None) -> Plan:
    """The plan for this process: one process, or, inside a torch.distributed group, the
    strategy the config asks for (latent sharding, placement by cost, or replication)."""
    import torch.distributed as dist

    specs = cfg.bank() if specs is None else specs
    if not (dist.is_available() and dist.is_initialized()):
        return Plan(cfg, specs)
    if cfg.train.latent_shards > 1:
        from distributed_sae.parallel.sharded_plan import LatentShardedPlan

        return LatentShardedPlan(cfg, specs)
    from distributed_sae.parallel.placed import PlacedPlan, ReplicatedPlan

    if cfg.train.placement == "cost":
        return PlacedPlan(cfg, specs)
    return ReplicatedPlan(cfg, specs)
