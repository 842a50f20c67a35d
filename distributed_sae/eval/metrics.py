"""Reconstruction and sparsity metrics of one SAE, streamed over held-out activations.

FVU (fraction of variance unexplained) = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the
evaluation set; 1.0 is what predicting the mean gives, 0.0 is perfect. MSE is the mean over
elements of (x - x_hat)^2 on raw (unscaled) activations. L0 is the mean number of active latents
per token. A latent is dead if it never fired on the evaluation tokens.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from distributed_sae.sae import SparseAutoencoder


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, batches: Iterable[torch.Tensor]) -> dict[str, float | list[float]]:
    """Stream batches (batch, d_in) of raw activations through `sae` and summarise."""
    n, sse, l0 = 0, 0.0, 0.0
    s1 = torch.zeros(sae.d_in, dtype=torch.float64)  # sum of x per dimension
    s2 = 0.0  # sum of ||x||^2
    fires = torch.zeros(sae.d_sae, dtype=torch.float64)
    for x in batches:
        f = sae.encode(x)  # (batch, d_sae)
        x_hat = sae.decode(f)
        active = f > 0
        n += x.shape[0]
        sse += float((x_hat - x).double().pow(2).sum())
        s1 += x.double().sum(0)
        s2 += float(x.double().pow(2).sum())
        l0 += float(active.sum())
        fires += active.double().sum(0)
    if n == 0:
        raise ValueError("no evaluation tokens: harvest more or lower train.holdout_fraction")
    total_var = s2 - float(s1.pow(2).sum()) / n  # sum ||x - mean||^2
    density = fires / n
    return {
        "n_tokens": n,
        "mse": sse / (n * sae.d_in),
        "fvu": sse / total_var,
        "explained_variance": 1.0 - sse / total_var,
        "l0": l0 / n,
        "dead_fraction": float((fires == 0).double().mean()),
        "dense_fraction": float((density > 0.1).double().mean()),  # fire on >10% of tokens
        "log10_density": [math.log10(d + 1e-10) for d in density.tolist()],
    }
