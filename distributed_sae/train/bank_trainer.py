"""One process's bank: its members, their optimisers, schedules and dead-latent tracking.

`BankTrainer.step(x)` feeds one batch to every member. What must survive a restart (weights,
Adam moments, the step, dead-latent and fire counters) is written and read by the plan
(parallel/plan.py) in train/checkpoint.py's one format, so a job killed at any step resumes to
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from distributed_sae.config import RunConfig
from distributed_sae.kernels import screen_supported
from distributed_sae.sae import MemberSpec, SparseAutoencoder, build_sae
from distributed_sae.store.bank_reader import cat_hooks
from distributed_sae.train.optim import (ADAM_DEAD_TOKENS, build_optimizer, dead_window,
                                         encoder_init_norm, peak_lr, scheduled)
from distributed_sae.train.resampling import resample_dead

log = logging.getLogger(__name__)

# Candidates past k that the TopK encoder's bf16 screen re-ranks by exact values. On 12,288
# held-out SmolLM2 layer-15 rows (scripts/bench_screen.py, k 16-64, width 2304-9216, at the start
# and after 60 steps), rows whose selection differs from fp32's: bf16 alone (0) 4-52%, margin 4
# up to 1.4%, margin 8 at most one row.
SCREEN_MARGIN = 8


def screen_margin(cfg: RunConfig) -> int:
    """The TopK kinds' screen margin under train.topk_screen (0: the fp32 GEMM selects)."""
    mode = cfg.train.topk_screen
    if mode == "auto":
        mode = "bf16" if screen_supported(torch.device(cfg.train.device)) else "off"
    return SCREEN_MARGIN if mode == "bf16" else 0


@dataclass
class Member:
    """One SAE of the bank with its optimiser and dead-latent tracking."""

    spec: MemberSpec
    # A SparseAutoencoder, or this rank's shard of a latent-sharded member (same interface).
    sae: SparseAutoencoder
    opt: torch.optim.Optimizer
    since_fired: torch.Tensor  # (d_sae,) tokens since each latent last fired (sharded: (d_sae/tp,))
    # Tokens each latent fired on since the last log, and this rank's tokens in that window:
    # their ratio is the feature density of the logged histogram.
    fire_counts: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    window_tokens: int = 0
    last: dict[str, float] = field(default_factory=dict)
    # Data parallelism (parallel/data_parallel.py): None trains this process alone. Otherwise an
    # object with global_loss(out, x) -> (loss, terms), backward(loss) (gradients averaged over the group, W_dec's parallel part
    # removed), step() (clip + optimiser step), after_renorm(), reduce_fired(fired, rows) ->
    # (fired over the group, rows over the group), sync_buffers() and mean_terms(dict).
    sync: Any = None
    # Rows of each batch this member trains on (its data-parallel share when the bank is placed
    # by cost, parallel/placement.py); None = the whole batch.
    share: slice | None = None
    # Peak learning rate (train/optim.py's peak_lr); the schedule scales it every step.
    peak_lr: float = 1e-3
    # Tokens without firing after which a latent gets AuxK (train/optim.py's dead_window).
    dead_tokens: int = ADAM_DEAD_TOKENS

    def dead(self, tokens: int) -> torch.Tensor:
        return self.since_fired >= tokens  # (d_sae,) bool

    def count_fires(self, out: Any, rows: int) -> None:
        """Add a step's firing counts (per token when the kind counts, else once per batch)."""
        counts = out.counts if out.counts is not None else out.fired
        # Kept on the counts' device: a copy to the host every step would sync a GPU every step.
        if self.fire_counts.numel() != counts.numel():
            self.fire_counts = torch.zeros(counts.numel(), dtype=torch.long, device=counts.device)
        elif self.fire_counts.device != counts.device:  # loaded from a checkpoint on the host
            self.fire_counts = self.fire_counts.to(counts.device)
        self.fire_counts += counts
        self.window_tokens += rows

    def take_density(self) -> tuple[torch.Tensor, int]:
        """(fire counts (d_sae,) on the CPU, tokens) since the last call; starts a new window."""
        counts, tokens = self.fire_counts.cpu(), self.window_tokens
        self.fire_counts, self.window_tokens = torch.zeros_like(self.fire_counts), 0
        return counts, tokens


def lr_at(step: int, total: int, cfg: RunConfig, base: float, constant: bool = False) -> float:
    """`base` (a member's peak, train/optim.py's peak_lr) times the schedule: linear warm-up,
    then constant, then linear decay to 0 over the last 20% of steps; `constant` (a
    schedule-free optimiser, signum_sf) keeps it at base."""
    if constant:
        return base
    warm = min(cfg.train.warmup_steps, max(1, total // 10))
    if step < warm:
        return base * (step + 1) / warm
    decay_start = int(total * 0.8)
    if step >= decay_start:
        return base * max(0.0, (total - step) / max(1, total - decay_start))
    return base


def batch_variance(x: torch.Tensor) -> torch.Tensor:
    """sum ||x - mean(x)||^2 of a batch (batch, d_in): the FVU denominator, shared by members."""
    return (x - x.mean(0)).pow(2).sum()


def member_batch(spec: MemberSpec, batch: Mapping[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input (batch, d_in), target (batch, d_out) or None for an SAE): the member's hooks of
    the batch, concatenated in the spec's order (one hook: the batch's own tensor, no copy)."""
    return cat_hooks(batch, spec.inputs), (cat_hooks(batch, spec.targets) if spec.targets
                                           else None)


def member_init(spec: MemberSpec, init: Any) -> torch.Tensor:
    """b_dec's start (d_out,): the scaled mean of each target hook, concatenated. `init` is a
    tensor (a one-hook bank), a mapping hook -> mean, or an object with .means (train/norm.py's
    MemberInit, which also carries skip-transcoders' least-squares maps)."""
    means = getattr(init, "means", init)
    if isinstance(means, torch.Tensor):
        return means
    return torch.cat([means[h] for h in spec.outputs])


def _metrics(loss: torch.Tensor, x_hat: torch.Tensor, x: torch.Tensor, var: torch.Tensor,
             terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    fvu = (x_hat - x).pow(2).sum() / var
    return {"loss": loss.detach(), "fvu": fvu, **{k: v.detach() for k, v in terms.items()}}


def train_step(member: Member, x: torch.Tensor, lr: float, sparsity_scale: float,
               dead_tokens: int, var: torch.Tensor | None = None,
               target: torch.Tensor | None = None) -> None:
    """One optimiser step of one member on a batch x (batch, d_in) with its target (batch,
    d_out; None: x), honouring its kind's flags.

    With `var` (batch_variance of the target) the step's metrics go to member.last; without it
    none are computed, which keeps the device-to-host syncs of float() off steps not logged.
    """
    sae = member.sae
    for group in member.opt.param_groups:
        group["lr"] = lr
    out = sae.loss(x, dead=member.dead(dead_tokens), sparsity_scale=sparsity_scale,
                   target=target)
    y = x if target is None else target
    if member.sync is not None:
        _synced_step(member, y, out, var)
        return
    member.opt.zero_grad(set_to_none=True)
    out.loss.backward()
    if sae.unit_norm_decoder:
        sae.remove_parallel_grad()
    if sae.grad_clip is not None:
        clip_gradients(sae)
    member.opt.step()
    if sae.unit_norm_decoder:
        sae.normalize_decoder()
    with torch.no_grad():
        member.since_fired += x.shape[0]
        member.since_fired[out.fired] = 0
        member.count_fires(out, x.shape[0])
        if var is not None:
            member.last = {k: float(v) for k, v in
                           _metrics(out.loss, out.x_hat, y, var, out.terms).items()}


def clip_gradients(sae: nn.Module) -> None:
    """Clip the member's gradient norm to its kind's grad_clip. A latent-sharded member brings
    its own clip_grad_norm_ (the norm over all shards; torch's would see one shard only)."""
    own_clip = getattr(sae, "clip_grad_norm_", None)
    if own_clip is not None:
        own_clip(sae.grad_clip)
    else:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), sae.grad_clip)


def _synced_step(member: Member, x: torch.Tensor, out: Any, var: torch.Tensor | None) -> None:
    """train_step's second half for a member replicated over a data-parallel group; x is the
    member's target (what its x_hat reconstructs)."""
    sae, sync = member.sae, member.sync
    loss, terms = sync.global_loss(out, x)  # terms whose normaliser is per-batch made global
    sync.backward(loss)
    sync.step()
    if sae.unit_norm_decoder:
        sae.normalize_decoder()
        sync.after_renorm()
    sync.sync_buffers()
    with torch.no_grad():
        fired, rows = sync.reduce_fired(out.fired, x.shape[0])
        member.since_fired += rows
        member.since_fired[fired] = 0
        member.count_fires(out, x.shape[0])  # this rank's share: density is a ratio
        if var is not None:  # every rank decides alike (same step count): mean_terms is collective
            member.last = sync.mean_terms(_metrics(loss, out.x_hat, x, var, terms))


class BankTrainer:
    """Trains every member of a bank on the same batches.

    sync: None (this process alone) or a data-parallel factory (parallel/data_parallel.py) with
    `world_size` and `wrap(member)` -> the member's sync; x is then this rank's share of the
    global batch and tokens_seen counts the global batch.
    placed: instead of `sync`, per member id a (factory or None, slice of the batch): x is the
    global batch and each member trains on its slice, data-parallel over its own group.
    build_member: (spec, dims) -> the member's module (default: build_sae from the config), e.g.
    this rank's shard of a latent-sharded member (parallel/sharded_plan.py); dead-latent counters get
    the module's local width (its b_enc's length).
    dims: each hook's width ({hook: d}, or one int for a one-hook bank); b_dec_init: see
    member_init.
    """

    def __init__(self, cfg: RunConfig, specs: list[MemberSpec], dims: int | Mapping[str, int],
                 b_dec_init: Any, total_steps: int,
                 sync: Any = None,
                 placed: dict[str, tuple[Any, slice]] | None = None,
                 build_member: Callable[[MemberSpec, Mapping[str, int]], nn.Module] | None = None
                 ) -> None:
        self.cfg, self.total_steps = cfg, total_steps
        self.build_member = build_member
        self.step_count, self.tokens_seen = 0, 0
        # Seconds each member's steps took, by member id, when set to a dict (benchmarks;
        # scripts/bench_bank_members.py): the step of one member inside the bank vs alone.
        self.member_seconds: dict[str, float] | None = None
        self.world_size = 1 if sync is None else int(sync.world_size)
        # Adam's fused (foreach over one flat loop) kernel: on the 2-core build machine it took
        # the TopK step (width 4608, batch 4096) from 2.06x to 1.69x its encoder matmul
        # (scripts/bench_kernels.py --cpu). DeepSpeed ZeRO-2 swaps in its own flat partitions,
        # so its members keep the plain kernel.
        factories = [sync] + [f for f, _ in (placed or {}).values()]
        self.fused_adam = not any(getattr(f, "strategy", None) == "zero2" for f in factories)
        self.hooks = list(dict.fromkeys(h for spec in specs for h in spec.hooks))
        dims = dims if isinstance(dims, Mapping) else {h: dims for h in self.hooks}
        self.members = [self._build(spec, dims, b_dec_init) for spec in specs]
        for m in self.members:
            factory = sync
            if placed is not None:
                factory, m.share = placed[m.spec.member_id]
            if factory is not None:
                m.sync = factory.wrap(m)

    def _build(self, spec: MemberSpec, dims: Mapping[str, int], init: Any) -> Member:
        if self.build_member is not None:
            sae = self.build_member(spec, dims)
        else:
            sae = build_sae(spec, dims)
        sae = sae.to(self.cfg.train.device)
        if hasattr(type(sae), "screen"):  # the TopK kinds' encoder (train.topk_screen)
            sae.screen = screen_margin(self.cfg)
        with torch.no_grad():
            sae.W_enc.mul_(encoder_init_norm(spec, self.cfg))  # built at unit norm
            sae.b_dec.copy_(member_init(spec, init))
            skip = getattr(init, "skip", lambda _spec: None)(spec)
            if skip is not None:  # a skip-transcoder's least-squares start (train/norm.py)
                sae.W_skip.copy_(skip[0])
                sae.b_dec.copy_(skip[1])
        peak = peak_lr(spec, self.cfg)
        opt = build_optimizer(sae.parameters(), spec, self.cfg, peak, fused=self.fused_adam)
        width = sae.b_enc.shape[0]  # the latents this rank holds: spec.width unless sharded
        return Member(spec, sae, opt, torch.zeros(width, dtype=torch.long), peak_lr=peak,
                      dead_tokens=dead_window(spec, self.cfg))

    def by_hook(self, batch: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A batch as {hook: (batch, d_hook)}; a bare tensor is the batch of a one-hook bank."""
        if isinstance(batch, torch.Tensor):
            if len(self.hooks) > 1:
                raise ValueError(f"this bank reads hooks {self.hooks}: pass a batch per hook")
            return {h: batch for h in self.hooks}
        return dict(batch)

    def step(self, batch: torch.Tensor | Mapping[str, torch.Tensor], record: bool = True) -> None:
        """Feed one batch ({hook: (batch, d_hook)}, the same rows in every hook, or one tensor
        for a one-hook bank) to every member; `record` computes their metrics."""
        batch = self.by_hook(batch)
        var = {h: batch_variance(x) for h, x in batch.items()} if record else {}
        for m in self.members:
            start = time.perf_counter()
            lr = lr_at(self.step_count, self.total_steps, self.cfg, m.peak_lr,
                       constant=not scheduled(m.opt))
            scale = m.sae.sparsity_scale_at(self.step_count, self.total_steps)
            x, y = member_batch(m.spec, batch)
            if m.share is None:
                # The variance of a concatenation is the sum of its hooks' variances.
                v = sum(var[h] for h in m.spec.outputs) if record else None
                train_step(m, x, lr, scale, m.dead_tokens, v, target=y)
            else:
                xm, ym = x[m.share], (None if y is None else y[m.share])
                train_step(m, xm, lr, scale, m.dead_tokens,
                           batch_variance(xm if ym is None else ym) if record else None,
                           target=ym)
            if self.member_seconds is not None:
                mid = m.spec.member_id
                self.member_seconds[mid] = self.member_seconds.get(mid, 0.0) + (
                    time.perf_counter() - start)
        self.step_count += 1
        self.tokens_seen += next(iter(batch.values())).shape[0] * self.world_size

    def logs_next(self) -> bool:
        """Whether the coming step is one the trainers log (every log_every steps and the last)."""
        nxt = self.step_count + 1
        return nxt % self.cfg.train.log_every == 0 or nxt == self.total_steps

    def resample_due(self) -> bool:
        """Whether some member resamples dead features after this step."""
        return (self.step_count in self.cfg.train.resample_steps
                and any(m.sae.uses_resampling for m in self.members))

    def resample(self, sample_inputs: Callable[[str], torch.Tensor]) -> None:
        """Towards Monosemanticity's resampling for the members that use it; sample_inputs(hook)
        -> (n, d_hook) training inputs of that hook."""
        window = self.cfg.train.resample_window * self.cfg.train.batch_size
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 7919 + self.step_count)
        inputs: dict[str, torch.Tensor] = {}
        for m in self.members:
            if m.sae.uses_resampling:
                hook = m.spec.hook
                if hook not in inputs:  # (n, d_in) training rows, drawn once per hook
                    inputs[hook] = sample_inputs(hook).to(self.cfg.train.device)
                dead = m.dead(window)
                n = resample_dead(m.sae, m.opt, inputs[hook], dead, gen)
                m.since_fired[dead] = 0
                log.info("step %d %s: resampled %d dead features", self.step_count,
                         m.spec.member_id, n)
