"""Sparse kernels for the TopK SAE matmuls, installed as `distributed_sae.kernels`.

Only k of n latents are non-zero per token, so the decoder and most of the backward pass are
O(batch·k·d) instead of O(batch·n·d). One dispatch point (dispatch.py) serves the SAE kinds:

    topk_encode(x, W_enc, b_enc, b_dec, k, dead=None, k_aux=0) -> TopKCode
    sparse_decode(values, indices, W_dec, b_dec=None) -> (batch, d)
    use_backend("torch" | "triton" | "dense" | "auto"), or DSAE_KERNELS=... in the environment
    topk_encode(..., screen=m): a bf16 GEMM screens k + m candidates, exact fp32 values pick k

Backends: Triton kernels on CUDA tensors (triton_sparse.py, imported lazily), the pure-torch
sparse path on CPU (torch_sparse.py), dense references (reference.py). Design and measured
numbers: docs/kernels.md.
"""

from distributed_sae.kernels.dispatch import (
    BACKENDS, ENV_VAR, TopKCode, backend_for, requested_backend, sparse_decode, topk_encode,
    triton_available, use_backend,
)
from distributed_sae.kernels.select import screen_supported

__all__ = ["BACKENDS", "ENV_VAR", "TopKCode", "backend_for", "requested_backend",
           "screen_supported", "sparse_decode", "topk_encode", "triton_available", "use_backend"]
