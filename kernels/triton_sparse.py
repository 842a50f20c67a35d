"""Triton kernels for the sparse SAE ops, with launchers of the same signatures as
torch_sparse.py. Imported only when the triton backend is chosen (dispatch.py), so the package
works without triton. Loads upcast to fp32 and every sum accumulates in fp32 (fp32/fp16/bf16).

  _decode_kernel       out[b] = bias + sum_j v[b,j] W[idx[b,j]]      grid (batch/BB, d/BD)
  _gather_dot_kernel   out[b,j] = g[b] . W[idx[b,j]]                  grid (batch*k/BR)
  _segment_tile_kernel out[i] = sum_{idx[b,j]=i} s[b,j] src[b]        grid (n/BL, d/BD)
  _segment_rows_kernel the same, latents one after another (the fallback)
The last two read the pairs sorted by latent (a stable sort + searchsorted), so each output row
is summed by one program in a fixed order: no atomics, deterministic, and its rows are written
exactly once (rows of unselected latents are written as zeros, which a dense gradient needs).

Tile sizes live in CONFIG (one dict per kernel), so scripts/bench_kernels.py can sweep them on a
GPU and set the defaults below from what it measured; under TRITON_INTERPRET=1 (the CPU tests)
each program is a numpy call, so INTERPRET_CONFIG uses large tiles there. Pointer offsets that can
pass 2^31 elements (n·d at n = 2^20, d = 4096 is 2^32) are computed in int64.
"""

from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

log = logging.getLogger(__name__)


# Tile sizes of each kernel on a GPU, each the fastest of the sweep in scripts/bench_kernels.py
# on an H100 (bf16, batch 4096, n 131072, d 4096, k 32; docs/kernels.md): decode 0.368 ms and
# gather_dot 0.349 ms, both at the copy bandwidth; segment_tile 0.82 ms (grad W_dec, (n, d)) and
# 0.90 ms (grad W_enc, (d, n)). BLOCK_D is capped at next_power_of_2(d) per call.
CONFIG: dict[str, dict[str, int]] = {
    "decode": dict(BLOCK_B=16, BLOCK_D=128, num_warps=4),
    "gather_dot": dict(BLOCK_R=32, BLOCK_D=128, num_warps=4),
    # LATENTS: latents summed one after another by each program (fewer, longer programs when the
    # average latent has ~1 pair, as at batch 4096, k 32, n 131072): 3.7 ms, 14.8 ms at
    # 16 pairs x 128 columns x 1 latent.
    "segment_rows": dict(BLOCK_P=4, BLOCK_D=512, LATENTS=4, num_warps=4),
    # The only tile of 8 tried that Triton 3.6 compiles for this kernel (see _segment_tile_kernel).
    "segment_tile": dict(BLOCK_L=16, BLOCK_D=256, num_warps=4),
}
# Which kernel segment_rows launches: "rows" (_segment_rows_kernel) or "tile".
SEGMENT_KERNEL = "tile"
# Under the interpreter a program costs ~a numpy call whatever its size: big tiles, few programs.
INTERPRET_CONFIG: dict[str, dict[str, int]] = {
    "decode": dict(BLOCK_B=64, BLOCK_D=256, num_warps=4),
    "gather_dot": dict(BLOCK_R=128, BLOCK_D=256, num_warps=4),
    "segment_rows": dict(BLOCK_P=64, BLOCK_D=256, LATENTS=1, num_warps=4),
    "segment_tile": dict(BLOCK_L=16, BLOCK_D=256, num_warps=4),
}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tile_table() -> dict[str, dict[str, int]]:
    """The table of tile sizes in force (CONFIG, or INTERPRET_CONFIG under the interpreter)."""
    return INTERPRET_CONFIG if _interpreting() else CONFIG


def _config(kernel: str, d: int) -> dict[str, int]:
    """The tile sizes of `kernel` for rows of width d (BLOCK_D no wider than d needs)."""
    cfg = dict(tile_table()[kernel])
    cfg["BLOCK_D"] = min(cfg["BLOCK_D"], triton.next_power_of_2(d))
    return cfg


@triton.jit
def _decode_kernel(v_ptr, idx_ptr, w_ptr, b_ptr, out_ptr, B, D, K, stride_wn, stride_wd,
                   HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BB,)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BD,)
    rm, cm = rows < B, cols < D
    cols64 = cols.to(tl.int64)  # W may be W_enc^T: stride_wd = n, cols * n can pass 2^31
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for j in range(0, K):
        idx = tl.load(idx_ptr + rows * K + j, mask=rm, other=0).to(tl.int64)  # (BB,)
        v = tl.load(v_ptr + rows * K + j, mask=rm, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + idx[:, None] * stride_wn + cols64[None, :] * stride_wd,
                    mask=rm[:, None] & cm[None, :], other=0.0).to(tl.float32)  # (BB, BD)
        acc += v[:, None] * w
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rm[:, None] & cm[None, :])


@triton.jit
def _gather_dot_kernel(g_ptr, idx_ptr, w_ptr, out_ptr, R, K, D, stride_wn, stride_wd,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,) flat (token, slot) pairs
    rm = r < R
    tok = r // K
    idx = tl.load(idx_ptr + r, mask=rm, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = rm[:, None] & (cols < D)[None, :]
        g = tl.load(g_ptr + tok[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + idx[:, None] * stride_wn + cols[None, :].to(tl.int64) * stride_wd,
                    mask=m, other=0.0).to(tl.float32)  # (BR, BD)
        acc += tl.sum(g * w, axis=1)
    tl.store(out_ptr + r, acc.to(out_ptr.dtype.element_ty), mask=rm)


@triton.jit
def _segment_rows_kernel(order_ptr, seg_ptr, s_ptr, src_ptr, out_ptr, sums_ptr, N, K, D,
                         WITH_SUMS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                         LATENTS: tl.constexpr):
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = cols < D
    for li in range(0, LATENTS):
        i = tl.program_id(0) * LATENTS + li  # latent
        valid = i < N
        start = tl.load(seg_ptr + i, mask=valid, other=0)
        end = tl.load(seg_ptr + i + 1, mask=valid, other=0)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        ssum = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for p0 in range(start, end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            pm = p < end
            pair = tl.load(order_ptr + p, mask=pm, other=0)  # (BP,) flat pair ids of latent i
            s = tl.load(s_ptr + pair, mask=pm, other=0.0).to(tl.float32)
            tok = (pair // K).to(tl.int64)
            x = tl.load(src_ptr + tok[:, None] * D + cols[None, :],
                        mask=pm[:, None] & cm[None, :], other=0.0).to(tl.float32)  # (BP, BD)
            acc += tl.sum(s[:, None] * x, axis=0)
            ssum += s
        if valid:  # the last program's trailing latents (n not a multiple of LATENTS)
            tl.store(out_ptr + i.to(tl.int64) * D + cols, acc.to(out_ptr.dtype.element_ty),
                     mask=cm)
            if WITH_SUMS:
                if tl.program_id(1) == 0:
                    tl.store(sums_ptr + i, tl.sum(ssum, axis=0))


@triton.jit
def _segment_tile_kernel(tok_ptr, sc_ptr, seg_ptr, steps_ptr, src_ptr, out_ptr, sums_ptr, N, D,
                         stride_on, stride_od, WITH_SUMS: tl.constexpr, BLOCK_L: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """BLOCK_L latents side by side, one pair of each per step: BLOCK_L independent row loads in
    flight per step instead of one latent's chain of dependent loads. tok_ptr / sc_ptr hold the
    token and scale of each pair in latent order, gathered on the host side, so a step's chain
    is position -> token -> row (skewed latents on an H100: 1.86 ms against 2.02 ms through the
    pair ids). steps_ptr holds each program's largest pair count, computed on the host: with
    an in-kernel max Triton 3.6's layout pass compiled this kernel at no tile size, and even
    now it compiles only at (16, 256, 4 warps) of 8 tried (docs/kernels.md). out is written
    through its strides, so grad W_enc's (d, n) layout needs no transposing copy."""
    lat = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)  # (BL,)
    lm = lat < N
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BD,)
    cm = cols < D
    start = tl.load(seg_ptr + lat, mask=lm, other=0)
    end = tl.load(seg_ptr + lat + 1, mask=lm, other=0)
    steps = tl.load(steps_ptr + tl.program_id(0))
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    ssum = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for t in range(0, steps):
        p = start + t  # (BL,) the t-th pair of each latent
        pm = p < end
        tok = tl.load(tok_ptr + p, mask=pm, other=0)
        s = tl.load(sc_ptr + p, mask=pm, other=0.0).to(tl.float32)
        x = tl.load(src_ptr + tok[:, None] * D + cols[None, :], mask=pm[:, None] & cm[None, :],
                    other=0.0).to(tl.float32)  # (BL, BD)
        acc += s[:, None] * x
        ssum += s
    off = lat.to(tl.int64)[:, None] * stride_on + cols.to(tl.int64)[None, :] * stride_od
    tl.store(out_ptr + off, acc.to(out_ptr.dtype.element_ty), mask=lm[:, None] & cm[None, :])
    if WITH_SUMS:
        if tl.program_id(1) == 0:
            tl.store(sums_ptr + lat, ssum, mask=lm)


@triton.jit
def _transpose_kernel(src_ptr, out_ptr, R, C, BLOCK: tl.constexpr):
    """out (C, R) = src (R, C)^T, both contiguous, one BLOCK x BLOCK tile per program."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = (rows < R)[:, None] & (cols < C)[None, :]
    tile = tl.load(src_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=m)
    tl.store(out_ptr + cols.to(tl.int64)[None, :] * R + rows[:, None], tile, mask=m)


def transpose(src: torch.Tensor) -> torch.Tensor:
    """src (R, C) contiguous -> (C, R) contiguous. torch's copy of a transposed bf16 view moved
    1 GiB in 4.5 ms on an H100 (~0.45 TB/s): a tiled copy is bound by the 3 TB/s instead."""
    r, c = src.shape
    out = torch.empty(c, r, dtype=src.dtype, device=src.device)
    block = 64
    _transpose_kernel[(triton.cdiv(r, block), triton.cdiv(c, block))](src, out, r, c, BLOCK=block)
    return out


def decode_rows(values: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """values (batch, k), indices (batch, k), weight (n, d) any strides -> (batch, d)."""
    batch, k = indices.shape
    d = weight.shape[1]
    out = torch.empty(batch, d, dtype=weight.dtype, device=weight.device)
    cfg = _config("decode", d)
    grid = (triton.cdiv(batch, cfg["BLOCK_B"]), triton.cdiv(d, cfg["BLOCK_D"]))
    _decode_kernel[grid](values.contiguous(), indices.contiguous(), weight,
                         bias if bias is not None else out, out, batch, d, k,
                         weight.stride(0), weight.stride(1), HAS_BIAS=bias is not None, **cfg)
    return out


def gather_dot(grad: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """grad (batch, d), weight (n, d), indices (batch, k) -> (batch, k) in grad's dtype."""
    batch, k = indices.shape
    d = weight.shape[1]
    out = torch.empty(batch, k, dtype=grad.dtype, device=grad.device)
    cfg = _config("gather_dot", d)
    grid = (triton.cdiv(batch * k, cfg["BLOCK_R"]),)
    _gather_dot_kernel[grid](grad.contiguous(), indices.contiguous(), weight, out, batch * k, k,
                             d, weight.stride(0), weight.stride(1), **cfg)
    return out


_TILE_FAILED = False


def _tile_failed(err: RuntimeError) -> None:
    global _TILE_FAILED
    _TILE_FAILED = True
    log.warning("the latent-tile segment kernel did not compile (%s); using the per-latent one",
                str(err).splitlines()[0][:200])


def _segment_tile(order: torch.Tensor, seg: torch.Tensor, scales: torch.Tensor,
                  src: torch.Tensor, n: int, k: int, sums: torch.Tensor | None,
                  transposed: bool) -> torch.Tensor:
    d = src.shape[1]
    cfg = _config("segment_tile", d)
    bl = cfg["BLOCK_L"]
    counts = torch.diff(seg)  # (n,) pairs per latent
    steps = torch.nn.functional.pad(counts, (0, -n % bl)).view(-1, bl).amax(1)  # (n / bl,)
    tok = order // k  # (batch * k,) token of each pair, latent order
    sc = scales.reshape(-1)[order]  # (batch * k,) its scale
    out = torch.empty((d, n) if transposed else (n, d), dtype=src.dtype, device=src.device)
    strides = (1, n) if transposed else (d, 1)  # (latent, column) strides of out
    grid = (triton.cdiv(n, bl), triton.cdiv(d, cfg["BLOCK_D"]))
    _segment_tile_kernel[grid](tok, sc, seg, steps, src.contiguous(), out,
                               sums if sums is not None else out, n, d, *strides,
                               WITH_SUMS=sums is not None, **cfg)
    return out


def latent_csr(indices: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """indices (batch, k) -> (order (batch * k,): flat pair ids grouped by latent, token order
    kept; seg (n + 1,): CSR offsets, the pairs of latent i are order[seg[i]:seg[i + 1]])."""
    keys, order = torch.sort(indices.reshape(-1), stable=True)
    # seg[i] = pairs with a latent < i. torch.bincount would do it too, but on CUDA it reads
    # its input's max back to the host, a sync per call.
    return order, torch.searchsorted(keys, torch.arange(n + 1, device=indices.device))


def segment_rows(indices: torch.Tensor, scales: torch.Tensor, src: torch.Tensor, n: int,
                 with_sums: bool = False, transposed: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """indices, scales (batch, k), src (batch, d) -> ((n, d) in src's dtype, or (d, n) with
    `transposed`; (n,) fp32 or None)."""
    k = indices.shape[1]
    d = src.shape[1]
    order, seg = latent_csr(indices, n)
    sums = torch.empty(n, dtype=torch.float32, device=src.device) if with_sums else None
    if SEGMENT_KERNEL == "tile" and not _TILE_FAILED:
        try:
            return _segment_tile(order, seg, scales, src, n, k, sums, transposed), sums
        except RuntimeError as err:  # a Triton that cannot compile it: the per-latent kernel
            _tile_failed(err)
    cfg = _config("segment_rows", d)
    out = torch.empty(n, d, dtype=src.dtype, device=src.device)
    grid = (triton.cdiv(n, cfg["LATENTS"]), triton.cdiv(d, cfg["BLOCK_D"]))
    _segment_rows_kernel[grid](order, seg, scales.contiguous(), src.contiguous(), out,
                               sums if sums is not None else out, n, k, d, WITH_SUMS=with_sums,
                               **cfg)
    return (transpose(out) if transposed else out), sums
