"""torch.autograd.Functions of the sparse TopK encoder and decoder, backend-agnostic.

`ops` is a backend module (torch_sparse or triton_sparse) with decode_rows, gather_dot and
segment_rows; dispatch.py picks it. Neither Function ever allocates a (batch, n) gradient: the
encoder keeps (batch, n) pre-activations only inside its forward (topk needs them) and saves
(batch, d) + (batch, k) tensors for backward.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from distributed_sae.kernels.select import grouped_topk, preact_buffer, screened_topk


class SparseDecode(torch.autograd.Function):
    """out = bias + sum_j values[:, j] * weight[indices[:, j]]   (batch, d)."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, ops: ModuleType) -> torch.Tensor:
        ctx.ops, ctx.has_bias = ops, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(values, indices, weight)
        return ops.decode_rows(values, indices, weight, bias)  # (batch, d)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        values, indices, weight = ctx.saved_tensors
        grad = grad.contiguous()  # (batch, d)
        g_values = g_weight = g_bias = None
        if ctx.needs_input_grad[0]:  # grad . W[idx]   (batch, k)
            g_values = ctx.ops.gather_dot(grad, weight, indices).to(values.dtype)
        if ctx.needs_input_grad[2]:  # rows of W_dec += v x grad, summed per latent   (n, d)
            g_weight, _ = ctx.ops.segment_rows(indices, values, grad, weight.shape[0])
            g_weight = g_weight.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            g_bias = grad.sum(0, dtype=torch.float32).to(ctx.bias_dtype)  # (d,)
        return g_values, None, g_weight, g_bias, None


class TopKEncode(torch.autograd.Function):
    """(values, indices, aux_values, aux_indices) of the TopK encoder, values after ReLU.

    pre = (x - b_dec) @ W_enc + b_enc; top k per row; with k_aux > 0 also the top k_aux among
    `dead` latents (AuxK); screen > 0 without AuxK: the top k by select.screened_topk (a bf16
    screen of k + screen candidates, their exact fp32 values). The gradient of pre is non-zero
    only at those (batch, k + k_aux) positions, so grad W_enc = x_c^T @ sparse is a latent-sorted sum of x_c rows (O(batch·k·d)),
    grad b_enc the per-latent sums, grad b_dec = -W_enc @ grad b_enc, grad x a sparse decode
    through W_enc^T.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                b_dec: torch.Tensor, k: int, dead: torch.Tensor | None, k_aux: int,
                ops: ModuleType, screen: int = 0) -> tuple[torch.Tensor, ...]:
        x_c = x - b_dec  # (batch, d)
        aux = k_aux > 0 and dead is not None
        # AuxK's sparse path needs every dead latent's exact pre-activation: no screen then.
        # Below 4 (k + screen) latents the screen's top-k is a plain topk: nothing to gain.
        if screen > 0 and not aux and 4 * (k + screen) <= W_enc.shape[1]:
            values, indices = screened_topk(x_c, W_enc, b_enc, k, screen, ops.gather_dot)
        else:
            buf = preact_buffer(x.shape[0], W_enc.shape[1], x_c)  # reused on CPU, else None
            pre = torch.addmm(b_enc, x_c, W_enc, out=buf)  # (batch, n); dead after forward
            values, indices = grouped_topk(pre, k)  # (batch, k)
        values = values.relu_()
        if aux:
            pre.masked_fill_(~dead, float("-inf"))
            aux_values, aux_indices = pre.topk(k_aux, dim=-1, sorted=False)  # (batch, k_aux)
            aux_values = aux_values.relu_()
        else:
            aux_values, aux_indices = values[:, :0], indices[:, :0]
        ctx.ops, ctx.n = ops, W_enc.shape[1]
        ctx.save_for_backward(x_c, W_enc, values, indices, aux_values, aux_indices)
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values.clone(), aux_indices.clone()

    @staticmethod
    def backward(ctx: Any, g_values: torch.Tensor | None, _g_idx: Any,
                 g_aux: torch.Tensor | None, _g_aux_idx: Any) -> tuple[Any, ...]:
        x_c, W_enc, values, indices, aux_values, aux_indices = ctx.saved_tensors
        g_pre = _relu_grad(g_values, values)  # (batch, k)
        if aux_indices.shape[1] > 0:
            g_pre = torch.cat([g_pre, _relu_grad(g_aux, aux_values)], 1)  # (batch, k + k_aux)
            indices = torch.cat([indices, aux_indices], 1)
        need_x, need_w, need_be, need_bd = ctx.needs_input_grad[:4]
        g_x = g_w = g_be = g_bd = None
        if need_w or need_be or need_bd:
            # straight into W_enc's (d, n) layout
            rows, sums = ctx.ops.segment_rows(indices, g_pre, x_c, ctx.n, with_sums=True,
                                              transposed=need_w)
            if need_w:
                g_w = rows.to(W_enc.dtype)
            g_be = sums.to(W_enc.dtype)  # (n,)
            if need_bd:  # d pre / d b_dec = -W_enc^T, summed over the batch
                g_bd = -torch.mv(W_enc, g_be)  # (d,)
            g_be = g_be if need_be else None
        if need_x:
            g_x = ctx.ops.decode_rows(g_pre, indices, W_enc.t(), None)  # (batch, d)
        return g_x, g_w, g_be, g_bd, None, None, None, None, None


def _relu_grad(grad: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
    """Gradient through the ReLU after topk: zero where the value was clipped (<= 0)."""
    if grad is None:
        return torch.zeros_like(values)
    return grad * (values > 0)
