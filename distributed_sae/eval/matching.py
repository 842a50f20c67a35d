"""Matching the features of two SAEs: feature splitting across widths, and universality.

* Feature splitting (decoder geometry): for each feature of a small SAE, the features of a larger
  SAE on the same hook whose decoder rows have cosine similarity > threshold with its own. A
  feature with >= 2 such children has split. No data needed.
* Universality (behaviour): Pearson correlation of the two SAEs' feature activations over the
  same tokens, streamed. The (d_a, d_b) matrix of sums of products is accumulated in float64 for
  at most `max_pairs` entries at a time (default 2^26 = 512 MB): B's features are cut into chunks
  of max_pairs // d_a columns and the data is read once per chunk (d_a = d_b = 8192: one pass;
  16384: four passes). Each B feature sees every A feature within its chunk, so both directions'
  maxima are exact.
A feature that never varies on the tokens (dead) has no correlation: left out of the means,
None in the per-feature lists.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable

import torch
from torch import Tensor

from distributed_sae.sae.base import SparseAutoencoder

log = logging.getLogger(__name__)


def _unit_rows(w: Tensor) -> Tensor:
    """(d_sae, d_in) decoder -> rows scaled to unit norm, float32 on the CPU."""
    w = w.detach().float().cpu()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def feature_splitting(small: SparseAutoencoder, large: SparseAutoencoder, threshold: float = 0.5,
                      chunk: int = 1024) -> dict[str, Any]:
    """Match each feature of `small` to the features of `large` by decoder cosine similarity.

    Returns mean_max_cosine (small -> large) and mean_max_cosine_large (large -> small),
    split_fraction (small features with >= 2 children above threshold), matched_fraction
    (>= 1), and per small feature: index, best (index in large), best_cosine and children
    [[index in large, cosine], ...] with cosine > threshold, highest first.
    """
    if small.d_in != large.d_in:
        raise ValueError(f"the SAEs read different widths (d_in {small.d_in} and {large.d_in}): "
                         f"compare SAEs of the same hook")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold} must be a cosine in [-1, 1], e.g. 0.5")
    a, b = _unit_rows(small.W_dec), _unit_rows(large.W_dec)  # (d_s, d_in), (d_l, d_in)
    best_large = torch.full((b.shape[0],), -1.0)  # (d_l,) max cosine to any small feature
    features = []
    for s in range(0, a.shape[0], chunk):
        cos = a[s:s + chunk] @ b.T  # (chunk, d_l)
        best_large = torch.maximum(best_large, cos.max(0).values)
        values, index = cos.max(1)
        for r, row in enumerate(cos):
            above = (row > threshold).nonzero().squeeze(1)
            order = above[row[above].argsort(descending=True)]
            features.append({"index": s + r, "best": int(index[r]),
                             "best_cosine": float(values[r]),
                             "children": [[int(j), float(row[j])] for j in order]})
    n_children = torch.tensor([len(f["children"]) for f in features])
    return {
        "d_small": small.d_sae, "d_large": large.d_sae, "threshold": threshold,
        "mean_max_cosine": float(torch.tensor([f["best_cosine"] for f in features]).mean()),
        "mean_max_cosine_large": float(best_large.mean()),
        "split_fraction": float((n_children >= 2).float().mean()),
        "matched_fraction": float((n_children >= 1).float().mean()),
        "features": features,
    }


def _pairs(batches: Iterable[Any]) -> Iterable[tuple[Tensor, Tensor]]:
    """Items are x (same hook for both SAEs) or (x_a, x_b) (two hooks, same tokens)."""
    for item in batches:
        yield (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, item)


def _encode(sae: SparseAutoencoder, x: Tensor) -> Tensor:
    w = sae.W_dec
    return sae.encode(x.to(device=w.device, dtype=w.dtype)).double().cpu()  # (B, d_sae)


def _correlation_chunk(sae_a: SparseAutoencoder, sae_b: SparseAutoencoder,
                       batches: Iterable[Any], cols: slice) -> tuple[Tensor, int]:
    """Pearson correlation (d_a, len(cols)) of A's features with B's features `cols`."""
    d_a, c = sae_a.d_sae, len(range(sae_b.d_sae)[cols])
    sa, sa2 = torch.zeros(d_a, dtype=torch.float64), torch.zeros(d_a, dtype=torch.float64)
    sb, sb2 = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    sab = torch.zeros(d_a, c, dtype=torch.float64)  # sums of products, the bounded (d_a, c) part
    n = 0
    for xa, xb in _pairs(batches):
        fa, fb = _encode(sae_a, xa), _encode(sae_b, xb)[:, cols]  # (B, d_a), (B, c)
        if fa.shape[0] != fb.shape[0]:
            raise ValueError(f"batches for A and B hold {fa.shape[0]} and {fb.shape[0]} rows: "
                             f"they must be the same tokens")
        n += fa.shape[0]
        sa += fa.sum(0)
        sa2 += fa.pow(2).sum(0)
        sb += fb.sum(0)
        sb2 += fb.pow(2).sum(0)
        sab += fa.T @ fb  # (d_a, c)
    if n < 2:
        raise ValueError(f"{n} token(s) in the batches: correlations need at least 2")
    ma, mb = sa / n, sb / n
    cov = sab / n - ma[:, None] * mb[None, :]
    std_a = (sa2 / n - ma.pow(2)).clamp_min(0).sqrt()  # (d_a,)
    std_b = (sb2 / n - mb.pow(2)).clamp_min(0).sqrt()
    denom = std_a[:, None] * std_b[None, :]
    # Dead features (std 0) get NaN, which the callers treat as "no correlation".
    corr = torch.where(denom > 1e-12, cov / denom.clamp_min(1e-300), torch.nan)
    return corr.clamp(-1.0, 1.0), n


def _finite_or_none(values: Tensor) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values.tolist()]


@torch.no_grad()
def activation_correlation(sae_a: SparseAutoencoder, sae_b: SparseAutoencoder,
                           batches: Iterable[Any], max_pairs: int = 1 << 26) -> dict[str, Any]:
    """Universality: how well each feature of A is matched by one of B on the same tokens.

    batches: raw activations (B, d_in) for both, or pairs (x_a, x_b) of the same tokens; it must
    be re-iterable (a list, an ActivationReader with shuffle=False) when d_a * d_b > max_pairs.
    Returns mean_max_corr_a (mean over live A features of the max correlation with B),
    mean_max_corr_b (the same from B), n_tokens, live_a, live_b, and per feature max_corr_a,
    best_b_for_a, max_corr_b, best_a_for_b (None / -1 for dead features).
    """
    chunk = max(1, max_pairs // sae_a.d_sae)
    n_chunks = -(-sae_b.d_sae // chunk)
    if n_chunks > 1 and iter(batches) is batches:
        raise ValueError(f"d_a * d_b = {sae_a.d_sae * sae_b.d_sae} > max_pairs={max_pairs} needs "
                         f"{n_chunks} passes over the data, but `batches` is a one-shot "
                         f"iterator: pass a list or a reader, or raise max_pairs")
    best_a = torch.full((sae_a.d_sae,), torch.nan, dtype=torch.float64)
    arg_a = torch.full((sae_a.d_sae,), -1, dtype=torch.long)
    best_b, arg_b = [], []
    n = 0
    for s in range(0, sae_b.d_sae, chunk):
        if n_chunks > 1:
            log.info("correlation chunk %d/%d", s // chunk + 1, n_chunks)
        corr, n = _correlation_chunk(sae_a, sae_b, batches, slice(s, s + chunk))  # (d_a, c)
        filled = corr.nan_to_num(-math.inf)
        v, i = filled.max(1)  # best of this chunk for each A feature
        better = v > best_a.nan_to_num(-math.inf)
        best_a = torch.where(better, v, best_a)
        arg_a = torch.where(better, i + s, arg_a)
        v, i = filled.max(0)
        best_b.append(torch.where(torch.isinf(v), torch.nan, v))
        arg_b.append(torch.where(torch.isinf(v), -1, i))
    max_b, best_a_for_b = torch.cat(best_b), torch.cat(arg_b)
    live_a, live_b = ~best_a.isnan(), ~max_b.isnan()
    return {
        "n_tokens": n, "live_a": int(live_a.sum()), "live_b": int(live_b.sum()),
        "mean_max_corr_a": float(best_a[live_a].mean()) if live_a.any() else float("nan"),
        "mean_max_corr_b": float(max_b[live_b].mean()) if live_b.any() else float("nan"),
        "max_corr_a": _finite_or_none(best_a), "best_b_for_a": arg_a.tolist(),
        "max_corr_b": _finite_or_none(max_b), "best_a_for_b": best_a_for_b.tolist(),
    }
