"""The report from the W&B API alone: a W&B run becomes the record its run directory would give.

The W&B API needs a server and a network, neither of which exists here, so these tests stand in
for ``wandb.Api`` with :class:`FakeApi`, whose runs hold what dynalign's tracker logs (config with
the launch, history at ``global_step``, summary with the newest ``eval_results``). What is checked
is real: the records :mod:`dynalign.report.wandb_source` builds, against the records the report
reads from a run directory holding the same numbers, and a report written from them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from dynalign import report
from dynalign.report import wandb_source
from dynalign.report.records import read_local_run

RESULTS = {"iteration": 1, "step": 2, "checkpoint": "/runs/x/iter_1",
           "pointwise": {"policy": {"overall": {"mean": 3.0, "ci_low": 2.5, "ci_high": 3.5, "n": 4}}},
           "pairwise": {"win_rate": 0.625, "ci_low": None},
           "lm_eval": {"tasks": ["arc"], "policy": {"arc": {"acc_norm": 0.52}},
                       "baseline": {"arc": {"acc_norm": 0.5}}, "delta": {"arc": {"acc_norm": 0.02}}}}
CONFIG = {"seed": 1, "steps_per_iteration": 2, "logger": {"group": "ablation-kl_beta"},
          "grpo": {"beta": 0.04}}
LAUNCH = {"overrides": ["+experiment=[preset_tiny,ablation_kl_beta]", "grpo.beta=0.04"],
          "swept": ["grpo.beta"], "job_num": 1}
TABLE = {"_type": "incremental-table-file", "nrows": 4}  # a samples table cell: not a metric
HISTORY = [
    {"_step": 1, "_runtime": 3.0, "global_step": 1, "reward/mean": 0.5, "time/step": 2.0, "samples": TABLE},
    {"_step": 2, "global_step": 2, "reward/mean": 0.7, "time/step": 4.0, "judge/parse_failure_rate": 0.2,
     "samples": TABLE},
    # the evaluation, added later by `python -m dynalign.evaluate` resuming the run: the next W&B step
    {"_step": 3, "global_step": 2, "eval/pairwise/win_rate": 0.625, "eval/ca/policy/overall/mean": 3.0},
]
# per prompt, as the evaluation's rows are summarised (eval_samples.jsonl without its texts)
PROMPTS = [{"id": "ca-eval-001", "source": "curated", "policy_tokens": 6, "external_score": 3.5,
            "pairwise": "win"},
           {"id": "ca-eval-002", "source": "curated", "policy_tokens": 6, "external_score": 2.5,
            "pairwise": "tie"}]
SUMMARY = {"_step": 3, "_wandb": {"runtime": 9}, "global_step": 2, "final_reward": 0.7, "skipped_steps": 0,
           "reward/mean": 0.7, "eval/pairwise/win_rate": 0.625, "samples": TABLE, "eval_results": RESULTS,
           "eval_prompts": PROMPTS}


class FakeRun:
    """What ``wandb.apis.public.Run`` offers the source: no server here, so the values are given."""

    def __init__(self, run_id="abc123", state="finished", config=None, summary=None, history=None,
                 group="ablation-kl_beta"):
        self.id, self.state, self.group = run_id, state, group
        self.name = "+experiment=[preset_tiny,ablation_kl_beta],grpo.beta=0.04,seed=1"
        self.path = ["me", "proj", run_id]
        self.config = {**CONFIG, "hydra": LAUNCH} if config is None else config
        self.summary_metrics = dict(SUMMARY) if summary is None else summary
        self._history = HISTORY if history is None else history

    def scan_history(self):
        return iter(self._history)


class FakeApi:
    def __init__(self, runs):
        self._runs, self.calls = runs, []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        return self._runs


def local_twin(root: Path) -> Path:
    """The run directory that the fake W&B run stands for, written by hand as a run writes it."""
    run = root / "ablation-kl_beta" / "1_grpo.beta=0.04"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(LAUNCH["overrides"]))
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
        {"hydra": {"job": {"num": 1}, "sweeper": {"params": {"grpo.beta": "0.0,0.04"}}}}))
    lines = [{"step": 1, "reward/mean": 0.5, "time/step": 2.0},
             {"step": 2, "reward/mean": 0.7, "time/step": 4.0, "judge/parse_failure_rate": 0.2},
             {"step": 2, "eval/pairwise/win_rate": 0.625, "eval/ca/policy/overall/mean": 3.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run / "summary.json").write_text(json.dumps({"global_step": 2, "final_reward": 0.7, "skipped_steps": 0}))
    (run / "eval" / "iter_1").mkdir(parents=True)
    (run / "eval" / "iter_1" / "eval_results.json").write_text(json.dumps(RESULTS))
    rows = [{**row, "prompt": "...", "policy_answer": "...", "external_reason": "ok"} for row in PROMPTS]
    (run / "eval" / "iter_1" / "eval_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def test_a_wandb_run_reads_as_its_run_directory(tmp_path):
    api = FakeApi([FakeRun()])
    (remote,) = wandb_source.wandb_records("me/proj", api=api)
    assert api.calls == [("me/proj", {"group": {"$regex": "^ablation-"}})]
    local = read_local_run(local_twin(tmp_path))
    differ = {k for k, v in asdict(remote).items() if not _same(v, asdict(local)[k])}
    assert differ == {"source", "run"}, {k: (asdict(remote)[k], asdict(local)[k]) for k in differ}
    assert (remote.source, remote.run) == ("wandb", "me/proj/abc123")
    # and the numbers, by hand
    assert (remote.axis, remote.value, remote.keys, remote.order, remote.status) == \
        ("kl_beta", "0.04", ("grpo.beta",), 1, "done")
    assert remote.steps == [1, 2] and remote.rewards == [0.5, 0.7] and remote.final_reward == 0.7
    assert remote.time_per_step_s == 3.0 and remote.judge_failure_rate == pytest.approx(0.2)
    assert (remote.ca_score, remote.win_rate, remote.eval_iteration) == (3.0, 0.625, 1)
    # per prompt: the external score and the pairwise outcome's points (win 1, tie 0.5)
    assert remote.ca_by_prompt == {"ca-eval-001": 3.5, "ca-eval-002": 2.5}
    assert remote.win_by_prompt == {"ca-eval-001": 1.0, "ca-eval-002": 0.5}


def test_states_of_runs_that_did_not_finish(tmp_path):
    crashed = wandb_source.wandb_record(FakeRun(run_id="c", state="crashed"), tmp_path)
    assert crashed.status == "failed" and crashed.steps == [1, 2]
    running = FakeRun(run_id="r", state="running")
    assert wandb_source.wandb_record(running, tmp_path).status == "incomplete"
    assert not (wandb_source.mirror_run(running, tmp_path) / "summary.json").exists()  # no final numbers yet
    preempted = FakeRun(run_id="p", state="finished", summary={**SUMMARY, "preempted": True})
    assert wandb_source.wandb_record(preempted, tmp_path).status == "preempted"
    never_evaluated = FakeRun(run_id="n", summary={"final_reward": 0.7}, history=HISTORY[:2])
    record = wandb_source.wandb_record(never_evaluated, tmp_path)
    assert record.eval_iteration is None and math.isnan(record.ca_score) and record.final_reward == 0.7


def test_an_unreachable_server_is_a_warning():
    class Broken:
        def runs(self, *args, **kwargs):
            raise ConnectionError("no network")

    with pytest.warns(UserWarning, match="no network"):
        assert wandb_source.wandb_records("me/proj", api=Broken()) == []


def test_make_report_from_wandb_alone(tmp_path, monkeypatch, capsys):
    import wandb

    monkeypatch.setattr(wandb, "Api", lambda **kwargs: FakeApi([FakeRun()]))  # no server here
    out = tmp_path / "report"
    assert report.main(["--wandb", "me/proj", "--out", str(out)]) == 0
    assert "kl_beta" in capsys.readouterr().out
    assert "me/proj/abc123" in (out / "runs.csv").read_text() and (out / "report.md").exists()
    assert report.main([]) == 2  # neither run directories nor W&B
    assert "give RUNS directories" in capsys.readouterr().err


def test_prompt_outcomes_keep_scores_and_outcomes_not_texts():
    from dynalign.eval.report import prompt_outcomes

    row = {"table": "eval", "id": "ca-eval-001", "source": "curated", "prompt": "How do I...?",
           "policy_answer": "Start by...", "policy_tokens": 6, "external_score": 3.5,
           "external_knowledge": 4.0, "external_reason": "ok", "pairwise": "win",
           "votes_policy_first": "policy,policy"}
    assert prompt_outcomes([row]) == [{"id": "ca-eval-001", "source": "curated", "policy_tokens": 6,
                                       "external_score": 3.5, "external_knowledge": 4.0, "pairwise": "win"}]
