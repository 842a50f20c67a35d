"""Model diffing with crosscoders: how much of each feature's decoder each hook holds.

A crosscoder over hooks h_1..h_n (sae/forms.py) decodes feature i into one row of W_dec, whose
per-hook slices d_{i,h} (W_dec split by form.targets_dims) write its reconstruction of each hook.
The share of hook h in feature i is ||d_{i,h}|| / sum_g ||d_{i,g}||. For the two-model crosscoder
of Lindsey et al. 2024 ("Sparse Crosscoders", model diffing: one hook of model A and the same
hook of model B, 'b/...') that is the relative decoder norm

    r_i = ||d_B|| / (||d_A|| + ||d_B||)  in [0, 1]:  0 = a feature of A only, 1 = of B only,
                                                      ~0.5 = shared by both models.

Fractions reported: exclusive to hook h (share_h > 0.9, i.e. r < 0.1 for A and r > 0.9 for B)
and shared (every share within 0.4 / n of the even split 1 / n, i.e. 0.3 <= r <= 0.7 for two
hooks). Only live features count when a liveness mask is given: a dead feature's decoder keeps
its random start, near an even split, and would read as shared.

Norms are taken in the space the member trained in (every hook scaled to E||x||^2 = d_hook,
train/norm.py). The saved decoder acts on raw activations (slice h divided by hook h's input
scale, sae/base.py's fold_input_scale), so each slice is multiplied back by its scale from the
member's cfg.json; otherwise the model with the larger activations would seem to hold less of
every feature.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from distributed_sae.sae.bank import hook_tag
from distributed_sae.sae.base import SparseAutoencoder

log = logging.getLogger(__name__)

DECODER_NORMS_FILE = "decoder_norms.json"
DECODER_NORMS_PLOT = "decoder_norms.png"
BINS = 20
EXCLUSIVE = 0.9  # share above which a feature belongs to one hook
SHARED_BAND = 0.4  # shared: every share within SHARED_BAND / n of 1 / n (0.3..0.7 for two)


@torch.no_grad()
def decoder_shares(sae: SparseAutoencoder, scales: Sequence[float] | None = None) -> Tensor:
    """(d_sae, n_hooks) share of each target hook in each feature's decoder norm (rows sum to
    1); `scales`: each target hook's input scale (the slices are multiplied by them), None = raw.
    A row whose slices are all zero gets an even split."""
    dims = list(sae.form.targets_dims)
    w = sae.W_dec.detach().float().cpu()  # (d_sae, d_out)
    norms = torch.stack([s.norm(dim=1) for s in w.split(dims, dim=1)], 1)  # (d_sae, n_hooks)
    if scales is not None:
        norms = norms * torch.tensor([float(s) for s in scales])[None, :]
    total = norms.sum(1, keepdim=True)  # (d_sae, 1)
    even = torch.full_like(norms, 1.0 / len(dims))
    return torch.where(total > 0, norms / total.clamp_min(1e-30), even)


def share_fractions(shares: Tensor, hooks: Sequence[str]) -> dict[str, Any]:
    """{'exclusive': {hook: fraction of features with share > 0.9}, 'shared': fraction with
    every share within SHARED_BAND / n of 1 / n} over the rows of `shares` (F, n_hooks)."""
    n = shares.shape[1]
    if shares.shape[0] == 0:
        return {"exclusive": {h: 0.0 for h in hooks}, "shared": 0.0}
    exclusive = (shares > EXCLUSIVE).float().mean(0)  # (n_hooks,)
    shared = ((shares - 1.0 / n).abs() <= SHARED_BAND / n).all(1).float().mean()
    return {"exclusive": {h: float(v) for h, v in zip(hooks, exclusive)},
            "shared": float(shared)}


def _histogram(values: Tensor) -> dict[str, Any]:
    counts = torch.histc(values, bins=BINS, min=0.0, max=1.0)  # (BINS,); 1.0 in the last bin
    edges = torch.linspace(0.0, 1.0, BINS + 1)
    return {"bins": BINS, "edges": [round(float(e), 6) for e in edges],
            "counts": [int(c) for c in counts]}


def decoder_norm_report(sae: SparseAutoencoder, hooks: Sequence[str],
                        scales: Sequence[float] | None = None, live: Tensor | None = None,
                        member: str = "") -> dict[str, Any]:
    """The relative decoder norms of a crosscoder over `hooks` (its targets, in order): per
    feature shares, for two hooks r = the second hook's share, a 20-bin histogram (of r, or of
    each hook's share), and the fractions of the module docstring over the live features
    (`live` (d_sae,) bool, None = all)."""
    if len(hooks) != len(sae.form.targets_dims) or len(hooks) < 2:
        raise ValueError(f"{member or 'the member'} writes {len(sae.form.targets_dims)} hook(s) "
                         f"but got hooks {list(hooks)}: pass its targets, at least two")
    shares = decoder_shares(sae, scales)  # (d_sae, n_hooks)
    keep = torch.ones(shares.shape[0], dtype=torch.bool) if live is None else live.bool().cpu()
    counted = shares[keep]  # (n_live, n_hooks)
    report: dict[str, Any] = {
        "member": member, "hooks": list(hooks), "space": "raw" if scales is None else "trained",
        "n_features": int(shares.shape[0]), "n_counted": int(counted.shape[0]),
        "counted": "all" if live is None else "live",
        **share_fractions(counted, hooks),
        "shares": {h: [round(float(v), 6) for v in shares[:, j]] for j, h in enumerate(hooks)},
        "live": keep.tolist(),
    }
    if len(hooks) == 2:  # r = ||d_B|| / (||d_A|| + ||d_B||), the second hook's share
        report["relative_norm"] = report["shares"][hooks[1]]
        report["histogram"] = _histogram(counted[:, 1])
    else:
        report["histogram"] = {h: _histogram(counted[:, j]) for j, h in enumerate(hooks)}
    return report


def plot_decoder_norms(report: Mapping[str, Any], out: str | Path) -> Path:
    """Histogram of the relative decoder norm r (two hooks) or of each hook's share (more),
    with the exclusive and shared bands marked; a PNG at `out` (eval/plots.py's style)."""
    from distributed_sae.eval.plots import _figure, _save

    hooks = list(report["hooks"])
    live = torch.tensor(report["live"], dtype=torch.bool)
    fig = _figure(5.5, 3.6)
    ax = fig.subplots()
    if len(hooks) == 2:
        r = torch.tensor(report["relative_norm"])[live]
        ax.hist(r.tolist(), bins=BINS, range=(0.0, 1.0), color="tab:blue")
        ax.set_xlabel(f"relative decoder norm ||d_B|| / (||d_A|| + ||d_B||)\n"
                      f"A = {hooks[0]}, B = {hooks[1]}", fontsize=8)
        for x, style in ((1 - EXCLUSIVE, ":"), (0.5 - SHARED_BAND / 2, "--"),
                         (0.5 + SHARED_BAND / 2, "--"), (EXCLUSIVE, ":")):
            ax.axvline(x, color="0.5", ls=style, lw=1)
    else:
        for j, h in enumerate(hooks):
            share = torch.tensor(report["shares"][h])[live]
            ax.hist(share.tolist(), bins=BINS, range=(0.0, 1.0), histtype="step",
                    color=f"C{j % 10}", label=hook_tag(h))
        ax.set_xlabel("share of each hook in a feature's decoder norm", fontsize=8)
        ax.legend(fontsize=7)
    names = ["A", "B"] if len(hooks) == 2 else [hook_tag(h) for h in hooks]  # short, for the title
    ex = ", ".join(f"{n} only {v:.0%}" for n, v in zip(names, report["exclusive"].values()))
    ax.set_title(f"{report['member']}\n{ex}, shared {report['shared']:.0%} "
                 f"({report['n_counted']} {report['counted']} features)", fontsize=9)
    ax.set_ylabel("features")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


def live_mask(metrics: Mapping[str, Any]) -> Tensor | None:
    """(d_sae,) bool: the features that fired on the evaluation tokens (eval/metrics.py's
    log10_density above its floor for never firing); None when the metrics have no densities."""
    from distributed_sae.eval.plots import DEAD_LOG10

    if "log10_density" not in metrics:
        return None
    return torch.tensor([float(v) > DEAD_LOG10 + 1e-6 for v in metrics["log10_density"]])


def hook_scales(sae_cfg: Mapping[str, Any], hooks: Sequence[str]) -> list[float] | None:
    """Each hook's input scale from a saved member's cfg.json metadata (None if not recorded)."""
    scale = (sae_cfg.get("metadata") or {}).get("input_scale")
    if isinstance(scale, Mapping) and all(h in scale for h in hooks):
        return [float(scale[h]) for h in hooks]
    if isinstance(scale, (int, float)):  # one scale for every hook
        return [float(scale)] * len(hooks)
    return None


def write_decoder_norms(sae: SparseAutoencoder, sae_cfg: Mapping[str, Any],
                        hooks: Sequence[str], metrics: Mapping[str, Any], out: Path
                        ) -> dict[str, Any]:
    """decoder_norms.json and decoder_norms.png of a crosscoder under `out` (its eval folder);
    returns the fractions for its metrics.json ({'decoder_norm_fractions': ...})."""
    member = str(metrics.get("member", out.name))
    report = decoder_norm_report(sae, hooks, hook_scales(sae_cfg, hooks), live_mask(metrics),
                                 member=member)
    out.mkdir(parents=True, exist_ok=True)
    (out / DECODER_NORMS_FILE).write_text(json.dumps(report))
    try:
        plot_decoder_norms(report, out / DECODER_NORMS_PLOT)
    except ImportError as err:  # matplotlib missing: the numbers still stand
        log.warning("no %s for %s: %s", DECODER_NORMS_PLOT, member, err)
    fractions = {"exclusive": report["exclusive"], "shared": report["shared"],
                 "counted": report["counted"], "n_counted": report["n_counted"]}
    log.info("decoder norms of %s over %s: exclusive %s, shared %.1f%%", member, list(hooks),
             {h: f"{v:.1%}" for h, v in report["exclusive"].items()}, 100 * report["shared"])
    return {"decoder_norm_fractions": fractions}
