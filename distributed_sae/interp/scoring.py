"""Explain units and score the explanations (Bills et al. 2023; EleutherAI's delphi).

    detection   does an unmarked excerpt contain what the explanation describes? Activating
                excerpts (truth yes) against non-activating ones (truth no): balanced accuracy.
    fuzzing     are the marked tokens what it describes? Each activating excerpt twice, with
                its active tokens marked (yes) and with as many inactive ones marked (no).
    simulation  the LLM predicts a 0-10 level per token from the explanation; the Pearson
                correlation with the true activations over all the unit's scoring tokens
                (Bills et al.'s "all at once" variant).

Detection and fuzzing also record `<scorer>_auc`: the AUROC of the LLM's p(yes) against the
truth. Balanced accuracy thresholds p(yes) at 0.5, so a model that leans to one answer for
every item of a unit scores exactly 0.5 whatever it ranks. SmolLM2-135M did this for 47 of 50
features on fuzzing (docs/interp.md). The AUROC needs no threshold and still reads its ranking.

Every request of a scorer, over every unit, goes to the LLM in ONE `complete_many` call, so a
concurrent client runs them in parallel.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import numpy as np

from distributed_sae.config.interp_schema import SCORERS  # the config's choices
from distributed_sae.interp.prompts import (
    MARK_FRACTION,
    detection_request,
    explain_request,
    fuzzing_request,
    parse_explanation,
    parse_simulation,
    simulation_request,
    yes_probability,
)
from distributed_sae.interp.types import Completer, Completion, Example, Request, UnitExamples

log = logging.getLogger(__name__)


def balanced_accuracy(pred: Sequence[bool], truth: Sequence[bool]) -> float:
    """(TPR + TNR) / 2. When one class is absent from `truth`, the accuracy on the class that is
    present (its TPR or TNR alone); NaN when `truth` is empty."""
    if len(pred) != len(truth):
        raise ValueError(f"pred has {len(pred)} entries but truth {len(truth)}")
    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    rates = [float(np.mean(p[t == cls] == cls)) for cls in (True, False) if np.any(t == cls)]
    return float(np.mean(rates)) if rates else math.nan


def auroc(score: Sequence[float], truth: Sequence[bool]) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half
    (the Mann-Whitney U over n_pos * n_neg); NaN when either class is absent."""
    if len(score) != len(truth):
        raise ValueError(f"score has {len(score)} entries but truth {len(truth)}")
    x, t = np.asarray(score, dtype=np.float64), np.asarray(truth, dtype=bool)
    pos, neg = x[t], x[~t]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    diff = pos[:, None] - neg[None, :]  # (n_pos, n_neg): at most a few dozen each per unit
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


YES_NO = ("detection", "fuzzing")  # the scorers whose answers are p(yes)


def score_keys(scorers: Sequence[str]) -> list[str]:
    """The keys a unit's record holds for these scorers: each scorer, then <yes/no scorer>_auc."""
    return [*scorers, *(f"{s}_auc" for s in scorers if s in YES_NO)]


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson correlation of a and b; 0.0 when either is constant (or has < 2 entries), since
    a constant prediction carries no information about the activations."""
    if len(a) != len(b):
        raise ValueError(f"a has {len(a)} entries but b {len(b)}")
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    # Tested on the raw values: a constant's mean can be off by float noise, and that noise
    # must not read as a correlation.
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    x, y = x - x.mean(), y - y.mean()
    return float(np.clip(float(x @ y) / math.sqrt(float(x @ x) * float(y @ y)), -1.0, 1.0))


def _complete(llm: Completer, requests: list[Request], desc: str) -> list[Completion]:
    """llm.complete_many, checking that it answered every request."""
    out = llm.complete_many(requests, desc=desc)
    if len(out) != len(requests):
        raise RuntimeError(f"{desc}: {len(requests)} requests but {len(out)} completions")
    return out


def explain_all(llm: Completer, units: list[UnitExamples]) -> list[str]:
    """One explanation per unit, (len(units),), from one batched complete_many call."""
    completions = _complete(llm, [explain_request(u) for u in units], "explain")
    return [parse_explanation(c.text) for c in completions]


def fuzz_marks(ex: Example, rng: np.random.Generator, correct: bool) -> list[int]:
    """Token indices to mark for fuzzing, sorted. correct: the tokens with act >= MARK_FRACTION
    of the excerpt's max (at least the argmax). Incorrect: as many tokens drawn by `rng` among
    the inactive ones (act == 0); if there are too few, all of them plus the lowest-activating
    of the rest (never a correct one), so fewer only when the excerpt has no room."""
    acts = np.asarray(ex.acts, dtype=np.float64)  # (window,)
    if acts.size == 0:
        return []
    top = float(acts.max())
    active = np.flatnonzero(acts >= MARK_FRACTION * top) if top > 0 else np.empty(0, np.int64)
    if active.size == 0:
        active = np.array([int(acts.argmax())])
    if correct:
        return [int(i) for i in active]
    rest = np.setdiff1d(np.arange(acts.size), active)  # (window - n_active,) sorted
    zeros = rest[acts[rest] == 0]
    if zeros.size >= active.size:
        return sorted(int(i) for i in rng.choice(zeros, size=active.size, replace=False))
    # Too few inactive tokens: the lowest of the others fill up (stable, so deterministic).
    others = rest[acts[rest] != 0]
    fill = others[np.argsort(acts[others], kind="stable")][: active.size - zeros.size]
    return sorted(int(i) for i in np.concatenate([zeros, fill]))


# A scorer's plan for one unit: (request, truth) pairs; its completions become the score.
_Item = tuple[Request, object]


def _detection_items(expl: str, u: UnitExamples, rng: np.random.Generator) -> list[_Item]:
    pos = [(detection_request(expl, ex), True) for ex in u.score_pos]
    return pos + [(detection_request(expl, ex), False) for ex in u.score_neg]


def _fuzzing_items(expl: str, u: UnitExamples, rng: np.random.Generator) -> list[_Item]:
    items: list[_Item] = []
    for ex in u.score_pos:
        if not ex.tokens:
            continue
        items.append((fuzzing_request(expl, ex, fuzz_marks(ex, rng, correct=True)), True))
        wrong = fuzz_marks(ex, rng, correct=False)
        if wrong:  # an excerpt with every token active has no wrong marking to show
            items.append((fuzzing_request(expl, ex, wrong), False))
    return items


def _simulation_items(expl: str, u: UnitExamples, rng: np.random.Generator) -> list[_Item]:
    # The truth is the excerpt itself: parse_simulation needs its length, pearson its acts.
    return [(simulation_request(expl, ex), ex) for ex in u.score_pos + u.score_neg if ex.tokens]


def _yes_no_score(completions: list[Completion], truths: list[object]) -> float:
    return balanced_accuracy([yes_probability(c) >= 0.5 for c in completions], truths)


def _simulation_score(completions: list[Completion], truths: list[object]) -> float:
    pred: list[float] = []  # (total scoring tokens,)
    true: list[float] = []
    for c, ex in zip(completions, truths):
        pred += parse_simulation(c, len(ex.tokens))
        true += ex.acts
    return pearson(pred, true)


_Build = Callable[[str, UnitExamples, np.random.Generator], list[_Item]]
_Score = Callable[[list[Completion], list[object]], float]
_PLANS: dict[str, tuple[_Build, _Score]] = {
    "detection": (_detection_items, _yes_no_score),
    "fuzzing": (_fuzzing_items, _yes_no_score),
    "simulation": (_simulation_items, _simulation_score),
}


def score_all(
    llm: Completer,
    units: list[UnitExamples],
    explanations: list[str],
    scorers: Sequence[str] = SCORERS,
    seed: int = 0,
) -> list[dict]:
    """Score each unit's explanation with each scorer: every request is built first, then one
    complete_many call per scorer. Per unit: {"unit", "explanation", <scorer>: float,
    "n_<scorer>": int (requests scored)} for the scorers asked, and "<scorer>_auc" for
    detection and fuzzing; a scorer with no requests for a unit scores NaN. Unit i's random
    choices (fuzzing's wrong marks) use seed + i."""
    unknown = [s for s in scorers if s not in _PLANS]
    if unknown:
        raise ValueError(f"unknown scorer(s) {unknown}; choices are {SCORERS}")
    if len(explanations) != len(units):
        raise ValueError(f"{len(units)} units but {len(explanations)} explanations")
    rngs = [np.random.default_rng(seed + i) for i in range(len(units))]
    names = list(dict.fromkeys(scorers))  # asked order, each once
    # Every request is built before the first call, so each call holds a scorer's whole batch.
    plans = {
        name: [_PLANS[name][0](e, u, rng) for u, e, rng in zip(units, explanations, rngs)]
        for name in names
    }
    results = [{"unit": u.unit, "explanation": e} for u, e in zip(units, explanations)]
    for name in names:
        per_unit = plans[name]  # (units,) lists of (request, truth)
        flat = [req for items in per_unit for req, _ in items]
        completions = _complete(llm, flat, name)
        start = 0
        for res, items in zip(results, per_unit):
            got = completions[start : start + len(items)]
            start += len(items)
            truths = [t for _, t in items]
            res[name] = _PLANS[name][1](got, truths) if items else math.nan
            if name in YES_NO:
                res[f"{name}_auc"] = auroc([yes_probability(c) for c in got], truths)
            res[f"n_{name}"] = len(items)
        log.info("%s: %d requests over %d units", name, len(flat), len(units))
    return results
