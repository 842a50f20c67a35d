"""The interp stage's example windows (interp/examples.py): windows never cross a context, the
explainer's and the scorers' windows are disjoint, the top windows go to the explainer, the
active ones are spread over the quantiles, the inactive ones never fire."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distributed_sae.interp.examples import (
    Split, UnitActs, sample_units, split_windows, unit_examples, window_rows)


def test_windows_stay_inside_their_context():
    w = window_rows(n_rows=3 * 10, context_size=10, window=4)  # 2 windows per context, tail cut
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [10, 11, 12, 13], [14, 15, 16, 17],
                          [20, 21, 22, 23], [24, 25, 26, 27]]
    with pytest.raises(ValueError, match=r"interp.window=12 is longer than a context"):
        window_rows(30, 10, 12)


def test_split_is_disjoint_and_takes_the_top_for_the_explainer():
    rng = np.random.default_rng(0)
    scores = np.zeros(200)
    scores[:60] = np.linspace(10.0, 0.5, 60)  # 60 active windows, the rest never fire
    rng.shuffle(scores)
    split = Split(explain_top=5, explain_quantile=3, score_active=6, score_inactive=6)
    explain, pos, neg = split_windows(scores, split, np.random.default_rng(1))
    assert len(explain) == 8 and len(pos) == 6 and len(neg) == 6
    assert not (set(explain) & set(pos)) and not (set(explain) | set(pos)) & set(neg)
    top5 = set(np.argsort(-scores)[:5])
    assert set(explain[:5]) == top5  # the strongest windows are the explainer's
    assert (scores[pos] > 0).all() and (scores[neg] == 0).all()
    # Over the quantiles: the active score windows span the range left after the top five.
    assert scores[pos].max() > 7 and scores[pos].min() < 2
    again = split_windows(scores, split, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(again, (explain, pos, neg)))  # seeded


def test_a_dense_unit_is_split_at_its_median():
    scores = np.arange(100, dtype=float)  # a neuron that is never exactly 0
    _, pos, neg = split_windows(scores, Split(2, 2, 5, 5), np.random.default_rng(0))
    assert (scores[pos] > 49.5).all() and (scores[neg] <= 49.5).all()


def test_a_rare_unit_gets_the_windows_there_are():
    scores = np.zeros(50)
    scores[[3, 17]] = [2.0, 1.0]
    explain, pos, neg = split_windows(scores, Split(5, 2, 4, 4), np.random.default_rng(0))
    assert explain.tolist() == [3, 17] and len(pos) == 0 and len(neg) == 4


def test_unit_examples_carry_tokens_and_acts():
    acts = torch.zeros(40, 2)  # (rows, units)
    acts[5, 0] = 3.0
    acts[25, 1] = 1.5
    units = UnitActs("feature", [7, 9], acts, [["a"], ["b"]])
    texts = [f"t{r}" for r in range(40)]
    out = unit_examples(units, window_rows(40, 20, 10), texts, Split(1, 0, 1, 2), seed=0)
    assert [u.unit for u in out] == ["feature 7", "feature 9"]
    assert out[0].explain[0].tokens == [f"t{r}" for r in range(10)]
    assert out[0].explain[0].acts[5] == 3.0 and out[0].explain[0].max_act == 3.0
    assert out[1].explain[0].tokens[5] == "t25" and out[1].logits_top == ["b"]
    assert all(e.max_act == 0 for e in out[0].score_neg)


def test_sample_units_is_seeded_and_sorted():
    a = sample_units(np.arange(100), 10, np.random.default_rng(3))
    assert a == sorted(a) and len(set(a)) == 10
    assert a == sample_units(np.arange(100), 10, np.random.default_rng(3))
    assert sample_units(np.array([4, 2]), 10, np.random.default_rng(0)) == [2, 4]
