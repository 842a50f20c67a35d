"""Dense, obviously-correct references for the sparse SAE ops (tests and benchmarks only).

They materialise the (batch, n) activations and let autograd differentiate plain matmuls, so
they cost O(batch·n·d) and allocate (batch, n) tensors: exactly what the sparse paths avoid.
Inputs are upcast to fp32, so a half-precision kernel can be checked against them.
"""

from __future__ import annotations

import torch


def dense_codes(values: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    """(batch, k) values at (batch, k) latent indices -> dense (batch, n); repeated indices add."""
    out = torch.zeros(values.shape[0], n, dtype=values.dtype, device=values.device)
    return out.scatter_add(1, indices, values)  # (batch, n)


def decode_reference(values: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """out[b] = bias + sum_j values[b, j] * weight[indices[b, j]], as a dense fp32 matmul.

    values (batch, k), indices (batch, k) int64, weight (n, d), bias (d,) -> (batch, d) fp32.
    """
    f = dense_codes(values.float(), indices, weight.shape[0])  # (batch, n)
    out = f @ weight.float()  # (batch, d)
    return out if bias is None else out + bias.float()


def topk_encode_reference(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                          b_dec: torch.Tensor, k: int, dead: torch.Tensor | None = None,
                          k_aux: int = 0) -> tuple[torch.Tensor, torch.Tensor,
                                                   torch.Tensor | None, torch.Tensor | None]:
    """Dense TopK encoder: (values, indices, aux_values, aux_indices), values after ReLU.

    pre = (x - b_dec) @ W_enc + b_enc (batch, n); the top k of each row; with k_aux > 0 also the
    top k_aux among the latents marked `dead` (n,) bool. Gradients flow by autograd through
    topk's dense scatter. pre uses addmm like the sparse paths, so both select the same latents.
    """
    pre = torch.addmm(b_enc, x - b_dec, W_enc)  # (batch, n)
    values, indices = pre.topk(k, dim=-1, sorted=False)
    if k_aux <= 0 or dead is None:
        return values.relu(), indices, None, None
    masked = pre.masked_fill(~dead, float("-inf"))  # (batch, n)
    aux_values, aux_indices = masked.topk(k_aux, dim=-1, sorted=False)
    return values.relu(), indices, aux_values.relu(), aux_indices
