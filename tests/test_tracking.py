"""W&B as the dashboard, in offline mode: names with the seed, credentials found as W&B finds
them, one incremental samples table per run, artifacts by reference, and an evaluation process
that adds to the training run it evaluates. The offline run files are read back with
:mod:`wandb_offline` (W&B's own record format; nothing is mocked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from wandb_offline import read_runs

from dynalign.config import LoggerConfig
from dynalign.tracking import (
    STEP_METRIC,
    SUMMARY_KEY,
    WANDB_ID_FILE,
    RunInfo,
    WandbTracker,
    evaluated_run,
    prompt_files,
    run_name,
    table_rows,
)

KEY = "k" * 40  # the shape of a W&B API key; never sent anywhere


def test_run_name_carries_the_seed():
    def info(name, seed=3):
        return RunInfo(run_dir=Path("."), name=name, group="g", config={"seed": seed})

    assert run_name(info("grpo.beta=0.04")) == "grpo.beta=0.04,seed=3"
    assert run_name(info("default")) == "default,seed=3"
    assert run_name(info("grpo.beta=0.04,seed=1", seed=1)) == "grpo.beta=0.04,seed=1"  # swept: once
    assert run_name(RunInfo(run_dir=Path("."), name="x", group="g", config={})) == "x"


def test_table_rows_spread_mappings_into_columns():
    rows = table_rows([{"prompt": "p", "reward": float("nan"), "scores": {"knowledge": 2.0, "power": 1}}])
    assert rows == [{"prompt": "p", "reward": None, "scores/knowledge": 2.0, "scores/power": 1}]


def test_evaluated_run_and_prompt_files(tmp_path):
    run = tmp_path / "run"
    (run / "iter_2").mkdir(parents=True)
    assert evaluated_run(run / "iter_2") is None  # no W&B id kept: the evaluation gets its own run
    (run / WANDB_ID_FILE).write_text("abc123")
    assert evaluated_run(run / "iter_2") == run and evaluated_run(run) == run
    assert prompt_files(run, 0) == [run / "prompts" / "iter_0.json"]
    (run / "prompts" / "iter_001").mkdir(parents=True)  # the policy wrote iteration 2's prompts
    assert prompt_files(run, 1) == [run / "prompts" / "iter_1.json", run / "prompts" / "iter_001"]


CREDENTIALS = """
import sys
from dynalign.tracking import resolve_wandb_mode
print(resolve_wandb_mode("auto"))
"""


def _mode(tmp_path: Path, name: str, netrc_host: str | None = None, **env: str) -> subprocess.Popen:
    home = tmp_path / name
    home.mkdir()
    if netrc_host:
        (home / ".netrc").write_text(f"machine {netrc_host}\n  login user\n  password {KEY}\n")
        (home / ".netrc").chmod(0o600)
    base = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k not in ("HOME", "NETRC")}
    return subprocess.Popen([sys.executable, "-c", CREDENTIALS], env={**base, "HOME": str(home), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_auto_mode_finds_credentials_the_way_wandb_does(tmp_path):
    host = "https://wandb.example.org"  # a self-hosted server: its netrc entry is not api.wandb.ai
    cases = {
        "env_key": _mode(tmp_path, "env_key", WANDB_API_KEY=KEY),
        "netrc_own_host": _mode(tmp_path, "netrc_own_host", "wandb.example.org", WANDB_BASE_URL=host),
        "netrc_other_host": _mode(tmp_path, "netrc_other_host", "wandb.example.org",
                                  WANDB_BASE_URL="https://other.example.org"),
        "nothing": _mode(tmp_path, "nothing"),
    }
    modes = {}
    for name, proc in cases.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        modes[name] = out.strip().splitlines()[-1]
    assert modes == {"env_key": "online", "netrc_own_host": "online", "netrc_other_host": "offline",
                     "nothing": "offline"}


def _tracker(run_dir: Path, **info) -> WandbTracker:
    cfg = LoggerConfig(mode="offline", project="dynalign-test")
    base = {"name": "grpo.beta=0.04", "group": "ablation-test", "config": {"seed": 7, "grpo": {"beta": 0.04}},
            "overrides": ("grpo.beta=0.04",), "swept": ("grpo.beta",), "job_num": 1}
    return WandbTracker(cfg, RunInfo(run_dir=run_dir, **{**base, **info}))


def _table_rows(offline_dir: Path, key: str) -> list[list]:
    """The rows of every increment of an incremental table, in order."""
    folder = offline_dir / "files" / "media" / "table" / Path(key).parent
    increments = sorted(folder.glob(f"{Path(key).name}_*.table.json"),
                        key=lambda p: int(p.name.split("_")[-2]))
    return [row for p in increments for row in json.loads(p.read_text())["data"]]


def test_offline_run_has_one_samples_table_artifacts_and_the_evaluation(tmp_path):
    run = tmp_path / "run"
    (run / "prompts").mkdir(parents=True)
    (run / "prompts" / "iter_0.json").write_text('["a prompt"]')
    (run / "iter_1").mkdir()
    (run / "iter_1" / "config.json").write_text("{}")
    tracker = _tracker(run)
    tracker.log_artifact("prompts", prompt_files(run, 0), 1, {"prompts": 1})
    for step in (1, 2, 3):
        tracker.log({"reward/mean": step / 10}, step)
        rows = [{"iteration": 0, "prompt": f"p{step}", "reward": step / 10, "scores": {"knowledge": step}},
                {"iteration": 0, "prompt": f"q{step}", "reward": float("nan"), "scores": {"knowledge": 0}}]
        tracker.log_samples(rows, step)
    tracker.log_artifact("policy", [run / "iter_1"], 1)
    tracker.log({"eval/pairwise/win_rate": 0.75}, 3)
    tracker.log_samples([{"table": "eval", "id": "ca-01", "pairwise": "win"}], 3)
    results = {"iteration": 1, "pairwise": {"win_rate": 0.75, "ci_low": float("nan")}}
    tracker.log_summary({SUMMARY_KEY: results})
    tracker.finish({"final_reward": 0.3})

    (offline,) = read_runs(run / "wandb")
    assert offline.id == (run / WANDB_ID_FILE).read_text()
    assert offline.name == "grpo.beta=0.04,seed=7" and offline.group == "ablation-test"
    assert offline.config["seed"] == 7
    assert offline.config["hydra"] == {"overrides": ["grpo.beta=0.04"], "swept": ["grpo.beta"], "job_num": 1}
    assert offline.step_metrics == {STEP_METRIC: "", "*": STEP_METRIC}  # every chart against the loop's step
    assert [row[STEP_METRIC] for row in offline.history] == [1, 2, 3]
    # one table key for the rollouts, appended every step; the evaluation's rows in a table of their own
    table_keys = {k for row in offline.history for k, v in row.items() if isinstance(v, dict)}
    assert table_keys == {"samples", "eval/samples"}
    assert [row["samples"]["nrows"] for row in offline.history] == [2, 4, 6]
    assert offline.history[2]["eval/samples"]["nrows"] == 1
    assert offline.history[2]["eval/pairwise/win_rate"] == 0.75  # the evaluation, in the same run
    rows = _table_rows(offline.path, "samples")
    assert [r[:3] for r in rows] == [[1, 0, "p1"], [1, 0, "q1"], [2, 0, "p2"], [2, 0, "q2"], [3, 0, "p3"],
                                     [3, 0, "q3"]]
    assert rows[1][3] is None and rows[4][4] == 3  # NaN reward -> empty cell; scores/knowledge column
    assert _table_rows(offline.path, "eval/samples") == [[3, "ca-01", "win"]]
    # artifacts point at the run directory's files, nothing uploaded
    (prompts,) = offline.artifact(f"prompts-{offline.id}")
    assert prompts.type == "dataset" and "iter_1" in prompts.aliases
    assert json.loads(prompts.metadata) == {"iteration": 1, "prompts": 1}
    (entry,) = prompts.manifest.contents
    assert entry.ref == (run / "prompts" / "iter_0.json").resolve().as_uri() and entry.size == 12
    (policy,) = offline.artifact(f"policy-{offline.id}")
    assert policy.type == "model" and [e.ref for e in policy.manifest.contents] == \
        [(run / "iter_1" / "config.json").resolve().as_uri()]
    assert offline.summary[SUMMARY_KEY] == {"iteration": 1, "pairwise": {"win_rate": 0.75, "ci_low": None}}
    assert offline.summary["final_reward"] == 0.3

    # an evaluation process continues the same W&B run: its files beside the training's
    (tmp_path / "eval_out").mkdir()
    evaluation = _tracker(tmp_path / "eval_out", name="eval-default", resume=run)
    evaluation.log({"eval/pairwise/win_rate": 0.5}, 3)
    evaluation.log_artifact("eval", [run / "iter_1" / "config.json"], 1)
    evaluation.finish({"eval/pairwise/win_rate": 0.5})
    first, second = read_runs(run / "wandb")
    assert second.id == first.id and second.resumed
    assert second.name == "" and not {"seed", "hydra"} & set(second.config)  # the training run's stay
    assert second.history == [{**second.history[0], "eval/pairwise/win_rate": 0.5, STEP_METRIC: 3}]
    assert second.summary["eval/pairwise/win_rate"] == 0.5
    assert second.artifact(f"eval-{first.id}")[0].type == "evaluation"
    record = json.loads((tmp_path / "eval_out" / "wandb_run.json").read_text())
    assert record["id"] == first.id and record["resumed"] == str(run) and record["name"] == first.name


def test_artifacts_can_be_uploaded_or_left_out(tmp_path):
    run = tmp_path / "run"
    (run / "iter_1").mkdir(parents=True)
    (run / "iter_1" / "config.json").write_text("{}")
    for mode in ("upload", "none"):
        (run / mode).mkdir()
        cfg = LoggerConfig(mode="offline", project="dynalign-test", artifacts=mode)
        tracker = WandbTracker(cfg, RunInfo(run_dir=run / mode, name="x", group="g", config={}))
        tracker.log_artifact("policy", [run / "iter_1"], 1)
        tracker.finish()
    (uploaded,) = read_runs(run / "upload" / "wandb")
    (entry,) = uploaded.artifact(f"policy-{uploaded.id}")[0].manifest.contents
    assert entry.path == "iter_1/config.json" and not entry.ref and entry.local_path  # a copy, to upload
    (skipped,) = read_runs(run / "none" / "wandb")
    assert skipped.artifacts == []


@pytest.mark.parametrize("bad", ["logger.artifacts=everything", "logger.mode=sometimes"])
def test_bad_logger_values_name_the_key(compose_cfg, bad):
    from dynalign.config import ConfigError, to_train_config

    with pytest.raises(ConfigError) as err:
        to_train_config(compose_cfg([bad]))
    assert err.value.key == bad.split("=")[0]


# ------------------------------------------------------------------ a real run, end to end

SMALL_EVAL = ["eval.num_prompts=2", "eval.max_new_tokens=6", "eval.bootstrap_samples=50",
              "eval.lm_eval_limit=4", "steps_per_iteration=2"]


def _dynalign(module: str, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    from conftest import REPO_ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(DYNALIGN_CACHE=str(cache), PYTHONPATH=str(REPO_ROOT), WANDB_MODE="offline",
               WANDB_SILENT="true")
    proc = subprocess.run([sys.executable, "-m", module, *overrides], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{overrides}\n{proc.stderr[-4000:]}"
    return proc


def _refs(artifact) -> list[str]:
    return sorted(Path(e.ref.removeprefix("file://")).name for e in artifact.manifest.contents)


class ReplayedRun:
    """What the W&B API would serve for the offline runs of one W&B run, replayed in order."""

    def __init__(self, segments):
        self.id, self.group, self.state = segments[0].id, segments[0].group, "finished"
        self.path = ["me", "proj", self.id]
        self.config = {k: v for k, v in segments[0].config.items() if k != "_wandb"}
        self.summary_metrics: dict = {}
        for segment in segments:
            self.summary_metrics.update(segment.summary)
        self._history = [row for segment in segments for row in segment.history]

    def scan_history(self):
        return iter(self._history)


@pytest.mark.slow  # a training run with its evaluation, then python -m dynalign.evaluate on it: ~2-3 min
def test_training_and_its_evaluations_land_in_one_wandb_run(tmp_path, cache_dir):
    from dynalign.report.records import read_local_run
    from dynalign.report.wandb_source import wandb_record

    run = tmp_path / "run"
    _dynalign("dynalign.train", cache_dir, f"hydra.run.dir={run}", "iterations=1",
              "grpo.max_completion_length=8", "judge.max_new_tokens=24", "logger.samples_per_log=4",
              "eval.every_n_iterations=1", "logger.group=ablation-test", *SMALL_EVAL)
    (offline,) = read_runs(run / "wandb")
    assert offline.id == (run / WANDB_ID_FILE).read_text() and offline.name.endswith(",seed=0")
    assert offline.config["seed"] == 0
    assert "logger.group=ablation-test" in offline.config["hydra"]["overrides"]
    # one samples table, appended at both steps; the evaluation's rows in one table of its own
    tables = {k for row in offline.history for k, v in row.items() if isinstance(v, dict)}
    assert tables == {"samples", "eval/samples"}
    assert [(row[STEP_METRIC], row["samples"]["nrows"]) for row in offline.history] == [(1, 4), (2, 8)]
    # the in-training evaluation sits in the history of the run it evaluates, at the step it ended
    assert 0.0 <= offline.history[1]["eval/ca/policy/overall/mean"] <= 5.0
    assert "eval/lm_eval/policy/ca_mini_mc/acc" in offline.history[1]
    assert offline.summary[SUMMARY_KEY]["iteration"] == 1 and offline.summary["final_reward"] is not None
    # the iteration's prompts, export and evaluation, by reference to the run directory's files
    (prompts,) = offline.artifact(f"prompts-{offline.id}")
    (policy,) = offline.artifact(f"policy-{offline.id}")
    (evaluation,) = offline.artifact(f"eval-{offline.id}")
    assert [a.type for a in (prompts, policy, evaluation)] == ["dataset", "model", "evaluation"]
    assert all("iter_1" in a.aliases for a in (prompts, policy, evaluation))
    assert _refs(prompts) == ["iter_0.json"] and "model.safetensors" in _refs(policy)
    assert _refs(evaluation) == ["eval_results.json", "eval_samples.jsonl", "eval_summary.md"]
    assert all(e.ref.startswith(f"file://{run}/") and not e.local_path  # nothing copied for upload
               for a in (prompts, policy, evaluation) for e in a.manifest.contents)
    # the report reads this W&B run as it reads the run directory
    local = read_local_run(run)
    remote = wandb_record(ReplayedRun([offline]), tmp_path / "mirror")
    assert {k: v for k, v in vars(remote).items() if k not in ("source", "run")} == \
        {k: v for k, v in vars(local).items() if k not in ("source", "run")}
    assert remote.ca_score == local.ca_score and remote.eval_iteration == 1 and remote.axis == "test"

    # a standalone evaluation of the run continues its W&B run: same id, its files beside the training's
    _dynalign("dynalign.evaluate", cache_dir, f"checkpoint={run}", f"hydra.run.dir={tmp_path / 'eval_out'}",
              *SMALL_EVAL)
    first, second = read_runs(run / "wandb")
    assert second.id == first.id and second.path.name > first.path.name
    (row,) = second.history
    assert row[STEP_METRIC] == 2 and "eval/pairwise/win_rate" in row  # charted at the step it evaluates
    assert second.summary[SUMMARY_KEY]["checkpoint"] == str(run / "iter_1")
    assert "iter_1" in second.artifact(f"eval-{first.id}")[0].aliases
    record = json.loads((tmp_path / "eval_out" / "wandb_run.json").read_text())
    assert record["id"] == first.id and record["resumed"] == str(run)
