"""The one dispatch point between the SAE kinds and the sparse kernels.

Backends, chosen per call from the tensors' device and `DSAE_KERNELS` (or `use_backend`):
    auto    (default) triton on CUDA tensors when triton imports, else the pure-torch path
    torch   the pure-torch sparse path everywhere (embedding_bag): CPU default,
            and a debugging path on GPU
    triton  the Triton kernels everywhere (on CPU tensors only under TRITON_INTERPRET=1)
    dense   the dense references: (batch, n) activations and plain autograd (comparisons)
triton is imported lazily the first time the triton backend is chosen, so the package works
without it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from types import ModuleType
from typing import Iterator, NamedTuple

import torch

from distributed_sae.kernels import torch_sparse
from distributed_sae.kernels.autograd import SparseDecode, TopKEncode
from distributed_sae.kernels.reference import dense_codes, topk_encode_reference

log = logging.getLogger(__name__)

ENV_VAR = "DSAE_KERNELS"
BACKENDS = ("auto", "torch", "triton", "dense")
_override: str | None = None
_triton_module: ModuleType | None = None
_triton_error: str | None = None


class TopKCode(NamedTuple):
    """What topk_encode returns; aux_* are None without AuxK."""

    values: torch.Tensor  # (batch, k) after ReLU
    indices: torch.Tensor  # (batch, k) int64
    aux_values: torch.Tensor | None  # (batch, k_aux) after ReLU
    aux_indices: torch.Tensor | None  # (batch, k_aux)


def requested_backend() -> str:
    """The backend asked for: use_backend's, else $DSAE_KERNELS, else 'auto'."""
    name = _override or os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} must be one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside the block (tests, benchmarks); wins over $DSAE_KERNELS."""
    global _override
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} must be one of {BACKENDS}")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous


def triton_available() -> bool:
    """Whether the Triton kernels import (triton installed and importable)."""
    return _load_triton() is not None


def _load_triton() -> ModuleType | None:
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        try:
            _triton_module = importlib.import_module("distributed_sae.kernels.triton_sparse")
        except ImportError as err:  # triton absent: the torch path serves every device
            _triton_error = str(err)
            log.info("triton kernels unavailable (%s): using the torch sparse path", err)
    return _triton_module


def backend_for(device: torch.device) -> str:
    """The backend a call on `device` uses: 'triton', 'torch' or 'dense'."""
    name = requested_backend()
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if _load_triton() is None:
            raise RuntimeError(f"{ENV_VAR}=triton but triton does not import: {_triton_error}")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"{ENV_VAR}=triton on {device} tensors needs TRITON_INTERPRET=1")
    return name


def _ops(device: torch.device) -> ModuleType | None:
    name = backend_for(device)
    if name == "dense":
        return None
    return _load_triton() if name == "triton" else torch_sparse


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """bias + sum_j values[:, j] * weight[indices[:, j]]: the decoder from top-k codes.

    values (batch, k), indices (batch, k) int64, weight (n, d), bias (d,) or None -> (batch, d),
    differentiable in values, weight and bias; repeated indices within a row add.
    """
    ops = _ops(weight.device)
    if ops is None:
        out = dense_codes(values, indices, weight.shape[0]) @ weight  # (batch, d)
        return out if bias is None else out + bias
    return SparseDecode.apply(values, indices, weight, bias, ops)


def topk_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                k: int, dead: torch.Tensor | None = None, k_aux: int = 0,
                screen: int = 0) -> TopKCode:
    """The TopK encoder as (values, indices) plus AuxK's selection among `dead` latents.

    x (batch, d), W_enc (d, n), b_enc (n,), b_dec (d,), dead (n,) bool; k_aux > 0 with `dead`
    also returns the top k_aux pre-activations among dead latents. Differentiable in x, W_enc,
    b_enc, b_dec through the values; the backward is sparse (never (batch, n)). screen > 0
    selects through a bf16 GEMM and re-ranks k + screen candidates by their exact fp32 values
    (select.screened_topk; the sparse backends only, and not while AuxK's codes are asked for).
    """
    ops = _ops(W_enc.device)
    if ops is None:
        return TopKCode(*topk_encode_reference(x, W_enc, b_enc, b_dec, k, dead, k_aux))
    values, indices, aux_v, aux_i = TopKEncode.apply(x, W_enc, b_enc, b_dec, k, dead, k_aux, ops,
                                                     screen)
    if aux_i.shape[1] == 0:
        return TopKCode(values, indices, None, None)
    return TopKCode(values, indices, aux_v, aux_i)
