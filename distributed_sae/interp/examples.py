"""Held-out activations of the units to explain, cut into example windows per unit.

A *unit* is a member's feature (its encoder output), an MLP neuron (blocks.L.mlp.hook_post) or
a residual-stream basis direction (the store's own columns): the paper's comparison is features
against the neurons of the same layer. The activations of the sampled units over the scanned
held-out rows are kept dense, (rows, units) float32: 32,768 rows x 100 units = 13 MB.

Contexts are cut into windows of `window` tokens (a context's tail shorter than that is
dropped). Per unit, a window's score is its largest activation; windows above the unit's
threshold (the median window score, or 0 if that is larger: 0 for a sparse feature, whose
median window never fires, the middle for a dense neuron) are *active*. The explainer sees the
top windows and samples over the active ones' quantiles; the scorers get other active windows
(again over the quantiles) and random inactive ones, so an explanation is tested on windows
its writer never saw. Activations are clipped at 0 (SiLU/GELU neurons dip to about -0.28; a
residual direction's negative side is left out), so every unit reads as "how much it fires".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from distributed_sae.interp.types import Example, UnitExamples
from distributed_sae.store.activation_store import ActivationStore


@dataclass
class UnitActs:
    """Sampled units of one kind and their activations over the scanned rows."""

    kind: str  # 'feature', 'neuron' (MLP) or 'resid' (a residual basis direction)
    indices: list[int]  # (U,) the units' indices (latent, neuron or dimension)
    acts: Tensor  # (rows, U) float32, clipped at 0, 0 on excluded tokens
    logits_top: list[list[str]] = field(default_factory=list)  # (U, n) promoted tokens

    def name(self, j: int) -> str:
        return f"{self.kind} {self.indices[j]}"


def batched_rows(store: ActivationStore, hook: str, rows: range, batch: int
                 ) -> Iterator[tuple[int, Tensor]]:
    """(first row, activations (B, d)) over `rows` in order."""
    for a in range(rows.start, rows.stop, batch):
        b = min(a + batch, rows.stop)
        yield a, store.read(hook, a, b).float()


def dense_acts(store: ActivationStore, hook: str, rows: range,
               fn: Callable[[Tensor], Tensor], batch: int = 2048) -> Tensor:
    """fn(activations (B, d)) -> (B, U) over `rows`, stacked to (rows, U), clipped at 0 and 0
    on the store's excluded tokens (BOS, EOS, padding)."""
    excluded = np.asarray(store.metadata.get("exclude_token_ids", []), dtype=np.int64)
    parts = []
    with torch.no_grad():
        for a, x in batched_rows(store, hook, rows, batch):
            u = fn(x).float().clamp_min(0.0)  # (B, U)
            skip = torch.from_numpy(np.isin(store.tokens(a, a + len(x)), excluded))
            u[skip] = 0.0
            parts.append(u)
    return torch.cat(parts)


def firing_counts(store: ActivationStore, hook: str, rows: range,
                  encode: Callable[[Tensor], Tensor], batch: int = 2048) -> Tensor:
    """(d_sae,) rows on which each feature fires (> 0)."""
    total: Tensor | None = None
    with torch.no_grad():
        for _, x in batched_rows(store, hook, rows, batch):
            fired = (encode(x) > 0).sum(0)  # (d_sae,)
            total = fired if total is None else total + fired
    assert total is not None, f"no rows in {rows}"
    return total


def sample_units(candidates: np.ndarray, n: int, rng: np.random.Generator) -> list[int]:
    """n of `candidates` (all if fewer), sorted, seeded."""
    if len(candidates) <= n:
        return sorted(int(c) for c in candidates)
    return sorted(int(c) for c in rng.choice(candidates, size=n, replace=False))


def window_rows(n_rows: int, context_size: int, window: int) -> Tensor:
    """(n_win, window) row offsets: each context cut into windows, the short tail dropped."""
    per_ctx = context_size // window
    if per_ctx == 0:
        raise ValueError(f"interp.window={window} is longer than a context "
                         f"(data.context_size={context_size}): use at most {context_size}")
    starts = [c + i * window for c in range(0, n_rows - context_size + 1, context_size)
              for i in range(per_ctx)]
    return torch.tensor(starts, dtype=torch.long)[:, None] + torch.arange(window)  # (n_win, w)


def _stratified(order: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n entries of `order` (sorted by score), one drawn at random from each of n equal bins:
    a sample over the quantiles (all of them if there are no more than n)."""
    if len(order) <= n:
        return order
    edges = np.linspace(0, len(order), n + 1).astype(int)
    return np.array([order[rng.integers(lo, hi)] for lo, hi in zip(edges[:-1], edges[1:])])


@dataclass(frozen=True)
class Split:
    """How many windows each role gets (interp.explain_top, ... of InterpConfig)."""

    explain_top: int
    explain_quantile: int
    score_active: int
    score_inactive: int


def split_windows(scores: np.ndarray, split: Split, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(explain, score_active, score_inactive) window indices, disjoint, from per-window
    scores (n_win,) (see the module docstring for the threshold)."""
    threshold = max(0.0, float(np.median(scores)))
    active = np.flatnonzero(scores > threshold)
    order = active[np.argsort(-scores[active], kind="stable")]  # strongest first
    top, rest = order[:split.explain_top], order[split.explain_top:]
    score_pos = _stratified(rest, split.score_active, rng)
    left = np.setdiff1d(rest, score_pos)
    left = left[np.argsort(-scores[left], kind="stable")]
    explain = np.concatenate([top, _stratified(left, split.explain_quantile, rng)])
    inactive = np.flatnonzero(scores <= threshold)
    score_neg = (rng.choice(inactive, size=split.score_inactive, replace=False)
                 if len(inactive) > split.score_inactive else inactive)
    return explain.astype(int), np.asarray(score_pos, dtype=int), np.asarray(score_neg, dtype=int)


def unit_examples(units: UnitActs, windows: Tensor, texts: list[str], split: Split,
                  seed: int) -> list[UnitExamples]:
    """Every unit's UnitExamples. windows (n_win, window) row offsets into units.acts; texts:
    the text of each scanned row's token."""
    out = []
    for j in range(len(units.indices)):
        rng = np.random.default_rng([seed, j])
        acts = units.acts[:, j][windows]  # (n_win, window)
        scores = acts.max(1).values.numpy()

        def examples(idx: np.ndarray) -> list[Example]:
            return [Example([texts[r] for r in windows[i].tolist()],
                            [round(float(v), 4) for v in acts[i]]) for i in idx]

        explain, pos, neg = split_windows(scores, split, rng)
        logits = units.logits_top[j] if units.logits_top else []
        out.append(UnitExamples(units.name(j), examples(explain), examples(pos), examples(neg),
                                logits))
    return out


def token_texts(store: ActivationStore, rows: range, text: Callable[[int], str]) -> list[str]:
    """The text of each row's token (one decode per distinct token)."""
    ids = np.asarray(store.tokens(rows.start, rows.stop))
    return [text(int(i)) for i in ids]


def top_tokens(logits: Tensor, text: Callable[[int], Any], n: int = 10) -> list[list[str]]:
    """(U, vocab) direct logit effects -> each unit's n most promoted tokens' texts."""
    if logits.numel() == 0:
        return [[] for _ in range(len(logits))]
    ids = logits.topk(min(n, logits.shape[1]), dim=1).indices
    return [[text(int(i)) for i in row] for row in ids]
