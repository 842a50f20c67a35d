"""Autointerp prompts and scoring maths (interp.prompts, interp.scoring) on planted units.

`StandInLLM` stands in for the LLM so the maths is tested exactly: it reads the prompts that
interp.prompts builds and answers as a perfect judge of the explanation's keyword would. The
real LLM client is tested elsewhere.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
import pytest

from distributed_sae.interp.prompts import (
    detection_request,
    explain_request,
    fuzzing_request,
    parse_explanation,
    parse_simulation,
    simulation_request,
    yes_probability,
)
from distributed_sae.interp.scoring import (
    SCORERS,
    auroc,
    balanced_accuracy,
    explain_all,
    fuzz_marks,
    pearson,
    score_all,
)
from distributed_sae.interp.types import Completion, Example, Request, UnitExamples

VOCAB = [" the", " a", " sat", " on", " mat", " ran", " big", " red", " and", " of", " in",
         " house", " tree", " blue", " was", " to", " dog", " bird", " fish", "."]


class StandInLLM:
    """Stands in for the LLM: answers each prompt from its text, deterministically.

    explain -> a fixed (messy) answer; detection -> yes iff the explanation's last word occurs in
    the excerpt; fuzzing -> yes iff every marked word is that word; simulation -> level 10 on
    lines whose token is that word, else 0, with logprobs (0.9 on its level, 0.1 on the other).
    Yes/no answers carry logprobs too, so yes_probability's logprob path is the one exercised.
    """

    def __init__(self, explanation: str = 'Explanation: "the word cat." It is a noun.'):
        self.explanation = explanation
        self.calls: list[tuple[str, int]] = []  # (desc, number of requests) per call
        self.requests: list[Request] = []

    def complete_many(self, requests: Sequence[Request], desc: str = "") -> list[Completion]:
        self.calls.append((desc, len(requests)))
        self.requests += requests
        return [self._answer(r.messages[-1].content) for r in requests]

    def _answer(self, user: str) -> Completion:
        if user.rstrip().endswith("Explanation:"):
            return Completion(self.explanation)
        keyword = re.search(r"^Explanation: (.*)$", user, re.M).group(1).split()[-1]
        if "index<TAB>level" in user:
            return self._simulate(user, keyword)
        text = re.search(r"^Text: (.*)$", user, re.M).group(1)
        if "marked <<like this>>" in user:
            words = [w for span in re.findall(r"<<(.*?)>>", text) for w in span.split()]
            yes = bool(words) and all(w == keyword for w in words)
        else:
            yes = re.search(rf"\b{keyword}\b", text) is not None
        if yes:
            return Completion(" Yes", [(" Yes", {" Yes": math.log(0.8), " No": math.log(0.2)})])
        return Completion(" No", [(" No", {" No": math.log(0.7), "yes": math.log(0.3)})])

    @staticmethod
    def _simulate(user: str, keyword: str) -> Completion:
        logprobs = []
        for i, tok in re.findall(r"^(\d+)\t(.*)$", user, re.M):
            level, other = ("10", "0") if tok.strip() == keyword else ("0", "10")
            cands = {level: math.log(0.9), other: math.log(0.1)}
            logprobs += [(i, {}), ("\t", {}), (level, cands), ("\n", {})]
        return Completion("".join(t for t, _ in logprobs), logprobs)


def _window(rng: np.random.Generator, n: int, cats: int) -> Example:
    """n random tokens (no ' cat'), `cats` of them replaced by ' cat' with act 5.0."""
    tokens = [VOCAB[i] for i in rng.integers(0, len(VOCAB), size=n)]
    acts = [0.0] * n
    for i in rng.choice(n, size=cats, replace=False):
        tokens[i], acts[i] = " cat", 5.0
    return Example(tokens, acts)


def _cat_unit(seed: int = 0, n_pos: int = 40, n_neg: int = 40) -> UnitExamples:
    """A feature that fires exactly on ' cat' (5.0) and nowhere else, in random windows."""
    rng = np.random.default_rng(seed)
    return UnitExamples(
        unit="feature 7",
        explain=[_window(rng, 16, 1) for _ in range(5)],
        score_pos=[_window(rng, 16, int(rng.integers(1, 3))) for _ in range(n_pos)],
        score_neg=[_window(rng, 16, 0) for _ in range(n_neg)],
        logits_top=[" cats", " kitten"],
    )


def test_true_explanation_scores_high_and_wrong_one_near_chance():
    unit = _cat_unit()
    llm = StandInLLM()
    [expl] = explain_all(llm, [unit])
    assert expl == "the word cat"  # quotes, prefix, 2nd sentence and final '.' stripped
    [good, bad] = score_all(llm, [unit, unit], [expl, "the word dog"])
    assert llm.calls == [("explain", 1), ("detection", 160), ("fuzzing", 160),
                         ("simulation", 160)]  # one batch per stage, both units in each
    assert good["unit"] == "feature 7" and good["explanation"] == "the word cat"
    assert good["n_detection"] == 80 and good["n_fuzzing"] == 80 and good["n_simulation"] == 80
    assert good["detection"] >= 0.95 and good["fuzzing"] >= 0.95 and good["simulation"] >= 0.95
    assert 0.3 <= bad["detection"] <= 0.7 and 0.3 <= bad["fuzzing"] <= 0.7
    assert bad["simulation"] <= 0.2


def test_score_all_batches_per_scorer_and_is_reproducible():
    units = [_cat_unit(1, 4, 3), _cat_unit(2, 2, 5)]
    llm = StandInLLM()
    res = score_all(llm, units, ["the word cat"] * 2, scorers=("fuzzing", "detection"), seed=3)
    assert [d for d, _ in llm.calls] == ["fuzzing", "detection"]  # one call per scorer asked
    assert set(res[0]) == {"unit", "explanation", "fuzzing", "n_fuzzing", "detection",
                           "n_detection", "fuzzing_auc", "detection_auc"}
    assert [r["n_detection"] for r in res] == [7, 7] and [r["n_fuzzing"] for r in res] == [8, 4]
    again = StandInLLM()
    assert score_all(again, units, ["the word cat"] * 2, ("fuzzing", "detection"), 3) == res
    assert again.requests == llm.requests  # same seed -> the same wrong marks


def test_unknown_scorer_is_refused():
    with pytest.raises(ValueError, match="bogus") as err:
        score_all(StandInLLM(), [_cat_unit()], ["x"], scorers=("detection", "bogus"))
    assert all(name in str(err.value) for name in SCORERS)
    with pytest.raises(ValueError, match="explanations"):
        score_all(StandInLLM(), [_cat_unit()], [], scorers=("detection",))


def test_balanced_accuracy_by_hand():
    # TPR: truth T at 0, 3, 4 -> predicted T at 0, 4: 2/3. TNR: truth F at 1, 2 -> 1/2.
    assert balanced_accuracy([1, 1, 0, 0, 1], [1, 0, 0, 1, 1]) == pytest.approx(7 / 12)
    assert balanced_accuracy([True, False, True], [True] * 3) == pytest.approx(2 / 3)  # TPR only
    assert balanced_accuracy([False, False, True], [False] * 3) == pytest.approx(2 / 3)  # TNR
    assert math.isnan(balanced_accuracy([], []))
    with pytest.raises(ValueError):
        balanced_accuracy([True], [True, False])


def test_auroc_by_hand():
    # positives 0.9, 0.4; negatives 0.4, 0.1: pairs (0.9>0.4) (0.9>0.1) (0.4=0.4: 1/2) (0.4>0.1)
    assert auroc([0.9, 0.4, 0.4, 0.1], [1, 1, 0, 0]) == pytest.approx(3.5 / 4)
    assert auroc([0.2, 0.8], [1, 0]) == 0.0
    assert auroc([0.3] * 4, [1, 0, 1, 0]) == 0.5  # one answer for all: no ranking
    assert math.isnan(auroc([0.5, 0.6], [1, 1]))
    with pytest.raises(ValueError):
        auroc([0.5], [1, 0])


class LeaningLLM(StandInLLM):
    """The stand-in's judgement, but it always answers No: p(yes) 0.4 where the stand-in would
    say yes, 0.1 where it would say no. A weak model's bias toward one answer, as measured."""

    def _answer(self, user: str) -> Completion:
        c = super()._answer(user)
        if c.text.strip() not in ("Yes", "No"):
            return c  # explanations and simulations as the stand-in gives them
        p = 0.4 if c.text.strip() == "Yes" else 0.1
        return Completion(" No", [(" No", {" No": math.log(1 - p), " Yes": math.log(p)})])


def test_auc_reads_the_ranking_of_a_model_that_leans_to_one_answer():
    unit = _cat_unit(4, 20, 20)
    [res] = score_all(LeaningLLM(), [unit], ["the word cat"], scorers=("detection", "fuzzing"))
    assert res["detection"] == 0.5 and res["fuzzing"] == 0.5  # every answer No
    assert res["detection_auc"] >= 0.95 and res["fuzzing_auc"] >= 0.95
    [wrong] = score_all(LeaningLLM(), [unit], ["the word dog"], scorers=("detection",))
    assert 0.3 <= wrong["detection_auc"] <= 0.7


def test_pearson_by_hand():
    # a - mean = (-1, 0, 1); b - mean(13/3) = (-7/3, -1/3, 8/3): cov 5, var 2 and 114/9.
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([0.1] * 5, [1, 2, 3, 4, 5]) == 0.0  # constant: no information
    assert pearson([1, 2, 3], [7, 7, 7]) == 0.0
    assert pearson([4.0], [2.0]) == 0.0


def test_yes_probability():
    lp = {" Yes": math.log(0.6), " No": math.log(0.2), " Maybe": math.log(0.1)}
    assert yes_probability(Completion(" Yes", [(" Yes", lp)])) == pytest.approx(0.75)
    split = {"yes": math.log(0.3), " Yes": math.log(0.3), "NO": math.log(0.2)}
    assert yes_probability(Completion("yes", [("yes", split)])) == pytest.approx(0.75)
    # A leading blank token is skipped: the answer token's candidates decide.
    blank = [("\n", {"\n": 0.0}), ("No", {"No": math.log(0.9), "Yes": math.log(0.1)})]
    assert yes_probability(Completion("\nNo", blank)) == pytest.approx(0.1)
    # Neither among the candidates, or no logprobs: the text decides.
    assert yes_probability(Completion("Yes.", [("Yes", {"Sure": -0.1})])) == 1.0
    assert yes_probability(Completion(' "No", it is not')) == 0.0
    assert yes_probability(Completion("I think so")) == 0.5
    assert yes_probability(Completion("")) == 0.5


def test_parse_simulation_lines_junk_and_logprobs():
    assert parse_simulation(Completion("0\t0\n1\t10\n2\t3\n"), 3) == [0.0, 10.0, 3.0]
    messy = "Sure! Here:\n0: 2\n 1 : 7\n2 cat 4\nblah 9\n3\t99\n1\t5\n12\t8\n"
    assert parse_simulation(Completion(messy), 5) == [2.0, 7.0, 4.0, 10.0, 0.0]
    assert parse_simulation(Completion("no idea"), 2) == [0.0, 0.0]
    half = {"3": math.log(0.5), "5": math.log(0.5)}
    lp = [("0", {}), ("\t", {}), ("3", half), ("\n", {}),
          ("1", {}), (":", {}), (" 7", {" 7": math.log(0.2), " x": -0.1, "10": math.log(0.2)}),
          ("\n", {}), ("2", {}), ("\t", {}), ("1", {"1": -0.1}), ("0", {"0": -0.1})]
    # '10' split over two tokens: its first token's candidates are not levels of '10'.
    assert parse_simulation(Completion("ignored", lp), 4) == pytest.approx([4.0, 8.5, 10.0, 0.0])


def test_fuzz_marks_correct_incorrect_and_deterministic():
    ex = Example([f"t{i}" for i in range(8)], [0, 5, 0, 2, 0, 0, 1, 0])
    assert fuzz_marks(ex, np.random.default_rng(0), correct=True) == [1, 3]  # >= 0.3 * 5
    wrong = fuzz_marks(ex, np.random.default_rng(0), correct=False)
    assert len(wrong) == 2 and all(ex.acts[i] == 0 for i in wrong)
    assert fuzz_marks(ex, np.random.default_rng(0), correct=False) == wrong
    drawn = {tuple(fuzz_marks(ex, np.random.default_rng(s), False)) for s in range(20)}
    assert len(drawn) > 1  # the draw does depend on the rng
    few = Example(list("abcd"), [5, 4, 1, 0.5])  # no zeros: the lowest of the rest fill in
    assert fuzz_marks(few, np.random.default_rng(0), True) == [0, 1]
    assert fuzz_marks(few, np.random.default_rng(0), False) == [2, 3]
    flat = Example(list("abc"), [0, 0, 0])  # no activation: the argmax alone is 'correct'
    assert fuzz_marks(flat, np.random.default_rng(0), True) == [0]
    assert fuzz_marks(flat, np.random.default_rng(0), False) in ([1], [2])
    assert fuzz_marks(Example(list("ab"), [5, 5]), np.random.default_rng(0), False) == []


def test_prompts_are_compact_and_marked():
    ex = Example(["The", " cat", " sat", "\n", " cat", " cat"], [0, 5, 1, 0, 2, 4])
    unit = UnitExamples("feature 1", [ex] * 12, [ex], [ex], logits_top=[" cats"])
    req = explain_request(unit, max_examples=3)
    user = req.messages[-1].content
    assert req.max_tokens == 48 and "ONE short phrase" in req.messages[0].content
    assert "Excerpt 1: The <<cat>> sat\\n <<cat cat>> [cat 10, cat 8, cat 4]" in user
    assert "Excerpt 3:" in user and "Excerpt 4:" not in user
    assert "Tokens it promotes: cats" in user and user.endswith("Explanation:")
    assert "Tokens it promotes" not in explain_request(UnitExamples("u", [ex], [], [])).messages[
        -1].content
    det = detection_request("cats", ex)
    assert (det.max_tokens, det.top_logprobs) == (2, 5)
    assert "Text: The cat sat\\n cat cat\n" in det.messages[-1].content
    fuzz = fuzzing_request("cats", ex, [0, 2])
    assert "Text: <<The>> cat <<sat>>\\n cat cat\n" in fuzz.messages[-1].content
    sim = simulation_request("cats", ex)
    assert sim.top_logprobs == 5 and sim.max_tokens >= 4 * 6 + 8
    assert "0\tThe\n1\t cat\n2\t sat\n3\t\\n\n" in sim.messages[-1].content


def test_parse_explanation():
    assert parse_explanation('Explanation: "the word cat." It is a noun.') == "the word cat"
    assert parse_explanation("\n  explanation: numbers like 3.5\nmore") == "numbers like 3.5"
    assert parse_explanation("Explanation:") == "(no explanation)"
    assert parse_explanation("") == "(no explanation)"
    assert len(parse_explanation("x" * 500)) == 200
