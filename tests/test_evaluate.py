"""``python -m dynalign.evaluate`` and ``evaluate_policy`` end to end on the tiny model, with the
tiny model as the external judge: gibberish in, judge failures counted (generate mode), numbers
out (logprob mode), files, tracker calls, history and the baseline cache."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from dynalign.config import to_train_config

RESULT_KEYS = {"checkpoint", "baseline", "iteration", "step", "timestamp", "prompts", "judge", "settings",
               "pointwise", "pairwise", "calibration", "lm_eval", "capability", "warnings", "timing",
               "metrics"}
# steps_per_iteration: the step an iteration's evaluation is logged at, pinned apart from the default run's
SMALL = ["eval.num_prompts=2", "eval.max_new_tokens=6", "eval.bootstrap_samples=100", "logger.backend=none",
         "steps_per_iteration=2"]


def _run(tmp_path, *overrides: str, cache) -> subprocess.CompletedProcess:
    env = {**os.environ, "DYNALIGN_CACHE": str(cache), "PYTHONPATH": str(REPO_ROOT)}
    args = [sys.executable, "-m", "dynalign.evaluate", *overrides, f"hydra.run.dir={tmp_path / 'out'}"]
    return subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("overrides, key", [
    ([], "checkpoint"),  # no checkpoint at all
    (["checkpoint=/nonexistent/dynalign/run"], "checkpoint"),
    (["checkpoint=.", "eval.num_prompts=0"], "eval.num_prompts"),
])
def test_bad_invocations_exit_2_naming_the_key(tmp_path, overrides, key):
    proc = _run(tmp_path, *overrides, cache=tmp_path / "cache")
    assert proc.returncode == 2, proc.stderr
    assert f"invalid config: {key}" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "cache").exists()  # failed before any model was built


@pytest.mark.slow  # a subprocess that loads the tiny model three times and runs lm-eval twice: ~40-70 s
def test_cli_on_a_run_directory_counts_judge_failures(tmp_path, cache_dir, tiny_model_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_model_path, run / "iter_3")  # a run directory whose newest export is iter_3
    proc = _run(tmp_path, f"checkpoint={run}", *SMALL, "judge.mode=generate", "judge.max_new_tokens=8",
                "eval.lm_eval_limit=4", cache=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results) == RESULT_KEYS
    assert results["checkpoint"] == str(run / "iter_3") and results["iteration"] == 3
    assert results["step"] == 3 * 2  # iteration x steps_per_iteration
    assert results["prompts"] == {"total": 2, "curated": 2, "held_out": 0}
    policy = results["pointwise"]["policy"]
    # a random model writes no nonce-tagged verdict: every judgement fails, nothing defaults
    assert policy["failure_rate"] == 1.0 and policy["overall"]["mean"] is None
    assert policy["overall"]["n"] == 0 and sum(policy["failures"].values()) == 2
    assert set(policy["aspects"]) == {"knowledge", "benevolence", "power", "vitality"}
    pairwise = results["pairwise"]
    assert pairwise["failed"] == 2 and pairwise["win_rate"] is None and pairwise["failure_rate"] == 1.0
    assert pairwise["policy_length_tokens"] == 6.0  # a random model never stops early
    assert results["calibration"]["n"] == 0 and results["calibration"]["self_failure_rate"] == 1.0
    lm = results["lm_eval"]
    assert 0.0 <= lm["policy"]["ca_mini_mc"]["acc"] <= 1.0
    assert lm["delta"]["ca_mini_mc"]["acc"] == 0.0  # the checkpoint is a copy of the base model
    # the same model on 4 items: delta 0, and either an interval far wider than the margin or, when
    # every item scored alike (stderr 0), none: capability is not shown either way
    task = results["capability"]["tasks"]["ca_mini_mc"]
    assert task["metric"] == "acc_norm" and task["delta"] == 0.0 and results["capability"]["margin"] == 0.02
    assert task["ci_low"] is None or task["ci_low"] < -0.02 < 0.0 < task["ci_high"]
    assert task["verdict"] == results["capability"]["verdict"] == "not shown"
    assert results["metrics"]["eval/capability/tasks/ca_mini_mc/delta"] == 0.0
    assert results["metrics"]["eval/pairwise/failed"] == 2.0
    assert any("without a score" in w for w in results["warnings"])
    rows = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["pairwise"] == "failed" and rows[0]["external_reason"] != "ok"
    summary = (out / "eval_summary.md").read_text()
    assert summary.splitlines()[0] in proc.stdout and "## Pairwise vs baseline" in summary
    assert len((out / "eval_history.jsonl").read_text().splitlines()) == 1
    assert list((cache_dir / "eval" / "lm_eval").glob("*.json"))  # the baseline's results are cached


class RecordingTracker:
    def __init__(self):
        self.logged, self.samples = [], []

    def log(self, metrics, step):
        self.logged.append((dict(metrics), step))

    def log_samples(self, rows, step):
        self.samples.append((list(rows), step))

    def log_artifact(self, kind, paths, iteration=None, metadata=None):
        assert kind == "eval" and all(p.exists() for p in paths)

    def log_summary(self, values):
        assert values["eval_results"]["iteration"] is not None

    def finish(self, summary=None):
        pass


@pytest.mark.slow  # two evaluations with logprob judging on 2 cores: ~40-80 s
def test_loop_hook_logs_numbers_and_reuses_the_baseline(tmp_path, compose_cfg, cache_dir, tiny_model_path,
                                                        monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import dynalign.eval.cache
    import dynalign.eval.runner as runner
    from dynalign.eval.answers import generate_answers
    from dynalign.judge import build_judge
    from dynalign.rollout import HFSampler

    overrides = [*SMALL, "judge.mode=logprob", "judge.source=self", "eval.lm_eval_tasks=[]"]
    cfg = to_train_config(compose_cfg(overrides))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).train()
    sampler = HFSampler(model, AutoTokenizer.from_pretrained(tiny_model_path), shares_weights=True)
    judge = build_judge(cfg.judge, sampler)  # the loop's self-judge
    monkeypatch.setattr(dynalign.eval.cache, "cache_root", lambda: tmp_path / "eval-cache")  # not shared
    answered = []

    def counting(*args, **kwargs):
        answered.append(kwargs["desc"])
        return generate_answers(*args, **kwargs)

    monkeypatch.setattr(runner, "generate_answers", counting)
    tracker = RecordingTracker()
    run_dir = tmp_path / "run"
    first = runner.evaluate_policy(cfg, tiny_model_path, out_dir=run_dir / "eval" / "iter_1", iteration=1,
                                   tracker=tracker, policy_sampler=sampler, self_judge=judge)
    assert model.training  # the training module is left as it was
    overall = first["pointwise"]["policy"]["overall"]
    assert 0.0 <= overall["mean"] <= 5.0 and overall["ci_low"] <= overall["mean"] <= overall["ci_high"]
    assert first["pointwise"]["policy"]["failure_rate"] == 0.0  # logprob mode always reads a score
    assert first["pairwise"]["decided"] == 2 and 0.0 <= first["pairwise"]["win_rate"] <= 1.0
    calibration = first["calibration"]
    assert calibration["n"] == 2 and calibration["mad"] >= 0.0 and not math.isnan(calibration["mad"])
    assert first["lm_eval"] == {}
    [(metrics, step)] = tracker.logged
    assert step == 2 and all(k.startswith("eval/") for k in metrics)
    expected = {"eval/ca/policy/overall/mean", "eval/pairwise/win_rate", "eval/calibration/spearman"}
    assert expected <= set(metrics)
    [(rows, _)] = tracker.samples
    assert len(rows) == 2 and {"prompt", "policy_answer", "baseline_answer", "external_score",
                               "self_score", "pairwise"} <= set(rows[0])
    assert all(isinstance(v, (str, int, float)) for v in rows[0].values())  # a W&B table as is
    assert answered == ["policy answers", "baseline answers"]

    runner.evaluate_policy(cfg, tiny_model_path, out_dir=run_dir / "eval" / "iter_2", iteration=2,
                           tracker=tracker, policy_sampler=sampler, self_judge=judge)
    assert answered[2:] == ["policy answers"]  # the baseline's answers came from the cache
    lines = (run_dir / "eval" / "eval_history.jsonl").read_text().splitlines()
    history = [json.loads(line) for line in lines]
    assert [h["iteration"] for h in history] == [1, 2]
    assert all(h["calibration"]["n"] == 2 for h in history)  # the calibration curve over iterations
    assert (run_dir / "eval" / "iter_2" / "eval_results.json").exists()


def test_the_loop_hook_runs_every_n_iterations_and_after_the_last(compose_cfg, tmp_path, monkeypatch):
    import dynalign.eval.runner as runner
    from dynalign.config import ConfigError

    calls = []
    monkeypatch.setattr(runner, "evaluate_policy",
                        lambda cfg, path, **kw: calls.append((path, kw)) or {"ok": 1})
    cfg = to_train_config(compose_cfg(["eval.every_n_iterations=2", "iterations=5"]))
    for k in range(1, 6):
        (tmp_path / f"iter_{k}").mkdir()
        (tmp_path / f"iter_{k}" / "config.json").write_text("{}")
    done = {k: runner.evaluate_iteration(cfg, tmp_path, k, tracker=None) for k in range(1, 6)}
    assert [k for k, r in done.items() if r] == [2, 4, 5]  # every 2nd, and the last
    path, kwargs = calls[0]
    assert path == tmp_path / "iter_2" and kwargs["out_dir"] == tmp_path / "eval" / "iter_2"
    assert kwargs["iteration"] == 2
    never = to_train_config(compose_cfg(["eval.every_n_iterations=0"]))
    assert runner.evaluate_iteration(never, tmp_path, 2) == {}
    with pytest.raises(ConfigError) as err:
        runner.evaluate_iteration(cfg, tmp_path / "no_exports", 2)
    assert err.value.key == "export_each_iteration"
