"""The blind rating page and what a person's ratings say: features against neurons.

The interp stage writes out_dir/interp/rate.html (interp.rate_units of each member's explained
features and of each layer's MLP neurons, shuffled, under opaque ids, with the windows and
promoted tokens the explainer saw) and rate_key.json beside it (id -> member or baseline, kind,
index). `dsae-interp interp.ratings=<saved file>` joins the saved ratings with the key and writes
ratings_summary.{json,md} and hist_ratings_<member>.png: the paper's features-vs-neurons
comparison, by a person instead of an LLM.

The rubric's four criteria follow *Towards Monosemanticity*'s 14-point rubric (confidence in an
interpretation, consistency of the activations with it, consistency of the logit effects,
specificity); the split of the 14 points over them below is ours.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from distributed_sae.config import ConfigError
from distributed_sae.interp.report import distribution, plot_histogram, write_json
from distributed_sae.interp.types import UnitExamples

PAGE_FILE = "rate.html"
KEY_FILE = "rate_key.json"
RUBRIC = (
    {"key": "confidence", "label": "confidence in an interpretation", "max": 4,
     "help": "0 none, 4 sure one short description covers this unit"},
    {"key": "activations", "label": "consistency of the activations", "max": 4,
     "help": "how many of the highlighted windows fit it, and their strength with it"},
    {"key": "logits", "label": "consistency of the promoted tokens", "max": 3,
     "help": "do the tokens it promotes follow from it (0 if unrelated or none shown)"},
    {"key": "specificity", "label": "specificity", "max": 3,
     "help": "0 fires on much else too, 3 on nothing but what the interpretation names"},
)
MAX_TOTAL = sum(c["max"] for c in RUBRIC)  # 14, as in the paper


def rating_data(groups: Mapping[str, tuple[str, Sequence[int], Sequence[UnitExamples]]],
                members: Mapping[str, Mapping[str, Any]], per_group: int, seed: int
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the page's data, the key). groups: name -> (kind, unit indices, their examples), a
    member's features or a baseline's neurons; members: name -> {"hook", "baselines"}. Each
    group gives a seeded sample of per_group units; all are shuffled together."""
    rng = np.random.default_rng([seed, 4])
    units, key_units = [], {}
    for name, (kind, indices, examples) in groups.items():
        pick = sorted(rng.permutation(len(indices))[:per_group].tolist())
        for j in pick:
            units.append(({"examples": [{"tokens": e.tokens, "acts": e.acts}
                                        for e in examples[j].explain],
                           "logits_top": list(examples[j].logits_top)},
                          {"group": name, "kind": kind, "index": int(indices[j])}))
    order = rng.permutation(len(units))
    ids = [f"u{n:03d}{rng.integers(16 ** 4):04x}" for n in range(len(units))]  # opaque, unique
    page_units = []
    for uid, i in zip(ids, order):
        page_units.append({"id": uid, **units[i][0]})
        key_units[uid] = units[i][1]
    key = {"members": {m: {"hook": v["hook"], "baselines": list(v["baselines"])}
                       for m, v in members.items()}, "units": key_units}
    page = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    key["page"] = page
    return {"page": page, "rubric": list(RUBRIC), "units": page_units}, key


def write_rating_page(out: Path, groups: Mapping[str, tuple[str, Sequence[int],
                                                              Sequence[UnitExamples]]],
                      members: Mapping[str, Mapping[str, Any]], per_group: int,
                      seed: int) -> Path:
    """out/rate.html and out/rate_key.json (see the module docstring); returns the page."""
    from distributed_sae.eval.dashboard import embed_json, fill_template
    from distributed_sae.interp import rating_template as tpl

    data, key = rating_data(groups, members, per_group, seed)
    write_json(out / KEY_FILE, key)
    page = fill_template(tpl.PAGE, {"CSS": tpl.CSS, "JS": tpl.JS, "PAGE": data["page"],
                                    "DATA": embed_json(data)})
    path = out / PAGE_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


def _load(path: Path, what: str, fix: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{what}={path}: no such file: {fix}")
    try:
        obj = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what}={path} is not JSON ({exc}): {fix}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{what}={path} holds a {type(obj).__name__}, not an object: {fix}")
    return obj


def _totals(ratings: Mapping[str, Any], key: Mapping[str, Any], source: Path
            ) -> tuple[dict[str, int], int]:
    """{unit id: total points} of the fully rated units, and how many were rated in part."""
    totals, partial = {}, 0
    for uid, r in ratings.items():
        if uid not in key["units"]:
            raise ConfigError(f"interp.ratings={source} rates unit {uid!r}, which the page's "
                              f"key does not hold: save the ratings of this run's rate.html")
        scores = {c["key"]: (r or {}).get(c["key"]) for c in RUBRIC}
        if any(v is None for v in scores.values()):
            partial += 1
            continue
        for c in RUBRIC:
            v = scores[c["key"]]
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= c["max"]:
                raise ConfigError(f"interp.ratings={source}: unit {uid} has {c['key']}={v!r}, "
                                  f"outside 0..{c['max']}: rate it again on the page")
        totals[uid] = sum(scores.values())
    return totals, partial


def summarize_ratings(out: Path, ratings_path: str | Path) -> dict[str, Any]:
    """Join saved ratings with out/rate_key.json; write ratings_summary.{json,md} and one
    histogram per member (its features against its layer's neurons); return the summary."""
    source = Path(ratings_path)
    key = _load(out / KEY_FILE, "the rating key", "run dsae-interp with interp.rate_units > 0 "
                "first (it writes rate.html and rate_key.json)")
    saved = _load(source, "interp.ratings", "pass the file rate.html's 'Save ratings' wrote")
    if not isinstance(saved.get("ratings"), dict):
        raise ConfigError(f"interp.ratings={source} has no 'ratings' object: pass the file "
                          f"rate.html's 'Save ratings' wrote")
    if saved.get("page") != key["page"]:
        raise ConfigError(f"interp.ratings={source} rates page {saved.get('page')!r}, but "
                          f"{out / KEY_FILE} is of page {key['page']!r}: rate this run's "
                          f"{out / PAGE_FILE}")
    totals, partial = _totals(saved["ratings"], key, source)
    by_group: dict[str, list[dict[str, Any]]] = {}
    for uid, total in totals.items():
        unit = key["units"][uid]
        by_group.setdefault(unit["group"], []).append({**unit, "id": uid, "rating": total})
    summary: dict[str, Any] = {
        "page": key["page"], "rater": saved.get("rater", ""), "max_total": MAX_TOTAL,
        "rated": len(totals), "partial": partial, "unrated": len(key["units"]) - len(saved["ratings"]),
        "groups": {g: distribution(recs, "rating") for g, recs in sorted(by_group.items())},
        "units": {g: recs for g, recs in sorted(by_group.items())}, "members": {}}
    lines = ["# Blind ratings", "", f"page {key['page']}, rater {summary['rater'] or '-'}: "
             f"{len(totals)} units rated in full, {partial} in part (left out), of "
             f"{len(key['units'])}; points out of {MAX_TOTAL}.", "",
             "| member | features mean (median) | neurons mean (median) |", "|---|---|---|"]
    bins = np.arange(-0.5, MAX_TOTAL + 1.0)  # one bin per total
    for name, m in key["members"].items():
        feats = by_group.get(name, [])
        neurons = [r for b in m["baselines"] for r in by_group.get(b, []) if r["kind"] == "neuron"]
        f, n = distribution(feats, "rating"), distribution(neurons, "rating")
        summary["members"][name] = {"hook": m["hook"], "features": f, "neurons": n}
        cell = [f"{d['mean']:.2f} ({d['median']:.1f}), n={d['n']}" if d["n"] else "-"
                for d in (f, n)]
        lines.append(f"| {name} | {cell[0]} | {cell[1]} |")
        if feats or neurons:
            png = plot_histogram(out / f"hist_ratings_{name}.png", feats, neurons, "rating",
                                 f"{name} at {m['hook']}: blind ratings", bins=bins)
            lines += ["", f"![{name} ratings]({png.name})"]
    write_json(out / "ratings_summary.json", summary)
    (out / "ratings_summary.md").write_text("\n".join(lines) + "\n")
    return summary
