"""The interface every SAE kind shares: encode, decode, forward, loss terms.

Parameter names and shapes follow SAELens, so export is a rename-free copy:
    W_enc (d_in, d_sae), b_enc (d_sae), W_dec (d_sae, d_in), b_dec (d_in)
and the forward pass is  f = act((x - b_dec) @ W_enc + b_enc),  x_hat = f @ W_dec + b_dec.

SAE code is single-device: it never imports torch.distributed (parallelism lives in `parallel/`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class SAEOutput:
    """What one forward pass of `loss` returns."""

    loss: torch.Tensor  # scalar, the sum of the weighted terms
    x_hat: torch.Tensor  # (batch, d_in)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # scalar loss terms, unweighted
    fired: torch.Tensor | None = None  # (d_sae,) bool, latents active on this batch


class SparseAutoencoder(nn.Module):
    """Base class: parameters, decoder-norm helpers, and the SAELens config of a kind."""

    kind: ClassVar[str] = "base"
    architecture: ClassVar[str] = "standard"  # SAELens's name for the inference kind

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
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, d_in) -> (batch, d_sae) encoder pre-activations."""
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, d_in) -> (batch, d_sae) dense feature activations."""
        raise NotImplementedError

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """(batch, d_sae) -> (batch, d_in)."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def loss(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> SAEOutput:
        """Training loss on a batch (batch, d_in); `dead` (d_sae,) marks dead latents."""
        raise NotImplementedError

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
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)  # (d_sae, d_in)
        self.W_dec.grad -= (self.W_dec.grad * w).sum(1, keepdim=True) * w

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
