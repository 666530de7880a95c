"""Intervals over seeds and prompts, the paired difference, step bands and the last-K reward:
every expected value is worked out by hand in the comments (t quantiles of 1 and 2 degrees of
freedom have closed forms)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dynalign.eval.stats import (
    Interval,
    last_steps_mean,
    normal_critical,
    seed_prompt_interval,
    step_bands,
    t_critical,
)

T1 = math.tan(0.475 * math.pi)  # df 1: P(|T| <= t) = 2 atan(t) / pi = 0.95  ->  t = tan(0.475 pi) = 12.706
T2 = 0.95 * math.sqrt(2 / (1 - 0.95 ** 2))  # df 2: P(|T| <= t) = t / sqrt(t^2 + 2) = 0.95  ->  4.303


def test_t_critical_matches_the_closed_forms_and_tends_to_the_normal():
    assert t_critical(1) == pytest.approx(T1, rel=1e-12)
    assert abs(T1 - 12.706) < 5e-4  # the printed tables' value
    assert t_critical(2) == pytest.approx(T2, rel=1e-12)
    assert abs(T2 - 4.303) < 5e-4
    # df 3 (odd): 2/pi (theta + sin(theta) cos(theta)), theta = atan(t / sqrt 3), at the table's 3.182
    theta = math.atan(3.18245 / math.sqrt(3))
    assert 2 / math.pi * (theta + math.sin(theta) * math.cos(theta)) == pytest.approx(0.95, abs=1e-6)
    assert t_critical(3) == pytest.approx(3.18245, abs=1e-5)
    t_90 = 0.90 * math.sqrt(2 / (1 - 0.90 ** 2))  # the df 2 formula at another level
    assert t_critical(2, level=0.90) == pytest.approx(t_90, rel=1e-12)
    # wider with fewer seeds, the normal's 1.96 in the limit
    values = [t_critical(df) for df in (1, 2, 3, 5, 10, 30, 2000)]
    assert values == sorted(values, reverse=True)
    assert normal_critical() == pytest.approx(1.959964, abs=1e-6)
    assert t_critical(2000) == pytest.approx(normal_critical(), abs=2e-3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_critical(0)


def test_one_value_per_seed_is_a_t_interval_over_seeds():
    # seeds 1.0, 2.0, 3.0: mean 2, sample variance 1, se = sqrt(1 / 3), df 2
    got = seed_prompt_interval([1.0, 2.0, 3.0])
    half = T2 * math.sqrt(1 / 3)
    assert got == pytest.approx(Interval(2.0, 2.0 - half, 2.0 + half, 3))
    assert got.half_width == pytest.approx(half) and got.sign == 0  # 2 - 2.48 < 0: the interval holds 0
    # two seeds: 1.5 and 2.5 -> var 0.5, se sqrt(0.5 / 2) = 0.5, half-width 12.706 * 0.5
    two = seed_prompt_interval([[1.5], [2.5]])
    assert (two.mean, two.low, two.high) == pytest.approx((2.0, 2.0 - T1 * 0.5, 2.0 + T1 * 0.5))


def test_seeds_by_prompts_adds_both_spreads():
    # [seeds=2, prompts=2]: seed means 2.0, 2.05 (var 0.00125); prompt means 2.0, 2.05 (var 0.00125)
    # variance of the mean = 0.00125 / 2 + 0.00125 / 2 = 0.00125; half-width t(1) * sqrt(0.00125)
    got = seed_prompt_interval([[2.0, 2.0], [2.0, 2.1]])
    half = T1 * math.sqrt(0.00125)
    assert got.mean == pytest.approx(2.025) and got.half_width == pytest.approx(half)
    assert got.low == pytest.approx(1.5758, abs=1e-4) and got.sign == 1  # above 0: a supported difference
    # prompts alone differ, seeds agree: the prompt term is all there is
    # seed means 1.5, 1.5 (var 0); prompt means 1, 2 (var 0.5) -> variance 0.5 / 2
    flat = seed_prompt_interval([[1.0, 2.0], [1.0, 2.0]])
    assert flat.half_width == pytest.approx(T1 * math.sqrt(0.25))


def test_missing_values_are_left_out_not_filled():
    # seed 0: (0, NaN) -> 0; seed 1: (-0.5, 0.5) -> 0; seed 2: all NaN -> no seed
    # prompt means: (0 - 0.5) / 2 = -0.25 and 0.5 -> var 0.28125, / 2 prompts; seeds' var 0
    got = seed_prompt_interval([[0.0, math.nan], [-0.5, 0.5], [math.nan, math.nan]])
    assert got.seeds == 2 and got.mean == 0.0
    assert got.half_width == pytest.approx(T1 * math.sqrt(0.28125 / 2))
    assert got.sign == 0


def test_under_two_seeds_there_is_no_interval():
    one = seed_prompt_interval([[1.0, 3.0]])
    assert one.mean == 2.0 and one.seeds == 1 and math.isnan(one.low) and math.isnan(one.high)
    assert one.sign == 0  # nothing is supported by one run
    empty = seed_prompt_interval(np.empty((0, 3)))
    assert empty.seeds == 0 and math.isnan(empty.mean)
    assert seed_prompt_interval([[math.nan], [math.nan]]).seeds == 0


def test_paired_differences_cancel_what_seeds_share():
    # each seed moves both values alike (+0 / +10): unpaired the spread is huge, paired it vanishes
    baseline = np.array([[1.0], [11.0], [21.0]])  # [seeds, 1]
    treated = baseline + np.array([[0.5], [0.6], [0.7]])
    diff = seed_prompt_interval(treated - baseline)
    # differences 0.5, 0.6, 0.7: mean 0.6, var 0.01, se sqrt(0.01 / 3); df 2
    assert diff.mean == pytest.approx(0.6)
    assert diff.half_width == pytest.approx(T2 * math.sqrt(0.01 / 3))
    assert diff.sign == 1
    # the same values unpaired: 1.5, 11.6, 21.7 -> var ((-10.1)^2 + 10.1^2) / 2 = 102.01: holds 0
    unpaired = seed_prompt_interval(treated)
    assert unpaired.half_width == pytest.approx(T2 * math.sqrt(102.01 / 3)) and unpaired.sign == 0


def test_step_bands_per_step_over_seeds():
    curves = [[0.0, 1.0, 2.0], [0.0, 2.0, math.nan]]
    mean, low, high = step_bands(curves)
    assert mean.tolist() == pytest.approx([0.0, 1.5, 2.0])
    # step 1: both 0 -> a zero-width band; step 2: 1 and 2 -> 1.5 +- t(1) * sqrt(0.5 / 2); step 3: one seed
    assert low[0] == high[0] == 0.0
    assert (low[1], high[1]) == pytest.approx((1.5 - T1 * 0.5, 1.5 + T1 * 0.5))
    assert math.isnan(low[2]) and math.isnan(high[2])


def test_last_steps_mean():
    rewards = [0.0, 1.0, 2.0, math.nan, 4.0]
    assert last_steps_mean(rewards, 1) == 4.0
    assert last_steps_mean(rewards, 3) == pytest.approx(3.0)  # (2 + 4) / 2: the NaN step is left out
    assert last_steps_mean(rewards, 10) == pytest.approx(7 / 4)  # fewer steps than k: all of them
    assert math.isnan(last_steps_mean([math.nan], 2)) and math.isnan(last_steps_mean([], 2))
    with pytest.raises(ValueError):
        last_steps_mean(rewards, 0)
