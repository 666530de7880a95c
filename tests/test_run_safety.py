"""Nothing lost, nothing duplicated, nothing executed: interrupted runs, shared run directories and
checkpoints from elsewhere, through the real CLI (``python -m dynalign.train`` subprocesses)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT
from test_train import FAST, _env, _metrics, _same_weights, _train, _weights

NO_LOGGER = "logger=none"
# the evaluation after each iteration, small: 2 prompts, short answers, no lm-eval task
SMALL_EVAL = ["eval.every_n_iterations=1", "eval.num_prompts=2", "eval.max_new_tokens=8",
              "eval.lm_eval_tasks=[]", "eval.bootstrap_samples=50"]


def _run(run_dir: Path, *overrides: str, cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """The CLI, whatever its exit status."""
    cmd = [sys.executable, "-m", "dynalign.train", f"hydra.run.dir={run_dir}", *FAST, NO_LOGGER, *overrides]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=_env(cache), capture_output=True, text=True,
                          timeout=timeout)


def _refusal(proc: subprocess.CompletedProcess) -> str:
    """The one line a refused run prints; it must have exited non-zero without a traceback."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def _record(run_dir: Path) -> dict[str, str]:
    """The run's launch record (``.hydra/``), by file name."""
    return {p.name: p.read_text() for p in sorted((run_dir / ".hydra").iterdir())}


def _steps(run_dir: Path) -> list[int]:
    return [m["step"] for m in _metrics(run_dir)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir) -> Path:
    """One iteration of two steps, checkpointed at step 2; tests work on copies."""
    run = tmp_path_factory.mktemp("finished") / "run"
    _train(run, NO_LOGGER, "iterations=1", cache=cache_dir)
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_resumes_without_duplicate_steps(tmp_path, cache_dir):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "dynalign.train", f"hydra.run.dir={run}", *FAST, NO_LOGGER, "iterations=1",
           "steps_per_iteration=3"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(cache_dir), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline, "the run ended before logging a step"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not (run / "checkpoints" / "latest").exists(), "killed too late to test anything"

    out = _train(run, NO_LOGGER, "iterations=1", "steps_per_iteration=3", "resume=auto", cache=cache_dir)
    assert "no checkpoint" in out.stdout + out.stderr and "starting from step 0" in out.stdout + out.stderr
    assert _steps(run) == [1, 2, 3]
    samples = [json.loads(line)["step"] for line in (run / "samples.jsonl").read_text().splitlines()]
    assert samples == sorted(samples) and samples.count(1) == samples.count(3)


@pytest.mark.slow
def test_a_missing_latest_resumes_from_the_newest_complete_checkpoint(finished_run, tmp_path, cache_dir):
    run = _copy(finished_run, tmp_path)
    (run / "checkpoints" / "latest").unlink()
    (run / "checkpoints" / ".tmp-step_3").mkdir()  # a save that crashed half-way never counts
    # what a kill during an export's swap left: its temporary directory and the old copy
    half = run / ".iter_2.4242-0a1b2c3d.tmp"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 2**20)
    shutil.copytree(run / "iter_1", run / ".iter_1.old-4242")
    proc = _train(run, NO_LOGGER, "iterations=2", "resume=auto", cache=cache_dir)
    assert f"resumed from {run / 'checkpoints' / 'step_2'}" in proc.stdout + proc.stderr
    assert f"that interrupted writes left in {run}" in proc.stdout
    assert not half.exists() and not (run / ".iter_1.old-4242").exists()
    assert _steps(run) == [1, 2, 3, 4]
    assert (run / "iter_2" / "model.safetensors").exists()


@pytest.mark.slow
def test_a_torn_last_metrics_line_is_dropped_on_resume(finished_run, tmp_path, cache_dir):
    run = _copy(finished_run, tmp_path)
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "reward/mean": 1.2')  # the write a kill cut short
    _train(run, NO_LOGGER, "iterations=2", "resume=auto", cache=cache_dir)
    assert _steps(run) == [1, 2, 3, 4]  # every line parses


@pytest.mark.slow
def test_a_fresh_run_in_a_used_directory_refuses_unless_told_to_overwrite(finished_run, tmp_path, cache_dir):
    run = _copy(finished_run, tmp_path)
    record = _record(run)
    line = _refusal(_run(run, "iterations=1", "seed=7", cache=tmp_path / "no-models"))
    assert str(run) in line and "resume=auto" in line and "overwrite=true" in line
    assert not (tmp_path / "no-models").exists() or not any((tmp_path / "no-models").iterdir())
    assert _steps(run) == [1, 2]  # untouched, its launch record too
    assert _record(run) == record

    proc = _train(run, NO_LOGGER, "iterations=1", "steps_per_iteration=1", "overwrite=true", cache=cache_dir)
    assert "deleted the earlier run" in proc.stdout + proc.stderr
    assert _steps(run) == [1] and not (run / "checkpoints" / "step_2").exists()
    assert "overwrite=true" in yaml.safe_load(_record(run)["overrides.yaml"])  # the new run's record


@pytest.mark.slow
def test_a_second_run_in_the_same_directory_refuses_and_names_the_first(tmp_path, cache_dir):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "dynalign.train", f"hydra.run.dir={run}", *FAST, NO_LOGGER,
           "steps_per_iteration=50"]
    first = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(cache_dir), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        lock = run / ".dynalign.lock"
        deadline = time.time() + 300
        written = run / ".hydra" / "overrides.yaml"  # the last file of its launch record
        while not lock.exists() or f"process {first.pid}" not in lock.read_text() or not written.exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        record = _record(run)
        line = _refusal(_run(run, "resume=auto", "seed=7", cache=cache_dir))
        assert f"is in use by process {first.pid}" in line and str(run) in line
        assert first.poll() is None  # the first run goes on, its launch record as it wrote it
        assert _record(run) == record
    finally:
        first.kill()
        first.wait()
    # the kernel released the killed run's lock: the directory can be resumed
    assert _run(run, "resume=auto", "iterations=1", "steps_per_iteration=1", cache=cache_dir).returncode == 0


@pytest.mark.slow
def test_sigterm_on_the_last_step_of_an_iteration_finishes_that_iteration_on_resume(tmp_path, cache_dir):
    """Export, reference move and evaluation of iteration 1 happen after the resume, and the run
    ends bitwise where an uninterrupted one does (the KL reference moved: grpo.beta > 0)."""
    settings = ["grpo.beta=0.1", *SMALL_EVAL]
    straight = tmp_path / "straight"
    _train(straight, NO_LOGGER, *settings, cache=cache_dir)

    broken = tmp_path / "broken"
    cmd = [sys.executable, str(REPO_ROOT / "tests" / "dist" / "train_until.py"), "2",
           f"hydra.run.dir={broken}", *FAST, NO_LOGGER, *settings]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(cache_dir), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "preempted; checkpoint saved at step 2" in proc.stdout + proc.stderr
    state = json.loads((broken / "checkpoints" / "step_2" / "dynalign_state.json").read_text())
    assert state["client_state"]["pending"] == ["export", "reference", "checkpoint", "eval"]
    assert not (broken / "iter_1").exists() and not (broken / "eval").exists()

    proc = _train(broken, NO_LOGGER, *settings, "resume=auto", cache=cache_dir)
    assert "still to run: export, reference, checkpoint, eval" in proc.stdout + proc.stderr
    for k in (1, 2):
        assert (broken / f"iter_{k}" / "config.json").exists()
        assert json.loads((broken / "eval" / f"iter_{k}" / "eval_results.json").read_text())["iteration"] == k
    history = (broken / "eval" / "eval_history.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in history] == [1, 2]
    assert _steps(broken) == _steps(straight)
    assert _same_weights(_weights(broken / "iter_2"), _weights(straight / "iter_2"))
    state = json.loads((broken / "checkpoints" / "step_4" / "dynalign_state.json").read_text())
    assert state["client_state"]["pending"] == [] and state["reference_updated"]


@pytest.mark.slow
def test_an_evaluation_interrupted_by_a_kill_runs_again_on_resume(finished_run, tmp_path, cache_dir):
    run = _copy(finished_run, tmp_path)
    # as if killed during the evaluation of iteration 1: the checkpoint says it is still to run
    state_file = run / "checkpoints" / "step_2" / "dynalign_state.json"
    state = json.loads(state_file.read_text())
    state["client_state"]["pending"] = ["eval"]
    state_file.write_text(json.dumps(state))
    proc = _train(run, NO_LOGGER, "iterations=1", "resume=auto", *SMALL_EVAL, cache=cache_dir)
    assert "still to run: eval" in proc.stdout + proc.stderr
    assert (run / "eval" / "iter_1" / "eval_results.json").exists()
    assert json.loads(state_file.read_text())["client_state"]["pending"] == []
    assert _steps(run)[:2] == [1, 2] and _steps(run).count(2) == 2  # the step, then the evaluation's line


class _Payload:
    """A pickle that, once loaded, would create ``marker``: what a crafted checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_a_crafted_pickle_in_a_checkpoint_is_refused_not_run(finished_run, tmp_path, cache_dir):
    run = _copy(finished_run, tmp_path)
    marker = tmp_path / "pwned"
    checkpoint = run / "checkpoints" / "step_2"
    (target,) = checkpoint.glob("*model_states.pt")
    target.write_bytes(pickle.dumps({"module": _Payload(marker)}))
    # its size on record too, as a careful forger would: the load must refuse the pickle itself
    state = json.loads((checkpoint / "dynalign_state.json").read_text())
    state["files"][target.name] = target.stat().st_size
    (checkpoint / "dynalign_state.json").write_text(json.dumps(state))
    line = _refusal(_run(run, "iterations=2", "resume=auto", cache=cache_dir))
    assert str(target) in line
    assert not marker.exists()


@pytest.mark.slow
def test_latest_must_name_a_checkpoint_beside_it(finished_run, tmp_path, cache_dir):
    run = _copy(finished_run, tmp_path)
    (run / "checkpoints" / "latest").write_text(str(finished_run / "checkpoints" / "step_2"))
    line = _refusal(_run(run, "iterations=2", "resume=auto", cache=cache_dir))
    assert str(run / "checkpoints" / "latest") in line


def test_an_unwritable_checkpoints_directory_is_found_before_any_model_loads(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a directory")
    line = _refusal(_run(run, "resume=auto", cache=tmp_path / "no-models"))
    assert str(run / "checkpoints") in line and "cannot write" in line
    assert not (tmp_path / "no-models").exists()
