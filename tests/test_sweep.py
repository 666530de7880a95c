"""Sweeps and launches: every job on every rank, ranks from SLURM's variables, a clean end to each
job, and the collective timeout. Real processes throughout: torchrun, or two plain ``python``
processes given the variables ``srun`` would set (there is no SLURM here)."""

from __future__ import annotations

import gc
import json
import os
import platform
import random
import re
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from safetensors.torch import load_file

from dynalign.config import ConfigError, to_train_config
from dynalign.distributed import (
    LAUNCHER_VARIABLES,
    SLURM_PORT_BASE,
    SLURM_PORT_SPAN,
    first_slurm_host,
    free_port,
    name_local_size,
    slurm_launch,
    slurm_tasks_per_node,
)

# One step of 4 prompts x 4 answers, short answers and verdicts, no W&B.
QUICK = ["logger=none", "iterations=1", "steps_per_iteration=1", "grpo.max_completion_length=8",
         "judge.max_new_tokens=8"]


def _env(cache: Path, **extra: str) -> dict[str, str]:
    """A clean environment: no launcher variables of this process, the session's model cache."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("SLURM_")}
    env.update(DYNALIGN_CACHE=str(cache), PYTHONPATH=str(REPO_ROOT), HYDRA_FULL_ERROR="1", **extra)
    return env


def _slurm_task(rank: int, job_id: int, tasks: int = 2) -> dict[str, str]:
    """The variables ``srun --ntasks 2`` sets for task ``rank`` on one node."""
    return {"SLURM_JOB_ID": str(job_id), "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank), "SLURM_NTASKS": str(tasks), "SLURM_STEP_NUM_TASKS": str(tasks),
            "SLURM_STEP_NODELIST": "localhost", "SLURM_NODELIST": "localhost"}


def _free_slurm_job_id() -> int:
    """A job id whose rendezvous port (:func:`slurm_launch`) is free here now."""
    while True:
        job_id = random.randrange(1, 10**7)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN))
                return job_id
            except OSError:
                continue


def _srun(args: list[str], cache: Path, cwd: Path, timeout: int, env_extra: dict[str, str] | None = None,
          ) -> list[subprocess.CompletedProcess]:
    """``args`` run as the two tasks of one simulated srun step (plain processes, no launcher)."""
    job_id = _free_slurm_job_id()
    procs = [subprocess.Popen([sys.executable, *args], cwd=cwd, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env=_env(cache, **_slurm_task(rank, job_id), **(env_extra or {})))
             for rank in (0, 1)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _ranks_in_checkpoint(run_dir: Path) -> list[str]:
    """The ranks whose ZeRO shards the run's newest checkpoint holds (each rank writes its own)."""
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    return sorted(p.name.split("_")[3] for p in latest.glob("zero_pp_rank_*_optim_states.pt"))


# ------------------------------------------------------------------ SLURM's variables


@pytest.mark.parametrize("nodelist,first", [
    ("node7", "node7"),
    ("gpu[03-05,9],cpu1", "gpu03"),
    ("a1,b[2-3]", "a1"),
    ("rack[1-2]-n[07-08]", "rack1-n07"),
    ("n[12]", "n12"),
])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_a_task_of_an_srun_step_gets_its_rank_from_slurm():
    env = {**_slurm_task(5, job_id=123456, tasks=16), "SLURM_LOCALID": "1",
           "SLURM_STEP_NODELIST": "gpu[07-14]", "SLURM_NODELIST": "gpu[01-40]"}
    assert slurm_launch(env) == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                                 "MASTER_PORT": str(12000 + 123456 % 20000)}  # 15456
    pinned = slurm_launch({**env, "MASTER_ADDR": "ib-gpu07", "MASTER_PORT": "29500"})
    assert (pinned["MASTER_ADDR"], pinned["MASTER_PORT"]) == ("ib-gpu07", "29500")
    no_step_list = {k: v for k, v in env.items() if k != "SLURM_STEP_NODELIST"}
    assert slurm_launch(no_step_list)["MASTER_ADDR"] == "gpu01"


def test_the_tasks_on_this_node_come_from_slurm():
    assert slurm_tasks_per_node("4(x2),3") == [4, 4, 3] and slurm_tasks_per_node("8") == [8]
    with pytest.raises(ValueError, match=r"not a SLURM tasks-per-node list: '4\(x\)'"):
        slurm_tasks_per_node("4(x)")
    env = {**_slurm_task(9, job_id=5, tasks=11), "SLURM_STEP_TASKS_PER_NODE": "4(x2),3", "SLURM_NODEID": "2",
           "SLURM_TASKS_PER_NODE": "8(x2)"}
    assert slurm_launch(env)["LOCAL_WORLD_SIZE"] == "3"  # the step's counts win over the job's
    assert slurm_launch({**env, "SLURM_NODEID": "0"})["LOCAL_WORLD_SIZE"] == "4"
    assert "LOCAL_WORLD_SIZE" not in slurm_launch(_slurm_task(1, job_id=5))  # SLURM did not say


def test_slurm_leaves_other_launches_alone():
    task = _slurm_task(1, job_id=7, tasks=4)
    assert slurm_launch({**task, "RANK": "3", "WORLD_SIZE": "8"}) == {}  # torchrun inside srun
    batch_script = {k: v for k, v in task.items() if not k.startswith("SLURM_STEP")}
    assert slurm_launch(batch_script) == {}  # sbatch --ntasks 4 runs the script once, not 4 times
    assert slurm_launch(_slurm_task(0, job_id=7, tasks=1)) == {}  # one task: a world of one
    assert slurm_launch({}) == {}


@pytest.mark.parametrize("env, world, local_size", [
    ({"DS_ACCELERATOR": "cpu"}, 1, "1"),  # a plain process
    ({"DS_ACCELERATOR": "cpu", "LOCAL_WORLD_SIZE": "4"}, 8, "4"),  # torchrun, srun: this node's ranks
    ({"DS_ACCELERATOR": "cpu", "LOCAL_WORLD_SIZE": "4", "LOCAL_SIZE": "1"}, 8, "4"),  # not the parent's
    ({"DS_ACCELERATOR": "cpu", "LOCAL_SIZE": "1"}, 1, "1"),
    ({"DS_ACCELERATOR": "cpu", "LOCAL_SIZE": "2"}, 8, "2"),  # the deepspeed launcher's
    ({"DS_ACCELERATOR": "cpu"}, 8, None),  # nothing says how many ranks share this node
    ({"DS_ACCELERATOR": "cuda", "LOCAL_WORLD_SIZE": "4"}, 8, None),  # the CUDA accelerator counts devices
])
def test_cpu_ranks_name_their_node_s_ranks_for_deepspeed(monkeypatch, env, world, local_size):
    for name in ("DS_ACCELERATOR", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    name_local_size(world)
    assert os.environ.get("LOCAL_SIZE") == local_size


def test_a_slurm_step_without_ranks_is_refused_by_name():
    task = {k: v for k, v in _slurm_task(1, job_id=7).items() if k != "SLURM_PROCID"}
    with pytest.raises(RuntimeError, match="SLURM_PROCID"):
        slurm_launch(task)


def test_mpirun_without_ranks_is_refused(tmp_path):
    code = "from dynalign.distributed import init_distributed; init_distributed()"
    proc = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path, OMPI_COMM_WORLD_SIZE="4"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "OMPI_COMM_WORLD_SIZE=4 but RANK/WORLD_SIZE are unset" in proc.stderr


def test_the_slurm_launcher_runs_one_rank_per_gpu():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from dynalign.config import CONF_DIR, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=[
            "hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4"])
    GlobalHydra.instance().clear()
    launcher = instantiate(cfg.hydra.launcher)  # what submitit is given
    params = launcher.params
    assert (params["nodes"], params["gpus_per_node"], params["tasks_per_node"]) == (2, 4, 4)


# ------------------------------------------------------------------ the collective timeout

# gloo reports an expired collective in one of two words, depending on which side of the pair
# notices first: the waiting rank's own timer, or its peer's socket closed by that timer
GLOO_TIMEOUT = r"\(Timed out waiting {ms}ms|\(Application timeout caused pair closure"


def test_timeout_must_be_positive(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"^distributed\.timeout_minutes: must be > 0"):
        to_train_config(compose_cfg(["distributed.timeout_minutes=0"]))
    assert to_train_config(compose_cfg()).distributed.timeout_minutes >= 60  # an 8B evaluation fits
    proc = subprocess.run([sys.executable, "-m", "dynalign.train", f"hydra.run.dir={tmp_path / 'run'}",
                           "distributed.timeout_minutes=-5"], cwd=REPO_ROOT, env=_env(tmp_path / "cache"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        "dynalign: invalid config: distributed.timeout_minutes: must be > 0 (got -5.0)"
    assert not (tmp_path / "cache").exists()  # refused before the embedded model was built


def test_a_late_rank_times_the_collective_out_on_every_group(tmp_path):
    # rank 1 arrives 6 s late; a 2 s timeout ends rank 0's wait, even on a group made after the
    # world's (torch would give that one its own default, 30 min)
    script = str(REPO_ROOT / "tests" / "dist" / "collective_timeout.py")
    rank0, rank1 = _srun([script, "2", "6"], tmp_path, REPO_ROOT, timeout=300)
    assert "rank 0 of 2" in rank0.stdout and "rank 1 of 2" in rank1.stdout  # one world of two
    assert rank1.returncode == 0
    assert rank0.returncode == 1
    waited = float(rank0.stdout.split("waited ")[1].split()[0])
    assert 1.5 <= waited < 5.5, rank0.stdout
    line = rank0.stderr.strip().splitlines()[-1]
    assert line.startswith("dynalign: rank 0: a collective waited longer than "
                           "distributed.timeout_minutes=0.0333")
    assert re.search(GLOO_TIMEOUT.format(ms=2000), line) and "raise distributed.timeout_minutes" in line


@pytest.mark.slow
def test_a_late_rank_fails_the_run_with_one_line(tmp_path, cache_dir, tiny_model_path):
    # a real run: rank 1 starts its first step 30 s late; rank 0 waits in the ZeRO-3 gather before
    # sampling (a DeepSpeed group) and gives up after distributed.timeout_minutes (15 s)
    run = tmp_path / "run"
    late = str(REPO_ROOT / "tests" / "dist" / "late_rank.py")
    start = time.monotonic()
    rank0, rank1 = _srun([late, "30", f"hydra.run.dir={run}", *QUICK,
                          "distributed.timeout_minutes=0.25"], cache_dir, REPO_ROOT, timeout=600)
    assert rank0.returncode == 1 and rank1.returncode == 1
    line = rank0.stderr.strip().splitlines()[-1]
    assert line.startswith("dynalign: rank 0: a collective waited longer than distributed.timeout_minutes="
                           "0.25 for the other ranks ("), rank0.stderr[-3000:]
    assert re.search(GLOO_TIMEOUT.format(ms=15000), line), line
    assert "Traceback" not in rank0.stderr  # the line is the report
    assert time.monotonic() - start < 300


# ------------------------------------------------------------------ every job on every rank


@pytest.mark.parametrize("launcher", ["basic", "submitit_local"])
def test_every_job_of_a_sweep_lands_in_the_directory_stamped_when_it_began(tmp_path, launcher):
    # each job re-resolves hydra.sweep.dir: in this process (basic) or in its own (submitit)
    cmd = [sys.executable, str(REPO_ROOT / "tests" / "dist" / "stamp_app.py"), "-m",
           f"hydra/launcher={launcher}", f"hydra.sweep.dir={tmp_path}/multirun/${{run_stamp:}}", "+a=1,2,3"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    assert sorted(p.name for p in sweep.glob("[0-9]")) == ["0", "1", "2"]
    assert all((sweep / job / ".hydra" / "overrides.yaml").exists() for job in "012")


@pytest.mark.slow
def test_a_sweep_under_torchrun_runs_every_job_on_both_ranks(tmp_path, cache_dir, tiny_model_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(free_port())]
    # no hydra.sweep.dir: both ranks stamp multirun/<date>/<time>/ themselves, once for both jobs
    cmd = [*torchrun, "-m", "dynalign.train", "-m", *QUICK, "grpo.lr=1e-5,3e-5"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(cache_dir), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    jobs = sorted(sweep.glob("[01]_*"))
    assert [job.name[:2] for job in jobs] == ["0_", "1_"]
    base = load_file(str(tiny_model_path / "model.safetensors"))
    for job, lr in zip(jobs, (1e-5, 3e-5), strict=True):
        assert f"grpo.lr={lr}" in job.name
        (step,) = _metrics(job)
        assert step["train/lr"] == pytest.approx(lr, rel=1e-6)
        assert step["judge/judgements"] == 16  # 4 prompts x 4 answers, 8 judged on each rank
        assert _ranks_in_checkpoint(job) == ["0", "1"]  # both ranks took part in this job
        summary = json.loads((job / "summary.json").read_text())
        assert summary["global_step"] == 1 and summary["mem/rss_gib"] > 0
        # AdamW's first step moves every weight with a gradient by lr * g / (|g| + eps): by lr at most
        export = load_file(str(job / "iter_1" / "model.safetensors"))
        moved = max(float((export[k] - base[k]).abs().max()) for k in export)
        assert moved == pytest.approx(lr, rel=1e-2)


@pytest.mark.slow
def test_slurm_variables_make_one_world_of_two_that_trains(tmp_path, cache_dir, tiny_model_path):
    # no RANK, no torchrun: each process finds its rank in SLURM_PROCID, rank 0 serves the rendezvous
    # on the port SLURM_JOB_ID gives, and both stamp the same outputs/<date>/<time>/
    rank0, rank1 = _srun(["-m", "dynalign.train", *QUICK, "steps_per_iteration=2"], cache_dir, tmp_path,
                         timeout=900)
    assert rank0.returncode == 0 and rank1.returncode == 0, rank0.stderr[-3000:] + rank1.stderr[-3000:]
    (run,) = (tmp_path / "outputs").glob("*/*")
    assert [m["step"] for m in _metrics(run)] == [1, 2]
    assert _ranks_in_checkpoint(run) == ["0", "1"]


def test_ranks_in_different_directories_stop_before_training(tmp_path, cache_dir, tiny_model_path):
    # two nodes whose clocks stamped different run directories: caught right after the rendezvous
    job_id = _free_slurm_job_id()
    procs = [subprocess.Popen([sys.executable, "-m", "dynalign.train", f"hydra.run.dir={tmp_path}/node{rank}",
                               *QUICK], cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=_env(cache_dir, **_slurm_task(rank, job_id)))
             for rank in (0, 1)]
    outs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 2, err[-3000:]
        assert err.strip().splitlines()[-1] == (
            f"dynalign: the ranks run in different directories (rank 0: {tmp_path / 'node0'}, rank 1: "
            f"{tmp_path / 'node1'}): on several nodes pass hydra.run.dir (hydra.sweep.dir for a sweep) on a "
            "filesystem they all see, or export one DYNALIGN_RUN_STAMP everywhere")
    assert not (tmp_path / "node0" / "checkpoints").exists()


# ------------------------------------------------------------------ the end of a job


def test_closing_the_parts_of_a_job_frees_every_model(compose_cfg, tiny_model_path, tmp_path):
    from dynalign.engine import PolicyEngine
    from dynalign.runtime import PhaseTimer
    from dynalign.train import Position, build_parts, grpo_step

    # the tiny model's own judge: the policy as the iteration began, a whole model of its own
    overrides = [f"model.name_or_path={tiny_model_path}", "grpo.max_completion_length=4"]
    cfg = to_train_config(compose_cfg(overrides))
    assert cfg.judge.source == "frozen" and cfg.deepspeed.stage == 3
    engine = PolicyEngine.from_config(cfg)
    parts = build_parts(cfg, engine, tmp_path, iteration=0)
    grpo_step(cfg, parts, ["What is kindness?"] * cfg.grpo.prompts_per_step, Position(), 0, PhaseTimer())
    alive = {"policy": weakref.ref(engine.module), "DeepSpeed engine": weakref.ref(engine.ds_engine),
             "optimizer": weakref.ref(engine.ds_engine.optimizer),
             "frozen judge": weakref.ref(parts.judge.backend.sampler.model)}
    parts.close()
    engine.close()
    gc.collect()
    assert [name for name, ref in alive.items() if ref() is not None] == []
    del parts, engine


class Closable:
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def test_a_judge_closes_only_the_samplers_loaded_for_it(compose_cfg):
    from dynalign.judge import build_judge

    cfg = to_train_config(compose_cfg()).judge
    policy, frozen, given, made = Closable(), Closable(), Closable(), Closable()
    self_cfg, external = replace(cfg, source="self"), replace(cfg, source="external")
    judges = [build_judge(self_cfg, policy), build_judge(cfg, policy, frozen_sampler=frozen),
              build_judge(external, policy, external_sampler=given),
              build_judge(external, policy, make_sampler=lambda ext: made)]
    for judge in judges * 2:  # closing twice closes nothing more
        judge.close()
    assert [policy.closed, frozen.closed, given.closed, made.closed] == [0, 1, 0, 1]
    assert all(judge.backend.sampler is None for judge in judges)  # let go of, owned or not


def test_a_wandb_run_a_failed_job_left_open_is_closed(tmp_path, monkeypatch):
    import wandb

    from dynalign.config import LoggerConfig
    from dynalign.tracking import RunInfo, build_tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    for job in ("0", "1"):  # two failed jobs of one sweep in this process, neither finished
        info = RunInfo(run_dir=tmp_path / job, name=job, group="sweep", config={})
        info.run_dir.mkdir()
        tracker = build_tracker(LoggerConfig(mode="offline"), info, rank=0)
        tracker.log({"x": 1.0}, step=1)
        run_id = json.loads((info.run_dir / "wandb_run.json").read_text())["id"]
        assert wandb.run is not None and wandb.run.id == run_id
        tracker.close()
        assert wandb.run is None  # ended (marked failed): the next job's init starts its own run
        assert not (info.run_dir / "summary.json").exists()
        tracker.close()  # again: nothing left to close


PEAK_PROBE = """
import json, torch
from dynalign.teardown import memory_metrics, release_memory
release_memory()
block = torch.ones(256 * 2**20, dtype=torch.uint8)  # 256 MiB touched
before = memory_metrics()
del block
release_memory()
print(json.dumps([before, memory_metrics()]))
"""


def test_release_memory_restarts_the_peak():
    # in a fresh process: in a long one (the test session) freed heap pages may still be resident,
    # so a new block need not raise the resident size at all
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("the peak restarts on Linux only")
    proc = subprocess.run([sys.executable, "-c", PEAK_PROBE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0, proc.stderr
    before, after = json.loads(proc.stdout.strip().splitlines()[-1])
    assert before["mem/peak_rss_gib"] - after["mem/peak_rss_gib"] > 240 / 1024
    assert after["mem/peak_rss_gib"] == pytest.approx(after["mem/rss_gib"], abs=16 / 1024)


TRIM_PROBE = """
import json, torch
from dynalign.teardown import memory_metrics, release_memory
blocks = [torch.ones(16 * 2**10) for _ in range(4096)]  # 4,096 x 64 KiB from the C heap, touched
kept = blocks[::8]  # one in eight outlives the rest, so no freed run reaches the heap's top
del blocks
before = memory_metrics()["mem/rss_gib"]
release_memory()
print(json.dumps([before, memory_metrics()["mem/rss_gib"], len(kept)]))
"""


def test_release_memory_gives_back_freed_blocks_below_one_still_in_use():
    # a fresh process, as above; glibc keeps these 224 MiB resident by itself (measured: the
    # resident size does not move without the trim)
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    proc = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0, proc.stderr
    before, after, kept = json.loads(proc.stdout.strip().splitlines()[-1])
    assert kept == 512
    assert before - after > 180 / 1024, (before, after)


@pytest.mark.slow
def test_a_sweep_gives_each_job_the_memory_of_the_first(tmp_path, cache_dir):
    # 15 M parameters: a job's model, ZeRO-3 partitions and AdamW state are ~0.4 GiB, which every
    # job used to leave behind (0.8 GiB more by the third job's end). What still grows, measured
    # after each job's release: no tensor, ~1,900 Python objects (OmegaConf nodes among them), and
    # +0.02 to +0.19 GiB of RSS by the third job's end (RSS at each job's end, runs alone and in
    # the whole suite), so the bound sits between those and one job's state
    model = ["model.tiny.hidden_size=512", "model.tiny.intermediate_size=2048",
             "model.tiny.num_hidden_layers=4", "model.tiny.num_attention_heads=8"]
    cmd = [sys.executable, "-m", "dynalign.train", "-m", *QUICK, "export_each_iteration=false", *model,
           "seed=0,1,2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(cache_dir), capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-5000:]
    (sweep,) = (tmp_path / "multirun").glob("*/*")  # one directory for the whole sweep
    summaries = [json.loads((job / "summary.json").read_text()) for job in sorted(sweep.glob("[0-2]_*"))]
    assert [s["global_step"] for s in summaries] == [1, 1, 1]
    rss = [s["mem/rss_gib"] for s in summaries]
    assert all(s["mem/peak_rss_gib"] >= s["mem/rss_gib"] for s in summaries)
    assert rss[2] - rss[0] < 0.3, rss


def test_a_stale_deepspeed_build_lock_is_named_while_deepspeed_waits_for_it(tmp_path, monkeypatch):
    """torch waits forever for a JIT build lock an interrupted build left; the launch says so."""
    from torch.utils.cpp_extension import _get_build_directory

    from dynalign.distributed import SHM_OP, STALE_BUILD_LOCK_S, stale_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    lock = Path(_get_build_directory(SHM_OP, verbose=False)) / "lock"
    assert stale_build_lock() is None  # no lock
    lock.touch()
    assert stale_build_lock() is None  # a build may be running
    made = lock.stat().st_mtime
    assert stale_build_lock(now=made + STALE_BUILD_LOCK_S - 1) is None
    assert stale_build_lock(now=made + 3600) == (lock, 3600)
    os.utime(lock, (made - 3600, made - 3600))
    # a real launch with that lock: DeepSpeed hangs on it, after the one line naming it
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", "from dynalign.distributed import init_distributed; "
                             "init_distributed()"], cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(120, proc.kill)  # no line at all: the pipe closes when it is killed
    watchdog.start()
    try:
        assert proc.stderr is not None
        line = next((line for line in proc.stderr if line.startswith("dynalign:")), "")
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
    assert line.startswith(f"dynalign: DeepSpeed waits for {lock} (60 min old) to go before it loads")
    assert "if no DeepSpeed build is running, delete it" in line


def test_a_build_lock_that_grows_stale_while_deepspeed_waits_is_named_then(tmp_path, monkeypatch, capsys):
    """A lock an interrupted build left a minute before the launch is fresh when the launch looks:
    the launch still names it once it is old enough, while DeepSpeed waits on it."""
    from dynalign.distributed import build_lock, naming_stale_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    lock = build_lock()  # torch makes its directory
    lock.touch()  # fresh: a build may be running
    with naming_stale_build_lock(poll_s=0.05):  # where DeepSpeed would wait on it
        time.sleep(0.3)
        assert capsys.readouterr().err == ""  # nothing to say about a fresh lock
        old = time.time() - 3600
        os.utime(lock, (old, old))  # and now it is an hour old
        deadline = time.monotonic() + 30
        while "dynalign:" not in (err := capsys.readouterr().err) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert err.startswith(f"dynalign: DeepSpeed waits for {lock} (60 min old) to go before it loads")
    time.sleep(0.2)
    assert capsys.readouterr().err == ""  # said once
