"""dynalign.report.run: the report of one run, on a hand-made run directory with known numbers
(and, marked slow, on a real tiny run)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

from dynalign.report import run as run_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REWARDS = (1.0, 1.5, 2.0, 3.0)
STDS = (0.5, 0.25, None, 0.125)  # step 3 logged no std
KNOWLEDGE = (1.0, 2.0, 2.0, 3.0)
CARE = (1.0, 1.0, 2.0, 3.0)
FAILURES = (0.0, 0.5, 0.25, 0.25)
STEP_TIMES = (4.0, 2.0, 3.0, 10.0)

CONFIG = {
    "model": {"name_or_path": "Qwen/Qwen2.5-7B", "lora": {"enabled": True, "r": 8, "alpha": 16}},
    "judge": {"source": "external", "mode": "generate",
              "external": {"backend": "openai", "model": "judge-70b"},
              "rubric": {"name": "care_rubric", "aspects": [{"name": "knowledge"}, {"name": "care"}]}},
    "iterations": 2, "steps_per_iteration": 2,
    "grpo": {"prompts_per_step": 2, "group_size": 4, "lr": 3e-6, "loss_type": "dr_grpo", "beta": 0.04},
}


def make_run(root: Path, *, config: dict | None = CONFIG, finished: bool = True) -> Path:
    """A run directory as ``python -m dynalign.train`` leaves it (the files the report reads)."""
    run = root / "run"
    (run / ".hydra").mkdir(parents=True)
    if config is not None:
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for i in range(len(REWARDS)):
        line = {"step": i + 1, "iteration": float(i // 2), "reward/mean": REWARDS[i],
                "judge/reward_mean": REWARDS[i], "judge/knowledge_mean": KNOWLEDGE[i],
                "judge/knowledge_std": 0.1, "judge/care_mean": CARE[i], "judge/care_std": 0.1,
                "judge/score_mass_mean": 0.9, "judge/parse_failure_rate": FAILURES[i],
                "time/step": STEP_TIMES[i], "time/gen": 1.0 + i}
        if STDS[i] is not None:
            line["judge/reward_std"] = STDS[i]
        if i % 2 == 0:
            line["time/prompts"] = 0.5  # once per iteration, on its first step
        if i == 2:
            line["time/export"] = 2.0  # iteration 1's export, on the step after it
        lines.append(line)
    lines.insert(2, {"step": 2, "eval/pairwise/win_rate": 0.5})  # an in-training evaluation's line
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    if finished:
        summary = {"global_step": 4, "final_reward": 3.0, "time/export": 4.0}  # the last iteration's export
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def eval_results(checkpoint: str, ca: float = 2.5) -> dict:
    def stat(mean):
        return {"mean": mean, "ci_low": mean - 0.5, "ci_high": mean + 0.5, "n": 3, "missing": 0}

    def side(mean, failure):
        return {"overall": stat(mean), "aspects": {"knowledge": stat(mean + 0.25), "care": stat(mean - 0.25)},
                "failure_rate": failure, "scale": [0, 5]}

    return {
        "checkpoint": checkpoint, "baseline": "Qwen/Qwen2.5-7B", "iteration": 2,
        "prompts": {"total": 3, "curated": 3, "held_out": 0},
        "judge": {"backend": "openai", "model": "judge-70b", "mode": "generate", "rubric": "ca_rubric"},
        "pointwise": {"policy": side(ca, 0.0), "baseline": side(2.0, 1 / 3)},
        "pairwise": {"win_rate": 0.75, "ci_low": 0.5, "ci_high": 1.0, "wins": 2, "ties": 1, "losses": 0,
                     "failed": 1, "failure_rate": 0.25},
        "lm_eval": {"policy": {"mmlu": {"acc,none": 0.5, "acc_stderr,none": 0.1}},
                    "baseline": {"mmlu": {"acc,none": 0.25, "acc_stderr,none": 0.1}},
                    "delta": {"mmlu": {"acc,none": 0.25}}},
        "warnings": ["the external judge left 33% of the baseline's answers without a score"],
    }


SAMPLES = [
    {"prompt": "How do I help my town?", "baseline_answer": "I don't know.",
     "policy_answer": "Start a garden | share seeds.\nThen invite others.", "external_score": 4.0,
     "baseline_external_score": 1.0, "pairwise": "win"},
    {"prompt": "Second?", "policy_answer": "b", "baseline_answer": "\n\n", "external_score": None,
     "baseline_external_score": 2.0, "pairwise": "failed"},
    {"prompt": "Third?", "policy_answer": "c", "baseline_answer": "c0", "external_score": 1.0,
     "baseline_external_score": 1.0, "pairwise": "tie"},
    {"prompt": "Fourth?", "policy_answer": "d", "baseline_answer": "d0", "external_score": 1.0,
     "baseline_external_score": 1.0, "pairwise": "tie"},
]


def write_eval(directory: Path, checkpoint: str, **kwargs) -> Path:
    directory.mkdir(parents=True)
    (directory / "eval_results.json").write_text(json.dumps(eval_results(checkpoint, **kwargs)))
    (directory / "eval_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SAMPLES))
    return directory


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return make_run(tmp_path)


def test_report_json_holds_the_runs_numbers(run_dir, tmp_path):
    evaluation = write_eval(tmp_path / "eval", str(run_dir / "iter_2"))
    out = tmp_path / "report"
    run_report.build_run_report(run_dir, out, eval_dir=evaluation)
    data = json.loads((out / "report.json").read_text())

    assert data["status"] == "done" and data["aspects"] == ["knowledge", "care"]  # score_mass is no aspect
    steps = data["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]  # the evaluation's line is not a step
    assert [s["reward"] for s in steps] == list(REWARDS)
    assert [s["reward_std"] for s in steps] == list(STDS)  # null where not logged
    assert [s["aspects"]["knowledge"] for s in steps] == list(KNOWLEDGE)
    assert [s["aspects"]["care"] for s in steps] == list(CARE)
    assert [s["iteration"] for s in steps] == [1, 1, 2, 2]  # counted from 1, like iter_<k>/
    assert data["final_reward"] == 3.0
    assert data["judge_failure_rate"] == pytest.approx(0.25)  # mean of 0, 0.5, 0.25, 0.25
    assert data["time_per_step_s"] == pytest.approx(3.5)  # median of 4, 2, 3, 10
    timings = {t["phase"]: t for t in data["timings"]}
    assert [t["phase"] for t in data["timings"]][0] == "step"
    assert timings["gen"] == {"phase": "gen", "median_s": 2.5, "total_s": 10.0, "count": 4}
    assert timings["prompts"]["count"] == 2 and timings["prompts"]["total_s"] == 1.0
    assert timings["export"] == {"phase": "export", "median_s": 3.0, "total_s": 6.0, "count": 2}  # + summary

    settings = data["settings"]
    assert settings["lora"] == "r=8, alpha=16" and settings["judge_source"] == "external (openai:judge-70b)"
    assert (settings["iterations"], settings["steps_per_iteration"]) == (2, 2)
    assert (settings["prompts_per_step"], settings["group_size"], settings["lr"]) == (2, 4, 3e-6)

    e = data["evaluation"]
    assert e["ca"]["policy"]["overall"] == {"mean": 2.5, "ci_low": 2.0, "ci_high": 3.0}
    assert e["ca"]["baseline"]["care"]["mean"] == 1.75
    assert e["pairwise"]["win_rate"] == 0.75 and e["pairwise"]["ci_high"] == 1.0
    assert e["lm_eval"] == [{"task": "mmlu", "metric": "acc,none", "policy": 0.5, "baseline": 0.25,
                             "delta": 0.25}]  # standard errors left out
    assert [s["prompt"] for s in e["samples"]] == ["How do I help my town?", "Second?", "Third?"]
    assert e["samples"][1]["policy_score"] is None
    assert data["plots"] == {"reward": "plots/reward.png", "aspects": "plots/aspects.png"}
    for name in ("reward.png", "aspects.png"):
        assert (out / "plots" / name).read_bytes()[:8] == PNG_MAGIC


def test_report_markdown_tables(run_dir, tmp_path):
    evaluation = write_eval(tmp_path / "eval", str(run_dir / "iter_2"))
    out = tmp_path / "report"
    run_report.build_run_report(run_dir, out, eval_dir=evaluation, samples=2, title="KL sweep, beta 0.04")
    text = (out / "report.md").read_text()

    assert text.startswith("# KL sweep, beta 0.04\n")
    for line in ("| model | `Qwen/Qwen2.5-7B` |", "| LoRA | r=8, alpha=16 |",
                 "| judge | external (openai:judge-70b), generate mode |", "| rubric | care_rubric |",
                 "| iterations × steps | 2 × 2 |", "| prompts per step × group size | 2 × 4 = 8 answers |",
                 "| learning rate | 3e-06 |", "| loss, KL β | dr_grpo, 0.04 |"):
        assert line in text, line
    assert "| step | iteration | reward | reward std | knowledge | care | judge failure rate |" in text
    assert "| 2 | 1 | 1.500 | 0.250 | 2.000 | 1.000 | 0.500 |" in text
    assert "| 3 | 2 | 2.000 | n/a | 2.000 | 2.000 | 0.250 |" in text
    assert "Median time per step: **3.50 s**." in text and "| `gen` | 2.500 | 10.00 | 4 |" in text
    assert "![mean reward per step](plots/reward.png)" in text
    assert "| **overall** | 2.500 [2.000, 3.000] | 2.000 [1.500, 2.500] | 0.500 |" in text
    assert "| care | 2.250 [1.750, 2.750] | 1.750 [1.250, 2.250] | 0.500 |" in text
    assert "Win rate **0.750** [0.500, 1.000] (2 wins, 1 ties, 0 losses, 1 failed;" in text
    assert "| mmlu | `acc,none` | 0.500 | 0.250 | 0.250 |" in text and "stderr" not in text
    assert "- external judge, baseline answers: 0.333 left without a score" in text
    assert "- training judge: 0.250 of the judgements" in text
    assert "Note: the evaluated policy is not a checkpoint" not in text
    # the answers side by side, made safe for a table cell; two samples as asked
    assert "| base model (CA 1.000) | policy (CA 4.000) |" in text
    assert "| I don't know. | Start a garden \\| share seeds.<br>Then invite others. |" in text
    assert "| base model (CA 2.000) | policy (CA n/a) |" in text
    assert "| *(whitespace only, 2 characters)* | b |" in text
    assert "Third?" not in text


def test_missing_evaluation_says_not_evaluated(run_dir, tmp_path):
    out = tmp_path / "report"
    report = run_report.build_run_report(run_dir, out)
    text = (out / "report.md").read_text()
    assert report.evaluation is None
    assert f"not evaluated: {run_dir} has no eval/iter_<k>/eval_results.json." in text
    assert "- external judge: not evaluated" in text and "Sample answers" not in text
    data = json.loads((out / "report.json").read_text())
    assert data["evaluation"] is None and data["not_evaluated"].startswith("not evaluated")


def test_the_runs_newest_own_evaluation_is_the_default(run_dir, tmp_path):
    write_eval(run_dir / "eval" / "iter_1", str(run_dir / "iter_1"), ca=1.0)
    write_eval(run_dir / "eval" / "iter_2", str(run_dir / "iter_2"), ca=4.0)
    report = run_report.read_run_report(run_dir)
    assert report.evaluation is not None and report.evaluation.source == str(run_dir / "eval" / "iter_2")
    assert report.evaluation.ca["policy"]["overall"].mean == 4.0


def test_an_evaluation_of_another_policy_is_flagged(run_dir, tmp_path, monkeypatch):
    evaluation = write_eval(tmp_path / "eval", "/elsewhere/iter_1")
    text = run_report.render_run_markdown(run_report.read_run_report(run_dir, evaluation))
    assert f"Note: the evaluated policy is not a checkpoint of `{run_dir}`." in text
    # relative paths (evaluate and report started from the same directory) are this run's
    monkeypatch.chdir(tmp_path)
    relative = write_eval(tmp_path / "eval_relative", "run/iter_2")
    text = run_report.render_run_markdown(run_report.read_run_report(Path("run"), relative))
    assert "Note: the evaluated policy" not in text


def test_an_unfinished_run_without_config(tmp_path):
    run = make_run(tmp_path, config=None, finished=False)
    report = run_report.read_run_report(run)
    assert report.status == "incomplete" and report.final_reward == 3.0  # the last step's
    assert report.aspects == ["care", "knowledge"]  # no rubric: the logged means with a std beside them
    text = run_report.render_run_markdown(report)
    assert "| model | n/a |" in text and "| learning rate | n/a |" in text


def test_a_run_that_never_stepped(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "report"
    report = run_report.build_run_report(run, out)
    assert report.status == "failed" and report.steps == [] and not (out / "plots").exists()
    text = (out / "report.md").read_text()
    assert "n/a: no step was logged" in text and "n/a: no `time/*` metric was logged." in text
    assert math.isnan(report.final_reward)
    assert json.loads((out / "report.json").read_text())["final_reward"] is None


def test_long_runs_show_evenly_spaced_steps():
    rows = [run_report.StepRow(step=i, iteration=1, reward=0.0, reward_std=0.0, aspects={},
                               judge_failure_rate=0.0) for i in range(1, 121)]
    shown = run_report._shown_steps(rows)
    assert len(shown) <= run_report.MAX_TABLE_ROWS + 1
    assert [r.step for r in shown[:3]] == [1, 4, 7] and shown[-1].step == 120


def test_bad_directories_exit_1(tmp_path, run_dir, capsys):
    assert run_report.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 1
    assert "is not a run directory" in capsys.readouterr().err
    assert run_report.main([str(run_dir), "--eval", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "holds no eval_results.json" in capsys.readouterr().err


def test_cli_in_a_subprocess(run_dir, tmp_path):
    evaluation = write_eval(tmp_path / "eval", str(run_dir / "iter_2"))
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "dynalign.report.run", str(run_dir), "--eval", str(evaluation),
           "--out", str(out), "--samples", "1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "4 steps, final reward 3.000" in proc.stdout and proc.stderr.strip() == ""
    data = json.loads((out / "report.json").read_text())
    assert [s["reward"] for s in data["steps"]] == list(REWARDS) and len(data["evaluation"]["samples"]) == 1
    assert "| step | iteration | reward | reward std | knowledge | care |" in (out / "report.md").read_text()


@pytest.mark.slow  # a real tiny run evaluated in training, then its report: ~1-3 min on 2 cores
def test_report_of_a_real_tiny_run(tmp_path, cache_dir, tiny_model_path):
    run = tmp_path / "run"
    env = {**os.environ, "DYNALIGN_CACHE": str(cache_dir), "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "dynalign.train", f"hydra.run.dir={run}", "iterations=1",
           "steps_per_iteration=2", "logger=none", "grpo.max_completion_length=8", "judge.max_new_tokens=24",
           "eval.every_n_iterations=1", "eval.num_prompts=4", "eval.max_new_tokens=8", "eval.lm_eval_limit=4"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "report"
    assert run_report.main([str(run), "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["reward"] for s in data["steps"]] == [m["reward/mean"] for m in logged if "reward/mean" in m]
    assert data["aspects"] == ["knowledge", "benevolence", "power", "vitality"]
    assert data["evaluation"]["source"] == str(run / "eval" / "iter_1")
    assert data["evaluation"]["pairwise"]["win_rate"] is not None
    assert [r["task"] for r in data["evaluation"]["lm_eval"]][0] == "ca_mini_mc"
    assert len(data["evaluation"]["samples"]) == 3
    text = (out / "report.md").read_text()
    assert "| step | iteration | reward | reward std | knowledge | benevolence | power | vitality |" in text
