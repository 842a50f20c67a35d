"""The training stage's config: the loop that feeds every store batch to every bank member."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from distributed_sae.config.checks import DATA_PARALLEL, OPTIMIZERS, PLACEMENTS, SCREENS
from distributed_sae.config.checks import choice as _choice
from distributed_sae.config.checks import device as _device
from distributed_sae.config.checks import non_negative as _non_negative
from distributed_sae.config.checks import positive as _positive
from distributed_sae.config.checks import sweep as _sweep
from distributed_sae.config.errors import ConfigError


@dataclass
class TrainConfig:
    """The training loop that feeds every store batch to every bank member."""

    # Training tokens; 0 = one pass over the training part of the store.
    tokens: int = 0
    # Activations per optimiser step.
    batch_size: int = 4096
    # Every member's optimiser (train/optim.py): adam (warm-up, constant, then linear decay over
    # the last 20% of steps), signum_sf (sign-of-gradient steps with schedule-free averaging
    # at a constant lr: EleutherAI sparsify's default recipe; its averaged weights are saved),
    # or auto: signum_sf for the k kinds (topk, batchtopk, matryoshka: loss recovered 0.977-0.996
    # against Adam's 0.947-0.974 in docs/training.md's frontier), adam for the L1 and threshold
    # kinds (not measured with signum) and under data_parallel=zero2 (DeepSpeed takes Adam only).
    optimizer: str = "auto"
    # signum_sf's interpolation beta: gradients are taken at (1 - beta) z + beta x (sparsify's
    # 0.95; the schedule-free paper's SGD default 0.9).
    signum_momentum: float = 0.95
    # signum_sf members of unit-norm-decoder kinds: scale the saved average's decoder rows back
    # to unit norm. The schedule-free average of unit rows that keep turning is shorter (0.90 on
    # average after 107 steps at k16 w2304, SmolLM2 layer 15), which shrinks every
    # reconstruction; at unit norm, loss recovered rose at every frontier point measured
    # (docs/training.md, "The saved average's decoder"). false: save the raw average (sparsify's).
    signum_unit_decoder: bool = True
    # Peak learning rate of every member; None = the default: with adam each kind's (sae kinds'
    # default_lr: 1e-3, relu 2e-4), with signum_sf 5e-3 / sqrt(width / 2^14) (sparsify's); a
    # list sweeps it (one member per value).
    lr: Any = None
    # Linear warm-up steps of the learning rate (adam only).
    warmup_steps: int = 10
    # Coefficient of the AuxK loss for dead latents.
    auxk_coefficient: float = 1 / 32
    # Latents that did not fire for this many tokens get the AuxK loss. None = by optimiser:
    # 50,000 with adam (short enough to act within a short run), 10,000,000 with signum_sf
    # (Gao et al.'s window and sparsify's: AuxK acts in long runs only; at 50k it cost signum
    # members up to 2.2x the run for +0.0003 loss recovered: train/optim.py).
    dead_tokens: Optional[int] = None
    # Latents not fired in this many tokens (or in all tokens seen, when fewer) are reported as
    # dead in the logs: Gao et al. 2024 use 10M tokens.
    dead_report_tokens: int = 10_000_000
    # Drop training rows whose norm exceeds this multiple of the median row norm (0 = keep all
    # rows). A few tokens carry "massive activations": on SmolLM2 layer 15 the token after BOS
    # in 113 of 3,520 contexts, 6-150x the median norm; those 0.026% of rows hold 44% of the
    # squared norm, so they set the input scale, dominate the MSE and draw most of resampling's
    # loss^2 samples. The median, the scale and the mean then come from a sample of kept rows;
    # the threshold is saved with each member and eval drops the same rows. Try 5.
    outlier_norm_ratio: float = 0.0
    # Skip-transcoders' W_skip start: lstsq (the least-squares map of the input hook to the
    # target on a sample of training rows, with b_dec its intercept, so training starts from the
    # best linear model of the MLP) or zeros (SAELens's and sparsify's start).
    skip_init: str = "lstsq"
    # How the TopK kinds' training encoder picks each row's k latents (kernels/select.py): bf16
    # (a bf16 GEMM screens k + a margin candidates, their exact fp32 pre-activations pick the k:
    # the values, the loss and the gradients are fp32 as before; rows whose selection differs
    # from fp32's are counted by scripts/bench_screen.py), off (the fp32 GEMM selects), or auto
    # (bf16 on CPUs with AVX512-BF16 or AMX, where oneDNN's bf16 GEMM is native, else off).
    topk_screen: str = "auto"
    # Device the SAEs train on.
    device: str = "cpu"
    # CPU threads of each training process, also what a Ray Train worker reserves; None: torch's
    # default (every core) and 1 CPU per Ray Train worker, and with stream=true the local cores
    # that the harvest actors leave (at least 1).
    cpus: Optional[int] = None
    # Fraction of the store's tokens (its tail) held out for evaluation, never trained on.
    holdout_fraction: float = 0.1
    # Seed of the batch order.
    seed: int = 0
    # Log metrics every this many steps.
    log_every: int = 10
    # Ray Train workers that train the bank data-parallel (1 = in this process). Each reads its
    # own share of the store; train.batch_size is the global batch and must divide evenly.
    workers: int = 1
    # How the workers combine gradients: ddp (all-reduce) or zero2 (DeepSpeed ZeRO stage 2:
    # gradients and Adam state partitioned over the workers).
    data_parallel: str = "ddp"
    # How members go to workers: cost (by FLOPs and memory: small members share a worker, a
    # large one trains data-parallel over several; parallel/placement.py) or replicate (every
    # member data-parallel over all workers).
    placement: str = "cost"
    # Workers each member is split over by latents (parallel/latent_shard.py); 1 = unsharded.
    # With N > 1 the workers form dp = workers / N data-parallel replicas of N shards each
    # (parallel/layout.py): every member is sharded over a replica's N workers and the global
    # batch splits over the dp replicas; train.placement is then ignored (needs ddp).
    latent_shards: int = 1
    # Save a checkpoint every this many steps (0 = never); a restarted job resumes from the newest.
    checkpoint_every: int = 0
    # Checkpoints to keep (the newest ones).
    keep_checkpoints: int = 2
    # Resume from the newest checkpoint under out_dir/train/checkpoints when there is one.
    resume: bool = True
    # With train.workers > 1: times Ray Train restarts the worker group after a worker dies
    # (each restart resumes from the newest checkpoint, so set train.checkpoint_every too).
    max_failures: int = 3
    # relu (Towards Monosemanticity): steps at which dead features are resampled ([] = never).
    resample_steps: List[int] = field(default_factory=lambda: [25_000, 50_000, 75_000, 100_000])
    # Steps without firing after which a feature counts as dead for resampling.
    resample_window: int = 12_500
    # Inputs on which the loss is computed to pick resampling directions (the paper: 819,200).
    resample_inputs: int = 819_200
    # Weights & Biases project to log to (None = no W&B). The API key comes from the environment
    # (WANDB_API_KEY / `wandb login`); WANDB_MODE=offline keeps the run on disk.
    wandb_project: Optional[str] = None
    # W&B entity (team or user) and run name; None = W&B's defaults.
    wandb_entity: Optional[str] = None
    wandb_run_name: Optional[str] = None

    def __post_init__(self) -> None:
        if self.tokens < 0:
            raise ConfigError(f"train.tokens must be >= 0 (0 = one pass), got {self.tokens}")
        if self.lr is not None:
            self.lr = _sweep("train", "lr", self.lr, float)
        _positive("train", batch_size=self.batch_size, log_every=self.log_every,
                  dead_report_tokens=self.dead_report_tokens)
        if self.dead_tokens is not None:
            _positive("train", dead_tokens=self.dead_tokens)
        _positive("train", workers=self.workers, latent_shards=self.latent_shards)
        _positive("train", resample_window=self.resample_window,
                  resample_inputs=self.resample_inputs)
        # 0 = no warm-up; the batch order's seed goes to numpy, which takes no negative seed.
        _non_negative("train", warmup_steps=self.warmup_steps, seed=self.seed)
        _device("train", "device", self.device)
        if any(step <= 0 for step in self.resample_steps):
            raise ConfigError(f"train.resample_steps={list(self.resample_steps)} must be steps "
                              f">= 1 (the first optimiser step is 1), or [] for no resampling")
        if self.cpus is not None:
            _positive("train", cpus=self.cpus)
        if self.skip_init not in ("lstsq", "zeros"):
            raise ConfigError(f"train.skip_init={self.skip_init!r} is not one of lstsq, zeros")
        if self.outlier_norm_ratio and not self.outlier_norm_ratio > 1:
            raise ConfigError(f"train.outlier_norm_ratio={self.outlier_norm_ratio} would drop "
                              f"about half the rows or more: use 0 (keep all) or a ratio > 1, "
                              f"e.g. 5")
        _choice("train", "data_parallel", self.data_parallel, DATA_PARALLEL)
        _choice("train", "optimizer", self.optimizer, OPTIMIZERS)
        _choice("train", "topk_screen", self.topk_screen, SCREENS)
        if not 0.0 < self.signum_momentum < 1.0:
            raise ConfigError(f"train.signum_momentum={self.signum_momentum} must be in (0, 1), "
                              f"e.g. 0.95")
        if self.optimizer == "signum_sf" and self.data_parallel == "zero2":
            raise ConfigError("train.optimizer=signum_sf with train.data_parallel=zero2: DeepSpeed "
                              "partitions Adam only; use train.data_parallel=ddp")
        _choice("train", "placement", self.placement, PLACEMENTS)
        shards = self.latent_shards
        if self.workers % shards:
            raise ConfigError(
                f"train.workers={self.workers} is not a multiple of train.latent_shards={shards}: "
                f"the workers form replicas of latent_shards shards each; use e.g. "
                f"train.workers={self.workers - self.workers % shards + shards}")
        dp = self.workers // shards  # data-parallel replicas: the batch splits over them
        if self.latent_shards > 1 and self.batch_size % dp:
            raise ConfigError(f"train.batch_size={self.batch_size} is not divisible by the {dp} "
                              f"data-parallel replicas (train.workers={self.workers} / "
                              f"train.latent_shards={self.latent_shards}): use a multiple of {dp}")
        if self.latent_shards == 1 and self.batch_size % self.workers:
            raise ConfigError(f"train.batch_size={self.batch_size} is not divisible by "
                              f"train.workers={self.workers}")
        if self.latent_shards > 1 and self.data_parallel != "ddp":
            raise ConfigError(f"train.latent_shards={self.latent_shards} needs "
                              f"train.data_parallel=ddp (got {self.data_parallel!r}): ZeRO-2 does "
                              f"not combine with latent sharding; set train.data_parallel=ddp")
        if self.workers > 1 and self.checkpoint_every and self.latent_shards == 1 and (
                self.placement != "cost" or self.data_parallel != "ddp"):
            raise ConfigError(
                f"train.checkpoint_every with train.workers > 1 needs train.placement=cost and "
                f"train.data_parallel=ddp (got {self.placement}, {self.data_parallel}: ZeRO-2's "
                f"optimiser state is partitioned): change them or set train.checkpoint_every=0")
        if self.max_failures < 0:
            raise ConfigError(f"train.max_failures must be >= 0, got {self.max_failures}")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ConfigError(f"train.checkpoint_every={self.checkpoint_every} must be >= 0 and "
                              f"train.keep_checkpoints={self.keep_checkpoints} >= 1")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(f"train.holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
