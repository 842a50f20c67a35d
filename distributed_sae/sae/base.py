"""The interface every SAE kind shares: encode, decode, forward, loss terms.

Parameter names and shapes follow SAELens, so export is a rename-free copy:
    W_enc (d_in, d_sae), b_enc (d_sae), W_dec (d_sae, d_in), b_dec (d_in)
and the forward pass is  f = act((x - b_dec) @ W_enc + b_enc),  x_hat = f @ W_dec + b_dec.

SAE code is single-device: it never imports the distributed package of torch (parallelism lives
in `parallel/`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from distributed_sae.sae.latent_ops import LOCAL, LatentOps
from distributed_sae.sae.params import KindParams, config_values

if TYPE_CHECKING:  # only for annotations: SAE code stays usable without the config package
    from distributed_sae.config import SAEConfig, TrainConfig


@dataclass
class SAEOutput:
    """What one forward pass of `loss` returns."""

    loss: torch.Tensor  # scalar, the sum of the weighted terms
    x_hat: torch.Tensor  # (batch, d_in)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # scalar loss terms, unweighted
    fired: torch.Tensor | None = None  # (d_sae,) bool, latents active on this batch
    # (d_sae,) how many tokens of the batch each latent fired on (for density histograms);
    # None where a kind does not count, and the trainer then counts `fired` once per batch.
    counts: torch.Tensor | None = None


class SparseAutoencoder(nn.Module):
    """Base class: parameters, decoder-norm helpers, and the SAELens config of a kind."""

    kind: ClassVar[str] = "base"
    architecture: ClassVar[str] = "standard"  # SAELens's name for the inference kind
    # What the training loop must do around each Adam step. Class defaults; a kind may override
    # them per instance (the relu recipes differ).
    # True: call remove_parallel_grad() before opt.step() and normalize_decoder() after it.
    unit_norm_decoder: bool = True
    # Not None: clip the global gradient norm of the SAE's parameters to this before the step.
    grad_clip: float | None = None
    # Fraction of the run over which the sparsity penalty ramps linearly from 0 to full weight;
    # the loop passes sparsity_scale_at(step, total) to loss() as `sparsity_scale`.
    sparsity_warmup_fraction: float = 0.0
    # True: dead latents are re-initialised at the configured steps (train/resampling.py).
    uses_resampling: bool = False
    # Adam's learning rate for this kind when neither train.lr nor the member's spec sets one.
    default_lr: ClassVar[float] = 1e-3
    # The kind's parameters (sae/params.py): the constructor's keywords after (d_in, d_sae).
    Params: ClassVar[type[KindParams]] = KindParams
    # Whether parallel/latent_shard.py can split it by latents, and why not (for the message).
    shardable: ClassVar[bool] = True
    unshardable_reason: ClassVar[str] = ""
    # The latent axis of each per-latent tensor of the state dict (latent shards and checkpoints
    # slice them there); every other tensor is replicated. Kinds with more add theirs.
    latent_axes: ClassVar[dict[str, int]] = {"W_enc": 1, "b_enc": 0, "W_dec": 0}
    # Tensors known to be replicated (not per-latent) whatever their shape.
    replicated: ClassVar[tuple[str, ...]] = ("b_dec",)

    def __init__(self, d_in: int, d_sae: int, *, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.d_in, self.d_sae = d_in, d_sae
        gen = torch.Generator().manual_seed(seed)
        # Decoder rows start as random unit vectors and the encoder as their transpose (Gao et
        # al. 2024, sec. A.1): every latent starts out reading the direction it writes.
        w_dec = torch.randn(d_sae, d_in, generator=gen, dtype=torch.float32)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec.to(dtype))  # (d_sae, d_in)
        self.W_enc = nn.Parameter(w_dec.t().contiguous().to(dtype))  # (d_in, d_sae)
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype))

    # ---- the forward pass ------------------------------------------------------------------
    # Every method that sums or selects over latents takes `ops` (sae/latent_ops.py): the
    # identity on one device, the collectives when this SAE is one latent shard of a member.
    def pre_acts(self, x: torch.Tensor, ops: LatentOps = LOCAL) -> torch.Tensor:
        """(batch, d_in) -> (batch, d_sae) encoder pre-activations."""
        return (x - ops.replicated(self.b_dec)) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor, ops: LatentOps = LOCAL) -> torch.Tensor:
        """(batch, d_in) -> (batch, d_sae) dense feature activations."""
        raise NotImplementedError

    def decode(self, f: torch.Tensor, ops: LatentOps = LOCAL) -> torch.Tensor:
        """(batch, d_sae) -> (batch, d_in)."""
        if not ops.sharded:
            return f @ self.W_dec + self.b_dec
        return ops.sum(f @ self.W_dec) + self.b_dec  # every shard's partial product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def loss(self, x: torch.Tensor, dead: torch.Tensor | None = None,
             sparsity_scale: float = 1.0, ops: LatentOps = LOCAL) -> SAEOutput:
        """Training loss on a batch (batch, d_in); `dead` (d_sae,) marks dead latents;
        `sparsity_scale` in [0, 1] multiplies the sparsity penalty (warm-up), if there is one;
        `ops`: see pre_acts."""
        raise NotImplementedError

    def sparsity_scale_at(self, step: int, total_steps: int) -> float:
        """Weight of the sparsity penalty at `step`: linear ramp over the warm-up fraction."""
        warm = self.sparsity_warmup_fraction * total_steps
        return 1.0 if warm <= 0 else min(1.0, (step + 1) / warm)

    # ---- constraints and conversions -------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (keeps the sparsity penalty from being gamed)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the part of W_dec's gradient along each row: under the unit-norm constraint it
        only changes the norm, which normalize_decoder undoes after the step anyway."""
        if self.W_dec.grad is None:
            return
        # g -= (g.w / w.w) w row by row, with one (d_sae,) temporary instead of three
        # (d_sae, d_in) ones (normalised w, g*w, the product): the unit-norm step's cost.
        w, g = self.W_dec, self.W_dec.grad
        # (vector_norm is one fused pass; vecdot(w, w) multiplies into a (d_sae, d_in) temporary)
        w_sq = torch.linalg.vector_norm(w, dim=1).square().clamp_min(1e-16)  # (d_sae,)
        coef = torch.linalg.vecdot(g, w) / w_sq  # (d_sae,)
        g.addcmul_(coef.unsqueeze(1), w, value=-1.0)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on x * scale act on raw x, with identical features.

        pre = (x s - b_dec) W_enc + b_enc = (x - b_dec / s)(s W_enc) + b_enc, and
        x_hat = (f W_dec + b_dec) / s = f (W_dec / s) + b_dec / s.
        """
        self.W_enc *= scale
        self.W_dec /= scale
        self.b_dec /= scale

    def saelens_cfg(self) -> dict[str, Any]:
        """Kind-specific keys of SAELens's cfg.json (architecture and its parameters)."""
        return {"architecture": self.architecture}

    def extra_state(self) -> dict[str, Any]:
        """Hyperparameters needed to rebuild this SAE (besides d_in and d_sae)."""
        return {}

    # ---- the SAELens tensor set --------------------------------------------------------------
    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of the SAELens file, by SAELens name (kinds with thresholds add one)."""
        return {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of saelens_tensors: copy SAELens-named tensors into this SAE's state."""
        self.load_state_dict(tensors)

    # ---- loading saved SAEs --------------------------------------------------------------------
    @classmethod
    def load(cls, path_or_repo: str | Path, member: str | None = None,
             revision: str | None = None) -> SparseAutoencoder:
        """Load an SAE for inference from a local SAE folder, a bank folder (pass `member` when
        it holds several) or a Hugging Face Hub repo id 'org/name' (at `revision`; the Hub cache
        and HF_HUB_OFFLINE=1 are honoured). Returns the saved kind, e.g. a TopKSAE, in eval
        mode, with cfg.json as `.cfg_dict`; called on a subclass, a different kind is refused."""
        # Imported here: export.hub imports this module (and huggingface_hub only when needed).
        from distributed_sae.export.hub import load_pretrained

        sae = load_pretrained(path_or_repo, member=member, revision=revision)
        if not isinstance(sae, cls):
            raise TypeError(f"{path_or_repo} holds a {type(sae).__name__} ({sae.kind!r}), not a "
                            f"{cls.__name__}: load it with SAE.load")
        return sae

    # ---- construction from parameters or the run config -------------------------------------
    @property
    def params(self) -> KindParams:
        """This SAE's parameters as its kind's dataclass."""
        return self.Params.build({}, self.extra_state())

    @classmethod
    def resamples(cls, params: KindParams) -> bool:
        """Whether a member of this kind with `params` uses neuron resampling (uses_resampling)."""
        return cls.uses_resampling

    @classmethod
    def from_params(cls, d_in: int, d_sae: int, params: KindParams, *, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> SparseAutoencoder:
        """Build this kind from its parameter dataclass."""
        if not isinstance(params, cls.Params):
            raise TypeError(f"{cls.kind} needs {cls.Params.__name__}, got {type(params).__name__}")
        return cls(d_in, d_sae, **params.kwargs(), seed=seed, dtype=dtype)

    @classmethod
    def from_config(cls, d_in: int, d_sae: int, sae: SAEConfig, train: TrainConfig, *,
                    seed: int = 0, dtype: torch.dtype = torch.float32,
                    **overrides: Any) -> SparseAutoencoder:
        """Build this kind from the run config: each field of its Params is read from the config
        key it names (sae/params.py), `overrides` win (e.g. a member's own k)."""
        params = cls.Params.build(config_values(sae=sae, train=train), overrides)
        return cls.from_params(d_in, d_sae, params, seed=seed, dtype=dtype)
