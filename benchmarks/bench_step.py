"""One GRPO step, dynalign vs TRL's GRPOTrainer: same model, prompts, group size, lengths, reward.

Models (``--model``; ``make bench`` runs ``tiny``, then ``gemma3_270m``), each with its own
workload defaults (every one of them can be overridden on the command line):

* ``tiny``: the embedded tiny Llama (0.43 M random parameters; ``small``: 3.2 M), full
  fine-tuning. 4 chat prompts x 4 generations x 32 new tokens; 4 rounds x (2 warm-up + 5 timed)
  steps; 3 self-judge steps with the CA rubric; 1 thread. A random model almost never emits EOS,
  so answers are 32 tokens long.
* ``gemma3_270m``: Gemma 3 270M base (268 M parameters, 262k vocabulary), the converted local
  directory dynalign resolves by name (under ``$DYNALIGN_CACHE``); TRL loads that same
  directory. Full fine-tuning and LoRA (r 16, alpha 32 on q/k/v/o, as experiments/cpu_gemma.yaml;
  TRL gets a peft ``LoraConfig`` of the same shape). Sized for a CPU: 2 prompts x 4 generations
  x 16 new tokens; 1 round x (1 warm-up + 2 timed) steps; 1 self-judge step (1 warm-up) with the
  compact CA rubric; torch's threads (one per core).

Both frameworks, every model: temperature 1, beta 0 (no reference model), loss "grpo", AdamW
lr 1e-5 constant, one optimizer step per batch (one forward/backward in both), fp32 (the models'
presets), HF ``generate``; throughput = completion tokens actually generated / step wall time.

Prompts are chat messages rendered by the tokenizer's chat template in both: dynalign's sampler
does so for every prompt, TRL for a conversational dataset. For Gemma that template is dynalign's
one-example "Question: ... / Answer:" document (dynalign/gemma_model.py), which a base model
continues; the bench checks that both frameworks get identical prompt tokens. Answers end at EOS
or the token limit in both: Gemma's stop strings (``model.stop``) are off in dynalign here,
because TRL's trainer cannot pass them to ``generate`` (which needs the tokenizer for them).

Measurements (medians over ``--rounds`` x ``--steps`` steps, after ``--warmup`` steps per round),
for each fine-tuning mode of ``--finetune``:

* ``dynalign ZeRO-<s>, python reward`` for each of ``--zero-stages``: the training loop's own step
  (``dynalign.train.grpo_step``: rollout, reward, advantages, update on the DeepSpeed engine) with
  the judge replaced by the cheap python reward TRL gets -- the apples-to-apples comparison (b);
* ``TRL, python reward``: ``trl.GRPOTrainer`` with that reward function;
* ``dynalign ZeRO-<s>, self-judge``: the real dynalign step, the policy scoring its answers in
  logprob mode with the model's judge settings (``--judge-steps`` steps, first fine-tuning mode,
  first stage, first round; 0 skips it). TRL has no self-judge: its reward path is the python
  function, so this row vs TRL's compares each framework's own reward path (a).

Each row shows the step's phases (``other``: what the four named phases leave of the step --
dynalign's reference and sampler-sync phases and loop; TRL's update is the rest of its step, so
0 there) and the peak resident memory of the framework's process (``ru_maxrss``; a self-judge
row's includes the python-reward steps before it). The update's achieved FLOP/s (6 x parameters
x prompt+completion tokens / update time; 4 x with LoRA, whose frozen weights get no gradient)
is put against the fp32 matmul peak measured in the same run, and the load average is printed.
It is the workload's rate: dynalign's update reads each prompt once for its G answers
(``grpo.pack_groups``), fewer tokens than the workload counts, so its figure can pass the peak.

Each framework runs in its own subprocess (DeepSpeed's process group and accelerate's state never
meet). The frameworks take turns step by step: each round starts, for each dynalign ZeRO stage, a
fresh dynalign process and a fresh TRL process together; once both are set up, each waits at every
step (warm-up included) for its turn, so exactly one of them runs at a time and each step follows
the other framework's directly. A shared machine's speed drifts over tens of seconds (the same
``generate`` call took 85 ms for a while, then 100, then 138, in one process of this 2-core host):
turns step by step put that drift on both sides of each ratio, where processes run one after the
other would put it on one. The bench checks from the workers' own clocks that no two steps
overlapped, and says so. Fresh processes also differ among themselves (the same ``generate``
phase by up to ~20% between processes stepping in turns), so each pair's own ratio is printed
and the medians pool several rounds.

Goals, each printed with its ratio and verdict: dynalign ZeRO-3 with the python reward at least
2x TRL's throughput on tiny and ahead of TRL (> 1x) on Gemma; the self-judge phase at most
1.7 s per 16 answers on tiny and no longer than the generation phase of the same step on Gemma.

    make bench                                  # tiny, then gemma3_270m (BENCH_MODELS=tiny: tiny only)
    .venv/bin/python benchmarks/bench_step.py --model gemma3_270m --finetune lora --zero-stages 3
    .venv/bin/python benchmarks/bench_step.py --model small --judge-steps 0 --threads 0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT_TAG = "BENCH_RESULT "
TURN_TAG = "BENCH_TURN"  # a worker's line: set up and about to step; it then waits for "go" on stdin
PROMPTS = (
    "How can a neighbourhood start a tool library that everyone can use?",
    "What should I consider before adopting a rescue dog?",
    "Explain how vaccines train the immune system, for a curious twelve-year-old.",
    "Our team keeps missing deadlines. How do we fix this without blaming anyone?",
)
# LoRA of experiments/cpu_gemma.yaml, given to both frameworks
LORA_R, LORA_ALPHA, LORA_TARGETS = 16, 32, ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class BenchModel:
    """What ``--model`` names: the model, its dynalign settings, its workload defaults and goals."""

    name: str  # model.name_or_path of an embedded model
    description: str
    overrides: tuple[str, ...]  # dynalign config: the model's preset and its judge
    defaults: dict[str, Any]  # argparse defaults for this model
    speedup_goal: float  # dynalign ZeRO-3 / TRL throughput with the same python reward
    speedup_strict: bool = False  # "ahead of" (>) rather than "at least" (>=)
    judge_budget_s: float | None = None  # self-judge phase seconds per 16 answers
    judge_within_gen: bool = False  # self-judge phase <= the generation phase of the same step
    tiny: dict[str, Any] = field(default_factory=dict)  # TinyModelConfig fields of a tiny model


TINY_DEFAULTS = dict(prompts=4, generations=4, new_tokens=32, warmup=2, steps=5, judge_steps=3, rounds=4,
                     threads=1, finetune="full", zero_stages="3,2")
TINY_OVERRIDES = ("model=tiny", "judge=ca_rubric", "judge.mode=logprob")
MODELS = {
    "tiny": BenchModel("tiny", "the embedded tiny Llama, random weights", TINY_OVERRIDES, TINY_DEFAULTS,
                       speedup_goal=2.0, judge_budget_s=1.7),
    "small": BenchModel("tiny", "a wider embedded tiny Llama, random weights", TINY_OVERRIDES, TINY_DEFAULTS,
                        speedup_goal=2.0,
                        tiny=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2)),
    # The preset's judge is the compact rubric in logprob mode, the policy judging itself (as
    # experiments/cpu_gemma.yaml); its stop strings are off, see the module docstring.
    "gemma3_270m": BenchModel(
        "gemma3_270m", "Gemma 3 270M base", ("model=gemma3_270m", "judge=ca_compact", "judge.mode=logprob",
                                             "judge.source=self", "model.stop=[]"),
        dict(prompts=2, generations=4, new_tokens=16, warmup=1, steps=2, judge_steps=1, rounds=1, threads=0,
             finetune="full,lora", zero_stages="3,2"),
        speedup_goal=1.0, speedup_strict=True, judge_within_gen=True),
}
FINETUNES = ("full", "lora")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    # Defaults of None are the model's (MODELS[...].defaults, in the module docstring).
    parser.add_argument("--prompts", type=int, help=f"prompts per step (at most {len(PROMPTS)})")
    parser.add_argument("--generations", type=int, help="answers per prompt (group size)")
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--warmup", type=int, help="untimed steps first, per measurement")
    parser.add_argument("--steps", type=int, help="timed steps (median reported)")
    parser.add_argument("--judge-steps", type=int,
                        help="timed steps of dynalign with its self-judge (after at most 1 warm-up); "
                             "0 skips it")
    parser.add_argument("--finetune", help="comma-separated fine-tuning modes: full, lora")
    parser.add_argument("--zero-stages",
                        help="dynalign's DeepSpeed ZeRO stages to measure, comma-separated (3: the default "
                             "training core; 2: no parameter partitioning, the faster one on one process)")
    parser.add_argument("--rounds", type=int,
                        help="measure this many times, each round in fresh processes (per dynalign stage, "
                             "one dynalign and one TRL process taking turns step by step); medians pool "
                             "the rounds, and each pair's own ratio is printed")
    parser.add_argument("--threads", type=int,
                        help="torch/OpenMP threads in both frameworks; 0: torch's default (one per core). "
                             "1 on tiny: a 0.4 M model gains nothing from more, and on a shared machine "
                             "OpenMP threads spin-waiting for descheduled peers make timings erratic")
    parser.add_argument("--frameworks", default="dynalign,trl")
    parser.add_argument("--worker", choices=("dynalign", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--zero-stage", type=int, default=3, help=argparse.SUPPRESS)  # a worker's stage
    args = parser.parse_args(argv)
    for key, value in MODELS[args.model].defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be in [1, {len(PROMPTS)}]")
    if unknown := set(args.finetune.split(",")) - set(FINETUNES):
        parser.error(f"--finetune: unknown {sorted(unknown)}; known: {', '.join(FINETUNES)}")
    return args


# ------------------------------------------------------------------ shared pieces


def cheap_reward(texts: list[str]) -> list[float]:
    """The python reward both frameworks get: share of letters and spaces in the answer, in [0, 1].

    Microseconds per answer, like the rule-based rewards TRL users write; it varies between
    answers, so advantages and gradients are non-zero.
    """
    return [sum(ch.isalpha() or ch == " " for ch in t) / max(len(t), 1) for t in texts]


def chat_prompts(args: argparse.Namespace) -> list[list[dict[str, str]]]:
    """The step's prompts as one-turn chats: what dynalign's loop samples from, and TRL's dataset."""
    return [[{"role": "user", "content": p}] for p in PROMPTS[: args.prompts]]


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


def tokens_per_s(steps: list[dict[str, float]]) -> float:
    """Median throughput of steps: completion tokens / step wall time."""
    return statistics.median(s["completion_tokens"] / s["wall"] for s in steps)


def median_phases(steps: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for s in steps for k in s})
    return {k: statistics.median(s.get(k, 0.0) for s in steps) for k in keys}


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def emit(result: dict[str, Any]) -> None:
    print(RESULT_TAG + json.dumps(result), flush=True)


def wait_turn() -> float:
    """Tell the orchestrator this worker is about to step, wait for its turn; returns the turn's
    start on the wall clock (shared by the processes, for the orchestrator's overlap check)."""
    print(TURN_TAG, flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("bench_step: the orchestrator closed the lockstep channel")
    return time.time()


def _threads(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


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
    """The model's preset and judge, the bench's workload, and the directory TRL loads too."""
    from hydra import compose, initialize_config_dir

    from dynalign.config import CONF_DIR, register_configs, to_train_config

    register_configs()
    lora = (["model.lora.enabled=true", f"model.lora.r={LORA_R}", f"model.lora.alpha={LORA_ALPHA}",
             f"model.lora.target_modules=[{','.join(LORA_TARGETS)}]", "model.lora.dropout=0.0"]
            if args.finetune == "lora" else ["model.lora.enabled=false"])
    overrides = [*MODELS[args.model].overrides, f"model.name_or_path='{args.model_path}'",
                 "model.dtype=float32", *lora, "rollout=hf", "logger=none",
                 f"deepspeed.stage={args.zero_stage}", f"grpo.prompts_per_step={args.prompts}",
                 f"grpo.group_size={args.generations}",
                 f"grpo.micro_batch_size={args.prompts * args.generations}",  # one forward, like TRL
                 f"grpo.max_completion_length={args.new_tokens}", "grpo.beta=0.0", "grpo.loss_type=grpo",
                 "grpo.lr=1e-5", "grpo.num_iterations=1",
                 "rollout.temperature=1.0", "seed=0"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_train_config(compose(config_name="train", overrides=overrides))


def _time_dynalign(cfg, parts, prompts: list[str], warmup: int, steps: int,
                   spans: list[list[float]]) -> list[dict[str, float]]:
    """Phases of ``steps`` timed steps after ``warmup`` untimed ones, each step on its turn (its
    wall-clock span appended to ``spans``)."""
    from dynalign.runtime import PhaseTimer
    from dynalign.train import Position, grpo_step

    timer, timed = PhaseTimer(), []
    for i in range(warmup + steps):
        position = Position(iteration=0, step=i, global_step=i)
        turn = wait_turn()
        start = time.perf_counter()
        metrics, _ = grpo_step(cfg, parts, prompts, position, 0, timer)
        # the loop's phase names; its judge phase is the reward phase, whatever computes the reward
        phases = {k.removeprefix("time/").replace("judge", "reward"): v for k, v in timer.pop().items()}
        phases["wall"] = time.perf_counter() - start
        spans.append([turn, time.time()])
        phases["completion_tokens"] = metrics["train/tokens"]
        if i >= warmup:
            timed.append(phases)
    return timed


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
    prompts, spans = list(PROMPTS[: args.prompts]), []
    cheap = _time_dynalign(cfg, replace(parts, judge=PythonRewardJudge(cheap_reward)), prompts,
                           args.warmup, args.steps, spans)
    cheap_rss = peak_rss_gib()  # before the judge steps, which may need more
    judged = (_time_dynalign(cfg, parts, prompts, min(1, args.warmup), args.judge_steps, spans)
              if args.judge_steps else [])
    emit({"framework": "dynalign", "cheap": cheap, "judge": judged, "spans": spans,
          "threads": torch.get_num_threads(),
          "zero_stage": cfg.deepspeed.stage, "rss_gib": cheap_rss, "judge_rss_gib": peak_rss_gib(),
          "judge_name": f"{cfg.judge.rubric.name}, {cfg.judge.mode}, source {cfg.judge.source}"})


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


def _trl_lora():
    from peft import LoraConfig

    return LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                      bias="none", task_type="CAUSAL_LM")


def run_trl(args: argparse.Namespace) -> None:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    _threads(args)
    n = args.prompts * args.generations
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    phases: dict[str, float] = {}
    timed: list[dict[str, float]] = []
    spans: list[list[float]] = []

    class StepClock(TrainerCallback):
        """Times each optimizer step (the rollout is inside it), each on its turn."""

        def on_step_begin(self, *a, **kw):
            spans.append([wait_turn()])
            phases.clear()
            phases["_start"] = time.perf_counter()

        def on_step_end(self, *a, **kw):
            step = dict(phases)
            step["wall"] = time.perf_counter() - step.pop("_start")
            spans[-1].append(time.time())
            timed.append(step)

    with tempfile.TemporaryDirectory() as out:
        config = trl.GRPOConfig(
            output_dir=out, per_device_train_batch_size=n, gradient_accumulation_steps=1,
            num_generations=args.generations, max_completion_length=args.new_tokens,
            max_steps=args.warmup + args.steps, beta=0.0, loss_type="grpo", learning_rate=1e-5,
            lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, temperature=1.0, top_p=1.0,
            top_k=0, num_iterations=1, scale_rewards="group", bf16=False, fp16=False,
            gradient_checkpointing=False, use_cpu=True, report_to="none", logging_steps=1,
            save_strategy="no", disable_tqdm=True, shuffle_dataset=False, log_completions=False, seed=0,
            # what dynalign's loader does: fp32 (the presets' dtype), SDPA attention
            model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"})
        # the model as a path: TRL loads the directory dynalign loads
        trainer = trl.GRPOTrainer(model=args.model_path, reward_funcs=[_trl_reward], args=config,
                                  train_dataset=Dataset.from_dict({"prompt": chat_prompts(args)}),
                                  processing_class=tokenizer, callbacks=[StepClock()],
                                  peft_config=_trl_lora() if args.finetune == "lora" else None)
        for attr, name in (("_generate", "gen"), ("_calculate_rewards", "reward"),
                           ("_generate_and_score_completions", "rollout_and_score")):
            setattr(trainer, attr, _Timed(getattr(trainer, attr), name, phases))
        trainer.train()
    for step in timed:
        step["update"] = step["wall"] - step.get("rollout_and_score", 0.0)
        step["adv"] = step.get("rollout_and_score", 0.0) - step.get("gen", 0.0) - step.get("reward", 0.0)
    emit({"framework": "trl", "version": trl.__version__, "cheap": timed[args.warmup:], "spans": spans,
          "threads": torch.get_num_threads(), "rss_gib": peak_rss_gib()})


# ------------------------------------------------------------------ orchestration


WORKLOAD_FLAGS = ("model", "prompts", "generations", "new_tokens", "warmup", "steps", "threads")


@dataclass
class Worker:
    """One framework's measurement in its own process, stepping when the orchestrator says."""

    label: str
    proc: subprocess.Popen
    stderr: Any  # a temporary file: a pipe nobody reads while the worker waits could fill up
    tail: list[str] = field(default_factory=list)  # its last lines of stdout, for an error report
    result: dict[str, Any] | None = None
    turns: int = 0  # turns given to it

    def next_turn(self) -> bool:
        """Read the worker's output up to its next turn (True) or its end (False; result kept)."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.rstrip("\n") == TURN_TAG:
                return True
            if line.startswith(RESULT_TAG):
                self.result = json.loads(line[len(RESULT_TAG):])
            else:
                self.tail = [*self.tail[-40:], line]
        if self.proc.wait() != 0 or self.result is None:
            self.stderr.seek(0)
            sys.stderr.write("".join(self.tail)[-3000:] + self.stderr.read()[-6000:])
            raise SystemExit(f"bench_step: the {self.label} worker failed (exit {self.proc.returncode})")
        return False

    def step(self) -> bool:
        """Let the worker take one step; True while it has more."""
        assert self.proc.stdin is not None
        self.turns += 1
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self.next_turn()


def start_worker(name: str, args: argparse.Namespace, model_path: str, finetune: str, judge_steps: int,
                 zero_stage: int = 3) -> Worker:
    """Start one framework's measurement in a fresh process; it sets up, then waits for its turns."""
    flags = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in WORKLOAD_FLAGS]
    cmd = [sys.executable, __file__, "--worker", name, "--model-path", model_path, *flags,
           f"--finetune={finetune}", f"--judge-steps={judge_steps}", f"--zero-stage={zero_stage}"]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO_ROOT)}
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115  # the worker's, closed by lockstep
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=stderr, text=True)
    return Worker(f"{name} ({finetune}, ZeRO-{zero_stage})" if name == "dynalign" else f"{name} ({finetune})",
                  proc, stderr)


def lockstep(workers: list[Worker]) -> list[dict[str, Any]]:
    """Run the workers' steps in turns, one worker at a time, once all are set up; their results
    (each with ``turns``: how many it was given).

    A worker that fails stops the bench (its output is shown); the others are killed.
    """
    try:
        stepping = [w for w in workers if w.next_turn()]  # each is set up and waits at its first step
        while stepping:
            stepping = [w for w in stepping if w.step()]
        return [{**w.result, "turns": w.turns} for w in workers if w.result is not None]  # all of them
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
            w.stderr.close()


def overlapping_steps(results: list[dict[str, Any]]) -> int:
    """How many steps began before the step run just before them (by any worker) had ended."""
    spans = sorted(tuple(span) for r in results for span in r.get("spans", []))
    return sum(start < previous_end for (_, previous_end), (start, _) in pairwise(spans))


@dataclass
class Row:
    """One line of the table: a measurement's medians, and what the verdicts need to know of it."""

    label: str
    finetune: str
    framework: str  # dynalign | trl
    stage: int | None  # dynalign's ZeRO stage
    judge: bool  # dynalign's self-judge, not the python reward
    m: dict[str, float]
    pairs: list[float] = field(default_factory=list)  # throughput / TRL's, per pair of processes


def summarize(steps: list[dict[str, float]], update_flops: float, peak: float,
              rss: float) -> dict[str, float]:
    """Medians of the phases, tokens/s of the whole step, the update's FLOP/s, the peak RSS."""
    # per step, so that a median of several steps is still one step's remainder
    steps = [{**s, "other": s["wall"] - sum(s.get(k, 0.0) for k in ("gen", "reward", "adv", "update"))}
             for s in steps]
    med = median_phases(steps)
    med["tokens_per_s"] = tokens_per_s(steps)
    med["update_flops_per_s"] = update_flops / med["update"] if med.get("update") else float("nan")
    med["update_peak_frac"] = med["update_flops_per_s"] / peak
    med["rss_gib"] = rss
    return med


ROW = "{:<44} {:>7} {:>9} {:>7} {:>8} {:>7} {:>8} {:>7} {:>16} {:>12}"
HEADER = ("", "step s", "tokens/s", "gen s", "reward s", "adv s", "update s", "other s", "update GFLOP/s",
          "peak RSS GiB")


def print_row(row: Row) -> None:
    m = row.m

    def s(key: str) -> str:
        return f"{m[key]:.3f}" if key in m else "-"

    flops = f"{m['update_flops_per_s'] / 1e9:.2f} ({100 * m['update_peak_frac']:.1f}%)"
    rate = m["tokens_per_s"]  # thousands on tiny, a few on Gemma on a CPU
    tokens = f"{rate:,.0f}" if rate >= 100 else f"{rate:.2f}"
    print(ROW.format(row.label, s("wall"), tokens, s("gen"), s("reward"), s("adv"), s("update"), s("other"),
                     flops, f"{m['rss_gib']:.2f}"))


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def model_path(spec: BenchModel) -> str:
    """The model's local directory, built or converted on first use (before any worker starts)."""
    from dynalign.config import ModelConfig, TinyModelConfig
    from dynalign.models import resolve_model_path

    return resolve_model_path(ModelConfig(name_or_path=spec.name, tiny=TinyModelConfig(**spec.tiny)))


def workload_size(path: str, args: argparse.Namespace) -> tuple[int, int, str]:
    """(parameters, prompt tokens of one step, model type); stops if TRL would get other prompt tokens."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from dynalign.rollout.encoding import encode_prompts

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):  # shapes only: no 1 GB of random Gemma weights
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # a tied head is counted once
    tokenizer: Any = AutoTokenizer.from_pretrained(path)
    chats = chat_prompts(args)
    ours = encode_prompts(tokenizer, chats)
    # TRL's GRPOTrainer._tokenize_prompts on a conversational dataset, verbatim
    theirs = tokenizer.apply_chat_template(conversation=chats, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    if [list(ids) for ids in theirs] != ours:
        raise SystemExit("bench_step: dynalign and TRL would tokenize the prompts differently")
    return params, sum(len(ids) for ids in ours) * args.generations, config.model_type


def collect(args: argparse.Namespace, path: str) -> tuple[dict[tuple[str, str], dict[str, Any]], list[int]]:
    """Step records per (fine-tuning mode, measurement: ``zero3``, ``zero2``..., ``trl``); each
    dynalign stage measured in turns with a TRL process of its own, round after round (TRL's
    steps pool over its processes). Also: [steps run, turns given, steps that overlapped another]."""
    stages = [int(x) for x in args.zero_stages.split(",")]
    frameworks = args.frameworks.split(",")
    groups = []  # [(fine-tuning, measurement key, framework, stage)] run together in turns
    for finetune in args.finetune.split(","):
        trl = [(finetune, "trl", "trl", 3)] if "trl" in frameworks else []
        ours = [(finetune, f"zero{z}", "dynalign", z) for z in stages] if "dynalign" in frameworks else []
        groups += [[job, *trl] for job in ours] or [trl]
    results: dict[tuple[str, str], dict[str, Any]] = {}
    turns = [0, 0, 0]
    for round_index in range(args.rounds):
        for index, group in enumerate(groups):
            ordered = group[:: 1 if round_index % 2 == 0 else -1]  # who steps first alternates
            # the self-judge steps (slow): once, by the first dynalign process
            workers = [start_worker(name, args, path, finetune, args.judge_steps
                                    if round_index == 0 and index == 0 and name == "dynalign" else 0, stage)
                       for finetune, _, name, stage in ordered]
            outcome = lockstep(workers)
            turns[0] += sum(len(r["spans"]) for r in outcome)
            turns[1] += sum(r["turns"] for r in outcome)
            turns[2] += overlapping_steps(outcome)
            by_framework = {r["framework"]: r for r in outcome}
            for (finetune, key, _, _), result in zip(ordered, outcome, strict=True):
                merged = results.setdefault((finetune, key), {**result, "cheap": [], "judge": [], "pairs": [],
                                                              "rss_gib": 0.0, "judge_rss_gib": 0.0})
                if result["framework"] == "dynalign" and "trl" in by_framework:  # this pair's own ratio
                    theirs = by_framework["trl"]["cheap"]
                    merged["pairs"].append(tokens_per_s(result["cheap"]) / tokens_per_s(theirs))
                merged["cheap"] += result["cheap"]
                merged["judge"] += result.get("judge", [])
                for rss in ("rss_gib", "judge_rss_gib"):  # the peak over its processes
                    merged[rss] = max(merged[rss], result.get(rss, 0.0))
    finetunes = args.finetune.split(",")  # the table's order: per fine-tuning, dynalign's stages, then TRL
    ordered = sorted(results.items(), key=lambda item: (finetunes.index(item[0][0]), item[0][1] == "trl"))
    return dict(ordered), turns


def summary_rows(results: dict[tuple[str, str], dict[str, Any]], params: int, tokens: int,
                 peak: float) -> list[Row]:
    rows = []
    for (finetune, key), result in results.items():
        lora = finetune == "lora"
        # forward 2, backward 4 FLOPs per parameter and token; frozen weights (LoRA) skip their 2 of
        # weight gradients (the adapters' own are negligible)
        update_flops = (4 if lora else 6) * params * tokens
        suffix = " LoRA" if lora else ""
        if key == "trl":
            rows.append(Row(f"TRL {result['version']}{suffix}, python reward", finetune, "trl", None, False,
                            summarize(result["cheap"], update_flops, peak, result["rss_gib"])))
            continue
        stage = result["zero_stage"]
        rows.append(Row(f"dynalign ZeRO-{stage}{suffix}, python reward", finetune, "dynalign", stage, False,
                        summarize(result["cheap"], update_flops, peak, result["rss_gib"]), result["pairs"]))
        if result.get("judge"):
            rows.append(Row(f"dynalign ZeRO-{stage}{suffix}, self-judge", finetune, "dynalign", stage, True,
                            summarize(result["judge"], update_flops, peak, result["judge_rss_gib"])))
    return rows


def _verdict(ok: bool) -> str:
    return "meets" if ok else "does NOT meet"


def print_verdicts(rows: list[Row], spec: BenchModel, answers: int) -> None:
    """Each ratio against TRL with the same fine-tuning, and each goal's verdict."""
    trl = {r.finetune: r.m for r in rows if r.framework == "trl"}
    goal = f"{'>' if spec.speedup_strict else '>='} {spec.speedup_goal:g}x"
    for row in rows:
        if row.framework == "trl":
            continue
        label = row.label.removesuffix(", python reward")
        base = trl.get(row.finetune)
        ratio = row.m["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        theirs = "TRL LoRA" if row.finetune == "lora" else "TRL"
        if row.judge:
            if base:
                print(f"(a) own reward paths, {label} / {theirs} python reward: {ratio:.3f}x throughput")
            print_judge_verdict(row, spec, answers)
            continue
        if base is None:
            continue
        met = ratio > spec.speedup_goal if spec.speedup_strict else ratio >= spec.speedup_goal
        # the goal is the default training core's (ZeRO-3); other stages get their ratio only
        verdict = f" ({_verdict(met)} the {goal} goal)" if row.stage == 3 else ""
        pairs = ", ".join(f"{r:.2f}x" for r in row.pairs)
        print(f"(b) same python reward, {label} / {theirs}: {ratio:.2f}x throughput{verdict}; "
              f"TRL time / dynalign time: gen {base['gen'] / row.m['gen']:.2f}x, "
              f"update {base['update'] / row.m['update']:.2f}x" + (f"; each pair of processes: {pairs}"
                                                                  if len(row.pairs) > 1 else ""))


def print_judge_verdict(row: Row, spec: BenchModel, answers: int) -> None:
    m = row.m
    share = 100 * m["reward"] / m["wall"]
    head = f"self-judge: {m['reward']:.3f} s for {answers} answers, {share:.0f}% of the step"
    if spec.judge_budget_s is not None:
        budget = spec.judge_budget_s * answers / 16  # the goal is per 16 answers; scaled to this workload
        print(f"{head} ({_verdict(m['reward'] <= budget)} the <= {budget:.2f} s goal: "
              f"{spec.judge_budget_s:g} s per 16 answers)")
    elif spec.judge_within_gen:
        print(f"{head}; generation {m['gen']:.3f} s in the same steps ({_verdict(m['reward'] <= m['gen'])} "
              "the goal: self-judge <= generation)")
    else:
        print(f"{head} (no goal on this model)")


def orchestrate(args: argparse.Namespace) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    spec = MODELS[args.model]
    path = model_path(spec)
    load_start = _load()
    _threads(args)
    threads = args.threads or torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {platform.machine()}, {cores} CPU cores, torch {torch.__version__} "
          f"({threads} threads in both frameworks), load average {load_start} at the start", flush=True)
    peak_start = matmul_peak_flops()
    params, prompt_tokens, model_type = workload_size(path, args)
    n = args.prompts * args.generations
    tokens = prompt_tokens + n * args.new_tokens
    print(f"model:   {args.model}: {spec.description}, model type {model_type}, {params / 1e6:.2f} M "
          f"parameters, fp32, fine-tuning {args.finetune.replace(',', ' and ')} ({path})")
    print(f"work:    {args.prompts} prompts x {args.generations} generations x {args.new_tokens} new tokens "
          f"= {n * args.new_tokens} completion tokens/step at most; {tokens} prompt+completion tokens in the "
          "update; chat template, same prompt tokens in both; beta 0, loss grpo, 1 optimizer step per batch, "
          "HF generate", flush=True)
    started = time.perf_counter()
    results, (steps, turns, overlaps) = collect(args, path)
    elapsed = time.perf_counter() - started
    peak_end = matmul_peak_flops()
    peak = max(peak_start, peak_end)
    judge_name = next((r["judge_name"] for r in results.values() if r.get("judge")), None)
    print(f"peak:    fp32 matmul 2048x2048, best of 8: {peak_start / 1e9:.1f} GFLOP/s before, "
          f"{peak_end / 1e9:.1f} after; the higher is the peak")
    print(f"timing:  medians over {args.rounds} rounds x {args.steps} steps (each round: per dynalign stage, "
          f"a fresh dynalign process and a fresh TRL process, {args.warmup} warm-up steps, the two taking "
          f"turns step by step); seconds per phase; update GFLOP/s = 6 x params (LoRA: 4 x) x {tokens} "
          f"tokens / update time (% of peak; the workload's rate: dynalign reads each prompt once, "
          f"fewer tokens, so its rate can pass the peak); peak RSS: the framework's process; "
          f"measurements took {elapsed:.0f} s")
    checks = [f"WARNING: {steps} steps on {turns} turns"] if steps != turns else []
    checks += [f"WARNING: {overlaps} overlapped another"] if overlaps else ["none overlapped"]
    print(f"turns:   {steps} steps in all (warm-ups included) on {turns} turns, one process stepping at a "
          f"time by the workers' clocks: {'; '.join(checks)}")
    print(f"judge:   {judge_name}\n" if judge_name else "")
    print(ROW.format(*HEADER))
    rows = summary_rows(results, params, tokens, peak)
    for row in rows:
        print_row(row)
    print()
    print_verdicts(rows, spec, n)
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
