"""The Dynamic Alignment loop end to end, in real subprocesses on the tiny model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from safetensors.torch import load_file

from dynalign.distributed import free_port

# Small but complete: 2 iterations x 2 steps, 4 prompts x 4 answers, short answers and verdicts.
FAST = ["iterations=2", "steps_per_iteration=2", "grpo.max_completion_length=8", "judge.max_new_tokens=24",
        "logger.samples_per_log=4"]


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "DYNALIGN_CACHE": str(cache), "PYTHONPATH": str(REPO_ROOT),
           "WANDB_MODE": "", "WANDB_API_KEY": "", "HYDRA_FULL_ERROR": "1"}
    env.pop("WANDB_MODE")
    env.pop("WANDB_API_KEY")
    env.update(extra)
    return env


def _train(run_dir: Path, *overrides: str, cache: Path, timeout: int = 600, env_extra=None,
           launcher: tuple[str, ...] = (sys.executable, "-m"),
           fast: bool = True) -> subprocess.CompletedProcess:
    cmd = [*launcher, "dynalign.train", f"hydra.run.dir={run_dir}", *(FAST if fast else ()), *overrides]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(cache, **(env_extra or {})), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(model_dir: Path) -> dict:
    return load_file(str(model_dir / "model.safetensors"))


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.slow
def test_default_run_end_to_end(tmp_path, cache_dir, tiny_model_path):
    run = tmp_path / "run"
    proc = _train(run, cache=cache_dir)
    out = proc.stdout + proc.stderr
    assert "dynalign: done: 2 iterations, 4 steps" in out
    assert "the embedded tiny model, whose weights are RANDOM" in out  # said once, before any step
    assert out.count("weights are RANDOM") == 1 and "dynalign: iteration 2: reward " in out
    # no library's INFO log line (Hydra's format: [time][logger][LEVEL]), e.g. the C compiler's
    # gcc commands when DeepSpeed probes for libaio
    assert not re.search(r"\]\[[\w.]+\]\[INFO\]", out), out

    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        for key in ("reward/mean", "judge/reward_std", "judge/knowledge_mean", "judge/parse_failure_rate",
                    "advantages/abs_mean", "train/loss", "train/entropy", "train/grad_norm", "train/lr",
                    "train/clip_frac_low", "train/clip_frac_high", "completions/length_mean",
                    "completions/truncated_frac", "perf/tokens_per_s",
                    "time/gen", "time/judge", "time/ref", "time/update", "time/sync"):
            assert key in m, key
        # the tiny preset judges by score-token probabilities: every reward is defined, in range
        assert m["judge/reward_nan_rate"] == 0.0 and 0.0 <= m["reward/mean"] <= 5.0
        assert m["train/grad_norm"] > 0
        step_phases = sum(m[f"time/{p}"] for p in ("gen", "judge", "adv", "ref", "update", "sync"))
        assert m["time/step"] == pytest.approx(step_phases)
    # once-per-iteration phases ride on the first step after them; the last ones on the summary
    boundary = {f"time/{p}" for p in ("export", "reference", "checkpoint", "eval")}
    assert "time/prompts" in metrics[0] and not boundary & metrics[0].keys()
    assert boundary | {"time/prompts"} <= metrics[2].keys()
    assert boundary <= json.loads((run / "summary.json").read_text()).keys()
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 * 4 and {"prompt", "completion", "reward", "reason"} <= set(samples[0])

    # W&B offline: a run directory with the composed config and one samples table, appended every step
    record = json.loads((run / "wandb_run.json").read_text())
    assert record["mode"] == "offline"
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    # offline runs keep config and group inside the run's record file until `wandb sync`
    (records,) = offline[0].glob("run-*.wandb")
    raw = records.read_bytes()
    assert b'"group_size":4' in raw and b"ca_compact" in raw and str(run).encode() in raw
    tables = offline[0] / "files" / "media" / "table"
    steps = sorted(int(p.name.split("_")[1]) for p in tables.glob("samples_*.table.json"))  # samples_<step>_
    assert steps == [1, 2, 3, 4]  # one table, an increment appended at each step

    # checkpoint and an exported policy whose weights moved away from the base model
    assert (run / "checkpoints" / "latest").exists()
    assert not _same_weights(_weights(run / "iter_2"), _weights(tiny_model_path))
    assert (run / "iter_1" / "tokenizer.json").exists()


@pytest.mark.slow  # the default run itself, W&B aside: about 40 s on 2 cores
def test_the_default_run_climbs_under_its_fixed_judge(tmp_path, cache_dir, tiny_model_path):
    run = tmp_path / "run"
    _train(run, "logger=none", cache=cache_dir, fast=False)
    metrics = _metrics(run)
    rewards = [m["reward/mean"] for m in metrics]
    assert len(rewards) == 12
    # measured on 2 cores: 1.866 -> 2.001 (seed 0, this run), and +0.113, +0.135 with seeds 1, 2;
    # within a step answers differ by ~0.01, so a rise of 0.03 is the policy, not noise
    assert rewards[-1] > rewards[0] + 0.03, rewards
    # the policy settled on what the judge likes
    assert metrics[-1]["train/entropy"] < metrics[0]["train/entropy"] - 1.0


@pytest.mark.slow
def test_frozen_judge_is_the_policy_as_each_iteration_began(tmp_path, cache_dir, tiny_model_path):
    run = tmp_path / "run"
    proc = _train(run, "logger=none", "judge.source=frozen", "steps_per_iteration=1",
                  f"model.name_or_path={tiny_model_path}", cache=cache_dir)
    out = proc.stdout + proc.stderr
    assert f"iteration 1 is judged by the frozen policy {tiny_model_path}" in out
    assert f"iteration 2 is judged by the frozen policy {run / 'iter_1'}" in out
    assert [m["step"] for m in _metrics(run)] == [1, 2]


@pytest.mark.slow
def test_sweep_runs_share_one_wandb_group(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    # generate-mode judging: the tiny model's verdicts are gibberish, so every reward is NaN,
    # counted as a parse failure, and no group carries a learning signal
    cmd = [sys.executable, "-m", "dynalign.train", "-m", f"hydra.sweep.dir={sweep}", *FAST,
           "judge.mode=generate", "iterations=1", "steps_per_iteration=1", "export_each_iteration=false",
           "grpo.lr=1e-5,2e-5"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(cache_dir), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    runs = sorted(p.parent for p in sweep.glob("*/wandb_run.json"))
    records = [json.loads((run / "wandb_run.json").read_text()) for run in runs]
    assert len(records) == 2
    assert records[0]["group"] == records[1]["group"] == str(sweep)
    assert ["grpo.lr=1e-05" in records[0]["name"], "grpo.lr=2e-05" in records[1]["name"]] == [True, True]
    for run in runs:
        (m,) = _metrics(run)
        assert m["judge/parse_failure_rate"] == 1.0 and m["judge/reward_nan_rate"] == 1.0
        assert m["reward/mean"] is None  # NaN in JSON: no reward was defined
        assert m["advantages/abs_mean"] == 0.0 and m["train/loss"] == 0.0


@pytest.mark.slow
def test_kill_then_resume_reproduces_the_uninterrupted_run(tmp_path, cache_dir):
    straight = tmp_path / "straight"
    _train(straight, "logger=none", cache=cache_dir)

    broken = tmp_path / "broken"
    cmd = [sys.executable, "-m", "dynalign.train", f"hydra.run.dir={broken}", *FAST, "logger=none"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(cache_dir), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (broken / "checkpoints" / "latest").exists():  # the end of iteration 1
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (broken / "iter_2").exists(), "killed too late to test anything"

    _train(broken, "logger=none", "resume=auto", cache=cache_dir)
    assert _same_weights(_weights(broken / "iter_2"), _weights(straight / "iter_2"))
    assert _metrics_without_times(broken) == _metrics_without_times(straight)


def _metrics_without_times(run_dir: Path) -> list[dict]:
    timing = ("time/", "perf/")
    return [{k: v for k, v in m.items() if not k.startswith(timing)} for m in _metrics(run_dir)]


@pytest.mark.slow
def test_sigterm_saves_a_loadable_checkpoint(tmp_path, cache_dir):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "dynalign.train", f"hydra.run.dir={run}", *FAST, "logger=none",
           "steps_per_iteration=50"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(cache_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "preempted; checkpoint saved" in out
    saved = (run / "checkpoints" / "latest").read_text().strip()
    step = json.loads((run / "checkpoints" / saved / "dynalign_state.json").read_text())["client_state"]
    assert 1 <= step["global_step"] < 100

    # the checkpoint loads: resume and finish the iteration one step later
    proc = _train(run, "logger=none", "iterations=1", f"steps_per_iteration={step['global_step'] + 1}",
                  "resume=auto", cache=cache_dir)
    assert f"resumed from {run / 'checkpoints'}" in proc.stdout + proc.stderr
    assert _metrics(run)[-1]["step"] == step["global_step"] + 1


@pytest.mark.slow
def test_a_run_can_end_without_its_optimizer_state(tmp_path, cache_dir):
    run = tmp_path / "run"
    proc = _train(run, "logger=none", "checkpoint_optimizer_at_end=false", "checkpoints_to_keep=1",
                  cache=cache_dir)
    out = proc.stdout + proc.stderr
    # each iteration's checkpoint is reported as written, DeepSpeed's files included
    reported = [line.split(": ") for line in out.splitlines() if line.startswith("dynalign: checkpoint /")]
    assert [where for _, where, _ in reported] == [f"checkpoint {run}/checkpoints/step_{n}" for n in (2, 4)]
    sizes = [size.split(" (")[0] for *_, size in reported]
    assert [size for *_, size in reported] == [f"{s} (1 kept, {s} in all)" for s in sizes]
    assert all(s.endswith(" MiB") for s in sizes)  # the tiny model with its optimizer state
    assert "the checkpoints dropped their optimizer and module states" in out and str(run / "iter_2") in out

    (step_dir,) = (run / "checkpoints").glob("step_*")
    assert step_dir.name == "step_4" and not list(step_dir.glob("*.pt"))
    on_disk = sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["checkpoint/size_gib"] == pytest.approx(on_disk / 2**30)
    assert on_disk < 2**20 and (run / "iter_2" / "model.safetensors").is_file()  # the final weights

    # continuing the run is refused in one line naming the checkpoint and why, before any model loads
    cmd = [sys.executable, "-m", "dynalign.train", f"hydra.run.dir={run}", *FAST, "logger=none",
           "iterations=3", "resume=auto"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(tmp_path / "empty-cache"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"dynalign: {step_dir}: keeps no optimizer or module state")
    assert "checkpoint_optimizer_at_end=false" in last and "Traceback" not in proc.stderr
    assert not (tmp_path / "empty-cache").exists()  # nothing was built or loaded
    # named as resume=PATH, it is refused before any model loads
    cmd = [sys.executable, "-m", "dynalign.train", f"hydra.run.dir={tmp_path / 'next'}", *FAST, "logger=none",
           f"resume={step_dir}"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(tmp_path / "empty-cache"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"dynalign: invalid config: resume: {step_dir} keeps no optimizer or module state")
    assert not (tmp_path / "empty-cache").exists()  # nothing was built or loaded


@pytest.mark.slow
def test_unreachable_wandb_does_not_stop_training(tmp_path, cache_dir):
    run = tmp_path / "run"
    proc = _train(run, "iterations=1", "steps_per_iteration=1", "logger.mode=online",
                  "logger.init_timeout_s=5", cache=cache_dir,
                  env_extra={"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "x" * 40})
    assert "W&B init failed" in proc.stderr
    assert len(_metrics(run)) == 1  # the local mirror kept everything


@pytest.mark.slow
def test_two_processes_under_torchrun(tmp_path, cache_dir):
    run = tmp_path / "run"
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m")
    # both ranks find an empty model cache and build the tiny model at once; then both sample
    # shards of the regenerated prompts from the ZeRO-3 policy and rank 0 writes them; after the
    # iteration each rank evaluates its share of the prompts and rank 0 writes the results
    _train(run, "logger=none", "iterations=1", "generator.regenerate_each_iteration=true",
           "generator.num_prompts=4", "generator.max_new_tokens=16", "eval.every_n_iterations=1",
           "eval.num_prompts=2", "eval.max_new_tokens=8", "eval.lm_eval_limit=4", "eval.bootstrap_samples=50",
           cache=tmp_path / "empty-cache", launcher=torchrun, timeout=900)
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 2]  # the steps, then the evaluation
    assert metrics[2]["eval/ca/policy/overall/n"] == 2 and "eval/lm_eval/policy/ca_mini_mc/acc" in metrics[2]
    assert json.loads((run / "eval" / "iter_1" / "eval_results.json").read_text())["iteration"] == 1
    assert (run / "iter_1" / "model.safetensors").exists()
    summary = json.loads((run / "prompts" / "iter_000" / "summary.json").read_text())
    assert summary["calls"] > 0
