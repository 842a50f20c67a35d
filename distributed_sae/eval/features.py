"""Per-feature analysis of one SAE: top-activating contexts, activation quantiles, density and
logit effects, streamed over held-out store rows with memory bounded in the number of tokens.

Memory is O(d_sae) per statistic, never O(tokens x d_sae):
* top contexts: a running top-n per feature; each batch's own top-n (n, F) is concatenated with
  the running one (n, F) and cut back to n, which equals sorting all activations at the end.
* quantiles: a per-feature histogram of the activations where the feature fired, in log-spaced
  bins (HIST_BINS_PER_DECADE bins per decade over 10^HIST_LOG10_LO .. 10^HIST_LOG10_HI, values
  outside land in the end bins): F x 128 int32 counts (51 MB at d_sae = 100k). A quantile is
  interpolated log-linearly inside its bin, so it is exact up to one bin's width (a factor of
  10^(1/16) = 1.155, i.e. within +-7.5%); it is clamped to the exact max.
* per-token activations in each context window: a second pass over the same rows gathers, for
  every (feature, top entry, offset), the feature's activation on the window's rows.
The encoder output of one batch is dense, (batch_size, d_sae) float32: that bounds batch_size.

Logit effects (direct logit attribution): decoder row W_dec[i] through the unembedding, with the
final norm's linear part folded in: RMSNorm (Llama) multiplies by its weight; LayerNorm (GPT-2,
GPT-NeoX) also subtracts the mean over d_model (its bias adds the same to every feature and is
left out); an mlp.hook_post direction first goes through the down projection (without bias).
Later layers are ignored, as in the usual direct-logit view. BERT has no LM head here: no logits.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from distributed_sae.config.schema import parse_hook
from distributed_sae.models.architectures import arch_spec, layer_modules
from distributed_sae.models.hooks import check_hooks
from distributed_sae.models.registry import LoadedModel
from distributed_sae.sae.base import SparseAutoencoder
from distributed_sae.store.activation_store import ActivationStore

log = logging.getLogger(__name__)

QUANTILES = (0.5, 0.9, 0.99)
HIST_LOG10_LO, HIST_LOG10_HI, HIST_BINS_PER_DECADE = -4.0, 4.0, 16
# Final norm of each causal architecture, relative to model.base_model.
_FINAL_NORM = {"llama": "norm", "gpt2": "ln_f", "gpt_neox": "final_layer_norm"}


class RunningTopN:
    """The n largest values per column seen so far, with the row id each came from."""

    def __init__(self, n: int, n_features: int) -> None:
        self.n = n
        self.values = torch.full((n, n_features), -math.inf)  # (n, F), descending per column
        self.rows = torch.full((n, n_features), -1, dtype=torch.long)  # (n, F)

    def update(self, acts: Tensor, row_ids: Tensor) -> None:
        """Merge a batch: acts (B, F), row_ids (B,) the row of each line of acts."""
        k = min(self.n, acts.shape[0])
        v, i = acts.topk(k, dim=0)  # (k, F): only a batch's own top-n can enter the global one
        values = torch.cat([self.values, v.float()])  # (n + k, F)
        rows = torch.cat([self.rows, row_ids[i]])
        self.values, pick = values.topk(self.n, dim=0)  # (n, F)
        self.rows = rows.gather(0, pick)


class LogHistogram:
    """Per-feature counts of positive activations in log-spaced bins (see the module docstring)."""

    def __init__(self, n_features: int) -> None:
        self.n_bins = int((HIST_LOG10_HI - HIST_LOG10_LO) * HIST_BINS_PER_DECADE)
        self.counts = torch.zeros(n_features, self.n_bins, dtype=torch.int32)  # (F, bins)

    def update(self, acts: Tensor) -> None:
        """Count the positive entries of acts (B, F); only fired entries cost anything."""
        rows, feats = (acts > 0).nonzero(as_tuple=True)
        bins = ((acts[rows, feats].float().log10() - HIST_LOG10_LO) * HIST_BINS_PER_DECADE)
        bins = bins.floor().long().clamp(0, self.n_bins - 1)
        self.counts.view(-1).index_add_(0, feats * self.n_bins + bins,
                                        torch.ones_like(bins, dtype=torch.int32))

    def quantiles(self, qs: Sequence[float], max_values: Tensor) -> Tensor:
        """(F, len(qs)) approximate quantiles; 0 for features that never fired."""
        counts = self.counts.double()  # (F, bins)
        cum = counts.cumsum(1)
        total = cum[:, -1:]  # (F, 1)
        out = torch.zeros(counts.shape[0], len(qs), dtype=torch.float64)
        for j, q in enumerate(qs):
            target = q * total  # (F, 1)
            b = (cum < target).sum(1, keepdim=True).clamp(max=self.n_bins - 1)  # bin of quantile
            before = cum.gather(1, b) - counts.gather(1, b)
            frac = ((target - before) / counts.gather(1, b).clamp_min(1)).clamp(0, 1)
            log10 = HIST_LOG10_LO + (b.double() + frac) / HIST_BINS_PER_DECADE
            out[:, j] = (10 ** log10).squeeze(1)
        out = torch.minimum(out, max_values.double()[:, None].clamp_min(0))
        return torch.where(total > 0, out, torch.zeros_like(out)).float()


# ---- logit effects ---------------------------------------------------------------------------


@torch.no_grad()
def unembedding(loaded: LoadedModel, hook: str) -> Tensor:
    """(d_in, vocab) float32 matrix U with (direction @ U) = its direct effect on the logits."""
    check_hooks([hook], loaded.n_layers)
    spec = arch_spec(loaded.arch)
    head = loaded.model.get_output_embeddings() if spec.causal else None
    if head is None or loaded.arch not in _FINAL_NORM:
        raise ValueError(f"{loaded.name} ({loaded.arch}) has no LM head loaded: logit effects "
                         f"need a causal LM ({', '.join(_FINAL_NORM)}); pass unembed=None")
    base = getattr(loaded.model, "base_model", loaded.model)
    norm = base.get_submodule(_FINAL_NORM[loaded.arch])
    u = head.weight.detach().float().t().cpu()  # (d_model, vocab)
    u = norm.weight.detach().float().cpu()[:, None] * u  # fold the norm's gain
    if isinstance(norm, nn.LayerNorm):
        u = u - u.mean(0, keepdim=True)  # LayerNorm sees (I - 11^T/d) x: fold the centring
    layer, kind = parse_hook(hook)
    if kind == "mlp.hook_post":  # a neuron direction reaches the residual through down_proj
        down = layer_modules(loaded.model, spec)[layer].get_submodule(spec.mlp_down)
        p = next(down.parameters())
        eye = torch.eye(loaded.d_mlp, dtype=p.dtype, device=p.device)
        rows = down(eye) - down(torch.zeros_like(eye[:1]))  # (d_mlp, d_model), bias removed
        u = rows.float().cpu() @ u
    return u


@torch.no_grad()
def logit_effects(sae: SparseAutoencoder, unembed: Tensor, n: int = 10,
                  features: Sequence[int] | None = None, chunk: int = 256
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top and bottom n tokens of W_dec[i] @ unembed for each feature i (all, or `features`).

    Returns (top_values, top_ids, bottom_values, bottom_ids), each (F, n); bottom is ascending.
    Features are done `chunk` at a time so only (chunk, vocab) logits exist at once.
    """
    if unembed.shape[0] != sae.d_in:
        raise ValueError(f"unembed has {unembed.shape[0]} rows but the SAE's d_in is {sae.d_in}: "
                         f"build it with unembedding(loaded, <the SAE's hook>)")
    idx = torch.arange(sae.d_sae) if features is None else torch.as_tensor(list(features))
    n = min(n, unembed.shape[1])
    parts: list[list[Tensor]] = [[], [], [], []]
    for s in range(0, len(idx), chunk):
        logits = sae.W_dec.detach()[idx[s:s + chunk]].float().cpu() @ unembed  # (chunk, vocab)
        for store, res in zip(parts, (*logits.topk(n, dim=1), *logits.topk(n, 1, largest=False))):
            store.append(res)
    empty = torch.zeros(0, n)
    tv, ti, bv, bi = (torch.cat(p) if p else empty for p in parts)
    return tv, ti.long(), bv, bi.long()


# ---- the report ------------------------------------------------------------------------------


class _TokenText:
    """Token id -> its text, decoded one token at a time and cached."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            self.cache[token] = (str(token) if self.tokenizer is None
                                 else self.tokenizer.decode([token]))
        return self.cache[token]


def _batches(store: ActivationStore, hook: str, rows: range, batch_size: int,
             sae: SparseAutoencoder, cols: Tensor, excluded: np.ndarray, bar: tqdm
             ) -> Iterator[tuple[int, Tensor, int]]:
    """Yield (first row, f (B, F), tokens not excluded) over `rows` in order; f is 0 on the rows
    of excluded tokens. Ticks `bar` once per batch."""
    w = sae.W_dec
    for a in range(rows.start, rows.stop, batch_size):
        b = min(a + batch_size, rows.stop)
        x = store.read(hook, a, b).to(device=w.device, dtype=w.dtype)  # (B, d_in)
        f = sae.encode(x)[:, cols.to(w.device)].float().cpu()  # (B, F)
        skip = torch.from_numpy(np.isin(store.tokens(a, b), excluded))
        f[skip] = 0.0
        yield a, f, int((~skip).sum())
        bar.update(1)


def _window_acts(store: ActivationStore, hook: str, rows: range, batch_size: int,
                 sae: SparseAutoencoder, cols: Tensor, excluded: np.ndarray,
                 top_rows: Tensor, window: int, bar: tqdm) -> Tensor:
    """(n, F, 2w+1) activation of each feature around each of its top rows (0 outside)."""
    n, F = top_rows.shape
    out = torch.zeros(n, F, 2 * window + 1)
    feat = torch.arange(F).expand(n, F)
    for a, f, _ in _batches(store, hook, rows, batch_size, sae, cols, excluded, bar):
        for o in range(-window, window + 1):
            q = top_rows + o  # (n, F) rows at this offset
            hit = (top_rows >= 0) & (q >= a) & (q < a + len(f))
            out[..., o + window][hit] = f[q[hit] - a, feat[hit]]
    return out


def _contexts(j: int, top: RunningTopN, acts: Tensor, tokens: np.ndarray, rows: range,
              cs: int, window: int, text: _TokenText) -> list[dict[str, Any]]:
    """The top contexts of feature column j, in the features.json form."""
    out = []
    for t in range(top.n):
        value, r = float(top.values[t, j]), int(top.rows[t, j])
        if r < 0 or value <= 0:
            break  # descending: the rest never fired
        c0 = r // cs * cs  # first row of r's context; the window stays inside it and `rows`
        lo, hi = max(r - window, c0, rows.start), min(r + window + 1, c0 + cs, rows.stop)
        ids = tokens[lo - rows.start:hi - rows.start]
        window_acts = acts[t, j, lo - r + window:hi - r + window]
        out.append({"activation": value, "tokens": [text(int(i)) for i in ids],
                    "acts": [round(float(v), 5) for v in window_acts], "focus": r - lo})
    return out


@torch.no_grad()
def feature_report(sae: SparseAutoencoder, store: ActivationStore, hook: str, rows: range,
                   tokenizer: Any, unembed: Tensor | None, *, batch_size: int = 1024,
                   n_top: int = 10, window: int = 8, n_logits: int = 10, member: str = "",
                   features: Sequence[int] | None = None) -> dict[str, Any]:
    """The features.json structure of `sae` over store rows `rows` (see the module docstring).

    Rows of the store's excluded tokens (metadata exclude_token_ids) count as not firing and are
    not in n_tokens. `features` restricts the report to those indices (default: all d_sae).
    `unembed` (d_in, vocab) from `unembedding`, or None for empty logit lists.
    """
    if store.d(hook) != sae.d_in:
        raise ValueError(f"{hook} in {store.path} is {store.d(hook)} wide but the SAE's d_in is "
                         f"{sae.d_in}: pass the SAE's own hook")
    if len(rows) == 0 or n_top <= 0 or window < 0 or batch_size <= 0:
        raise ValueError(f"need rows (got {rows}), n_top > 0 (got {n_top}), window >= 0 (got "
                         f"{window}) and batch_size > 0 (got {batch_size})")
    cols = torch.arange(sae.d_sae) if features is None else torch.as_tensor(list(features))
    excluded = np.asarray(store.metadata.get("exclude_token_ids", []), dtype=np.int64)
    top, hist = RunningTopN(n_top, len(cols)), LogHistogram(len(cols))
    fired = torch.zeros(len(cols), dtype=torch.long)
    n_tokens = 0
    # One bar over both passes (statistics, then the top contexts' windows), on stderr.
    with tqdm(total=2 * -(-len(rows) // batch_size), desc=f"features {member or hook}",
              unit="batch", leave=False) as bar:
        for a, f, valid in _batches(store, hook, rows, batch_size, sae, cols, excluded, bar):
            n_tokens += valid
            fired += (f > 0).sum(0)
            top.update(f, torch.arange(a, a + len(f)))
            hist.update(f)
        if n_tokens == 0:
            raise ValueError(f"rows {rows.start}..{rows.stop} hold only excluded tokens")
        acts = _window_acts(store, hook, rows, batch_size, sae, cols, excluded, top.rows,
                            window, bar)
    quant = hist.quantiles(QUANTILES, top.values[0])  # (F, 3)
    logits = logit_effects(sae, unembed, n_logits, cols.tolist()) if unembed is not None else None
    tokens = np.asarray(store.tokens(rows.start, rows.stop))
    text = _TokenText(tokenizer)
    out = []
    for j, index in enumerate(cols.tolist()):
        density = float(fired[j]) / n_tokens
        q = {str(k): float(v) for k, v in zip(QUANTILES, quant[j])}
        q["max"] = max(float(top.values[0, j]), 0.0)
        entry = {"index": index, "density": density, "log10_density": math.log10(density + 1e-10),
                 "quantiles": q,
                 "top_contexts": _contexts(j, top, acts, tokens, rows, store.context_size,
                                           window, text),
                 "logits_top": [], "logits_bottom": []}
        if logits is not None:
            tv, ti, bv, bi = (t[j].tolist() for t in logits)
            entry["logits_top"] = [[text(int(i)), float(v)] for i, v in zip(ti, tv)]
            entry["logits_bottom"] = [[text(int(i)), float(v)] for i, v in zip(bi, bv)]
        out.append(entry)
    log.info("feature report of %s at %s: %d features over %d tokens", member or "sae", hook,
             len(out), n_tokens)
    return {"member": member, "hook": hook, "d_sae": sae.d_sae, "n_tokens": n_tokens,
            "features": out}


def write_feature_report(report: dict[str, Any], folder: str | Path) -> Path:
    """Write `report` as folder/features.json (created); returns the file's path."""
    path = Path(folder) / "features.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report))
    return path
