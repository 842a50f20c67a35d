"""CPU helpers of the TopK encoder's forward: a reused pre-activation buffer and an exact top-k
that scans fewer elements than torch.topk.

Both exist because, on the 2-core build machine (AMD EPYC, torch 2.13.0+cpu, 2 threads), the
encoder forward at batch 4096, d 576, n 4608, fp32 measured:
  * the matmul into a fresh (batch, n) tensor 129 ms, into a reused one 112 ms: the 17 ms
    difference is page faults. glibc serves a 75 MB allocation with mmap and unmaps it on free,
    so every step touches 18k fresh pages (torch has no caching allocator on CPU);
  * torch.topk(k=32) over (4096, 4608) 29.5 ms; `grouped_topk` below 22.6 ms, same values.
On CUDA the buffer does not apply (the caching allocator reuses blocks); the grouped top-k
does, with larger groups (_GROUP_CUDA).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

# Group size of grouped_topk: 8 measured best of {4, 8, 16, 32} at n 4608, k 32 (28.5, 22.6,
# 24.5, 42.7 ms): smaller groups leave many group maxima to select from, larger ones many
# candidates to gather.
_GROUP = 8
# On CUDA (H100, bf16, batch 4096, k 32; docs/kernels.md): torch.topk over n = 131072 took
# 3.89 ms, groups of 8/16/32/64/128 1.27/1.02/0.95/1.05/1.36 ms; over n = 2^20 35.1 ms against
# 8.62/6.11/4.95/4.94/4.74 ms. 0 would mean torch.topk over all n.
_GROUP_CUDA = 32

_local = threading.local()  # one buffer per thread: bank members of one thread share it


def preact_buffer(batch: int, n: int, like: torch.Tensor) -> torch.Tensor | None:
    """A (batch, n) buffer of like's dtype, reused across calls on CPU, or None off the CPU
    (where torch.addmm's own allocation is already cached).

    The caller must be done with the previous buffer before asking again: TopKEncode's forward
    is (the pre-activations never leave it). The buffer only grows, to the largest batch * n
    seen in this thread (release_buffers() frees it).
    """
    if like.device.type != "cpu":
        return None
    key = like.dtype
    buffers: dict[torch.dtype, torch.Tensor] = getattr(_local, "buffers", None) or {}
    flat = buffers.get(key)
    if flat is None or flat.numel() < batch * n:
        flat = torch.empty(batch * n, dtype=like.dtype)
        buffers[key] = flat
        _local.buffers = buffers
    return flat[:batch * n].view(batch, n)


def release_buffers() -> None:
    """Free this thread's pre-activation buffers (e.g. after evaluating with a huge batch)."""
    _local.buffers = {}


def grouped_topk(pre: torch.Tensor, k: int, group: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries of each row of pre (batch, n), unsorted:
    the same values as torch.topk (indices may differ only among equal values).

    Columns are split into m = n / g strided groups {c, c + m, ..., c + (g-1)m}. The top-k
    elements of a row lie in the k groups with the largest maxima: a group holding one of them
    has a maximum >= the k-th largest value v_k, and at most k groups can (each such maximum is a
    distinct element >= v_k). So torch.topk runs over the m group maxima (an elementwise max of g
    contiguous slices, vectorised) and then over the k·g candidates, instead of over n.
    g is `group`, else _GROUP on the CPU and _GROUP_CUDA elsewhere. Falls back to torch.topk
    where that does not pay (g <= 1, n not a multiple of g, or fewer than 4k groups).
    """
    batch, n = pre.shape
    g = group or (_GROUP if pre.device.type == "cpu" else _GROUP_CUDA)
    m = n // max(g, 1)
    if g <= 1 or n % g or m < 4 * k or not pre.is_contiguous():
        return pre.topk(k, dim=-1, sorted=False)
    group_max = pre.view(batch, g, m).amax(1)  # (batch, m)
    _, groups = group_max.topk(k, dim=-1, sorted=False)  # (batch, k)
    offsets = torch.arange(0, n, m, device=pre.device)  # (g,)
    cols = (groups.unsqueeze(-1) + offsets).view(batch, k * g)  # (batch, k·g) candidates
    values, pos = pre.gather(1, cols).topk(k, dim=-1, sorted=False)  # (batch, k)
    return values, cols.gather(1, pos)


def screen_supported(device: torch.device) -> bool:
    """Whether auto turns the bf16 screen on for `device`: CPUs with AVX512-BF16 or AMX, where
    oneDNN's bf16 GEMM is native (measured 1.9x fp32's speed on an AVX512-BF16 AMD EPYC). Other
    CPUs emulate bf16 and GPUs have not been measured, so auto leaves it off there."""
    if device.type != "cpu":
        return False
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def screened_topk(x_c: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int,
                  margin: int, gather_dot: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k of pre = x_c @ W_enc + b_enc (values before ReLU, indices: (batch, k)) found by
    a bf16 screen: the k + margin largest of a bf16 GEMM are the candidates, and their exact
    fp32 pre-activations (one dot product each, `gather_dot`) pick the k.

    bf16 keeps 8 significant bits, so a latent near a row's k-th value may swap places with its
    neighbours in the screen; re-ranking the exact values of k + margin candidates puts it back
    unless a true top-k latent fell below the screen's (k + margin)-th, which the margin makes
    rare (scripts/bench_screen.py counts the rows that differ from the exact fp32 selection).
    The values are the fp32 dot products, not the bf16 ones: the loss and every gradient are
    computed as without the screen. x_c (batch, d), W_enc (d, n), b_enc (n,).
    """
    batch, n = x_c.shape[0], W_enc.shape[1]
    xb = x_c.to(torch.bfloat16)
    buf = preact_buffer(batch, n, xb)  # (batch, n) bf16, reused on CPU
    pre = torch.addmm(b_enc.to(torch.bfloat16), xb, W_enc.to(torch.bfloat16), out=buf)
    _, cand = grouped_topk(pre, k + margin)  # (batch, k + margin)
    exact = gather_dot(x_c, W_enc.t().contiguous(), cand) + b_enc[cand]  # (batch, k+margin)
    values, pos = exact.topk(k, dim=-1, sorted=False)  # (batch, k)
    return values, cand.gather(1, pos)
