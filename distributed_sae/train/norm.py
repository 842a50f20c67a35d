"""Input normalisation: the scale that brings a hook's mean squared norm to d_in, and outliers.

Inputs are scaled so that their mean squared norm is d_in, which makes one learning rate fit
every model and hook; the scale is folded back into the weights when a member is saved, so
saved SAEs act on raw activations. A bank over several hooks has one InputNorm per hook.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from distributed_sae.config import RunConfig
from distributed_sae.sae import MemberSpec
from distributed_sae.store import ActivationStore

log = logging.getLogger(__name__)

SAMPLE_CHUNKS = 64  # chunks read, evenly spaced, to set the outlier threshold and the scale


def input_scale(store: ActivationStore, hook: str, units: Sequence[int] | None = None
                ) -> tuple[float, torch.Tensor]:
    """Scale that brings the mean squared norm to d_in, and the scaled mean (b_dec's start), from
    the store's statistics (every row but special tokens; of `units` only, when given: a streamed
    run's first units, train/stream_source.py)."""
    stats = store.stats(hook, units)
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
               hook: str | None = None, units: Sequence[int] | None = None) -> InputNorm:
    """The scale that brings the mean squared norm of training rows of `hook` (default: the
    bank's one hook) to d_in.

    Without an outlier threshold it comes from the store's statistics (every row). With
    train.outlier_norm_ratio, from SAMPLE_CHUNKS chunks spread over `rows` (special tokens
    dropped): the threshold is that ratio times their median norm, and the scale and mean are
    those of the rows under it. A pure function of the store and the config, so a resumed job
    gets the same numbers. `units`: the statistics of those units only (see input_scale).
    """
    hook = hook if hook is not None else cfg.sae_hook
    ratio = cfg.train.outlier_norm_ratio
    if not ratio:
        return InputNorm(*input_scale(store, hook, units))
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
             100 * (1 - len(kept) / len(x)), len(x), scale, input_scale(store, hook, units)[0])
    return InputNorm(scale, kept.mean(0) * scale, max_norm)


def input_norms(cfg: RunConfig, store: ActivationStore, rows: range,
                units: Sequence[int] | None = None) -> dict[str, InputNorm]:
    """One InputNorm per hook the bank reads or reconstructs."""
    return {hook: input_norm(cfg, store, rows, hook, units) for hook in cfg.bank_hooks}


SKIP_SAMPLE_CHUNKS = 16  # chunks spread over the training rows for the least-squares skip map
SKIP_SAMPLE_ROWS = 32768  # at most; >> d_in (576 on SmolLM2), so the map is well determined


@dataclass
class MemberInit:
    """How members start (BankTrainer): b_dec from each target hook's scaled mean, and a
    skip-transcoder's (W_skip (d_out, d_in), b_dec (d_out,)) by least squares."""

    means: Mapping[str, torch.Tensor]
    skips: Mapping[tuple[tuple[str, ...], tuple[str, ...]], tuple[torch.Tensor, torch.Tensor]]

    def skip(self, spec: MemberSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.skips.get((spec.inputs, spec.targets)) if spec.form == "skip_transcoder" \
            else None


def sample_rows(store: ActivationStore, hooks: Sequence[str], rows: range,
                norms: Mapping[str, InputNorm], chunks: int = SKIP_SAMPLE_CHUNKS,
                max_rows: int = SKIP_SAMPLE_ROWS) -> dict[str, torch.Tensor]:
    """The same training rows of every hook, scaled as training sees them, special tokens
    dropped: {hook: (n, d_hook)}, from `chunks` chunks spread evenly over `rows`."""
    starts = list(range(rows.start, rows.stop, store.chunk_rows))
    picks = np.unique(np.linspace(0, len(starts) - 1, min(chunks, len(starts))).astype(int))
    exclude = store.metadata["exclude_token_ids"]
    out: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    for s in (starts[i] for i in picks):
        e = min(s + store.chunk_rows, rows.stop)
        keep = torch.from_numpy(~np.isin(np.asarray(store.tokens(s, e)), exclude))
        for h in hooks:
            out[h].append(store.read(h, s, e)[keep] * norms[h].scale)
    return {h: torch.cat(parts)[:max_rows] for h, parts in out.items()}


def least_squares_skip(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (d_out, d_in), b (d_out,)) minimising ||x W^T + b - y||^2 over the rows of x (n, d_in)
    and y (n, d_out), in float64 (the normal equations of 576 inputs are ill-conditioned in
    fp32 on a residual stream with a few large directions)."""
    xm, ym = x.double().mean(0), y.double().mean(0)
    sol = torch.linalg.lstsq(x.double() - xm, y.double() - ym).solution  # (d_in, d_out)
    return sol.t().float().contiguous(), (ym - xm @ sol).float()


def member_inits(cfg: RunConfig, store: ActivationStore, rows: range,
                 norms: Mapping[str, InputNorm]) -> MemberInit:
    """MemberInit of the bank: least-squares skip maps (train.skip_init=lstsq) from one
    sample of the training rows; a pure function of the store and the config, so every rank and
    every resumed job computes the same."""
    means = {h: n.mean for h, n in norms.items()}
    pairs = list(dict.fromkeys((s.inputs, s.targets) for s in cfg.bank()
                               if s.form == "skip_transcoder"))
    if not pairs or cfg.train.skip_init != "lstsq":
        return MemberInit(means, {})
    hooks = list(dict.fromkeys(h for i, t in pairs for h in i + t))
    sample = sample_rows(store, hooks, rows, norms)
    skips = {}
    for inputs, targets in pairs:
        x = torch.cat([sample[h] for h in inputs], 1)  # (n, d_in)
        y = torch.cat([sample[h] for h in targets], 1)  # (n, d_out)
        skips[(inputs, targets)] = least_squares_skip(x, y)
        fit = (x @ skips[(inputs, targets)][0].t() + skips[(inputs, targets)][1] - y).pow(2).sum()
        log.info("skip path %s -> %s: least squares on %d rows leaves FVU %.4f", inputs,
                 targets, len(x), float(fit / (y - y.mean(0)).pow(2).sum()))
    return MemberInit(means, skips)
