"""A colocated vLLM engine on every rank of a torchrun world: real engines (CPU build) on the tiny
model, two processes, DeepSpeed ZeRO-3 over the same world.

Runs in ``.venv-vllm`` (``make test-vllm``); skipped where ``vllm`` is not installed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

pytest.importorskip("vllm")

from dynalign.distributed import LAUNCHER_VARIABLES, free_port  # noqa: E402

# fp32 trainer and engine; measured here ~1e-6. A stale engine is off by > 1e-2.
LOGPROB_ATOL = 1e-4


def _torchrun(args: list[str], cwd: Path, cache: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in (*LAUNCHER_VARIABLES, "LOCAL_WORLD_SIZE", "VLLM_LOGGING_LEVEL")}
    env.update(PYTHONPATH=str(REPO_ROOT), DS_ACCELERATOR="cpu", DYNALIGN_CACHE=str(cache),
               HYDRA_FULL_ERROR="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _ranks(tmp_path: Path, cache: Path, model: Path, tp: int) -> list[dict]:
    out = tmp_path / f"tp{tp}"
    out.mkdir()
    proc = _torchrun([str(REPO_ROOT / "tests" / "dist" / "vllm_ranks.py"), str(model), str(tp), str(out)],
                     tmp_path, cache)
    assert proc.returncode == 0, proc.stderr[-5000:]  # closing the engines left the trainer's group
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow  # two worlds of two ranks, each with DeepSpeed and two engines: ~2 min each on 2 cores
def test_an_engine_per_rank_and_tensor_parallel_groups_pool_their_requests(tmp_path, cache_dir,
                                                                           tiny_model_path):
    alone = _ranks(tmp_path, cache_dir, tiny_model_path, 1)
    pooled = _ranks(tmp_path, cache_dir, tiny_model_path, 2)
    # tensor_parallel_size=1: an engine per rank (external launcher), each its own group and seed
    assert [(r["executor"], r["group"], r["vllm_tp_group"], r["engine_seed"]) for r in alone] == \
        [("external_launcher", [0], [0], 0), ("external_launcher", [1], [1], 1)]
    # 2: the world is one tensor-parallel group, which vLLM carved out of the trainer's world
    assert [(r["executor"], r["group"], r["vllm_tp_group"], r["engine_seed"]) for r in pooled] == \
        [("external_launcher", [0, 1], [0, 1], 0)] * 2
    for one, two in zip(alone, pooled, strict=True):
        # each rank gets back its own answers out of the group's pooled requests (shares of 4 and 2
        # answers; per-request seeds), the same as from an engine of its own
        assert len(one["tokens"]) == (4 if one["rank"] == 0 else 2)
        assert two["tokens"] == one["tokens"] and two["texts"] == one["texts"]
        assert two["scores"] == pytest.approx(one["scores"], abs=1e-5)  # rank 1 asked for none
        # the engine matched the trainer before the step and again after the bucketed sync
        for record in (one, two):
            assert record["moved"] > 0.1  # the step changed the policy's log-probs
            assert record["gap_before"] < LOGPROB_ATOL and record["gap_after"] < LOGPROB_ATOL
            assert record["weight_version"] == 1
    assert alone[0]["scores"] and not alone[1]["scores"]


@pytest.mark.slow  # DeepSpeed and an engine on each of two ranks, two steps: ~3 min on 2 cores
def test_the_training_loop_on_two_ranks_with_one_tensor_parallel_engine(tmp_path, cache_dir):
    run = tmp_path / "run"
    proc = _torchrun(["-m", "dynalign.train", f"hydra.run.dir={run}", "logger=none", "rollout=vllm",
                      "rollout.vllm.tensor_parallel_size=2", "rollout.vllm.enforce_eager=true",
                      "rollout.vllm.kv_cache_space_gib=1", "judge.source=self", "iterations=1",
                      "steps_per_iteration=2", "grpo.max_completion_length=8", "grpo.max_prompt_length=64",
                      "eval.every_n_iterations=0"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-5000:]
    # vLLM's INFO lines (three at every weight sync) and its warning about the rotary cache that no
    # checkpoint holds stay off the console (VLLM_LOGGING_LEVEL unset here)
    out = proc.stdout + proc.stderr
    assert not re.search(r"\bINFO\b", out) and "Failed to load weights" not in out, out[-5000:]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"train/loss"' in line]
    assert [s["step"] for s in steps] == [1, 2]
    for step in steps:
        assert step["judge/judgements"] == 16  # 4 prompts x 4 answers, judged by the pooled engine
        assert step["judge/parse_failure_rate"] == 0
        # the second step samples from the engine synced after the first; the trainer agrees with it
        assert step["train/sampler_logp_abs_diff"] < LOGPROB_ATOL
    assert steps[0]["train/lr"] > 0 and (run / "summary.json").exists()
