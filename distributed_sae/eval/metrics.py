"""Reconstruction and sparsity metrics of one SAE, streamed over held-out activations.

FVU (fraction of variance unexplained) = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the
evaluation set, where x is what the member reconstructs (a transcoder's target hook); 1.0 is what predicting the mean gives, 0.0 is perfect. MSE is the mean over
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
                  batches: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
                  out_hooks: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Metrics of every member in `saes` (all reading and writing the same hooks) from ONE pass
    over `batches`: tensors x (an SAE's hook), or (x, y) pairs (input, target: transcoders,
    crosscoders, CLTs). With several `out_hooks` (the target's hooks, in order) the FVU and MSE
    are also given per hook (`fvu_by_hook`, `mse_by_hook`)."""
    n = 0
    dims = saes[0].form.targets_dims
    hooks = list(out_hooks) if len(out_hooks) == len(dims) else []
    d_out = sum(dims)
    s1 = torch.zeros(d_out, dtype=torch.float64)  # sum of y per dimension
    s2 = torch.zeros(d_out, dtype=torch.float64)  # sum of y^2 per dimension
    sse = [torch.zeros(d_out, dtype=torch.float64) for _ in saes]
    l0 = [0.0] * len(saes)
    fires = [torch.zeros(sae.d_sae, dtype=torch.float64) for sae in saes]
    for batch in batches:
        x, y = batch if isinstance(batch, tuple) else (batch, batch)
        n += x.shape[0]
        s1 += y.double().sum(0)
        s2 += y.double().pow(2).sum(0)
        for i, sae in enumerate(saes):
            f = sae.encode(x)  # (batch, d_sae)
            active = f > 0
            y_hat = sae.with_skip(sae.decode(f), x)  # (batch, d_out)
            sse[i] += (y_hat - y).double().pow(2).sum(0)
            l0[i] += float(active.sum())
            fires[i] += active.double().sum(0)
    if n == 0:
        raise ValueError("no evaluation tokens: harvest more or lower train.holdout_fraction")
    var = s2 - s1.pow(2) / n  # (d_out,) sum over rows of (y - mean)^2, per coordinate
    out = []
    for e, z, fr in zip(sse, l0, fires):
        summary = _summary(n, d_out, float(e.sum()), z, fr, float(var.sum()))
        if hooks:
            blocks = list(zip(hooks, e.split(list(dims)), var.split(list(dims))))
            summary["fvu_by_hook"] = {h: float(eb.sum() / vb.sum()) for h, eb, vb in blocks}
            summary["mse_by_hook"] = {h: float(eb.sum()) / (n * len(eb)) for h, eb, _ in blocks}
        out.append(summary)
    return out


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
