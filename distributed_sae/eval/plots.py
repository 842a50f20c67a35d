"""PNG plots of a bank's eval metrics: the sparsity-fidelity frontier and feature densities.

Input is the per-member metrics dict the eval stage writes (eval/metrics.py: l0, fvu,
log10_density, ...; `loss_recovered` when the spliced-loss evaluation ran). matplotlib is driven
through its object API on an Agg canvas, never pyplot: no global backend switch, no GUI, and safe
to call from any thread or a Ray worker.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)

FRONTIER_FILE = "frontier.png"
DENSITY_FILE = "density.png"
# log10_density of a feature that never fired: log10(0 + 1e-10), the epsilon of eval/metrics.py.
DEAD_LOG10 = -10.0
DPI = 110


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on an Agg canvas (imported here: matplotlib is only needed for plots)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install matplotlib") from exc
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _members(results: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]]
             ) -> list[tuple[str, Mapping[str, Any]]]:
    """(name, metrics) pairs from a {member: metrics} mapping or a list of metrics dicts."""
    if isinstance(results, Mapping):
        return [(str(name), m) for name, m in results.items()]
    return [(str(m.get("member", f"member {i}")), m) for i, m in enumerate(results)]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _scatter(ax: Any, series: dict[str, list[tuple[str, float, float]]], ylabel: str) -> None:
    """One labelled point per member, one colour per series (a kind), each series joined in L0
    order so its frontier reads as a curve."""
    xs_all = []
    for i, (label, points) in enumerate(series.items()):
        points = sorted(points, key=lambda p: p[1])
        xs, ys = [p[1] for p in points], [p[2] for p in points]
        color = f"C{i % 10}"
        ax.plot(xs, ys, color=color, alpha=0.4, zorder=1)
        ax.scatter(xs, ys, color=color, zorder=2, label=label)
        for name, x, y in points:
            ax.annotate(name.split(".")[-1], (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=6)
        xs_all += xs
    ax.set_xlabel("L0 (mean active latents per token)")
    ax.set_ylabel(ylabel)
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 20:  # k sweeps span decades
        ax.set_xscale("log")
    if len(series) > 1:
        ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.12, y=0.1)  # room for the labels of the end points


def _series(members: list[tuple[str, Mapping[str, Any]]], key: str
            ) -> dict[str, dict[str, list[tuple[str, float, float]]]]:
    """hook -> kind -> (member, l0, metric) of the members with a finite `key`."""
    out: dict[str, dict[str, list[tuple[str, float, float]]]] = {}
    for name, m in members:
        if _finite(m.get(key)):
            hook, kind = str(m.get("hook", "")), str(m.get("kind", "members"))
            out.setdefault(hook, {}).setdefault(kind, []).append(
                (name, float(m["l0"]), float(m[key])))
    return out


def plot_frontier(results: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
                  out: str | Path) -> Path:
    """The bank's sparsity-fidelity frontier: L0 vs FVU, and L0 vs fraction of loss recovered
    when any member has `loss_recovered`; one row of plots per hook, one series per kind.
    Writes a PNG to `out` and returns its path."""
    members = _members(results)
    if not members:
        raise ValueError("plot_frontier got no members: pass the eval stage's metrics dicts")
    for name, m in members:
        if not _finite(m.get("l0")) or not _finite(m.get("fvu")):
            raise ValueError(f"member {name!r} has no finite l0/fvu (got l0={m.get('l0')!r}, "
                             f"fvu={m.get('fvu')!r}): pass the metrics.json the eval stage wrote")
    fvu, recovered = _series(members, "fvu"), _series(members, "loss_recovered")
    cols = 2 if recovered else 1
    fig = _figure(5.0 * cols + 0.5, 4.0 * len(fvu))
    axes = fig.subplots(len(fvu), cols, squeeze=False)
    for row, (hook, series) in enumerate(fvu.items()):
        where = f" ({hook})" if hook else ""
        _scatter(axes[row][0], series, "FVU (fraction of variance unexplained)")
        axes[row][0].set_title("reconstruction vs sparsity" + where, fontsize=9)
        if recovered:
            _scatter(axes[row][1], recovered.get(hook, {}), "fraction of CE loss recovered")
            axes[row][1].set_title("downstream loss vs sparsity" + where, fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def plot_density(metrics: Mapping[str, Any], out: str | Path, bins: int = 60) -> Path:
    """Histogram of log10 feature density (firing frequency) of one member, as in Towards
    Monosemanticity; dead features (never fired) are left out of the bars and counted in the
    title and a note. Writes a PNG to `out` and returns its path."""
    name = metrics.get("member", "SAE")
    if "log10_density" not in metrics:
        raise ValueError(f"metrics of {name!r} have no log10_density: pass the full metrics.json "
                         "the eval stage wrote (export strips it into sparsity.safetensors)")
    values = [float(v) for v in metrics["log10_density"]]
    # Anything at the epsilon floor never fired on the evaluation tokens.
    live = [v for v in values if v > DEAD_LOG10 + 1e-6]
    dead = len(values) - len(live)
    fig = _figure(5.5, 3.6)
    ax = fig.subplots()
    if live:
        ax.hist(live, bins=bins, color="tab:blue")
    n_tokens = metrics.get("n_tokens")
    if n_tokens:  # a feature firing once is the lowest density the evaluation can resolve
        ax.axvline(math.log10(1.0 / n_tokens), color="0.5", ls=":", lw=1,
                   label=f"1 / {n_tokens} tokens")
    if dead:  # an empty handle: the count goes in the legend, not as a bar at -10
        ax.plot([], [], " ", label=f"dead (never fired): {dead}, not shown")
    if n_tokens or dead:
        ax.legend(fontsize=7, loc="best")
    share = dead / len(values) if values else 0.0
    ax.set_title(f"{name}: {len(live)} live, {dead} dead ({share:.1%})", fontsize=9)
    ax.set_xlabel("log10 feature density (fraction of tokens a feature fires on)")
    ax.set_ylabel("features")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


def plot_bank(results: Mapping[str, Mapping[str, Any]], out_dir: str | Path
              ) -> dict[str, Path]:
    """Every plot of a bank under `out_dir`: frontier.png and <member>/density.png.

    Returns {"frontier": path, "density/<member>": path, ...}; a member without log10_density
    gets no density plot (logged), it does not stop the others.
    """
    out_dir = Path(out_dir)
    plots = {"frontier": plot_frontier(results, out_dir / FRONTIER_FILE)}
    for name, metrics in results.items():
        if "log10_density" not in metrics:
            log.warning("no log10_density for %s: skipping its density plot", name)
            continue
        plots[f"density/{name}"] = plot_density({"member": name, **metrics},
                                                out_dir / name / DENSITY_FILE)
    return plots
