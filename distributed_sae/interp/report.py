"""What the interp stage writes: per-unit records, the summary (features against the neuron
baselines, mean score by width) and the paper's histogram of scores, features vs neurons."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from distributed_sae.interp.scoring import score_keys


def write_json(path: Path, obj: Any, indent: int | None = 1) -> Path:
    """Atomically: a temp file beside it, fsync, rename (a kill leaves the old file or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_results(path: Path, name: str, hook: str, records: list[dict[str, Any]]) -> Path:
    return write_json(path, {"name": name, "hook": hook, "units": records})


def distribution(records: list[dict[str, Any]], scorer: str) -> dict[str, float]:
    """n, mean, median, std and quartiles of one scorer's scores (finite ones)."""
    vals = np.array([r[scorer] for r in records
                     if isinstance(r.get(scorer), (int, float)) and math.isfinite(r[scorer])])
    if len(vals) == 0:
        return {"n": 0}
    q1, med, q3 = np.quantile(vals, [0.25, 0.5, 0.75])
    return {"n": int(len(vals)), "mean": float(vals.mean()), "median": float(med),
            "std": float(vals.std()), "q1": float(q1), "q3": float(q3)}


def _by_width(members: dict[str, Any], scorers: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean score of every scorer over the features of all members of each width."""
    widths: dict[int, list[dict[str, Any]]] = {}
    for m in members.values():
        widths.setdefault(m["d_sae"], []).extend(m["units"])
    return {str(w): {s: distribution(recs, s).get("mean", float("nan")) for s in scorers}
            for w, recs in sorted(widths.items())}


def _table(members: dict[str, Any], baselines: dict[str, list], scorers: Sequence[str]) -> str:
    rows = ["| units | n | " + " | ".join(f"{s} mean (median)" for s in scorers) + " |",
            "|---|---|" + "---|" * len(scorers)]

    def row(name: str, recs: list[dict[str, Any]]) -> str:
        d = [distribution(recs, s) for s in scorers]
        cells = [f"{x['mean']:.3f} ({x['median']:.3f})" if x["n"] else "-" for x in d]
        return f"| {name} | {len(recs)} | " + " | ".join(cells) + " |"

    rows += [row(f"{name} features", m["units"]) for name, m in members.items()]
    rows += [row(name.replace("baseline_", "layer ").replace("_", " "), recs)
             for name, recs in baselines.items()]
    return "\n".join(rows)


def plot_histogram(path: Path, features: list[dict[str, Any]], neurons: list[dict[str, Any]],
                   scorer: str, title: str, bins: np.ndarray | None = None) -> Path:
    """The paper's figure: the distribution of one scorer's scores, features vs neurons.
    bins: the histogram's edges (default: 20 over the scorer's range, -1..1 or 0..1)."""
    from distributed_sae.eval.plots import _figure, _save

    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    if bins is None:
        bins = np.linspace(-1.0 if scorer == "simulation" else 0.0, 1.0, 21)
    for recs, label, color in ((features, "features", "tab:blue"),
                               (neurons, "neurons", "tab:gray")):
        vals = [r[scorer] for r in recs if isinstance(r.get(scorer), (int, float))]
        if vals:
            ax.hist(vals, bins=bins, alpha=0.6, label=f"{label} (n={len(vals)}, "
                    f"mean {np.mean(vals):.2f})", color=color)
    ax.set_xlabel(f"{scorer} score")
    ax.set_ylabel("units")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def write_summary(out: Path, members: dict[str, Any], baselines: dict[str, list],
                  usage: dict[str, Any], scorers: Sequence[str], llm: str = "") -> dict[str, Any]:
    """summary.json, summary.md and hist_<member>_<scorer>.png under `out`; returns the summary.
    llm: which model explained and scored ('<backend>:<model>')."""
    keys = score_keys(scorers)  # the scorers, then detection_auc / fuzzing_auc
    summary: dict[str, Any] = {"scorers": list(scorers), "keys": keys, "llm": llm,
                               "usage": usage, "members": {}, "baselines": {},
                               "by_width": _by_width(members, keys)}
    for name, recs in baselines.items():
        summary["baselines"][name] = {s: distribution(recs, s) for s in keys}
    lines = ["# Autointerpretability", "", _table(members, baselines, keys), "",
             "`<scorer>_auc`: the AUROC of the LLM's p(yes) against the truth, which a model "
             "that gives every item one answer cannot hide behind a 0.5 threshold.", ""]
    for name, m in members.items():
        neurons = [r for b in m["baselines"] for r in baselines[b] if r["kind"] == "neuron"]
        summary["members"][name] = {"hook": m["hook"], "d_sae": m["d_sae"], "kind": m["kind"],
                                    "baselines": m["baselines"],
                                    **{s: distribution(m["units"], s) for s in keys}}
        for s in scorers:
            png = plot_histogram(out / f"hist_{name}_{s}.png", m["units"], neurons, s,
                                 f"{name} at {m['hook']}: features vs MLP neurons")
            lines.append(f"![{name} {s}]({png.name})")
    lines += ["", "Mean score by width (features of every member of that width):", "",
              "| width | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    lines += [f"| {w} | " + " | ".join(f"{v[s]:.3f}" for s in keys) + " |"
              for w, v in summary["by_width"].items()]
    lines += ["", f"LLM usage: {json.dumps(usage)}", ""]
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text("\n".join(lines))
    return summary
