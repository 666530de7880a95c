"""The evaluation's judging glue on hand-made judge results: pointwise summaries, chunks and
calibration (pairwise judging is tested with the judge: tests/test_judge_pairwise.py)."""

from __future__ import annotations

import math

import pytest
import torch

from dynalign.eval.judging import concat_results, pointwise_summary
from dynalign.eval.runner import calibration
from dynalign.judge import JudgeResult


def result(rewards, scores, reasons, scale=(0, 5), names=("knowledge", "power")):
    return JudgeResult(rewards=torch.tensor(rewards), scores=torch.tensor(scores), reasons=reasons,
                       judgement_reasons=[[r] for r in reasons], texts=[[""] for _ in reasons],
                       nonces=["n"] * len(reasons), aspect_names=names, scale=scale)


def test_pointwise_summary_by_hand():
    nan = math.nan
    r = result([4.0, nan, 2.0], [[5.0, 3.0], [nan, nan], [2.0, 2.0]], ["ok", "no_verdict", "ok"])
    s = pointwise_summary(r, samples=200, seed=0)
    assert s["overall"]["mean"] == 3.0 and s["overall"]["n"] == 2 and s["overall"]["missing"] == 1
    assert s["aspects"]["knowledge"]["mean"] == 3.5 and s["aspects"]["power"]["mean"] == 2.5
    assert s["failure_rate"] == pytest.approx(1 / 3)
    assert s["judgement_failure_rate"] == pytest.approx(1 / 3)
    assert s["failures"] == {"no_verdict": 1}
    assert s["overall"]["ci_low"] <= 3.0 <= s["overall"]["ci_high"]


def test_concat_results_keeps_order():
    a = result([1.0], [[1.0, 1.0]], ["ok"])
    b = result([2.0, 3.0], [[2.0, 2.0], [3.0, 3.0]], ["ok", "ok"])
    joined = concat_results([a, b])
    assert joined.rewards.tolist() == [1.0, 2.0, 3.0] and len(joined) == 3


def test_calibration_on_the_same_scale_and_across_scales():
    nan = math.nan
    self_r = result([4.0, 3.0, 5.0, nan], [[4.0, 4.0], [3.0, 3.0], [5.0, 5.0], [nan, nan]],
                    ["ok", "ok", "ok", "empty"])
    ext_r = result([3.0, 3.0, 4.0, 2.0], [[3.0, 3.0], [3.0, 3.0], [4.0, 4.0], [2.0, 2.0]], ["ok"] * 4)
    same = calibration(self_r, ext_r)
    assert same["scale"] == "raw" and same["n"] == 3
    assert same["mad"] == pytest.approx(2 / 3) and same["bias"] == pytest.approx(2 / 3)
    assert same["self_failure_rate"] == 0.25
    assert set(same["aspects"]) == {"knowledge", "power"}
    # a 1-10 self rubric against the 0-5 external one: both mapped to [0, 1] first
    ten = result([10.0, 1.0], [[10.0, 10.0], [1.0, 1.0]], ["ok", "ok"], scale=(1, 10))
    five = result([5.0, 0.0], [[5.0, 5.0], [0.0, 0.0]], ["ok", "ok"])
    unit = calibration(ten, five)
    assert unit["scale"] == "unit" and unit["mad"] == pytest.approx(0.0)
