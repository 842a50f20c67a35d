"""Latent-sharded SAEs: one member split by latents over a tensor-parallel group.

Shard r of R holds latents [r·n/R, (r+1)·n/R) (n divisible by R): W_enc's columns, b_enc, W_dec's
rows (and JumpReLU's thresholds) of that slice, plus the full b_dec. It is an ordinary SAE of the
same kind at width n/R (`self.local`), so decoder renormalisation and the parallel-gradient
projection, which act per row, stay local. Every shard sees the same input batch.

    pre_r   = (x - b_dec) W_enc[:, r] + b_enc[r]         (batch, n/R), local
    f_r     = activation of pre_r, selected EXACTLY      top-k: each shard's local candidates,
                                                         then one global selection (collectives.py)
    x_hat   = Σ_r f_r W_dec[r] + b_dec                   one all-reduce of (batch, d_in)
    loss    = the kind's loss on x_hat                   identical on every shard

Gradients: x_hat's all-reduce passes the gradient through unchanged (every shard computes the
same loss); b_dec's use inside pre_r collects every shard's part with one all-reduce of (d_in,)
in backward; sparsity terms (L1, L0) are sums over latents, hence one all-reduced scalar.
Communication per step, per shard (fp32): top-k candidates 4·batch·k·R bytes gathered (BatchTopK
the same: k·batch candidates), x_hat 4·batch·d_in, b_dec's gradient 4·d_in, a few scalars; AuxK
adds 4·batch·k_aux·R and another 4·batch·d_in. None of it grows with the width n.

Dead latents: each shard tracks its own slice (`fired` in the output is the local slice); the
global count comes from one scalar all-reduce (`dead_count`). Matryoshka is refused: its nested
prefixes of latents cut across shards.

The kinds own their math: each writes its loss once against sae/latent_ops.py's operations
(the identity on one device), and this module only supplies ShardOps, their collectives; it
names no kind. The TopK kinds' sharded step uses the sparse kernels like their unsharded one:
each shard's top-k codes come from topk_encode and its partial x_hat from sparse_decode. SAE
code (distributed_sae/sae/) stays single-device: everything distributed is here.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from distributed_sae.parallel.collectives import (
    ShardComm, reduce_grad_over_shards, select_global_topk, sum_over_shards,
)
from distributed_sae.sae import SAEOutput, SparseAutoencoder
from distributed_sae.sae.latent_ops import LatentOps
from distributed_sae.sae.registry import (
    latent_axes, replicated_tensors, sae_class, shardable_kinds,
)

log = logging.getLogger(__name__)


def shard_seed(seed: int, shard: int) -> int:
    """Initialisation seed of shard `shard` of a member seeded `seed` (shards must differ)."""
    return seed * 1_000_003 + shard


def shard_range(n: int, shards: int, shard: int) -> tuple[int, int]:
    """[start, stop) of the latents of `shard` of `shards`; n must be divisible by `shards`."""
    if shards < 1 or not 0 <= shard < shards:
        raise ValueError(f"shard={shard} must be in 0..{shards - 1} (shards={shards})")
    if n % shards:
        raise ValueError(f"d_sae={n} is not divisible by {shards} latent shards: pick a width "
                         f"that is a multiple of {shards} (e.g. {n - n % shards + shards})")
    size = n // shards
    return shard * size, (shard + 1) * size


def latent_axis(name: str, t: torch.Tensor, n_local: int) -> int | None:
    """Latent axis of local tensor `name` (None: replicated); unknown per-latent tensors raise."""
    axes = latent_axes()  # from the kinds (SparseAutoencoder.latent_axes)
    if name in axes:
        return axes[name]
    if name in replicated_tensors():
        return None
    if t.dim() > 0 and n_local in t.shape:
        raise ValueError(f"tensor {name!r} of shape {tuple(t.shape)} may be per-latent: add its "
                         f"latent axis to its kind's latent_axes")
    return None


def _local_hparams(kind: str, hparams: dict[str, Any], n_local: int) -> dict[str, Any]:
    """The kind's constructor keywords for a width-n_local slice (k clipped: the slice's class
    checks k <= its width; the global k is kept by the sharded wrapper)."""
    out = dict(hparams)
    if "k" in out:
        out["k"] = min(int(out["k"]), n_local)
    return out


class ShardOps(LatentOps):
    """sae/latent_ops.py's operations over the shards of one member (see the module docstring
    for what each sends)."""

    sharded = True

    def __init__(self, comm: ShardComm, k: int | None) -> None:
        self.comm, self.k = comm, k

    def replicated(self, t: torch.Tensor) -> torch.Tensor:
        return reduce_grad_over_shards(t, self.comm)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return sum_over_shards(t, self.comm)

    @torch.no_grad()
    def count(self, n: torch.Tensor) -> int:
        count = n.to(torch.int64).reshape(1)
        return int(self.comm.all_reduce_(count, "dead_count"))

    def select(self, values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return select_global_topk(values, k, self.comm)


class LatentShardedSAE(nn.Module):
    """This shard of a member split by latents; same loss interface as SparseAutoencoder."""

    def __init__(self, local: SparseAutoencoder, d_sae: int, comm: ShardComm,
                 k: int | None = None) -> None:
        super().__init__()
        if local.kind not in shardable_kinds():
            raise ValueError(f"sae.kind={local.kind!r} cannot be latent-sharded: use one of "
                             f"{shardable_kinds()} or train it unsharded (latent_shards=1)")
        self.local, self.comm, self.d_sae, self.d_in = local, comm, d_sae, local.d_in
        self.start, self.stop = shard_range(d_sae, comm.size, comm.rank)
        if local.d_sae != self.stop - self.start:
            raise ValueError(f"shard {comm.rank} of {comm.size} of d_sae={d_sae} holds "
                             f"{self.stop - self.start} latents, the local SAE has {local.d_sae}")
        self.k = k if k is not None else getattr(local, "k", None)
        if self.k is not None and not 0 < self.k <= d_sae:
            raise ValueError(f"k={self.k} must be in 1..d_sae={d_sae}")
        self.ops = ShardOps(comm, self.k)
        # The training loop's flags are the kind's (see SparseAutoencoder).
        self.unit_norm_decoder = local.unit_norm_decoder
        self.grad_clip = local.grad_clip
        # Resampling is not implemented here: the training loop must never try it.
        self.uses_resampling = False
        if local.uses_resampling:
            log.warning("%s: neuron resampling is not implemented for sharded members",
                        local.kind)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def build(cls, kind: str, d_in: int, d_sae: int, comm: ShardComm, *, seed: int = 0,
              dtype: torch.dtype = torch.float32, **hparams: Any) -> LatentShardedSAE:
        """A fresh shard, initialised locally (never materialising the full member): shard r
        uses seed·1_000_003 + r, so the init differs from the unsharded member's (same law)."""
        start, stop = shard_range(d_sae, comm.size, comm.rank)
        local = sae_class(kind)(d_in, stop - start, **_local_hparams(kind, hparams, stop - start),
                                seed=shard_seed(seed, comm.rank), dtype=dtype)
        return cls(local, d_sae, comm, k=hparams.get("k"))

    @classmethod
    @torch.no_grad()
    def from_full(cls, full: SparseAutoencoder, comm: ShardComm) -> LatentShardedSAE:
        """This shard's slice of an unsharded SAE (every shard passes the same `full`)."""
        start, stop = shard_range(full.d_sae, comm.size, comm.rank)
        hp = _local_hparams(full.kind, full.extra_state(), stop - start)
        local = type(full)(full.d_in, stop - start, **hp, dtype=full.W_enc.dtype, form=full.form)
        local.load_state_dict({name: slice_latents(t, latent_axis(name, t, full.d_sae), start, stop)
                               for name, t in full.state_dict().items()})
        if hasattr(full, "threshold_updates"):
            local.threshold_updates = full.threshold_updates
        local.train(full.training)
        return cls(local, full.d_sae, comm, k=getattr(full, "k", None)).to(full.W_enc.device)

    @property
    def kind(self) -> str:
        return self.local.kind

    # This shard's tensors under the SAE's names, so code written for an SAE (e.g. the W_dec
    # gradient hook of parallel/data_parallel.py, used over the dp group) finds them.
    @property
    def W_enc(self) -> nn.Parameter:  # noqa: N802 - SAELens's name
        return self.local.W_enc  # (d_in, n/R)

    @property
    def W_dec(self) -> nn.Parameter:  # noqa: N802
        return self.local.W_dec  # (n/R, d_in)

    @property
    def b_enc(self) -> nn.Parameter:
        return self.local.b_enc  # (n/R,)

    @property
    def b_dec(self) -> nn.Parameter:
        return self.local.b_dec  # (d_in,), replicated

    @property
    def auxk_coefficient(self) -> float | None:
        return getattr(self.local, "auxk_coefficient", None)

    def extra_state(self) -> dict[str, Any]:
        """The whole member's hyperparameters (the global k, not the slice's)."""
        out = self.local.extra_state()
        if self.k is not None and "k" in out:
            out["k"] = self.k
        return out

    def sparsity_scale_at(self, step: int, total_steps: int) -> float:
        return self.local.sparsity_scale_at(step, total_steps)

    # ---- the forward pass: the kind's own math, with the collectives of ShardOps -----------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, d_in) -> (batch, n/R) this shard's pre-activations."""
        return self.local.pre_acts(x, self.ops)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, d_in) -> (batch, n/R): this shard's slice of the feature activations."""
        return self.local.encode(x, self.ops)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """This shard's activations (batch, n/R) -> the full reconstruction (batch, d_in)."""
        return self.local.decode(f, self.ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local.with_skip(self.decode(self.encode(x)), x)

    @property
    def form(self) -> Any:
        return self.local.form

    def loss(self, x: torch.Tensor, dead: torch.Tensor | None = None,
             sparsity_scale: float = 1.0, target: torch.Tensor | None = None) -> SAEOutput:
        """The kind's training loss, identical on every shard; `dead` (n/R,) is this shard's
        slice; the output's `fired` and `counts` (n/R,) too. Collective: every shard calls it."""
        return self.local.loss(x, dead=dead, sparsity_scale=sparsity_scale, ops=self.ops,
                               target=target)

    # ---- training-loop helpers -------------------------------------------------------------
    def dead_count(self, dead: torch.Tensor) -> int:
        """Dead latents over all shards, from this shard's mask (n/R,): one scalar all-reduce."""
        return self.ops.count(dead.sum())

    def dead_fraction(self, dead: torch.Tensor) -> float:
        return self.dead_count(dead) / self.d_sae

    def normalize_decoder(self) -> None:
        self.local.normalize_decoder()  # per row: local

    def remove_parallel_grad(self) -> None:
        self.local.remove_parallel_grad()  # per row: local

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ over the whole member: the sharded parameters' squared
        norms are summed over the shards, b_dec (replicated, same gradient everywhere) counted
        once. Returns the total norm."""
        replicated = [p.grad for n, p in self.local.named_parameters()
                      if n in self.local.replicated and p.grad is not None]
        sharded = [p.grad for n, p in self.local.named_parameters()
                   if n not in self.local.replicated and p.grad is not None]
        sq = torch.stack([g.double().pow(2).sum() for g in sharded]).sum().reshape(1) \
            if sharded else torch.zeros(1, dtype=torch.float64)
        self.comm.all_reduce_(sq, "grad_norm")
        for g in replicated:  # b_dec, W_skip: the same gradient on every shard, counted once
            sq += g.double().pow(2).sum()
        total = sq.sqrt()[0].float()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # torch's rule
        for p in self.local.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
        return total


def slice_latents(t: torch.Tensor, axis: int | None, start: int, stop: int) -> torch.Tensor:
    """Latents [start, stop) of `t` along `axis` (a copy); replicated tensors (axis None) as is."""
    if axis is None:
        return t.clone()
    return t.narrow(axis, start, stop - start).clone()


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               dead: torch.Tensor | None = None, sparsity_scale: float = 1.0) -> SAEOutput:
    """One optimiser step of a sharded (or plain) SAE, as bank_trainer.train_step does it:
    loss, backward, W_dec's parallel gradient removed, clipped (globally), step, renormalised."""
    opt.zero_grad(set_to_none=True)
    out = model.loss(x, dead=dead, sparsity_scale=sparsity_scale)
    out.loss.backward()
    if model.unit_norm_decoder:
        model.remove_parallel_grad()
    if model.grad_clip is not None:
        if isinstance(model, LatentShardedSAE):
            model.clip_grad_norm_(model.grad_clip)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), model.grad_clip)
    opt.step()
    if model.unit_norm_decoder:
        model.normalize_decoder()
    return out
