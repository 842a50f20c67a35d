"""TopK SAE with the AuxK loss for dead latents (Gao et al. 2024, "Scaling and evaluating SAEs").

Only the k largest pre-activations of a token survive (then ReLU), so L0 <= k by construction and
no sparsity coefficient needs tuning. AuxK: the residual e = x - x_hat is reconstructed from the
top k_aux pre-activations among the dead latents only; training on that pulls dead latents back
towards directions the live ones miss. The paper uses k_aux = d_in / 2 and weight 1/32.
"""

from __future__ import annotations

from typing import Any

import torch

from distributed_sae.sae.base import SAEOutput, SparseAutoencoder


class TopKSAE(SparseAutoencoder):
    kind = "topk"
    architecture = "topk"

    def __init__(self, d_in: int, d_sae: int, k: int, *, auxk_coefficient: float = 1 / 32,
                 seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        if not 0 < k <= d_sae:
            raise ValueError(f"k={k} must be in 1..d_sae={d_sae}")
        super().__init__(d_in, d_sae, seed=seed, dtype=dtype)
        self.k = k
        self.auxk_coefficient = auxk_coefficient

    def topk(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, d_sae) pre-activations -> values (batch, k) after ReLU and indices (batch, k)."""
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return values.relu(), indices

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        values, indices = self.topk(self.pre_acts(x))
        return torch.zeros(x.shape[0], self.d_sae, dtype=values.dtype,
                           device=x.device).scatter_(1, indices, values)  # (batch, d_sae)

    def loss(self, x: torch.Tensor, dead: torch.Tensor | None = None,
             sparsity_scale: float = 1.0) -> SAEOutput:
        """MSE + AuxK. `sparsity_scale` is unused: TopK fixes L0 by construction, no penalty."""
        pre = self.pre_acts(x)  # (batch, d_sae)
        values, indices = self.topk(pre)
        f = torch.zeros_like(pre).scatter_(1, indices, values)
        x_hat = self.decode(f)  # (batch, d_in)
        mse = (x_hat - x).pow(2).mean()
        terms = {"mse": mse}
        loss = mse
        if dead is not None and bool(dead.any()):
            terms["auxk"] = self._auxk(x - x_hat.detach(), pre, dead)
            loss = loss + self.auxk_coefficient * terms["auxk"]
        fired = torch.zeros(self.d_sae, dtype=torch.bool, device=x.device)
        fired[indices[values > 0]] = True
        return SAEOutput(loss=loss, x_hat=x_hat, terms=terms, fired=fired)

    def _auxk(self, residual: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
        """Normalised error of reconstructing the residual (batch, d_in) from dead latents."""
        k_aux = min(self.d_in // 2, int(dead.sum()))
        masked = pre.masked_fill(~dead, float("-inf"))  # (batch, d_sae)
        values, indices = masked.topk(k_aux, dim=-1, sorted=False)
        values = values.relu()
        e_hat = torch.zeros_like(pre).scatter_(1, indices, values) @ self.W_dec  # (batch, d_in)
        # Normalised by the residual's variance so the term is ~1 at start whatever the scale.
        denom = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
        return (e_hat - residual).pow(2).sum() / denom

    def saelens_cfg(self) -> dict[str, Any]:
        return {"architecture": "topk", "k": self.k, "rescale_acts_by_decoder_norm": False}

    def extra_state(self) -> dict[str, Any]:
        return {"k": self.k, "auxk_coefficient": self.auxk_coefficient}
