"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs").

A ReLU SAE's L1 penalty both decides which latents fire and pulls down how strongly they fire
(shrinkage). The gated encoder splits the two decisions between two paths that share their
directions: the gate says whether latent i is active, the magnitude path how much,
    x̄ = x - b_dec
    π_gate = x̄ W_enc + b_gate                        (which latents fire)
    π_mag  = x̄ (W_enc ⊙ exp(r_mag)) + b_mag          (how strongly: W_enc's columns rescaled)
    f = 1[π_gate > 0] ⊙ ReLU(π_mag),    x̂ = f W_dec + b_dec
The step 1[·] passes no gradient, so the gate learns from two terms on ReLU(π_gate) alone:
    loss = MSE(x̂, x) + λ · mean over batch of Σ_i ReLU(π_gate)_i ‖W_dec,i‖
                     + MSE(ReLU(π_gate) sg(W_dec) + sg(b_dec), x)
(MSE a mean over elements, sg = stop-gradient). The L1 makes the gate sparse; the auxiliary
reconstruction, through a frozen copy of the decoder, makes the gate open where the decoder
needs the latent. The penalty never reaches the magnitudes, so they are not shrunk.

No unit-norm decoder: scaling latent i's W_enc column, b_gate_i and b_mag_i by c and its W_dec
row by 1/c leaves f W_dec, the norm-weighted L1 and the auxiliary term unchanged, so the penalty
cannot be gamed by rescaling and the constraint would only cost a projection per step.

Exported as SAELens 'gated' with its tensor names: W_enc, b_gate, r_mag, b_mag, W_dec, b_dec
(no b_enc). The base class's b_enc is the storage of b_gate, renamed on export and load: the
base's pre_acts then gives π_gate, and the trainer's code that reads b_enc (a member's width)
works unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distributed_sae.sae.base import SAEOutput, SparseAutoencoder
from distributed_sae.sae.forms import Form
from distributed_sae.sae.latent_ops import LOCAL, LatentOps
from distributed_sae.sae.params import KindParams, from_key, non_negative


@dataclass(frozen=True)
class GatedParams(KindParams):
    """Gated: the coefficient λ of the gate's L1 penalty."""

    kind = "gated"
    l1_coefficient: float = from_key("sae.l1_coefficient", 0.01)

    def __post_init__(self) -> None:
        non_negative(self, "l1_coefficient")


class GatedSAE(SparseAutoencoder):
    kind = "gated"
    architecture = "gated"
    Params = GatedParams
    latent_axes = {**SparseAutoencoder.latent_axes, "r_mag": 0, "b_mag": 0}  # b_enc is b_gate
    unit_norm_decoder = False  # the L1 is weighted by decoder norms (module docstring)
    # Same step as relu's (see ReLUSAE.default_lr): the gate is trained by the same
    # norm-weighted L1 on the same scaled inputs as relu april_2024, where lr 2e-3 oscillated
    # and 2e-4 settled. Not measured for gated itself.
    default_lr = 2e-4

    def __init__(self, d_in: int, d_sae: int, *, l1_coefficient: float = 0.01, seed: int = 0,
                 dtype: torch.dtype = torch.float32, form: Form | None = None) -> None:
        if l1_coefficient < 0:
            raise ValueError(f"l1_coefficient={l1_coefficient} must be >= 0")
        super().__init__(d_in, d_sae, seed=seed, dtype=dtype, form=form)
        self.l1_coefficient = l1_coefficient
        # Zeros, as SAELens: with b_gate = b_enc = 0 too, π_mag = π_gate at the start, i.e. the
        # SAE starts as a plain ReLU SAE.
        self.r_mag = nn.Parameter(torch.zeros(d_sae, dtype=dtype))  # (d_sae,) log-rescale
        self.b_mag = nn.Parameter(torch.zeros(d_sae, dtype=dtype))  # (d_sae,)

    @property
    def b_gate(self) -> nn.Parameter:
        """(d_sae,) the gate's bias, stored as the base class's b_enc."""
        return self.b_enc

    def gate_and_magnitude(self, x: torch.Tensor, ops: LatentOps = LOCAL
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, d_in) -> (π_gate, π_mag), each (batch, d_sae)."""
        # x̄ (W_enc ⊙ exp(r_mag)) = (x̄ W_enc) ⊙ exp(r_mag): both paths share one matmul instead
        # of two (batch, d_in) x (d_in, d_sae) ones.
        shared = (x - self.enc_bias(ops)) @ self.W_enc  # (batch, d_sae)
        return shared + self.b_gate, shared * self.r_mag.exp() + self.b_mag

    @staticmethod
    def combine(gate: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
        """f = 1[π_gate > 0] ⊙ ReLU(π_mag), (batch, d_sae); gradients reach π_mag only."""
        return mag.relu() * (gate > 0)

    def encode(self, x: torch.Tensor, ops: LatentOps = LOCAL) -> torch.Tensor:
        return self.combine(*self.gate_and_magnitude(x, ops))  # (batch, d_sae)

    def loss(self, x: torch.Tensor, dead: torch.Tensor | None = None,
             sparsity_scale: float = 1.0, ops: LatentOps = LOCAL,
             target: torch.Tensor | None = None) -> SAEOutput:
        """MSE + λ·(norm-weighted L1 of the gate) + the gate's frozen-decoder reconstruction.
        `dead` is unused: nothing here targets dead latents."""
        gate, mag = self.gate_and_magnitude(x, ops)
        f = self.combine(gate, mag)  # (batch, d_sae)
        x_hat = self.with_skip(self.decode(f, ops), x)  # (batch, d_out)
        y = self.target_of(x, target)  # (batch, d_out)
        mse = F.mse_loss(x_hat, y)
        gate_acts = gate.relu()  # (batch, d_sae)
        # Σ_i ReLU(π_gate)_i ‖W_dec,i‖, a sum over latents: over every shard.
        l1 = ops.sum((gate_acts @ self.W_dec.norm(dim=1)).mean())
        # Detached decoder: this term trains the gate (W_enc, b_gate) only.
        gate_hat = ops.sum(gate_acts @ self.W_dec.detach()) + self.b_dec.detach()
        if self.form.skip:
            gate_hat = gate_hat + x @ self.W_skip.detach().t()
        aux = F.mse_loss(gate_hat, y)
        loss = mse + sparsity_scale * self.l1_coefficient * l1 + aux
        counts = (f > 0).sum(0)  # (d_sae,) tokens each latent is active on
        return SAEOutput(loss=loss, x_hat=x_hat, terms={"mse": mse, "l1": l1, "aux_mse": aux},
                         fired=counts > 0, counts=counts)

    # ---- export: SAELens 'gated' ---------------------------------------------------------------
    # fold_input_scale is the base one: with W_enc *= s, b_dec /= s both paths see the same
    # x̄ W_enc on raw x as before on scaled x (r_mag rescales W_enc's columns, whatever their
    # scale), so b_gate, r_mag and b_mag stay as they are; W_dec /= s undoes the output's scale.
    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        return {"W_enc": self.W_enc, "b_gate": self.b_gate, "r_mag": self.r_mag,
                "b_mag": self.b_mag, "W_dec": self.W_dec, "b_dec": self.b_dec,
                **self.form_tensors()}

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        b_gate = tensors.pop("b_gate")  # (d_sae,)
        self.load_state_dict({**tensors, "b_enc": b_gate})

    def extra_state(self) -> dict[str, Any]:
        return {"l1_coefficient": self.l1_coefficient}
