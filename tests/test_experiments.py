"""The ablation suite: every preset x axis composes, every sweep point validates, one axis runs
end to end on the tiny preset and its report holds the runs' numbers."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from dynalign import report
from dynalign.config import CONF_DIR, EXPERIMENTS_DIR, register_configs, register_experiments, to_train_config

PRESETS = ("tiny", "full")


def _axes() -> list[str]:
    return sorted(p.stem.removeprefix("ablation_") for p in EXPERIMENTS_DIR.glob("ablation_*.yaml"))


def _make_axes() -> list[str]:
    """``ABLATION_AXES`` as make computes it (the Makefile derives it from experiments/)."""
    cmd = ["make", "-s", "--eval", "print-axes: ; @echo $(ABLATION_AXES)", "print-axes"]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split()


def _compose(overrides: list[str], hydra_config: bool = False):
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="train", overrides=overrides, return_hydra_config=hydra_config)
    finally:
        GlobalHydra.instance().clear()


def _experiment(preset: str, axis: str) -> str:
    return f"+experiment=[preset_{preset},ablation_{axis}]"


def _sweep_points(params) -> list[list[str]]:
    """The overrides of every job of a basic-sweeper ``params`` block (its cartesian product)."""
    parser = OverridesParser.create()
    points: list[list[str]] = [[]]
    for key, values in params.items():
        (override,) = parser.parse_overrides([f"{key}={values}"])
        assert override.is_sweep_override(), f"{key}: {values!r} is not a sweep"
        swept = [f"{key}={v}" for v in override.sweep_string_iterator()]
        points = [p + [s] for p in points for s in swept]
    return points


def test_make_and_the_report_find_every_ablation_file():
    assert _make_axes() == report.ablation_axes() == _axes()
    assert len(_axes()) == 8


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("axis", _axes())
def test_every_sweep_point_of_every_preset_validates(preset, axis):
    cfg = _compose([_experiment(preset, axis)], hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params, "an ablation defines its sweep in hydra.sweeper.params"
    assert cfg.logger.group == f"ablation-{axis}"
    assert cfg.hydra.sweep.dir == f"multirun/ablations/{preset}/ablation-{axis}"
    assert "experiment" in cfg.hydra.job.config.override_dirname.exclude_keys
    points = _sweep_points(params)
    assert len(points) >= 2
    for point in points:
        train_cfg = to_train_config(_compose([_experiment(preset, axis), *point]))
        key, value = point[0].split("=")
        if not (CONF_DIR / key).is_dir():  # a value, not a group choice: it arrived
            assert str(OmegaConf.select(OmegaConf.structured(train_cfg), key)).lower() == value.lower()


def test_tiny_preset_is_small_and_scores_by_logprob():
    cfg = to_train_config(_compose([_experiment("tiny", "kl_beta")]))
    assert cfg.model.name_or_path == "tiny" and cfg.rollout.backend == "hf"
    assert cfg.judge.mode == "logprob"  # generate mode on the tiny model: NaN rewards only
    # its own baseline, not the default run's values from conf/model/tiny.yaml
    assert (cfg.judge.source, cfg.judge.rubric.name, cfg.grpo.lr) == ("self", "ca_rubric", 1e-5)
    assert cfg.iterations * cfg.steps_per_iteration <= 2 and cfg.grpo.max_completion_length <= 8
    assert (cfg.judge.external.backend, cfg.judge.external.model) == ("hf", "tiny")
    generate = to_train_config(_compose([_experiment("tiny", "judge_mode"), "judge.mode=generate"]))
    assert generate.judge.mode == "generate"


def test_full_preset_runs_on_slurm_gpus():
    cfg = _compose([_experiment("full", "loss_type")], hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node >= 1 and launcher.tasks_per_node == 1  # dynalign: one process per job
    assert launcher.timeout_min > 0 and launcher.signal_delay_s > 0
    train_cfg = to_train_config(_compose([_experiment("full", "loss_type")]))
    assert train_cfg.model.lora.enabled and train_cfg.rollout.backend == "vllm"
    assert train_cfg.model.dtype == "bfloat16"


def test_the_slurm_launcher_composes_from_the_command_line():
    cmd = [sys.executable, "-m", "dynalign.train", "--cfg", "hydra", _experiment("tiny", "kl_beta"),
           "hydra/launcher=slurm"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SlurmLauncher" in proc.stdout and "grpo.beta: 0.0,0.04" in proc.stdout


def test_nested_experiment_names_compose(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "probe.yaml").write_text("# @package _global_\nseed: 7\n")
    repo = ConfigStore.instance().repo
    try:
        register_experiments(ConfigStore.instance(), tmp_path)
        assert _compose(["+experiment=sub/probe"]).seed == 7
    finally:
        repo.get("experiment", {}).pop("sub/probe.yaml", None)
        repo.get("experiment", {}).get("sub", {}).pop("probe.yaml", None)


@pytest.mark.slow
def test_tiny_preset_of_one_axis_end_to_end(tmp_path, cache_dir, tiny_model_path):
    """What `make ablations AXES=kl_beta` does: the sweep, then the report from the runs' records."""
    sweep = tmp_path / "multirun" / "ablation-kl_beta"
    env = {"DYNALIGN_CACHE": str(cache_dir), "PYTHONPATH": str(REPO_ROOT), "HYDRA_FULL_ERROR": "1",
           "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "dynalign.train", "-m", _experiment("tiny", "kl_beta"),
           f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0_grpo.beta=0.0", "1_grpo.beta=0.04"]  # the value only in the name

    out = tmp_path / "report"
    assert report.main([str(tmp_path / "multirun"), "--out", str(out)]) == 0
    with (out / "runs.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["axis"], r["value"], r["status"]) for r in rows] == [("kl_beta", "0.0", "done"),
                                                                    ("kl_beta", "0.04", "done")]
    for row, run in zip(rows, runs, strict=True):
        summary = json.loads((run / "summary.json").read_text())
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert float(row["final_reward"]) == pytest.approx(summary["final_reward"])
        assert int(row["steps"]) == len(metrics) == summary["global_step"] == 2
        median_step = statistics.median(m["time/step"] for m in metrics)
        assert float(row["time_per_step_s"]) == pytest.approx(median_step)
        assert float(row["judge_failure_rate"]) == 0.0  # logprob mode always gives a score
        assert row["ca_score"] == "n/a"  # not evaluated
    png = out / "plots" / "reward_kl_beta.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    text = (out / "report.md").read_text()
    assert "| kl_beta | `0.04` | 1 | 1 done |" in text and "(plots/reward_kl_beta.png)" in text
    assert "**One seed per value: no intervals and no tests.**" in text


def test_cpu_gemma_preset_composes_the_whole_loop_on_gemma():
    cfg = to_train_config(_compose(["+experiment=cpu_gemma"]))
    assert cfg.model.name_or_path == "gemma3_270m" and cfg.model.lora.enabled
    assert cfg.model.stop == ["\nQuestion:", "\n\n\n"]  # the model group's settings survive the preset
    assert cfg.judge.mode == "logprob" and cfg.judge.source == "self"
    assert cfg.judge.rubric.name == "ca_compact" and cfg.eval.rubric == "ca_compact"
    assert cfg.generator.name == "base_model" and cfg.generator.regenerate_each_iteration
    assert cfg.deepspeed.stage == 2  # one process: no partitioning to pay hooks for
    # evaluated once, after the last iteration, by the base model, with pairwise and lm-eval
    assert cfg.eval.every_n_iterations == cfg.iterations
    assert (cfg.eval.judge.backend, cfg.eval.judge.model) == ("hf", "gemma3_270m")
    assert cfg.eval.pairwise and cfg.eval.lm_eval_tasks == ["ca_mini_mc"]
