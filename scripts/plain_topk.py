"""The baseline of the SAE issues: a textbook dense PyTorch TopK SAE loop (~60 lines in full).

Encoder matmul, top-k, scatter to a dense (batch, width) code, dense decoder matmul, MSE,
autograd, Adam, decoder rows renormalised. The benchmarks (bench_bank.py, bench_kernels.py,
bench_vs_plain.py) measure ours against it on the same batches.
"""

from __future__ import annotations

import torch


def plain_params(d: int, width: int, seed: int = 0) -> list[torch.nn.Parameter]:
    """[W_enc (d, width), b_enc (width,), W_dec (width, d), b_dec (d,)], decoder rows unit-norm
    and the encoder their transpose (Gao et al. 2024)."""
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(width, d, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    return [torch.nn.Parameter(w_dec.t().clone()), torch.nn.Parameter(torch.zeros(width)),
            torch.nn.Parameter(w_dec), torch.nn.Parameter(torch.zeros(d))]


def plain_dense_step(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
                     x: torch.Tensor, k: int) -> torch.Tensor:
    """One step on x (batch, d); returns the (detached) MSE."""
    w_enc, b_enc, w_dec, b_dec = params
    pre = (x - b_dec) @ w_enc + b_enc  # (batch, width)
    vals, idx = pre.topk(k, dim=-1)
    f = torch.zeros_like(pre).scatter_(1, idx, vals.relu())
    loss = ((f @ w_dec + b_dec - x) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        w_dec /= w_dec.norm(dim=1, keepdim=True)
    return loss.detach()
