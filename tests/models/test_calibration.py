"""Calibration figures of a confidence head against hand counts and brute force."""

from __future__ import annotations

import itertools
import random

import pytest

from deepspec.models.calibration import auroc, brier, ece, fit_sts, prefix_ece, prefix_survival, reliability


def brute_force_auroc(scores, outcomes):
    pairs = [
        (s, r)
        for (s, ys), (r, yr) in itertools.product(zip(scores, outcomes, strict=True), repeat=2)
        if ys and not yr
    ]
    return sum(1.0 if s > r else 0.5 if s == r else 0.0 for s, r in pairs) / len(pairs)


def test_auroc_equals_the_pair_count_with_ties():
    rng = random.Random(0)
    for _ in range(20):
        scores = [rng.choice([0.1, 0.2, 0.5, 0.7, 0.9]) for _ in range(30)]  # many ties
        outcomes = [rng.random() < s for s in scores]
        if any(outcomes) and not all(outcomes):
            assert auroc(scores, outcomes) == pytest.approx(brute_force_auroc(scores, outcomes))
    assert auroc([0.2, 0.9], [False, True]) == 1.0 and auroc([0.9, 0.2], [False, True]) == 0.0
    assert auroc([0.3, 0.4], [True, True]) is None


def test_ece_and_reliability_by_hand():
    # bin [0.2, 0.3): scores 0.2, 0.25, one kept -> gap |0.225 - 0.5|; bin [0.9, 1]: 0.9 and 1.0 kept
    scores, outcomes = [0.2, 0.25, 0.9, 1.0], [True, False, True, True]
    bins = reliability(scores, outcomes)
    assert [(b["lo"], b["count"]) for b in bins] == [(0.2, 2), (0.9, 2)]
    assert bins[0]["score"] == pytest.approx(0.225) and bins[0]["observed"] == 0.5
    assert ece(scores, outcomes) == pytest.approx((2 * 0.275 + 2 * 0.05) / 4)
    assert brier(scores, outcomes) == pytest.approx((0.8**2 + 0.25**2 + 0.1**2 + 0.0) / 4)
    assert ece([], []) is None and brier([], []) is None
    with pytest.raises(ValueError, match="2 scores for 1 outcomes"):
        ece([0.1, 0.2], [True])


def overconfident_rounds(n: int, slots: int, true_temperature: float, seed: int):
    """Rounds whose drafts survive with probability sigmoid(logit(c_k) / T): a head that is
    overconfident for T > 1. A round keeps drafts until the first one that does not survive."""
    rng = random.Random(seed)
    rounds = []
    for _ in range(n):
        c = [rng.uniform(0.05, 0.95) for _ in range(slots)]
        kept = 0
        for ck in c:
            p = 1 / (1 + ((1 - ck) / ck) ** (1 / true_temperature))
            if rng.random() >= p:
                break
            kept += 1
        rounds.append((c, kept))
    return rounds


def test_sequential_temperature_scaling_recovers_an_overconfident_head():
    fit, held_out = overconfident_rounds(4000, 3, 2.0, 0), overconfident_rounds(4000, 3, 2.0, 1)
    temperatures = fit_sts(fit, slots=3)
    assert 1.6 <= temperatures[0] <= 2.5  # slot 0 has no earlier slot to absorb the error
    before, after = prefix_ece(held_out, 3), prefix_ece(held_out, 3, temperatures)
    assert all(a < b / 2 for a, b in zip(after, before, strict=True)), (before, after)
    assert prefix_survival([0.5, 0.5]) == pytest.approx([0.5, 0.25])
    assert prefix_survival([0.8], [1e9]) == pytest.approx([0.5])  # an infinite temperature says 1/2
    assert fit_sts([], slots=2) == [1.0, 1.0] and prefix_ece([], 1) == [None]
