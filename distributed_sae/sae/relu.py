"""ReLU SAE with an L1 penalty, in Anthropic's two recipes.

'towards_monosemanticity' (Bricken et al. 2023):
    x̄ = x - b_dec,  f = ReLU(x̄ W_enc + b_enc),  x̂ = f W_dec + b_dec
    loss = mean over elements of (x - x̂)^2 + λ · mean over batch of Σ_i |f_i|
with decoder rows held at unit norm (otherwise the L1 term is gamed by shrinking f and growing
W_dec) and dead features re-initialised at set steps (distributed_sae.train.resampling).

'april_2024' (Anthropic's "Training SAEs" update, April 2024): the L1 term is weighted by the
decoder norms, Σ_i f_i ‖W_dec,i‖, which removes the incentive to shrink f without a constraint;
so no unit-norm projection and no resampling. W_enc starts as W_dec transposed with decoder rows
of norm 0.1, λ ramps up over the first 5% of steps and the gradient norm is clipped at 1.

Either way the inference function is SAELens's 'standard' SAE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from distributed_sae.sae.base import SAEOutput, SparseAutoencoder
from distributed_sae.sae.forms import Form
from distributed_sae.sae.latent_ops import LOCAL, LatentOps
from distributed_sae.sae.params import KindParams, from_key, non_negative

RECIPES = ("towards_monosemanticity", "april_2024")
# Decoder row norm at init for april_2024. The update reports norms between 0.05 and 1 working
# and suggests 0.1: small rows keep the first reconstructions close to b_dec (no large initial
# error to undo) while the norm-weighted L1 term starts small, so features are not killed
# before they have found a direction.
APRIL_DECODER_INIT_NORM = 0.1
APRIL_SPARSITY_WARMUP = 0.05  # fraction of the run over which λ ramps from 0
APRIL_GRAD_CLIP = 1.0


@dataclass(frozen=True)
class ReLUParams(KindParams):
    """ReLU + L1: the penalty's coefficient and Anthropic's recipe."""

    kind = "relu"
    l1_coefficient: float = from_key("sae.l1_coefficient", 5.0)
    recipe: str = from_key("sae.recipe", "towards_monosemanticity")

    def __post_init__(self) -> None:
        non_negative(self, "l1_coefficient")
        self._require(self.recipe in RECIPES, "recipe", f"is not one of {RECIPES}")


class ReLUSAE(SparseAutoencoder):
    kind = "relu"
    architecture = "standard"
    Params = ReLUParams
    # The L1 recipes need a 5-10x smaller step than the k-sparse kinds: on SmolLM2 layer 15
    # (width 4608, batch 1024, ~400 steps, 2-core build machine) lr 2e-3 left the batch FVU
    # oscillating between 0.5 and 1.0, lr 2e-4 settled at FVU 0.31, L0 120.
    default_lr = 2e-4

    def __init__(self, d_in: int, d_sae: int, *, l1_coefficient: float = 5.0,
                 recipe: str = "towards_monosemanticity", seed: int = 0,
                 dtype: torch.dtype = torch.float32, form: Form | None = None) -> None:
        if recipe not in RECIPES:
            raise ValueError(f"recipe={recipe!r} must be one of {RECIPES}")
        if l1_coefficient < 0:
            raise ValueError(f"l1_coefficient={l1_coefficient} must be >= 0")
        super().__init__(d_in, d_sae, seed=seed, dtype=dtype, form=form)
        self.l1_coefficient = l1_coefficient
        self.recipe = recipe
        april = recipe == "april_2024"
        # Training-loop flags (see SparseAutoencoder): the recipes differ only here and in the
        # L1 weighting below.
        self.unit_norm_decoder = not april
        self.uses_resampling = not april
        self.grad_clip = APRIL_GRAD_CLIP if april else None
        self.sparsity_warmup_fraction = APRIL_SPARSITY_WARMUP if april else 0.0
        if april:
            with torch.no_grad():  # base init: unit rows, W_enc = W_dec^T; shrink both alike
                self.W_dec.mul_(APRIL_DECODER_INIT_NORM)
                self.W_enc.mul_(APRIL_DECODER_INIT_NORM)

    @classmethod
    def resamples(cls, params: ReLUParams) -> bool:  # type: ignore[override]
        return params.recipe != "april_2024"

    def encode(self, x: torch.Tensor, ops: LatentOps = LOCAL) -> torch.Tensor:
        return self.pre_acts(x, ops).relu()  # (batch, d_sae)

    def sparsity(self, f: torch.Tensor) -> torch.Tensor:
        """Per-input L1 penalty (batch,) of activations f (batch, d_sae), f >= 0 so |f| = f."""
        if self.recipe == "april_2024":
            return f @ self.W_dec.norm(dim=1)  # Σ_i f_i ‖W_dec,i‖
        return f.sum(1)

    def loss(self, x: torch.Tensor, dead: torch.Tensor | None = None,
             sparsity_scale: float = 1.0, ops: LatentOps = LOCAL,
             target: torch.Tensor | None = None) -> SAEOutput:
        f = self.encode(x, ops)  # (batch, d_sae)
        x_hat = self.with_skip(self.decode(f, ops), x)  # (batch, d_out)
        mse = F.mse_loss(x_hat, self.target_of(x, target))
        l1 = ops.sum(self.sparsity(f).mean())  # a sum over latents: over every shard
        loss = mse + sparsity_scale * self.l1_coefficient * l1
        counts = (f > 0).sum(0)  # (d_sae,)
        return SAEOutput(loss=loss, x_hat=x_hat, terms={"mse": mse, "l1": l1}, fired=counts > 0,
                         counts=counts)

    @torch.no_grad()
    def per_input_loss(self, x: torch.Tensor) -> torch.Tensor:
        """(n, d_in) -> (n,) the training loss of each input alone (resampling weights)."""
        f = self.encode(x)  # (n, d_sae)
        mse = (self.decode(f) - x).pow(2).mean(1)  # (n,)
        return mse + self.l1_coefficient * self.sparsity(f)

    def saelens_cfg(self) -> dict[str, Any]:
        return {"architecture": "standard"}

    def extra_state(self) -> dict[str, Any]:
        return {"l1_coefficient": self.l1_coefficient, "recipe": self.recipe}
