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

from distributed_sae.sae.forms import Form, clt_masks
from distributed_sae.sae.latent_ops import LOCAL, LatentOps
from distributed_sae.sae.params import KindParams, config_values

if TYPE_CHECKING:  # only for annotations: SAE code stays usable without the config package
    from distributed_sae.config import SAEConfig, TrainConfig


@dataclass
class SAEOutput:
    """What one forward pass of `loss` returns."""

    loss: torch.Tensor  # scalar, the sum of the weighted terms
    x_hat: torch.Tensor  # (batch, d_out): the reconstruction of the target
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
    # Whether a latent's inference-time code depends on its own pre-activation only (False for
    # TopK, whose per-token top-k compares all latents). A CLT needs True: its layer-l latents
    # must not depend on later layers' inputs, which the replacement model has not computed yet.
    per_latent_codes: ClassVar[bool] = True
    # Whether parallel/latent_shard.py can split it by latents, and why not (for the message).
    shardable: ClassVar[bool] = True
    unshardable_reason: ClassVar[str] = ""
    # The latent axis of each per-latent tensor of the state dict (latent shards and checkpoints
    # slice them there); every other tensor is replicated. Kinds with more add theirs.
    latent_axes: ClassVar[dict[str, int]] = {"W_enc": 1, "b_enc": 0, "W_dec": 0,
                                             "latent_group": 0}
    # Tensors known to be replicated (not per-latent) whatever their shape.
    replicated: ClassVar[tuple[str, ...]] = ("b_dec", "W_skip")

    def __init__(self, d_in: int, d_sae: int, *, seed: int = 0,
                 dtype: torch.dtype = torch.float32, form: Form | None = None) -> None:
        super().__init__()
        form = form if form is not None else Form.sae(d_in)
        if form.d_in != d_in:
            raise ValueError(f"d_in={d_in} but the {form.name}'s input hooks are {form.in_dims} "
                             f"wide (sum {form.d_in})")
        self.form = form
        self.d_in, self.d_sae, self.d_out = d_in, d_sae, form.d_out
        gen = torch.Generator().manual_seed(seed)
        # Decoder rows start as random unit vectors and the encoder as their transpose (Gao et
        # al. 2024, sec. A.1): every latent starts out reading the direction it writes. Where
        # input and output are different spaces (transcoders) the encoder draws its own unit
        # directions from the same generator.
        w_dec = torch.randn(d_sae, self.d_out, generator=gen, dtype=torch.float32)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        if form.apply_b_dec_to_input:
            w_enc = w_dec.t().contiguous()
        else:
            w_enc = torch.randn(d_sae, d_in, generator=gen, dtype=torch.float32)
            w_enc = (w_enc / w_enc.norm(dim=1, keepdim=True)).t().contiguous()
        self.W_dec = nn.Parameter(w_dec.to(dtype))  # (d_sae, d_out)
        self.W_enc = nn.Parameter(w_enc.to(dtype))  # (d_in, d_sae)
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out, dtype=dtype))  # (d_out,)
        # The encoder's input offset where b_dec is not in the input space: zeros, not a state.
        self.register_buffer("_zero_in", torch.zeros(d_in, dtype=dtype), persistent=False)
        if form.skip:  # (d_out, d_in) SAELens's layout; zeros until train/norm.py's least squares
            self.W_skip = nn.Parameter(torch.zeros(self.d_out, d_in, dtype=dtype))
        if form.groups and not self.per_latent_codes:
            raise ValueError(f"a clt of kind {self.kind} would select each token's codes across "
                             f"layers (acausal): use a kind with per-latent codes, e.g. batchtopk, "
                             f"jumprelu, relu")
        if form.groups:
            self.register_buffer("latent_group", torch.arange(d_sae) % form.groups)  # (d_sae,)
            self.set_latent_groups(self.latent_group)
            # Gradients of forbidden blocks are zeroed as they are computed (a tensor hook runs
            # before any data-parallel reduction), so Adam never moves them off zero.
            self.W_enc.register_hook(lambda g: g * self.clt_masks()[0].to(g.dtype))
            self.W_dec.register_hook(lambda g: g * self.clt_masks()[1].to(g.dtype))

    # ---- the form (sae/forms.py) -----------------------------------------------------------
    def clt_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(allowed encoder entries (d_in, d_sae), allowed decoder entries (d_sae, d_out))."""
        return clt_masks(self.form, self.latent_group)

    @torch.no_grad()
    def set_latent_groups(self, groups: torch.Tensor) -> None:
        """Give a CLT's latents their layer groups (d_sae,) and zero the forbidden blocks (a
        latent shard takes its slice of the whole member's groups)."""
        self.latent_group.copy_(groups)
        enc, dec = self.clt_masks()
        self.W_enc.mul_(enc.to(self.W_enc.dtype))
        self.W_dec.mul_(dec.to(self.W_dec.dtype))
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    def enc_bias(self, ops: LatentOps = LOCAL) -> torch.Tensor:
        """(d_in,) what the encoder subtracts from x: b_dec for an SAE or crosscoder, zeros
        where b_dec is in the output space (transcoders, SAELens's apply_b_dec_to_input)."""
        return ops.replicated(self.b_dec) if self.form.apply_b_dec_to_input else self._zero_in

    def with_skip(self, y_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y_hat (batch, d_out) plus a skip-transcoder's linear path x W_skip^T (identity for
        every other form)."""
        if not self.form.skip:
            return y_hat
        return torch.addmm(y_hat, x, self.W_skip.t())

    def target_of(self, x: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """What the reconstruction is compared with: `target` (batch, d_out), else x itself."""
        if target is not None:
            return target
        if self.d_out != self.d_in or not self.form.apply_b_dec_to_input:
            raise ValueError(f"a {self.form.name} reconstructs another hook than it reads: pass "
                             f"target= ((batch, {self.d_out}))")
        return x

    # ---- the forward pass ------------------------------------------------------------------
    # Every method that sums or selects over latents takes `ops` (sae/latent_ops.py): the
    # identity on one device, the collectives when this SAE is one latent shard of a member.
    def pre_acts(self, x: torch.Tensor, ops: LatentOps = LOCAL) -> torch.Tensor:
        """(batch, d_in) -> (batch, d_sae) encoder pre-activations."""
        return (x - self.enc_bias(ops)) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor, ops: LatentOps = LOCAL) -> torch.Tensor:
        """(batch, d_in) -> (batch, d_sae) dense feature activations."""
        raise NotImplementedError

    def decode(self, f: torch.Tensor, ops: LatentOps = LOCAL) -> torch.Tensor:
        """(batch, d_sae) -> (batch, d_out), without a skip path (see with_skip)."""
        if not ops.sharded:
            return f @ self.W_dec + self.b_dec
        return ops.sum(f @ self.W_dec) + self.b_dec  # every shard's partial product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, d_in) -> (batch, d_out): the reconstruction (of the target hooks)."""
        return self.with_skip(self.decode(self.encode(x)), x)

    def loss(self, x: torch.Tensor, dead: torch.Tensor | None = None,
             sparsity_scale: float = 1.0, ops: LatentOps = LOCAL,
             target: torch.Tensor | None = None) -> SAEOutput:
        """Training loss on a batch (batch, d_in); `dead` (d_sae,) marks dead latents;
        `sparsity_scale` in [0, 1] multiplies the sparsity penalty (warm-up), if there is one;
        `ops`: see pre_acts; `target` (batch, d_out): what to reconstruct (None: x itself)."""
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
    def fold_input_scale(self, scale: float | torch.Tensor,
                         out_scale: float | torch.Tensor | None = None) -> None:
        """Make an SAE trained on scaled activations act on raw ones, with identical features.

        `scale`: the input's scale, a float or per coordinate (d_in,) (a crosscoder's hooks each
        have their own); `out_scale`: the target's (d_out,), None = `scale` (an SAE). With
        x' = x s_in and y' = y s_out:
            pre  = (x' - b_dec) W_enc + b_enc = (x - b_dec / s)(s W_enc) + b_enc   (SAE)
            pre  = x' W_enc + b_enc = x (s_in W_enc) + b_enc                        (transcoder)
            y    = (f W_dec + b_dec + x' W_skip^T) / s_out
                 = f (W_dec / s_out) + b_dec / s_out + x (W_skip s_in / s_out)^T.
        """
        s_in = torch.as_tensor(scale, dtype=self.W_enc.dtype, device=self.W_enc.device)
        s_out = s_in if out_scale is None else torch.as_tensor(
            out_scale, dtype=self.W_enc.dtype, device=self.W_enc.device)
        self.W_enc *= s_in[:, None] if s_in.dim() else s_in
        self.W_dec /= s_out
        self.b_dec /= s_out
        if self.form.skip:
            ratio = (s_out[:, None] if s_out.dim() else s_out) ** -1
            self.W_skip *= ratio * s_in

    def saelens_cfg(self) -> dict[str, Any]:
        """Kind-specific keys of SAELens's cfg.json (architecture and its parameters)."""
        return {"architecture": self.architecture}

    def extra_state(self) -> dict[str, Any]:
        """Hyperparameters needed to rebuild this SAE (besides d_in and d_sae)."""
        return {}

    # ---- the SAELens tensor set --------------------------------------------------------------
    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of the SAELens file, by SAELens name (kinds with thresholds add one; a
        skip-transcoder adds W_skip (d_out, d_in), a CLT its latent_group (d_sae,))."""
        out = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        return {**out, **self.form_tensors()}

    def form_tensors(self) -> dict[str, torch.Tensor]:
        """The form's own tensors: W_skip, latent_group (none for an SAE)."""
        out: dict[str, torch.Tensor] = {}
        if self.form.skip:
            out["W_skip"] = self.W_skip
        if self.form.groups:
            out["latent_group"] = self.latent_group
        return out

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
                    dtype: torch.dtype = torch.float32,
                    form: Form | None = None) -> SparseAutoencoder:
        """Build this kind from its parameter dataclass, in `form` (None: an SAE)."""
        if not isinstance(params, cls.Params):
            raise TypeError(f"{cls.kind} needs {cls.Params.__name__}, got {type(params).__name__}")
        return cls(d_in, d_sae, **params.kwargs(), seed=seed, dtype=dtype, form=form)

    @classmethod
    def from_config(cls, d_in: int, d_sae: int, sae: SAEConfig, train: TrainConfig, *,
                    seed: int = 0, dtype: torch.dtype = torch.float32,
                    **overrides: Any) -> SparseAutoencoder:
        """Build this kind from the run config: each field of its Params is read from the config
        key it names (sae/params.py), `overrides` win (e.g. a member's own k)."""
        params = cls.Params.build(config_values(sae=sae, train=train), overrides)
        return cls.from_params(d_in, d_sae, params, seed=seed, dtype=dtype)
