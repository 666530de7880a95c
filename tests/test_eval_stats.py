"""Pure evaluation statistics on hand-made judgements: pairwise outcomes, win rates, bootstrap
intervals, calibration. Every expected value is computed by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dynalign.eval.stats import (
    bootstrap_ci,
    calibration_stats,
    longer_answer_win_rate,
    mean_abs_diff,
    mean_with_ci,
    nan_mean,
    pairwise_summary,
    pearson,
    spearman,
    to_unit_scale,
    win_rate,
)
from dynalign.judge.pairwise import order_vote, pair_outcome

P, B, T = "a", "b", "tie"  # the policy is side a


@pytest.mark.parametrize("policy_first, baseline_first, outcome", [
    (P, P, "win"),  # both orders prefer the policy
    (B, B, "loss"),
    (T, T, "tie"),
    (P, B, "tie"),  # the verdict follows the position: position bias, a tie
    (B, P, "tie"),
    (P, T, "tie"),  # one order undecided: disagreement, a tie
    (T, B, "tie"),
    (None, P, None),  # an order without a verdict: a judge failure
    (B, None, None),
    (None, None, None),
])
def test_pair_outcome_needs_both_orders_to_agree(policy_first, baseline_first, outcome):
    assert pair_outcome(policy_first, baseline_first) == outcome


def test_order_vote_is_the_majority_of_parsed_votes():
    assert order_vote([P]) == P
    assert order_vote([P, P, B]) == P
    assert order_vote([P, B]) == T  # a draw between the top votes
    assert order_vote([P, None, None]) == P  # unparsed judgements do not vote
    assert order_vote([None, None]) is None
    assert order_vote([]) is None
    with pytest.raises(ValueError, match="unknown pairwise votes"):
        order_vote(["A"])


def test_win_rate_by_hand():
    # 3 wins, 2 ties, 1 loss, 2 failures: (3 + 0.5 * 2) / 6 = 4 / 6
    outcomes = ["win", "win", "win", "tie", "tie", "loss", None, None]
    assert win_rate(outcomes) == pytest.approx(4 / 6)
    assert win_rate(["loss", "loss"]) == 0.0
    assert math.isnan(win_rate([None, None]))


def test_pairwise_summary_from_order_verdicts_by_hand():
    # pairs: win, win, loss, tie (position flip), tie (both tie), failed
    policy_first = [P, P, B, P, T, None]
    baseline_first = [P, P, B, B, T, P]
    s = pairwise_summary(policy_first, baseline_first, samples=500, seed=0)
    assert (s["wins"], s["ties"], s["losses"], s["failed"]) == (2, 2, 1, 1)
    assert s["decided"] == 5 and s["total"] == 6
    assert s["win_rate"] == pytest.approx((2 + 0.5 * 2) / 5)  # 0.6
    assert s["failure_rate"] == pytest.approx(1 / 6)
    assert s["order_agreement"] == pytest.approx(4 / 5)  # the flipped pair is the only disagreement
    assert s["ci_low"] <= s["win_rate"] <= s["ci_high"]
    assert 0.0 <= s["ci_low"] < s["ci_high"] <= 1.0


def test_pairwise_summary_all_failed_is_nan_not_a_default():
    s = pairwise_summary([None, None], [P, None], samples=100)
    assert s["failed"] == 2 and s["decided"] == 0 and s["failure_rate"] == 1.0
    assert math.isnan(s["win_rate"]) and math.isnan(s["ci_low"]) and math.isnan(s["order_agreement"])


def test_bootstrap_is_deterministic_with_a_seed_and_contains_the_mean():
    values = [1.0, 0.5, 0.0, 1.0, 1.0, 0.5, 0.0, 1.0, 0.5, 1.0]  # mean 0.65
    first = bootstrap_ci(values, samples=2000, seed=3)
    assert first == bootstrap_ci(values, samples=2000, seed=3)
    assert first != bootstrap_ci(values, samples=2000, seed=4)
    low, high = first
    assert low < 0.65 < high
    # the sd of the mean is sqrt(var / n) = sqrt(0.1525 / 10) ~ 0.123: a 95% interval spans ~4 sd
    assert 0.3 < high - low < 0.65


def test_bootstrap_edge_cases():
    assert bootstrap_ci([2.0, 2.0, 2.0], samples=100) == (2.0, 2.0)  # no spread: a point
    assert all(math.isnan(v) for v in bootstrap_ci([], samples=100))
    assert all(math.isnan(v) for v in bootstrap_ci([math.nan, math.nan], samples=100))
    assert all(math.isnan(v) for v in bootstrap_ci([1.0, 2.0], samples=0))  # disabled


def test_mean_with_ci_leaves_nan_out():
    stat = mean_with_ci([1.0, math.nan, 3.0, math.nan], samples=200, seed=0)
    assert stat["mean"] == 2.0 and stat["n"] == 2 and stat["missing"] == 2
    assert stat["ci_low"] <= 2.0 <= stat["ci_high"]
    assert math.isnan(nan_mean([math.nan]))


def test_longer_answer_win_rate_by_hand():
    outcomes = ["win", "win", "loss", "tie", None, "loss"]
    policy = [100, 50, 80, 10, 10, 40]
    baseline = [60, 90, 20, 10, 10, 40]
    # decided with unequal lengths: pair 0 (policy longer, won: longer won), pair 1 (policy shorter,
    # won: shorter won), pair 2 (policy longer, lost: longer lost); pair 5 has equal lengths
    assert longer_answer_win_rate(outcomes, policy, baseline) == pytest.approx(1 / 3)
    assert math.isnan(longer_answer_win_rate(["tie"], [1], [2]))


def test_spearman_and_pearson_by_hand():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert spearman(x, [10.0, 20.0, 30.0, 40.0, 50.0]) == pytest.approx(1.0)
    assert spearman(x, [5.0, 4.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert spearman(x, [1.0, 4.0, 9.0, 16.0, 100.0]) == pytest.approx(1.0)  # monotone, not linear
    assert pearson(x, [1.0, 4.0, 9.0, 16.0, 100.0]) < 0.95
    # ranks x: 1..4, y = [1, 3, 2, 4] -> d = [0, 1, 1, 0]; rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # ties get average ranks: y ranks [1.5, 1.5, 3, 4]; Pearson of ranks [1,2,3,4] with them
    r = np.array([1.5, 1.5, 3.0, 4.0]) - 2.5
    expected = float((np.array([-1.5, -0.5, 0.5, 1.5]) * r).sum() / math.sqrt(5.0 * (r * r).sum()))
    assert spearman([1, 2, 3, 4], [7, 7, 8, 9]) == pytest.approx(expected)


def test_correlations_are_nan_aware_and_nan_without_spread():
    # NaN in either list drops the pair: what is left is [1, 2, 3] vs [2, 4, 6]
    assert spearman([1, 2, math.nan, 3, 4], [2, 4, 5, 6, math.nan]) == pytest.approx(1.0)
    assert math.isnan(spearman([1.0, 2.0], [3.0, 3.0]))  # no spread
    assert math.isnan(spearman([1.0], [1.0]))
    with pytest.raises(ValueError):
        spearman([1.0, 2.0], [1.0])


def test_calibration_stats_by_hand():
    self_scores = [4.0, 3.0, math.nan, 5.0, 2.0]
    external = [3.0, 3.0, 1.0, 4.0, math.nan]
    # pairs kept: (4, 3), (3, 3), (5, 4): |d| = 1, 0, 1 -> MAD 2/3; self - external = 1, 0, 1 -> bias 2/3
    stats = calibration_stats(self_scores, external)
    assert stats["n"] == 3
    assert stats["mad"] == pytest.approx(2 / 3)
    assert stats["bias"] == pytest.approx(2 / 3)
    # ranks self [2, 1, 3] vs external [1.5, 1.5, 3]: Pearson of the ranks
    a, b = np.array([0.0, -1.0, 1.0]), np.array([-0.5, -0.5, 1.0])
    assert stats["spearman"] == pytest.approx(float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum())))
    assert mean_abs_diff([math.nan], [1.0]) != mean_abs_diff([math.nan], [1.0])  # NaN: nothing to compare


def test_unit_scale():
    assert to_unit_scale([1.0, 5.5, 10.0], 1, 10).tolist() == pytest.approx([0.0, 0.5, 1.0])
