"""Reconstruction and sparsity metrics of one SAE, streamed over held-out activations.

FVU (fraction of variance unexplained) = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the
evaluation set; 1.0 is what predicting the mean gives, 0.0 is perfect. MSE is the mean over
elements of (x - x_hat)^2 on raw (unscaled) activations. L0 is the mean number of active latents
per token. A latent is dead if it never fired on the evaluation tokens.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch

from distributed_sae.sae import SparseAutoencoder


def evaluate_sae(sae: SparseAutoencoder, batches: Iterable[torch.Tensor]) -> dict[str, Any]:
    """Stream batches (batch, d_in) of raw activations through `sae` and summarise."""
    return evaluate_saes([sae], batches)[0]


@torch.no_grad()
def evaluate_saes(saes: Sequence[SparseAutoencoder],
                  batches: Iterable[torch.Tensor]) -> list[dict[str, Any]]:
    """Metrics of every SAE in `saes` (all on the same hook) from ONE pass over `batches`."""
    n = 0
    d_in = saes[0].d_in
    s1 = torch.zeros(d_in, dtype=torch.float64)  # sum of x per dimension
    s2 = 0.0  # sum of ||x||^2
    sse, l0 = [0.0] * len(saes), [0.0] * len(saes)
    fires = [torch.zeros(sae.d_sae, dtype=torch.float64) for sae in saes]
    for x in batches:
        n += x.shape[0]
        s1 += x.double().sum(0)
        s2 += float(x.double().pow(2).sum())
        for i, sae in enumerate(saes):
            f = sae.encode(x)  # (batch, d_sae)
            active = f > 0
            sse[i] += float((sae.decode(f) - x).double().pow(2).sum())
            l0[i] += float(active.sum())
            fires[i] += active.double().sum(0)
    if n == 0:
        raise ValueError("no evaluation tokens: harvest more or lower train.holdout_fraction")
    total_var = s2 - float(s1.pow(2).sum()) / n  # sum ||x - mean||^2
    return [_summary(n, d_in, e, z, fr, total_var) for e, z, fr in zip(sse, l0, fires)]


def _summary(n: int, d_in: int, sse: float, l0: float, fires: torch.Tensor,
             total_var: float) -> dict[str, Any]:
    density = fires / n
    return {
        "n_tokens": n,
        "mse": sse / (n * d_in),
        "fvu": sse / total_var,
        "explained_variance": 1.0 - sse / total_var,
        "l0": l0 / n,
        "dead_fraction": float((fires == 0).double().mean()),
        "dense_fraction": float((density > 0.1).double().mean()),  # fire on >10% of tokens
        "log10_density": [math.log10(d + 1e-10) for d in density.tolist()],
    }
