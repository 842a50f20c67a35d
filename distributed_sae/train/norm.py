"""Input normalisation: the scale that brings a hook's mean squared norm to d_in, and outliers.

Inputs are scaled so that their mean squared norm is d_in, which makes one learning rate fit
every model and hook; the scale is folded back into the weights when a member is saved, so
saved SAEs act on raw activations. A bank over several hooks has one InputNorm per hook.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from distributed_sae.config import RunConfig
from distributed_sae.store import ActivationStore

log = logging.getLogger(__name__)

SAMPLE_CHUNKS = 64  # chunks read, evenly spaced, to set the outlier threshold and the scale


def input_scale(store: ActivationStore, hook: str) -> tuple[float, torch.Tensor]:
    """Scale that brings the mean squared norm to d_in, and the scaled mean (b_dec's start), from
    the store's statistics (every row but special tokens)."""
    stats = store.stats(hook)
    scale = math.sqrt(store.d(hook) / stats["mean_sq_norm"])
    return scale, torch.as_tensor(stats["mean"], dtype=torch.float32) * scale


@dataclass(frozen=True)
class InputNorm:
    """How training rows are prepared: rows whose raw norm exceeds max_norm are dropped (None:
    none), the rest are multiplied by scale; mean is the scaled mean of the rows (b_dec's start)."""

    scale: float
    mean: torch.Tensor  # (d_in,)
    max_norm: float | None = None


def input_norm(cfg: RunConfig, store: ActivationStore, rows: range,
               hook: str | None = None) -> InputNorm:
    """The scale that brings the mean squared norm of training rows of `hook` (default: the
    bank's one hook) to d_in.

    Without an outlier threshold it comes from the store's statistics (every row). With
    train.outlier_norm_ratio, from SAMPLE_CHUNKS chunks spread over `rows` (special tokens
    dropped): the threshold is that ratio times their median norm, and the scale and mean are
    those of the rows under it. A pure function of the store and the config, so a resumed job
    gets the same numbers.
    """
    hook = hook if hook is not None else cfg.sae_hook
    ratio = cfg.train.outlier_norm_ratio
    if not ratio:
        return InputNorm(*input_scale(store, hook))
    starts = list(range(rows.start, rows.stop, store.chunk_rows))
    picks = np.unique(np.linspace(0, len(starts) - 1, min(SAMPLE_CHUNKS, len(starts))).astype(int))
    exclude = store.metadata["exclude_token_ids"]
    parts = []
    for s in (starts[i] for i in picks):
        e = min(s + store.chunk_rows, rows.stop)
        keep = ~np.isin(np.asarray(store.tokens(s, e)), exclude)
        parts.append(store.read(hook, s, e)[torch.from_numpy(keep)])
    x = torch.cat(parts)  # (sampled rows, d_in) float32, raw
    norms = x.norm(dim=1)  # (sampled rows,)
    max_norm = ratio * float(norms.median())
    kept = x[norms <= max_norm]
    scale = math.sqrt(store.d(hook) / float(kept.pow(2).sum(1).mean()))
    log.info("outliers: rows with norm > %.4g (%.3g x the median) dropped: %.3f%% of %d sampled "
             "rows; input scale %.4g (store statistics, every row: %.4g)", max_norm, ratio,
             100 * (1 - len(kept) / len(x)), len(x), scale, input_scale(store, hook)[0])
    return InputNorm(scale, kept.mean(0) * scale, max_norm)


def input_norms(cfg: RunConfig, store: ActivationStore, rows: range) -> dict[str, InputNorm]:
    """One InputNorm per hook of the bank."""
    return {hook: input_norm(cfg, store, rows, hook) for hook in cfg.sae_hooks}
