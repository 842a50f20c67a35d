"""Matryoshka SAE (Bussmann et al. 2025; Nabeshima 2024): nested dictionaries in one.

The latents are split into nested prefixes of sizes m_1 < m_2 < ... < m_J = d_sae (the
`fractions` of the width). Each prefix must reconstruct the input on its own:
    x̂_j = f[:, :m_j] W_dec[:m_j] + b_dec,     loss = (1/J) Σ_j MSE(x, x̂_j)  (+ AuxK)
so the first latents learn the general, frequent directions (they get gradient from every
term) and later ones refine them, instead of a wide SAE splitting or absorbing features.

Activation: BatchTopK over the whole dictionary, as Bussmann et al. 2025 train it (one selection
of k x batch latents; every prefix reads its part of it), with the same EMA threshold for
inference, so the export is SAELens 'jumprelu' exactly like BatchTopKSAE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from distributed_sae.sae.batchtopk import BatchTopKParams, BatchTopKSAE, Reconstruction
from distributed_sae.sae.forms import Form
from distributed_sae.sae.latent_ops import LOCAL, LatentOps
from distributed_sae.sae.topk import ExtraCodes
from distributed_sae.sae.params import from_key


def prefix_sizes(d_sae: int, fractions: Sequence[float]) -> list[int]:
    """Ascending distinct prefix sizes in 1..d_sae; the last is always d_sae."""
    fr = [float(v) for v in fractions]
    if not fr or fr != sorted(fr) or fr[0] <= 0 or fr[-1] != 1.0:
        raise ValueError(f"fractions={fr} must be ascending in (0, 1] and end at 1.0")
    return sorted({min(d_sae, max(1, round(v * d_sae))) for v in fr})


@dataclass(frozen=True)
class MatryoshkaParams(BatchTopKParams):
    """Matryoshka: BatchTopK's parameters and the nested prefixes as fractions of the width."""

    kind = "matryoshka"
    fractions: tuple[float, ...] = from_key("sae.matryoshka_fractions", (0.0625, 0.25, 1.0))

    def __post_init__(self) -> None:
        super().__post_init__()
        fr = [float(v) for v in self.fractions]
        self._require(bool(fr) and fr == sorted(fr) and fr[0] > 0 and fr[-1] == 1.0,
                      "fractions", "must be ascending in (0, 1] and end at 1.0")


class MatryoshkaSAE(BatchTopKSAE):
    kind = "matryoshka"
    architecture = "jumprelu"
    Params = MatryoshkaParams
    shardable = False
    unshardable_reason = "its nested prefixes cut across shards"

    def __init__(self, d_in: int, d_sae: int, k: int, *,
                 fractions: Sequence[float] = (0.0625, 0.25, 1.0),
                 auxk_coefficient: float = 1 / 32, threshold_momentum: float = 0.99,
                 seed: int = 0, dtype: torch.dtype = torch.float32,
                 form: Form | None = None) -> None:
        super().__init__(d_in, d_sae, k, auxk_coefficient=auxk_coefficient,
                         threshold_momentum=threshold_momentum, seed=seed, dtype=dtype, form=form)
        self.fractions = [float(v) for v in fractions]
        self.prefixes = prefix_sizes(d_sae, self.fractions)

    def reconstruction_loss(self, x: torch.Tensor, y: torch.Tensor, f: torch.Tensor,
                            ops: LatentOps = LOCAL) -> Reconstruction:
        """Mean over prefixes of the MSE; x_hat is the full dictionary's reconstruction.

        Built incrementally: x̂_j = x̂_{j-1} + f[:, m_{j-1}:m_j] W_dec[m_{j-1}:m_j], so the cost is
        that of one full decode.
        """
        x_hat = self.with_skip(self.b_dec.expand_as(y), x)  # (batch, d_out)
        terms: dict[str, torch.Tensor] = {}
        total = y.new_zeros(())
        start = 0
        for m in self.prefixes:
            x_hat = x_hat + f[:, start:m] @ self.W_dec[start:m]  # (batch, d_out)
            mse = F.mse_loss(x_hat, y)
            terms[f"mse_{m}"] = mse
            total = total + mse
            start = m
        terms["mse"] = terms[f"mse_{self.d_sae}"]
        return x_hat, total / len(self.prefixes), terms

    def codes_reconstruction(self, x: torch.Tensor, y: torch.Tensor, values: torch.Tensor,
                             indices: torch.Tensor, ops: LatentOps = LOCAL,
                             extra: ExtraCodes | None = None) -> Reconstruction:
        """reconstruction_loss on sparse codes (batch, c) and `extra` (the training path):
        prefix j decodes the codes whose latent index is under m_j, one sparse decode each."""
        terms: dict[str, torch.Tensor] = {}
        total = y.new_zeros(())
        for m in self.prefixes:
            inside = torch.where(indices < m, values, torch.zeros_like(values))  # (batch, c)
            more = None if extra is None else extra._replace(values=torch.where(
                extra.indices < m, extra.values, torch.zeros_like(extra.values)))
            x_hat = self.with_skip(self.decode_rows(inside, indices, ops, more), x)
            terms[f"mse_{m}"] = mse = F.mse_loss(x_hat, y)
            total = total + mse
        terms["mse"] = terms[f"mse_{self.d_sae}"]
        return x_hat, total / len(self.prefixes), terms

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "fractions": self.fractions}
