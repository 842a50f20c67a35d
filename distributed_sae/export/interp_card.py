"""The model card's interpretability section, from what the interp stage left in out_dir/interp:
summary.json (LLM scores of the member's features and of its layer's neurons) and, where a
person rated the blind page, ratings_summary.json. Files only: export does not import interp."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _cell(d: dict[str, Any] | None) -> str:
    if not d or not d.get("n"):
        return "-"
    return f"{d['mean']:.3f} ({d['median']:.3f}), n={d['n']}"


def _neuron_baseline(summary: dict[str, Any], member: dict[str, Any]) -> dict[str, Any]:
    """The member's layer's MLP-neuron baseline (scorer -> distribution), or {}."""
    for name in member.get("baselines", []):
        if name.endswith("_neuron"):
            return summary.get("baselines", {}).get(name, {})
    return {}


def interp_section(interp_dir: Path, member: str) -> tuple[list[str], dict[Path, str]]:
    """(the card's lines, {histogram PNG to copy: its name in the export}); ([], {}) when the
    member was not explained."""
    path = interp_dir / "summary.json"
    if not path.is_file():
        return [], {}
    summary = json.loads(path.read_text())
    m = summary.get("members", {}).get(member)
    if m is None:
        return [], {}
    neurons = _neuron_baseline(summary, m)
    llm = summary.get("llm") or "an LLM"
    lines = ["## Interpretability", "",
             f"Explanations written and scored by `{llm}` on held-out windows the explainer never "
             f"saw (distributed-sae's interp stage); the layer's MLP neurons, explained and "
             f"scored the same way, are the baseline. Mean (median) score:", "",
             "| scorer | features | MLP neurons |", "|---|---|---|"]
    lines += [f"| {s} | {_cell(m.get(s))} | {_cell(neurons.get(s))} |"
              for s in summary.get("keys", summary.get("scorers", []))]
    lines.append("")
    copies = {}
    for s in summary.get("scorers", []):
        png = interp_dir / f"hist_{member}_{s}.png"
        if png.is_file():
            copies[png] = f"interp_{s}.png"
            lines += [f"![{s} scores, features vs neurons](interp_{s}.png)", ""]
    ratings = interp_dir / "ratings_summary.json"
    if ratings.is_file():
        saved = json.loads(ratings.read_text())
        rated = saved.get("members", {}).get(member)
        if rated and rated["features"].get("n"):
            lines += [f"Blind human ratings (points out of {saved.get('max_total', 14)}): "
                      f"features {_cell(rated['features'])}, MLP neurons "
                      f"{_cell(rated['neurons'])}.", ""]
    return lines, copies
