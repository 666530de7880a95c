"""Capability preservation as a stated test: per lm-eval task, the delta (policy - baseline,
positive = better) with its 95% interval from lm-eval's standard errors, a non-inferiority
margin, and a verdict per task and overall. Expected values are worked out by hand
(z = 1.959964 for 95%)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from dynalign.config import ConfigError, to_train_config
from dynalign.eval.report import flat_metrics, history_record, render_summary
from dynalign.eval.stats import (
    DEGRADED,
    NOT_SHOWN,
    PRESERVED,
    capability_summary,
    capability_verdict,
    main_metric,
    overall_verdict,
    stderr_key,
    task_capability,
)

Z = 1.959964  # P(|Z| <= z) = 0.95


@pytest.mark.parametrize("delta, stderr, low, high, verdict", [
    (0.01, 0.005, 0.01 - Z * 0.005, 0.01 + Z * 0.005, PRESERVED),  # [0.0002, 0.0198]: above -0.02
    (-0.01, 0.005, -0.01 - Z * 0.005, -0.01 + Z * 0.005, PRESERVED),  # [-0.0198, -0.0002]: still above
    (-0.05, 0.01, -0.05 - Z * 0.01, -0.05 + Z * 0.01, DEGRADED),  # [-0.0696, -0.0304]: below -0.02
    (-0.01, 0.01, -0.01 - Z * 0.01, -0.01 + Z * 0.01, NOT_SHOWN),  # [-0.0296, 0.0096]: straddles -0.02
    (0.30, 0.20, 0.30 - Z * 0.20, 0.30 + Z * 0.20, NOT_SHOWN),  # a big gain, too noisy to rule out a loss
    (-0.019, 0.001, -0.019 - Z * 0.001, -0.019 + Z * 0.001, NOT_SHOWN),  # [-0.02096, -0.01704]: just across
])
def test_verdict_from_delta_and_stderr(delta, stderr, low, high, verdict):
    got_low, got_high, got = capability_verdict(delta, stderr, 0.02)
    assert (got_low, got_high) == pytest.approx((low, high), abs=1e-6)
    assert got == verdict


def test_missing_delta_or_stderr_and_zero_stderr_are_not_shown():
    # a zero stderr: every item scored alike on both sides (0 of 4 right, say): no interval to claim from
    for delta, stderr in ((0.1, math.nan), (math.nan, 0.01), (0.0, 0.0), (-0.5, 0.0)):
        low, high, verdict = capability_verdict(delta, stderr, 0.02)
        assert math.isnan(low) and math.isnan(high) and verdict == NOT_SHOWN


def test_margin_zero_asks_for_no_loss_at_all():
    # +-1.96 * 0.001: [-0.00496, -0.00104] is below 0; [0.00104, 0.00496] above it
    assert capability_verdict(-0.003, 0.001, 0.0)[2] == DEGRADED
    assert capability_verdict(0.003, 0.001, 0.0)[2] == PRESERVED


def test_task_on_accuracy_with_its_stderrs():
    # delta 0.60 - 0.62 = -0.02; se = sqrt(0.03^2 + 0.04^2) = 0.05; interval -0.02 +- 0.098
    got = task_capability({"acc": 0.60, "acc_stderr": 0.03}, {"acc": 0.62, "acc_stderr": 0.04}, margin=0.02)
    assert got["metric"] == "acc" and got["higher_is_better"] is True
    assert got["delta"] == pytest.approx(-0.02) and got["stderr"] == pytest.approx(0.05)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((-0.02 - Z * 0.05, -0.02 + Z * 0.05), abs=1e-6)
    assert got["verdict"] == NOT_SHOWN and got["verdict_code"] == 0


def test_lower_is_better_flips_the_sign():
    # perplexity 10 (policy) vs 12 (baseline): better by 2; se sqrt(0.1^2 + 0.1^2) = 0.1414
    policy, baseline = {"perplexity": 10.0, "perplexity_stderr": 0.1}, {"perplexity": 12.0,
                                                                       "perplexity_stderr": 0.1}
    got = task_capability(policy, baseline, margin=0.5)
    assert got["higher_is_better"] is False and got["delta"] == pytest.approx(2.0)
    assert got["ci_low"] == pytest.approx(2.0 - Z * math.sqrt(0.02), abs=1e-6)
    assert got["verdict"] == PRESERVED
    worse = task_capability(baseline, policy, margin=0.5)  # the policy's perplexity rose by 2
    assert worse["delta"] == pytest.approx(-2.0) and worse["verdict"] == DEGRADED
    # lm-eval's own higher_is_better wins over the built-in list
    told = task_capability(policy, baseline, margin=0.5, higher_is_better={"perplexity": True})
    assert told["delta"] == pytest.approx(-2.0) and told["verdict"] == DEGRADED


def test_filtered_metrics_and_the_main_metric():
    assert stderr_key("acc") == "acc_stderr"
    assert stderr_key("exact_match,strict-match") == "exact_match_stderr,strict-match"
    assert main_metric({"acc": 0.1, "acc_stderr": 0.01, "acc_norm": 0.2}) == "acc_norm"
    assert main_metric({"exact_match,flexible-extract": 0.3, "exact_match,strict-match": 0.2}) == \
        "exact_match,flexible-extract"  # the first by name among equals
    assert main_metric({"zeta": 1.0, "alpha": 2.0}) == "alpha"
    assert main_metric({"acc_stderr": 0.1}) is None
    # 0.5 vs 0.5, stderrs 0.003 and 0.004 -> se 0.005: [-0.0098, 0.0098] above -0.02
    policy = {"exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.003}
    baseline = {"exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.004}
    got = task_capability(policy, baseline, margin=0.02)
    assert got["metric"] == "exact_match,strict-match" and got["stderr"] == pytest.approx(0.005)
    assert got["delta"] == 0.0 and got["verdict"] == PRESERVED


def test_missing_stderr_is_not_shown_and_unshared_metrics_are_skipped():
    # bootstrap_iters=0: lm-eval writes "N/A" stderrs, which task_metrics leaves out
    got = task_capability({"acc": 0.9}, {"acc": 0.1}, margin=0.02)
    assert got["delta"] == pytest.approx(0.8) and math.isnan(got["stderr"]) and got["verdict"] == NOT_SHOWN
    assert task_capability({"acc": 0.9}, {"f1": 0.1}, margin=0.02) is None


def test_overall_verdict_rules():
    assert overall_verdict([PRESERVED, PRESERVED]) == PRESERVED
    assert overall_verdict([PRESERVED, NOT_SHOWN]) == NOT_SHOWN  # preserved only if every task is
    assert overall_verdict([PRESERVED, DEGRADED, NOT_SHOWN]) == DEGRADED  # one degraded task is a finding
    assert overall_verdict([]) == NOT_SHOWN


LM_POLICY = {"arc": {"acc": 0.50, "acc_stderr": 0.01, "acc_norm": 0.55, "acc_norm_stderr": 0.005},
             "ppl": {"perplexity": 9.0, "perplexity_stderr": 0.2},
             "mmlu": {"acc": 0.40, "acc_stderr": 0.004}, "mmlu_law": {"acc": 0.1, "acc_stderr": 0.05},
             "only_policy": {"acc": 1.0}}
LM_BASELINE = {"arc": {"acc": 0.60, "acc_stderr": 0.01, "acc_norm": 0.56, "acc_norm_stderr": 0.005},
               "ppl": {"perplexity": 10.0, "perplexity_stderr": 0.2},
               "mmlu": {"acc": 0.41, "acc_stderr": 0.003}, "mmlu_law": {"acc": 0.5, "acc_stderr": 0.05}}


def test_summary_over_the_tasks_asked_for():
    # arc on acc_norm: -0.01 +- Z * sqrt(2) * 0.005 = [-0.0239, 0.0039] -> not shown at margin 0.02
    # ppl: +1.0 +- Z * sqrt(0.08) -> [0.446, 1.554] -> preserved
    # mmlu (the group, not its subtask): -0.01 +- Z * 0.005 = [-0.0198, -0.0002] -> preserved
    got = capability_summary(LM_POLICY, LM_BASELINE, margin=0.02, tasks=["arc", "ppl", "mmlu", "only_policy"])
    assert list(got["tasks"]) == ["arc", "ppl", "mmlu"]  # mmlu_law not asked; only_policy has no baseline
    assert got["tasks"]["arc"]["metric"] == "acc_norm"
    assert got["tasks"]["arc"]["ci_low"] == pytest.approx(-0.01 - Z * math.sqrt(2) * 0.005, abs=1e-6)
    assert [t["verdict"] for t in got["tasks"].values()] == [NOT_SHOWN, PRESERVED, PRESERVED]
    assert (got["verdict"], got["verdict_code"], got["margin"], got["level"]) == (NOT_SHOWN, 0, 0.02, 0.95)
    wider = capability_summary(LM_POLICY, LM_BASELINE, margin=0.03, tasks=["arc", "ppl", "mmlu"])
    assert wider["verdict"] == PRESERVED  # [-0.0239, ...] is above -0.03
    every = capability_summary(LM_POLICY, LM_BASELINE, margin=0.02)  # no task list: all shared tasks
    # mmlu_law: -0.4 +- Z * sqrt(0.005) = [-0.539, -0.261] -> degraded, and so overall
    assert every["tasks"]["mmlu_law"]["verdict"] == DEGRADED and every["verdict"] == DEGRADED
    empty = capability_summary({}, {}, margin=0.02)
    assert empty["tasks"] == {} and empty["verdict"] == NOT_SHOWN


def _results(capability):
    return {"checkpoint": "run/iter_1", "iteration": 1, "baseline": "base", "step": 2,
            "prompts": {"total": 2, "curated": 2, "held_out": 0},
            "judge": {"backend": "hf", "model": "tiny", "mode": "logprob", "rubric": "ca_rubric"},
            "settings": {"max_new_tokens": 8}, "timestamp": "t",
            "lm_eval": {"tasks": ["arc", "ppl"], "policy": LM_POLICY, "baseline": LM_BASELINE, "delta": {}},
            "capability": capability}


def test_results_carry_the_verdict_to_wandb_the_summary_and_the_history():
    capability = capability_summary(LM_POLICY, LM_BASELINE, margin=0.03, tasks=["arc", "ppl"])
    results = _results(capability)
    metrics = flat_metrics(results)
    assert metrics["eval/capability/verdict_code"] == 1.0 and metrics["eval/capability/margin"] == 0.03
    assert metrics["eval/capability/tasks/ppl/delta"] == pytest.approx(1.0)
    assert metrics["eval/capability/tasks/arc/verdict_code"] == 1.0
    assert "eval/capability/tasks/arc/ci_low" in metrics and "eval/capability/verdict" not in metrics
    text = render_summary(results)
    assert "## Capability preserved? (non-inferiority margin 0.030, 95% intervals)" in text
    assert "| ppl | perplexity (lower is better: sign flipped) | 9.000 | 10.000 | 1.000 [0.446, 1.554] | " \
           "preserved |" in text
    assert "Overall: **preserved**" in text
    assert history_record(results)["capability"] == PRESERVED
    assert "Capability preserved?" not in render_summary(_results({}))


def test_margin_must_not_be_negative(compose_cfg):
    with pytest.raises(ConfigError) as info:
        to_train_config(compose_cfg(["eval.capability_margin=-0.1"]))
    assert info.value.key == "eval.capability_margin" and ">= 0" in info.value.message
    assert to_train_config(compose_cfg(["eval.capability_margin=0.05"])).eval.capability_margin == 0.05


def test_a_negative_margin_stops_evaluate_before_any_model(tmp_path):
    env = {**os.environ, "DYNALIGN_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "dynalign.evaluate", "checkpoint=.",
                           "eval.capability_margin=-0.1", f"hydra.run.dir={tmp_path / 'out'}"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "invalid config: eval.capability_margin: must be >= 0 (got -0.1)" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "cache").exists()
