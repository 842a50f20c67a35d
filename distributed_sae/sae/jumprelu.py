"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; the Gemma Scope SAEs).

    f_i = pre_i · H(pre_i - θ_i),     loss = MSE + λ · mean over batch of Σ_i H(pre_i - θ_i)

with a learned threshold θ_i = exp(log_threshold_i) > 0 per latent. H has zero derivative almost
everywhere, so θ is trained through straight-through estimators (STEs) that replace the Dirac
delta by a rectangle kernel K(u) = 1[|u| < 1/2] of bandwidth ε:
    ∂/∂θ [z · H(z - θ)]  := -(θ / ε) · K((z - θ) / ε)
    ∂/∂θ  H(z - θ)       := -(1 / ε) · K((z - θ) / ε)
i.e. only pre-activations within ε/2 of the threshold inform it, trading the reconstruction a
latent gives near θ (first) against its share of the L0 cost (second). The gradient w.r.t. z is
the ordinary one for z · H (H) and none through the L0 step. Exported as SAELens 'jumprelu'
with the raw threshold tensor.

Units: the defaults (θ_0 = ε = 0.001) are Gemma Scope's, whose inputs have E‖x‖² = 1. The trainer
scales inputs to E‖x‖² = d_in, which makes pre-activations ~sqrt(d_in) times larger, so θ_0 and
ε should grow alike; the test suite uses values fitted to its data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from distributed_sae.sae.base import SAEOutput, SparseAutoencoder
from distributed_sae.sae.forms import Form
from distributed_sae.sae.latent_ops import LOCAL, LatentOps
from distributed_sae.sae.params import KindParams, from_key, non_negative, positive


@dataclass(frozen=True)
class JumpReLUParams(KindParams):
    """JumpReLU: the L0 penalty's coefficient, the thresholds' start and the STE's bandwidth."""

    kind = "jumprelu"
    l0_coefficient: float = from_key("sae.l0_coefficient", 1.0)
    init_threshold: float = from_key("sae.jumprelu_threshold", 0.001)
    bandwidth: float = from_key("sae.jumprelu_bandwidth", 0.001)

    def __post_init__(self) -> None:
        non_negative(self, "l0_coefficient")
        positive(self, "init_threshold", "bandwidth")


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    """K(u) = 1 where |u| < 1/2, else 0 (same shape and dtype as u)."""
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """z · H(z - θ), with the STE above for θ."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)  # (batch, d_sae)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > theta)
        grad_theta = (-(theta / eps) * _rectangle((pre - theta) / eps) * grad).sum(0)  # (d_sae,)
        return grad_pre, grad_theta, None


class _Step(torch.autograd.Function):
    """H(z - θ), with the STE above for θ and no gradient for z."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)  # (batch, d_sae)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = (-(1.0 / eps) * _rectangle((pre - theta) / eps) * grad).sum(0)  # (d_sae,)
        return None, grad_theta, None


class JumpReLUSAE(SparseAutoencoder):
    kind = "jumprelu"
    architecture = "jumprelu"
    Params = JumpReLUParams
    latent_axes = {**SparseAutoencoder.latent_axes, "log_threshold": 0}
    # Decoder rows stay at unit norm (as the base trainer does for every kind): L0 cannot be
    # gamed by rescaling, but fixing the scale split between encoder and decoder keeps the
    # thresholds, which live in pre-activation units, meaningful across training.

    def __init__(self, d_in: int, d_sae: int, *, l0_coefficient: float = 1.0,
                 init_threshold: float = 0.001, bandwidth: float = 0.001, seed: int = 0,
                 dtype: torch.dtype = torch.float32, form: Form | None = None) -> None:
        if init_threshold <= 0 or bandwidth <= 0 or l0_coefficient < 0:
            raise ValueError(f"need init_threshold > 0, bandwidth > 0, l0_coefficient >= 0; got "
                             f"{init_threshold}, {bandwidth}, {l0_coefficient}")
        super().__init__(d_in, d_sae, seed=seed, dtype=dtype, form=form)
        self.l0_coefficient = l0_coefficient
        self.init_threshold = init_threshold
        self.bandwidth = bandwidth
        # log θ keeps θ positive under any Adam step.
        self.log_threshold = torch.nn.Parameter(
            torch.full((d_sae,), float(torch.tensor(init_threshold).log()), dtype=dtype))

    @property
    def threshold(self) -> torch.Tensor:
        """(d_sae,) θ = exp(log_threshold)."""
        return self.log_threshold.exp()

    def encode(self, x: torch.Tensor, ops: LatentOps = LOCAL) -> torch.Tensor:
        return _JumpReLU.apply(self.pre_acts(x, ops), self.threshold,
                               self.bandwidth)  # (batch, d_sae)

    def loss(self, x: torch.Tensor, dead: torch.Tensor | None = None,
             sparsity_scale: float = 1.0, ops: LatentOps = LOCAL,
             target: torch.Tensor | None = None) -> SAEOutput:
        pre = self.pre_acts(x, ops)  # (batch, d_sae)
        theta = self.threshold  # (d_sae,)
        f = _JumpReLU.apply(pre, theta, self.bandwidth)
        x_hat = self.with_skip(self.decode(f, ops), x)  # (batch, d_out)
        mse = F.mse_loss(x_hat, self.target_of(x, target))
        l0 = ops.sum(_Step.apply(pre, theta, self.bandwidth).sum(1).mean())  # over every shard
        loss = mse + sparsity_scale * self.l0_coefficient * l0
        counts = (f != 0).sum(0)  # (d_sae,)
        return SAEOutput(loss=loss, x_hat=x_hat, terms={"mse": mse, "l0": l0},
                         fired=counts > 0, counts=counts)

    # ---- export: SAELens 'jumprelu' ------------------------------------------------------------
    # fold_input_scale needs nothing extra: the folded SAE computes the same pre-activations on
    # raw x as the trained one did on scaled x, so θ (in pre-activation units) is unchanged.
    def saelens_cfg(self) -> dict[str, Any]:
        return {"architecture": "jumprelu"}

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        return {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec,
                "b_dec": self.b_dec, "threshold": self.threshold, **self.form_tensors()}

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        threshold = tensors.pop("threshold")  # (d_sae,)
        if not bool((threshold > 0).all()):
            raise ValueError("jumprelu thresholds must be > 0 (they are stored as log θ)")
        self.load_state_dict({**tensors, "log_threshold": threshold.log()})

    def extra_state(self) -> dict[str, Any]:
        return {"l0_coefficient": self.l0_coefficient, "init_threshold": self.init_threshold,
                "bandwidth": self.bandwidth}
