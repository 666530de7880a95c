"""One GRPO step, dynalign vs TRL's GRPOTrainer: same model, prompts, group size, lengths, reward.

Workload (defaults): 4 chat prompts x 4 generations x 32 new tokens, temperature 1, beta 0
(no reference model), loss "grpo", AdamW lr 1e-5 constant, one optimizer step per batch of 16
sequences (one forward/backward in both), fp32, HF ``generate`` in both, on the embedded tiny
Llama (0.43 M parameters; ``--model small``: 3.2 M). A random model almost never emits EOS, so
answers are 32 tokens long; throughput = completion tokens actually generated / step wall time.

Measurements (medians over ``--rounds`` x ``--steps`` steps, after ``--warmup`` steps per round):

* ``dynalign ZeRO-<s>, python reward`` for each of ``--zero-stages``: the training loop's own step
  (``dynalign.train.grpo_step``: rollout, reward, advantages, update on the DeepSpeed engine) with
  the judge replaced by the cheap python reward TRL gets -- the apples-to-apples comparison (b);
* ``TRL, python reward``: ``trl.GRPOTrainer`` with that reward function;
* ``dynalign ZeRO-<s>, self-judge``: the real dynalign step, the policy scoring its answers with
  the CA rubric in logprob mode (``--judge-steps`` steps, first stage, first round; 0 skips it).
  TRL has no self-judge: its reward path is the python function, so this row vs TRL's compares
  each framework's own reward path (a).

The update phase's achieved FLOP/s (6 x parameters x prompt+completion tokens / update time) is
put against the fp32 matmul peak measured in the same run. Each measurement runs in a fresh
subprocess (DeepSpeed's process group and accelerate's state never meet), the frameworks take
turns round after round so both see the same machine load, and the load average is printed.

    make bench                                  # = .venv/bin/python benchmarks/bench_step.py
    .venv/bin/python benchmarks/bench_step.py --model small --judge-steps 0 --threads 0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # TinyModelConfig fields; "tiny" is the embedded default
    "tiny": {},
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
}
PROMPTS = (
    "How can a neighbourhood start a tool library that everyone can use?",
    "What should I consider before adopting a rescue dog?",
    "Explain how vaccines train the immune system, for a curious twelve-year-old.",
    "Our team keeps missing deadlines. How do we fix this without blaming anyone?",
)
RESULT_TAG = "BENCH_RESULT "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--prompts", type=int, default=4, help=f"prompts per step (at most {len(PROMPTS)})")
    parser.add_argument("--generations", type=int, default=4, help="answers per prompt (group size)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first, per measurement")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--judge-steps", type=int, default=3,
                        help="timed steps of dynalign with its self-judge (1 warm-up); 0 skips it")
    parser.add_argument("--zero-stages", default="3,2",
                        help="dynalign's DeepSpeed ZeRO stages to measure, comma-separated (3: the default "
                             "training core; 2: no parameter partitioning, the faster one on one process)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternate the frameworks this many times (each round: fresh processes, "
                             "warm-up, timed steps); medians pool the rounds, so both see the same load")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/OpenMP threads in both frameworks; 0: torch's default (one per core). "
                             "1 by default: a 0.4 M model gains nothing from more, and on a shared machine "
                             "OpenMP threads spin-waiting for descheduled peers make timings erratic")
    parser.add_argument("--frameworks", default="dynalign,trl")
    parser.add_argument("--worker", choices=("dynalign", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--zero-stage", type=int, default=3, help=argparse.SUPPRESS)  # a worker's stage
    args = parser.parse_args(argv)
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be in [1, {len(PROMPTS)}]")
    return args


# ------------------------------------------------------------------ shared pieces


def cheap_reward(texts: list[str]) -> list[float]:
    """The python reward both frameworks get: share of letters and spaces in the answer, in [0, 1].

    Microseconds per answer, like the rule-based rewards TRL users write; it varies between
    answers, so advantages and gradients are non-zero.
    """
    return [sum(ch.isalpha() or ch == " " for ch in t) / max(len(t), 1) for t in texts]


def matmul_peak_flops(size: int = 2048, repeats: int = 8) -> float:
    """Best achieved fp32 FLOP/s of a size x size matmul (2 n^3 FLOPs) over ``repeats`` timings."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up: threads, caches
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def median_phases(steps: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for s in steps for k in s})
    return {k: statistics.median(s.get(k, 0.0) for s in steps) for k in keys}


def emit(result: dict[str, Any]) -> None:
    print(RESULT_TAG + json.dumps(result), flush=True)


# ------------------------------------------------------------------ dynalign worker


class PythonRewardJudge:
    """A judge that is a python function: what TRL's ``reward_funcs`` are, behind ``Judge.score``."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def score(self, prompts, candidates, **options):  # options (e.g. a seed): a pure function ignores them
        import torch

        from dynalign.judge import JudgeResult

        rewards = torch.tensor(self.fn(list(candidates)), dtype=torch.float32)  # [N]
        n = len(candidates)
        return JudgeResult(rewards=rewards, scores=rewards[:, None], reasons=["ok"] * n,
                           judgement_reasons=[["ok"]] * n, texts=[[""]] * n, nonces=[""] * n,
                           aspect_names=("reward",), scale=(0, 1))


def _dynalign_config(args: argparse.Namespace):
    from hydra import compose, initialize_config_dir

    from dynalign.config import CONF_DIR, register_configs, to_train_config

    register_configs()
    spec = [f"model.tiny.{k}={v}" for k, v in MODELS[args.model].items()]
    overrides = [*spec, "model=tiny", "judge=ca_rubric", "judge.mode=logprob", "rollout=hf", "logger=none",
                 f"deepspeed.stage={args.zero_stage}", f"grpo.prompts_per_step={args.prompts}",
                 f"grpo.group_size={args.generations}",
                 f"grpo.micro_batch_size={args.prompts * args.generations}",  # one forward, like TRL
                 f"grpo.max_completion_length={args.new_tokens}", "grpo.beta=0.0", "grpo.loss_type=grpo",
                 "grpo.lr=1e-5", "grpo.num_iterations=1", "rollout.temperature=1.0", "seed=0"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_train_config(compose(config_name="train", overrides=overrides))


def _time_dynalign(cfg, parts, prompts: list[str], warmup: int, steps: int) -> list[dict[str, float]]:
    from dynalign.runtime import PhaseTimer
    from dynalign.train import Position, grpo_step

    timer, timed = PhaseTimer(), []
    for i in range(warmup + steps):
        position = Position(iteration=0, step=i, global_step=i)
        start = time.perf_counter()
        metrics, _ = grpo_step(cfg, parts, prompts, position, 0, timer)
        # the loop's phase names; its judge phase is the reward phase, whatever computes the reward
        phases = {k.removeprefix("time/").replace("judge", "reward"): v for k, v in timer.pop().items()}
        phases["wall"] = time.perf_counter() - start
        phases["completion_tokens"] = metrics["train/tokens"]
        if i >= warmup:
            timed.append(phases)
    return timed


def _threads(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def run_dynalign(args: argparse.Namespace) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    _threads(args)

    from dataclasses import replace

    from dynalign.distributed import init_distributed
    from dynalign.engine import PolicyEngine
    from dynalign.train import build_parts

    cfg = _dynalign_config(args)
    init_distributed()
    engine = PolicyEngine.from_config(cfg)
    with tempfile.TemporaryDirectory() as run_dir:
        parts = build_parts(cfg, engine, Path(run_dir), iteration=0)
    prompts = list(PROMPTS[: args.prompts])
    cheap = _time_dynalign(cfg, replace(parts, judge=PythonRewardJudge(cheap_reward)), prompts,
                           args.warmup, args.steps)
    judged = _time_dynalign(cfg, parts, prompts, 1, args.judge_steps) if args.judge_steps else []
    emit({"framework": "dynalign", "cheap": cheap, "judge": judged, "threads": torch.get_num_threads(),
          "zero_stage": cfg.deepspeed.stage})


# ------------------------------------------------------------------ TRL worker


class _Timed:
    """Wraps a bound method, adding its wall time to ``sink[name]`` on every call."""

    def __init__(self, fn, name: str, sink: dict[str, float]) -> None:
        self.fn, self.name, self.sink = fn, name, sink

    def __call__(self, *a, **kw):
        start = time.perf_counter()
        try:
            out = self.fn(*a, **kw)
        finally:
            self.sink[self.name] = self.sink.get(self.name, 0.0) + time.perf_counter() - start
        if self.name == "gen":  # TRL's _generate returns (prompt_ids, completion_ids, ...) as lists
            self.sink["completion_tokens"] = float(sum(len(ids) for ids in out[1]))
        return out


def _trl_reward(completions, **kwargs) -> list[float]:
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return cheap_reward(texts)


def run_trl(args: argparse.Namespace) -> None:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    _threads(args)
    n = args.prompts * args.generations
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS[: args.prompts]]
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    phases: dict[str, float] = {}
    timed: list[dict[str, float]] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            phases.clear()
            phases["_start"] = time.perf_counter()

        def on_step_end(self, *a, **kw):
            step = dict(phases)
            step["wall"] = time.perf_counter() - step.pop("_start")
            timed.append(step)

    with tempfile.TemporaryDirectory() as out:
        config = trl.GRPOConfig(
            output_dir=out, per_device_train_batch_size=n, gradient_accumulation_steps=1,
            num_generations=args.generations, max_completion_length=args.new_tokens,
            max_steps=args.warmup + args.steps, beta=0.0, loss_type="grpo", learning_rate=1e-5,
            lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, temperature=1.0, top_p=1.0,
            top_k=0, num_iterations=1, scale_rewards="group", bf16=False, fp16=False,
            gradient_checkpointing=False, use_cpu=True, report_to="none", logging_steps=1,
            save_strategy="no", disable_tqdm=True, shuffle_dataset=False, log_completions=False, seed=0)
        trainer = trl.GRPOTrainer(model=model, reward_funcs=[_trl_reward], args=config,
                                  train_dataset=Dataset.from_dict({"prompt": prompts}),
                                  processing_class=tokenizer, callbacks=[StepClock()])
        for attr, name in (("_generate", "gen"), ("_calculate_rewards", "reward"),
                           ("_generate_and_score_completions", "rollout_and_score")):
            setattr(trainer, attr, _Timed(getattr(trainer, attr), name, phases))
        trainer.train()
    for step in timed:
        step["update"] = step["wall"] - step.get("rollout_and_score", 0.0)
        step["adv"] = step.get("rollout_and_score", 0.0) - step.get("gen", 0.0) - step.get("reward", 0.0)
    emit({"framework": "trl", "version": trl.__version__, "cheap": timed[args.warmup:],
          "threads": torch.get_num_threads()})


# ------------------------------------------------------------------ orchestration


WORKLOAD_FLAGS = ("model", "prompts", "generations", "new_tokens", "warmup", "steps", "threads")


def run_worker(name: str, args: argparse.Namespace, model_path: str, judge_steps: int,
               zero_stage: int = 3) -> dict[str, Any]:
    """Run one framework's measurement in a fresh process; returns its result record."""
    flags = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in WORKLOAD_FLAGS]
    cmd = [sys.executable, __file__, "--worker", name, "--model-path", model_path, *flags,
           f"--judge-steps={judge_steps}", f"--zero-stage={zero_stage}"]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO_ROOT)}
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"bench_step: the {name} worker failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT_TAG):])


def summarize(steps: list[dict[str, float]], params: int, tokens_per_step: float,
              peak: float) -> dict[str, float]:
    """Medians of the phases, tokens/s of the whole step and the update's FLOP/s."""
    med = median_phases(steps)
    update_flops = 6 * params * tokens_per_step  # forward + backward over prompt and completion tokens
    med["tokens_per_s"] = statistics.median(s["completion_tokens"] / s["wall"] for s in steps)
    med["update_flops_per_s"] = update_flops / med["update"] if med.get("update") else float("nan")
    med["update_peak_frac"] = med["update_flops_per_s"] / peak
    return med


ROW = "{:<34} {:>8} {:>10} {:>8} {:>9} {:>9} {:>9} {:>16}"


def print_row(label: str, m: dict[str, float]) -> None:
    def s(key: str) -> str:
        return f"{m[key]:.3f}" if key in m else "-"

    flops = f"{m['update_flops_per_s'] / 1e9:.2f} ({100 * m['update_peak_frac']:.1f}%)"
    print(ROW.format(label, s("wall"), f"{m['tokens_per_s']:,.0f}", s("gen"), s("reward"), s("adv"),
                     s("update"), flops))


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def workload_size(path: str, args: argparse.Namespace) -> tuple[int, int]:
    """(parameters, prompt tokens of one step): the same chat template renders the prompts in both."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from dynalign.rollout.encoding import encode_prompts

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    params = sum(p.numel() for p in model.parameters())  # a tied head is counted once
    chats = [[{"role": "user", "content": p}] for p in PROMPTS[: args.prompts]]
    prompt_tokens = sum(len(ids) for ids in encode_prompts(AutoTokenizer.from_pretrained(path), chats))
    return params, prompt_tokens * args.generations


def collect(args: argparse.Namespace, path: str) -> dict[str, dict[str, Any]]:
    """Step records per measurement (``zero3``, ``zero2``..., ``trl``), alternating round after round."""
    stages = [int(x) for x in args.zero_stages.split(",")]
    frameworks = args.frameworks.split(",")
    jobs = [(f"zero{z}", "dynalign", z) for z in stages if "dynalign" in frameworks]
    jobs += [("trl", "trl", 3)] if "trl" in frameworks else []
    results: dict[str, dict[str, Any]] = {}
    for round_index in range(args.rounds):
        for index, (key, name, stage) in enumerate(jobs):
            judge_steps = args.judge_steps if round_index == 0 and index == 0 else 0  # the slow one: once
            result = run_worker(name, args, path, judge_steps, stage)
            merged = results.setdefault(key, {**result, "cheap": [], "judge": []})
            merged["cheap"] += result["cheap"]
            merged["judge"] += result.get("judge", [])
    return results


def summary_rows(results: dict[str, dict[str, Any]], params: int, tokens: int,
                 peak: float) -> dict[str, tuple[str, dict[str, float]]]:
    rows = {}
    for key, result in results.items():
        label = (f"TRL {result['version']}, python reward" if key == "trl"
                 else f"dynalign ZeRO-{result['zero_stage']}, python reward")
        rows[key] = (label, summarize(result["cheap"], params, tokens, peak))
        if result.get("judge"):
            rows[f"{key}-judge"] = (f"dynalign ZeRO-{result['zero_stage']}, self-judge",
                                    summarize(result["judge"], params, tokens, peak))
    return rows


def print_verdicts(rows: dict[str, tuple[str, dict[str, float]]]) -> None:
    trl = rows["trl"][1] if "trl" in rows else None
    for key, (label, row) in rows.items():
        if trl is None or key == "trl":
            continue
        ratio = row["tokens_per_s"] / trl["tokens_per_s"]
        label = label.removesuffix(", python reward")
        if key.endswith("-judge"):
            print(f"(a) own reward paths, {label} / TRL python reward: {ratio:.3f}x "
                  f"(the self-judge is {100 * row['reward'] / row['wall']:.0f}% of the step)")
            continue
        verdict = "meets" if ratio >= 2 else "does NOT meet"
        print(f"(b) same python reward, {label} / TRL: {ratio:.2f}x throughput ({verdict} the >= 2x "
              f"goal); TRL time / dynalign time: gen {trl['gen'] / row['gen']:.2f}x, "
              f"update {trl['update'] / row['update']:.2f}x")


def orchestrate(args: argparse.Namespace) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from dynalign.config import TinyModelConfig
    from dynalign.tiny_model import ensure_tiny_model

    path = str(ensure_tiny_model(TinyModelConfig(**MODELS[args.model])))
    load_start = _load()
    _threads(args)
    threads = args.threads or torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {platform.machine()}, {cores} CPU cores, torch {torch.__version__} "
          f"({threads} threads in both frameworks), load average {load_start} at the start", flush=True)
    peak_start = matmul_peak_flops()
    params, prompt_tokens = workload_size(path, args)
    n = args.prompts * args.generations
    tokens = prompt_tokens + n * args.new_tokens
    print(f"model:   {args.model} Llama, {params / 1e6:.2f} M parameters, fp32 ({path})")
    print(f"work:    {args.prompts} prompts x {args.generations} generations x {args.new_tokens} new tokens "
          f"= {n * args.new_tokens} completion tokens/step; {tokens} prompt+completion tokens in the update; "
          "beta 0, loss grpo, 1 optimizer step per batch, HF generate", flush=True)
    results = collect(args, path)
    peak_end = matmul_peak_flops()
    peak = max(peak_start, peak_end)
    print(f"peak:    fp32 matmul 2048x2048, best of 8: {peak_start / 1e9:.1f} GFLOP/s before, "
          f"{peak_end / 1e9:.1f} after; the higher is the peak")
    print(f"timing:  medians over {args.rounds} rounds x {args.steps} steps (each round: a fresh process per "
          f"framework, {args.warmup} warm-up steps, frameworks alternating); seconds per phase; update "
          f"GFLOP/s = 6 x params x {tokens} tokens / update time (% of peak)\n")
    print(ROW.format("", "step s", "tokens/s", "gen s", "reward s", "adv s", "update s", "update GFLOP/s"))
    rows = summary_rows(results, params, tokens, peak)
    for label, row in rows.values():
        print_row(label, row)
    print()
    print_verdicts(rows)
    print(f"load average: {load_start} at the start, {_load()} at the end")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker == "dynalign":
        run_dynalign(args)
    elif args.worker == "trl":
        run_trl(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
