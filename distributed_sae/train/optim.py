"""Members' optimisers: Adam (the default) and schedule-free Signum (sparsify's default).

`train.optimizer=auto` (the default) picks per member (member_optimizer below).
`train.optimizer=adam`: torch Adam (fused on one process) under lr_at's warm-up / constant /
linear-decay schedule. `train.optimizer=signum_sf`: sign-of-gradient steps inside schedule-free
averaging (Defazio et al. 2024, "The Road Less Scheduled"), the recipe EleutherAI's sparsify
trains with by default (its SignSGD wrapped in schedulefree's ScheduleFreeWrapper, momentum
0.95, lr 5e-3 / sqrt(width / 2^14), no schedule). ScheduleFreeSignum below reproduces that
pair's arithmetic operation for operation, so the same batches give the same weights bit for bit
(tests/test_optim.py checks it against the schedulefree package).

Schedule-free keeps two sequences besides the parameters: z, where the sign steps land, and x,
a running average of the z's, which is what gets evaluated and saved. Gradients are taken at
y = (1 - beta) z + beta x, which the parameters hold while training; x is recovered from y and
z when needed (x = (y - (1 - beta) z) / beta), so the state is one extra copy of the weights
(Adam keeps two).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from distributed_sae.config import RunConfig
from distributed_sae.sae import MemberSpec, member_lr
from distributed_sae.sae.registry import k_kinds

# sparsify's signum lr at 2^14 latents, scaled by 1 / sqrt(width / 2^14) (its Trainer's rule).
SIGNUM_LR = 5e-3
# Encoder columns' starting norm under signum_sf. Sign steps move every entry by lr whatever
# its size, so the start's scale sets how far the first steps turn each latent. sparsify's
# encoder starts at nn.Linear's default U(-1/sqrt(d), 1/sqrt(d)), columns of norm 1/sqrt(3).
# scripts/bench_init.py (SmolLM2 layer 15, 97 batches of 4096, 6 points of k x width, 2-core
# AMD EPYC), loss recovered minus sparsify's: norm 1.0 -0.0047..-0.0023; 1/sqrt(3)
# -0.0015..+0.0002; 0.3 -0.0017..+0.0012, above 1/sqrt(3) at 5 of 6 points (two seeds at
# 1/sqrt(3) differed by up to 0.0010); docs/training.md, "Initialisation".
SIGNUM_ENCODER_NORM = 0.3
# AuxK's dead window. Adam: 50k tokens, short enough to act within a short run (with it Adam
# members end the frontier's 400k tokens with 0-1.4% dead). signum_sf: 10M tokens, Gao et al.'s
# definition and sparsify's default, so AuxK waits for latents dead over a long run. Started at
# norm 0.3, signum members leave many latents silent for a while early on (k16 w9216: up to
# 3,082 of 9,216 unfired over 50k tokens, more than AuxK's block path covers for 77 of 97
# steps), and AuxK at 50k then cost 2.2x the run (53.5 s against 23.8 s) for loss recovered
# 0.9852 against 0.9849 and 17% dead against 23% (docs/training.md, "AuxK's window").
ADAM_DEAD_TOKENS = 50_000
SIGNUM_DEAD_TOKENS = 10_000_000


class ScheduleFreeSignum(torch.optim.Optimizer):
    """Signum steps on z, schedule-free averaging into x; the parameters hold y while training.

    momentum: beta, the interpolation y = (1 - beta) z + beta x; weight_lr_power: step t's
    weight in the average x is lr_max^power (lr_max the largest lr so far), so a warm-up's small
    steps count less. Call eval() before evaluating or saving (parameters := x) and train()
    before stepping again; a new optimiser starts in train mode, its parameters being y = x = z.
    """

    # Per-group scalars that change as it steps: checkpoints carry them (train/checkpoint.py).
    running_keys = ("k", "weight_sum", "lr_max", "train_mode")

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.95,
                 weight_lr_power: float = 2.0) -> None:
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"momentum must be in (0, 1), got {momentum}")
        super().__init__(params, {"lr": lr, "momentum": momentum,
                                  "weight_lr_power": weight_lr_power, "k": 0,
                                  "weight_sum": 0.0, "lr_max": 0.0, "train_mode": True})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        assert closure is None, "closure is not supported"
        for group in self.param_groups:
            if not group["train_mode"]:
                raise RuntimeError("ScheduleFreeSignum.step() in eval mode: call train() first")
            beta, lr = group["momentum"], group["lr"]
            group["lr_max"] = max(lr, group["lr_max"])
            weight = group["lr_max"] ** group["weight_lr_power"]
            group["weight_sum"] += weight
            c = weight / group["weight_sum"]  # the new z's share of the average
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "z" not in state:
                    state["z"] = p.detach().clone()
                z = state["z"]
                p.lerp_(z, 1 - 1 / beta)  # y -> x
                z.add_(p.grad.sign(), alpha=-lr)  # the Signum step, taken at y, applied to z
                p.lerp_(z, c)  # x <- (1 - c) x + c z
                p.lerp_(z, 1 - beta)  # x -> y, where the next gradient is taken
            group["k"] += 1

    @torch.no_grad()
    def eval(self) -> None:
        """Parameters := x, the averaged weights (what is evaluated and saved)."""
        self._move(to_train=False)

    @torch.no_grad()
    def train(self) -> None:
        """Parameters := y, where gradients are taken."""
        self._move(to_train=True)

    def _move(self, to_train: bool) -> None:
        for group in self.param_groups:
            if group["train_mode"] == to_train:
                continue
            beta = group["momentum"]
            for p in group["params"]:
                z = self.state[p].get("z")
                if z is not None:
                    p.lerp_(z, 1 - beta if to_train else 1 - 1 / beta)
            group["train_mode"] = to_train

    @torch.no_grad()
    def restart_entries(self, param: torch.Tensor, index: Any) -> None:
        """Entries of `param` given new values (resampled features) restart the averages there:
        z = x = y = the new values."""
        z = self.state.get(param, {}).get("z")
        if z is not None:
            z[index] = param[index]


def member_optimizer(spec: MemberSpec, cfg: RunConfig) -> str:
    """'adam' or 'signum_sf' for this member: train.optimizer, or under 'auto' signum_sf for
    the k kinds (measured better than Adam at every point of bench_frontier's k x width grid)
    and adam for the others (L1 and threshold kinds: not measured with signum) and under
    ZeRO-2 (DeepSpeed partitions Adam only)."""
    if cfg.train.optimizer != "auto":
        return cfg.train.optimizer
    if spec.kind in k_kinds() and cfg.train.data_parallel != "zero2":
        return "signum_sf"
    return "adam"


def peak_lr(spec: MemberSpec, cfg: RunConfig) -> float:
    """A member's peak learning rate: its spec's, else train.lr, else the optimiser's default
    (Adam: the kind's default_lr; signum_sf: 5e-3 / sqrt(width / 2^14), sparsify's)."""
    if member_optimizer(spec, cfg) == "signum_sf" and spec.lr is None and not isinstance(
            cfg.train.lr, (int, float)):
        return SIGNUM_LR / (spec.width / 2**14) ** 0.5
    return member_lr(spec, cfg.train)


def encoder_init_norm(spec: MemberSpec, cfg: RunConfig) -> float:
    """The norm a member's encoder columns start at: sae.encoder_init_norm, else
    SIGNUM_ENCODER_NORM under signum_sf and 1.0 (the unit-norm tied start) under Adam."""
    if cfg.sae.encoder_init_norm is not None:
        return cfg.sae.encoder_init_norm
    return SIGNUM_ENCODER_NORM if member_optimizer(spec, cfg) == "signum_sf" else 1.0


def dead_window(spec: MemberSpec, cfg: RunConfig) -> int:
    """Tokens without firing after which a member's latent counts as dead for AuxK:
    train.dead_tokens, else SIGNUM_DEAD_TOKENS under signum_sf and ADAM_DEAD_TOKENS under Adam."""
    if cfg.train.dead_tokens is not None:
        return cfg.train.dead_tokens
    return SIGNUM_DEAD_TOKENS if member_optimizer(spec, cfg) == "signum_sf" else ADAM_DEAD_TOKENS


def build_optimizer(params: Iterable[torch.Tensor], spec: MemberSpec, cfg: RunConfig,
                    lr: float, fused: bool) -> torch.optim.Optimizer:
    """The member's optimiser (member_optimizer; `fused`: Adam's fused kernel)."""
    if member_optimizer(spec, cfg) == "signum_sf":
        return ScheduleFreeSignum(params, lr=lr, momentum=cfg.train.signum_momentum)
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=fused)


def scheduled(opt: torch.optim.Optimizer) -> bool:
    """Whether lr_at's warm-up and decay apply to this optimiser: schedule-free averaging
    replaces them (sparsify runs its signum at a constant lr)."""
    return not isinstance(opt, ScheduleFreeSignum)


def to_averages(optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """Put every schedule-free optimiser's parameters at their averages (before saving)."""
    for opt in optimizers:
        if isinstance(opt, ScheduleFreeSignum):
            opt.eval()


@torch.no_grad()
def to_saved(members: Iterable[Any], unit_decoder: bool) -> None:
    """Put members (train.bank_trainer.Member) at the weights they save: schedule-free members
    at their averages, whose decoder rows go back to unit norm when `unit_decoder` and the kind
    keeps its decoder at unit norm (train.signum_unit_decoder). Each latent's row is whole on
    its shard and every replica does the same, so this needs no communication."""
    for m in members:
        if isinstance(m.opt, ScheduleFreeSignum):
            m.opt.eval()
            if unit_decoder and m.sae.unit_norm_decoder:
                m.sae.normalize_decoder()
