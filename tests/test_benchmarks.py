"""The benchmarks run: each one once, at its smallest size, in a real subprocess.

Their figures are not asserted (speed is measured, not tested); what is checked is that they
still run against today's code and print the lines the README quotes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


def run_benchmark(args: list[str], timeout: int) -> str:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_bench_judge_compares_both_paths(tiny_model_path):
    out = run_benchmark(["benchmarks/bench_judge.py", "--model", str(tiny_model_path), "--prompts", "1",
                         "--answers", "2", "--rounds", "1"], timeout=600)
    assert re.search(r"from scratch\s+[\d.]+ s/answer", out)
    assert re.search(r"prefix reuse\s+[\d.]+ s/answer", out)
    difference = float(re.search(r"max \|expected score difference\| (\S+)", out).group(1))
    assert difference < 1e-4  # the two paths score alike


@pytest.mark.slow
def test_bench_step_runs_dynalign_with_both_rewards(tiny_model_path):
    out = run_benchmark(["benchmarks/bench_step.py", "--frameworks", "dynalign", "--zero-stages", "3",
                         "--rounds", "1", "--warmup", "0", "--steps", "1", "--judge-steps", "1"], timeout=900)
    assert "dynalign ZeRO-3, python reward" in out and "dynalign ZeRO-3, self-judge" in out
