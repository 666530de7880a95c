"""``python -m dynalign.gpu_check``: its report logic, and its checks run on the CPU (``--cpu``).

The script's worth is on a GPU machine; here the same check functions run with small shapes,
gloo and the tiny model, in real subprocesses, as ``make gpu-check`` starts them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dynalign import gpu_check
from dynalign.config import TinyModelConfig
from dynalign.gpu_check import FAIL, PASS, SKIP, CheckFailed, Result, Worker

REPO_ROOT = Path(__file__).resolve().parents[1]

# DeepSpeed calls torch.distributed APIs that torch 2.13 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def run_script(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "dynalign.gpu_check", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def table_rows(stdout: str) -> dict[str, str]:
    """check name -> result, from the table printed at the end."""
    lines = stdout.splitlines()
    header = max(i for i, line in enumerate(lines) if line.split()[:2] == ["check", "result"])
    rows = [line.split() for line in lines[header + 2:]]
    end = next(i for i, row in enumerate(rows) if row[1] in ("check:", "checks:"))  # the summary line
    return {row[0]: row[1] for row in rows[:end]}


def results(out: Path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((out / "results.json").read_text())}


# ------------------------------------------------------------------------ the report


def record(rank: int, status: str, detail: str = "", **extra) -> dict:
    return {"rank": rank, "status": status, "detail": detail, "seconds": 1.0, **extra}


def test_combine_ranks_into_one_row():
    passed = gpu_check.combine("c", [record(1, PASS, "one"), record(0, PASS, "zero")], 2, 0)
    assert (passed.status, passed.detail) == (PASS, "zero")  # rank 0 speaks for the check
    records = [record(0, PASS, "ok"), record(1, FAIL, "boom", traceback="Traceback...")]
    failed = gpu_check.combine("c", records, 2, 1)
    assert (failed.status, failed.detail, failed.tracebacks) == (FAIL, "rank 1: boom", ["Traceback..."])
    alone = gpu_check.combine("c", [record(0, FAIL, "boom")], 1, 1)
    assert alone.detail == "boom"  # no rank prefix in a world of one
    skipped = gpu_check.combine("c", [record(0, SKIP, "no vllm"), record(1, SKIP, "no vllm")], 2, 0)
    assert (skipped.status, skipped.detail) == (SKIP, "no vllm")


def test_combine_a_crash_or_a_timeout_fails():
    hung = gpu_check.combine("c", [record(0, PASS)], 2, None, timeout_s=30)
    assert hung.status == FAIL and hung.detail == "timed out after 30 s"
    cut = gpu_check.combine("c", [], 1, None, timeout_s=12, budget_cut=True)
    assert "timed out after 12 s" in cut.detail and "--budget-s" in cut.detail
    crashed = gpu_check.combine("c", [record(0, PASS)], 2, -11)
    assert crashed.status == FAIL and "rank(s) [1] wrote no result" in crashed.detail
    assert "exited with -11" in crashed.detail
    # every rank wrote its record before the processes were killed: the records decide
    assert gpu_check.combine("c", [record(0, PASS, "ok")], 1, None, timeout_s=30).status == PASS


def test_table_lists_every_row_and_counts():
    table = gpu_check.format_table([Result("bf16_a", PASS, "fine", 1.25), Result("b", FAIL, "bad", 10.0),
                                    Result("c", SKIP, "why", 0.0)])
    lines = table.splitlines()
    assert lines[0].split() == ["check", "result", "time", "detail"]
    assert lines[2].split() == ["bf16_a", "PASS", "1.2", "s", "fine"]
    assert lines[3].split() == ["b", "FAIL", "10.0", "s", "bad"]
    assert lines[-1] == "3 checks: 1 PASS, 1 FAIL, 1 SKIP"
    assert gpu_check.format_table([Result("a", SKIP, "why")]).endswith("\n1 check: 0 PASS, 0 FAIL, 1 SKIP")


def test_select_checks_by_name_or_pattern_in_running_order():
    names = list(gpu_check.CHECKS)
    assert [c.name for c in gpu_check.select_checks([])] == names
    assert [c.name for c in gpu_check.select_checks(["zero3*", "bf16_llama3_8b"])] == [
        "bf16_llama3_8b", "zero3", "zero3_offload_optimizer", "zero3_offload_param"]
    with pytest.raises(ValueError, match="'nope' matches no check; checks: bf16_llama3_8b"):
        gpu_check.select_checks(["bf16_*", "nope"])


def test_unknown_names_exit_2_before_anything_runs(tmp_path):
    assert gpu_check.main(["--cpu", "--only", "zero3,nope", "--out", str(tmp_path)]) == 2
    assert gpu_check.main(["--cpu", "--fail-check", "nope", "--out", str(tmp_path)]) == 2
    assert not any(tmp_path.iterdir())


def test_a_timed_out_check_is_killed_with_its_children(tmp_path):
    """The process group goes: a launcher's ranks cannot outlive a hung check."""
    child = tmp_path / "child.pid"
    command = ["bash", "-c", f"sleep 60 & echo $! > {child}; wait"]
    start = time.perf_counter()
    with open(tmp_path / "log", "w") as log:
        assert gpu_check.run_killable(command, dict(os.environ), log, timeout=2) is None
    assert time.perf_counter() - start < 30
    pid = int(child.read_text())
    for _ in range(50):  # the kill is delivered; reaping the orphan may take a moment
        if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the check's child {pid} outlived the timeout")


# ------------------------------------------------------------------- what is checked


def meta_parameters(name: str, **changes) -> int:
    from transformers import AutoModelForCausalLM

    config = gpu_check.architecture_config(name, small=False)
    for key, value in changes.items():
        setattr(config, key, value)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # a tied weight counts once


def test_architectures_have_the_published_shapes():
    """Parameter counts by hand from the shapes, and the published totals of the full models."""
    # Llama-3-8B layer: q and o 4096^2, k and v 4096 x 1024 (8 kv heads of 128), MLP 3 x 4096 x 14336,
    # two norms; untied 128256 x 4096 embedding and head, a final norm.
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    outer = 2 * 128256 * 4096 + 4096
    assert meta_parameters("llama3_8b") == 2 * layer + outer
    assert meta_parameters("llama3_8b", num_hidden_layers=32) == 32 * layer + outer == 8_030_261_248
    # Qwen2.5-0.5B: q/k/v with biases (2 kv heads of 64), tied 151936 x 896 embedding.
    layer = (896 * 896 + 896) + 2 * (896 * 128 + 128) + 896 * 896 + 3 * 896 * 4864 + 2 * 896
    assert meta_parameters("qwen2_5_0_5b") == 24 * layer + 151936 * 896 + 896 == 494_032_768


def test_bf16_steps_fail_when_the_loss_does_not_fall(tmp_path):
    """The bf16 check's criteria bite: the same model at lr 0 cannot lower its loss."""
    config = gpu_check.architecture_config("qwen2_5_0_5b", small=True)
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    w = Worker(cpu=True, out=tmp_path)
    bounds = {"first_loss": (0.0, 20.0), "expectation": "test"}

    def model():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).train()

    detail = gpu_check.train_and_report(w, model(), ids, lr=1e-3, **bounds)
    assert "bf16, 2x16 tokens" in detail
    with pytest.raises(CheckFailed, match="loss did not fall over 5 AdamW steps"):
        gpu_check.train_and_report(w, model(), ids, lr=0.0, **bounds)
    with pytest.raises(CheckFailed, match=r"first loss .* outside \[0.00, 1.00\]"):
        gpu_check.train_and_report(w, model(), ids, lr=1e-3, first_loss=(0.0, 1.0), expectation="test")


def test_the_gpu_loop_trains_its_46m_shape_at_its_own_learning_rate(tmp_path, compose_cfg):
    """On a GPU the tiny loop runs a 46 M shape in bf16 at GPU_TINY_LR, not the 0.43 M preset's 3e-2."""
    from dynalign.config import to_train_config

    cpu = to_train_config(compose_cfg(gpu_check.loop_overrides(Worker(cpu=True, out=tmp_path), "tiny")))
    gpu = to_train_config(compose_cfg(gpu_check.loop_overrides(Worker(cpu=False, out=tmp_path), "tiny")))
    assert cpu.grpo.lr == 3e-2 and cpu.model.tiny == TinyModelConfig()
    assert gpu.grpo.lr == gpu_check.GPU_TINY_LR < cpu.grpo.lr
    assert gpu.model.dtype == "bfloat16"
    assert gpu.model.tiny.hidden_size == gpu_check.GPU_TINY_SHAPE["hidden_size"]


def test_a_failing_loop_reports_the_entry_points_own_error(tmp_path, monkeypatch):
    """The row of a loop that did not run names why (here a refused config, before any model)."""
    monkeypatch.setattr(gpu_check, "loop_overrides", lambda w, model: ["model=tiny", "grpo.loss_type=ppo"])
    refused = "exited with 2: dynalign: invalid config: grpo.loss_type: unknown value 'ppo'"
    with pytest.raises(CheckFailed, match=refused):
        gpu_check.run_loop(Worker(cpu=True, out=tmp_path), "tiny")


# ----------------------------------------------------------------- the script itself


def test_without_cuda_it_says_so_and_exits_0():
    proc = run_script(timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA device found" in proc.stdout and "--cpu" in proc.stdout


def test_a_failed_check_shows_in_the_table_and_the_exit_status(tmp_path, cache_dir):
    """One check passes, one is failed on purpose after it ran, one skips (a GPU-only loop)."""
    out = tmp_path / "out"
    proc = run_script("--cpu", "--only", "bf16_qwen2_5_0_5b,bf16_llama3_8b,loop_tiny",
                      "--fail-check", "bf16_llama3_8b", "--out", str(out))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert table_rows(proc.stdout) == {"bf16_llama3_8b": FAIL, "bf16_qwen2_5_0_5b": PASS, "loop_tiny": SKIP}
    assert "3 checks: 1 PASS, 1 FAIL, 1 SKIP" in proc.stdout
    found = results(out)
    assert found["bf16_llama3_8b"]["detail"].startswith("CheckFailed: failed on purpose (--fail-check")
    assert "loss" in found["bf16_qwen2_5_0_5b"]["detail"]
    assert found["loop_tiny"]["detail"] == "with --cpu the loop check runs the tiny model"
    log = (out / "gpu_check.log").read_text()
    assert "---- bf16_llama3_8b: traceback\nTraceback (most recent call last)" in log
    assert "raise CheckFailed(f\"failed on purpose" in log


@pytest.mark.slow
def test_quick_checks_pass_on_the_cpu(tmp_path, tiny_model_path):
    out = tmp_path / "out"
    proc = run_script("--cpu", "--only", "bf16_*,zero3,checkpoint_resume", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = ["bf16_llama3_8b", "bf16_qwen2_5_0_5b", "bf16_gemma3_270m", "zero3", "checkpoint_resume"]
    assert table_rows(proc.stdout) == dict.fromkeys(names, PASS)
    found = results(out)
    assert "all 21 weights changed, the same on every rank" in found["zero3"]["detail"]
    assert "bitwise" in found["checkpoint_resume"]["detail"]
    assert not (out / "checkpoint_resume" / "checkpoints").exists()  # a passed check cleans up


@pytest.mark.slow
def test_two_ranks_on_the_cpu(tmp_path, tiny_model_path):
    out = tmp_path / "out"
    proc = run_script("--cpu", "--nproc", "2", "--only", "zero3_offload_param,checkpoint_resume",
                      "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert table_rows(proc.stdout) == {"checkpoint_resume": PASS, "zero3_offload_param": PASS}
    found = results(out)
    assert found["zero3_offload_param"]["detail"].startswith("2 rank(s), gloo")
    assert found["checkpoint_resume"]["detail"].startswith("2 rank(s)")


@pytest.mark.slow
def test_the_loop_through_the_entry_point_on_the_cpu(tmp_path, tiny_model_path):
    out = tmp_path / "out"
    proc = run_script("--cpu", "--only", "loop*,vllm_sync", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    assert rows["loop"] == PASS and rows["loop_tiny"] == SKIP
    assert rows["vllm_sync"] == (SKIP if gpu_check.missing_module(["vllm"]) else PASS)
    detail = results(out)["loop"]["detail"]
    assert detail.startswith("tiny model, fp32, 1 rank(s), 4 prompts x 4 answers per step: reward ")
    rewards = [float(v) for v in detail.split("reward ")[1].split(",")[0].split()]
    assert len(rewards) == 3 and all(0.0 <= r <= 5.0 for r in rewards)  # the rubric's scale
    entropies = [float(v) for v in detail.split("policy entropy ")[1].split(" nats")[0].split()]
    assert len(entropies) == 3 and all(0.0 < e <= math.log(1024) for e in entropies)  # tiny vocabulary: 1024
    metrics = (out / "loop" / "run_tiny" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["step"] for m in metrics] == [1, 2, 3]


@pytest.mark.slow
def test_the_checkpoint_check_fails_when_the_rng_is_not_restored(tmp_path, tiny_model_path, monkeypatch):
    """In process: a load that forgets the RNG states is caught (the batches after it differ)."""
    from dynalign.engine import checkpoint

    monkeypatch.setattr(checkpoint, "set_rng_state", lambda state: None)
    with pytest.raises(CheckFailed, match="the torch CPU RNG state of rank 0 was not restored"):
        gpu_check.check_checkpoint_resume(Worker(cpu=True, out=tmp_path))
