"""Neuron resampling of *Towards Monosemanticity* (Bricken et al. 2023): revive dead features.

At a few set steps, every feature that did not fire during the previous window is pointed at an
input the SAE reconstructs badly:
  1. compute the loss of each of a random sample of inputs;
  2. draw one input per dead feature with probability proportional to loss^2, so the features go
     where the error is concentrated;
  3. decoder row  <- the input, centred by b_dec (what the encoder sees), at unit norm;
     encoder row  <- the input scaled to 0.2 x the mean encoder-row norm of the live features
                     (small, so a revived feature does not swamp the others at once);
     encoder bias <- 0;
  4. reset Adam's moments of exactly those rows/entries: the old moments belong to the dead
     weights and would push the new ones in a stale direction.

Centring departs from the paper, whose inputs were MLP activations. A residual stream carries a
large common mean (on SmolLM2 layer 15 it is ~75% of E||x||^2), so raw inputs all point near
that mean and every revived feature would start as the same mean detector; x - b_dec points at
what makes the chosen input different.

The caller picks the inputs (a random sample of the store) and the dead mask; this module never
reads the store and, like the SAE code, is single-device.
"""

from __future__ import annotations

import torch

from distributed_sae.sae.base import SparseAutoencoder

ENCODER_SCALE = 0.2  # new encoder rows get this fraction of the live rows' mean norm


@torch.no_grad()
def input_losses(sae: SparseAutoencoder, inputs: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """(n, d_in) -> (n,) per-input training loss, computed in chunks to bound memory.

    Uses the kind's own `per_input_loss` when it has one (ReLUSAE: MSE + λ L1), else the squared
    reconstruction error.
    """
    per_input = getattr(sae, "per_input_loss", None)
    out = []
    for start in range(0, inputs.shape[0], chunk):
        x = inputs[start:start + chunk]  # (chunk, d_in)
        if per_input is not None:
            out.append(per_input(x))
        else:
            out.append((sae(x) - x).pow(2).sum(1))
    return torch.cat(out)  # (n,)


def _sample_rows(weights: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """n indices drawn with probability ∝ weights (n,); without replacement when possible."""
    weights = weights.double().cpu().clamp_min(0)
    if not bool(weights.sum() > 0):
        weights = torch.ones_like(weights)  # a perfect fit: any input will do
    replacement = int((weights > 0).sum()) < n
    return torch.multinomial(weights, n, replacement=replacement, generator=generator)


@torch.no_grad()
def _reset_adam_state(optimizer: torch.optim.Optimizer, sae: SparseAutoencoder,
                      dead: torch.Tensor) -> None:
    """Zero every per-element state tensor (exp_avg, exp_avg_sq, max_exp_avg_sq) of the
    resampled entries: W_enc columns, W_dec rows, b_enc entries (a schedule-free optimiser
    restarts its average there instead). `step` is shared by the whole
    tensor in torch's Adam, so it stays."""
    where = {sae.W_enc: (slice(None), dead), sae.W_dec: (dead,), sae.b_enc: (dead,)}
    restart = getattr(optimizer, "restart_entries", None)  # schedule-free (train/optim.py)
    for param, index in where.items():
        if restart is not None:
            restart(param, index)
            continue
        state = optimizer.state.get(param, {})
        for value in state.values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value[index] = 0.0


@torch.no_grad()
def resample_dead(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer | None,
                  inputs: torch.Tensor, dead: torch.Tensor,
                  generator: torch.Generator | None = None) -> int:
    """Re-initialise the dead features of `sae` from `inputs` (n, d_in); `dead` (d_sae,) bool.

    Inputs are in the units the SAE trains on (scaled like the training batches). Returns the
    number of features resampled (all dead ones, each from its own draw).
    """
    dead = dead.to(device=sae.W_dec.device, dtype=torch.bool)
    n_dead = int(dead.sum())
    if n_dead == 0:
        return 0
    inputs = inputs.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)
    losses = input_losses(sae, inputs)  # (n,)
    rows = _sample_rows(losses.pow(2), n_dead, generator).to(inputs.device)  # (n_dead,)
    picked = inputs[rows] - sae.b_dec  # (n_dead, d_in), centred as the encoder sees it
    directions = picked / picked.norm(dim=1, keepdim=True).clamp_min(1e-8)  # (n_dead, d_in)

    enc_norms = sae.W_enc.norm(dim=0)  # (d_sae,) norm of each feature's encoder row
    alive = ~dead
    mean_alive = float(enc_norms[alive].mean()) if bool(alive.any()) else 1.0

    sae.W_dec[dead] = directions
    sae.W_enc[:, dead] = (directions * (ENCODER_SCALE * mean_alive)).t()
    sae.b_enc[dead] = 0.0
    if optimizer is not None:
        _reset_adam_state(optimizer, sae, dead)
    return n_dead
