"""The update phase two ways on one batch, in one process (``--compare``):

* ``layout`` (default): each prompt read once for its answers (``grpo.pack_groups``, packed rows)
  or once per answer (padded rows);
* ``kernels``: the float32 CPU linears, forward and backward, through torch's ``F.linear`` (MKL)
  or through oneDNN as dynalign runs them (:mod:`dynalign.onednn`), both packed;
* ``leaf``: ZeRO-3's hooks on every module (``deepspeed.stage3_leaf_layers=false``) or on each
  decoder layer as one unit (the default), on a second engine built the other way.

One dynalign engine (ZeRO-3 by default) samples one batch of rollouts as a GRPO step does
(bench_step's prompts, group size, lengths and python reward), then times ``train_step`` on that
batch both ways, alternating one step of each per repeat, so the host's drift falls on both
sides of the ratio. It prints the rows and token positions each layout reads, each median, and
the baseline's median over the other's.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_update.py [--model tiny|gemma3_270m]
        [--compare layout|kernels|leaf] [--repeats 10] [--profile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_step  # noqa: E402  (its workload, config and python reward)

Block = Callable[[], AbstractContextManager]  # entered around a step; gives the engine that steps
Variant = tuple[str, Block]  # a name, and the block its step runs in


def on(engine, block: Block = nullcontext) -> Block:
    """A variant's block: ``block()`` entered, ``engine`` given to step."""
    @contextmanager
    def run():
        with block():
            yield engine
    return run


def layout_variants(engine, _cfg, _stack) -> list[Variant]:
    """Padded rows (the baseline), then packed rows."""
    packing = engine.packing

    def layout(value):
        def block() -> AbstractContextManager:
            engine.packing = value
            return nullcontext()
        return on(engine, block)

    return [("padded", layout(None)), ("packed", layout(packing))]


def kernel_variants(engine, _cfg, _stack) -> list[Variant]:
    """Every linear through ``F.linear`` (the baseline), then as dynalign runs them."""
    from dynalign.engine import policy

    def torch_linears() -> AbstractContextManager:
        return mock.patch.object(policy, "onednn_linears", lambda _module: nullcontext())

    return [("torch's linears", on(engine, torch_linears)), ("dynalign's", on(engine))]


def leaf_variants(engine, cfg, stack: ExitStack) -> list[Variant]:
    """A second engine with DeepSpeed's hooks on every module (the baseline; closed by ``stack``),
    then the engine with each decoder layer one ZeRO-3 unit."""
    from dynalign.engine import PolicyEngine

    if not (engine.zero3 and cfg.deepspeed.stage3_leaf_layers):
        raise SystemExit("bench_update --compare leaf: needs ZeRO-3 with deepspeed.stage3_leaf_layers")
    per_module = PolicyEngine.from_config(
        replace(cfg, deepspeed=replace(cfg.deepspeed, stage3_leaf_layers=False)))
    stack.callback(per_module.close)
    per_module.packing = engine.packing

    def hooks(module) -> int:
        tables = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
        return sum(len(getattr(sub, table)) for sub in module.modules() for table in tables)

    print(f"hooks:   per-module {hooks(per_module.module)} on the model's modules, leaf layers "
          f"{hooks(engine.module)}")
    return [("per-module hooks", on(per_module)), ("leaf layers", on(engine))]


VARIANTS = {"layout": layout_variants, "kernels": kernel_variants, "leaf": leaf_variants}


def profile(step: Callable[[], object], top: int = 15) -> None:
    """One update under cProfile: its seconds, then the ``top`` functions by time of their own."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(step)
    print(f"profiled step: {time.perf_counter() - start:.2f} s")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(top)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(bench_step.MODELS), default="tiny")
    parser.add_argument("--finetune", choices=bench_step.FINETUNES, default="full")
    parser.add_argument("--zero-stage", type=int, default=3)
    parser.add_argument("--compare", choices=sorted(VARIANTS), default="layout",
                        help="layout: padded rows against packed ones; kernels: torch's linears against "
                             "dynalign's (oneDNN); leaf: ZeRO-3 hooks per module against per decoder layer")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps of each variant")
    parser.add_argument("--threads", type=int, help="torch threads; default: bench_step's for the model")
    parser.add_argument("--profile", action="store_true",
                        help="then one more step as dynalign runs it under cProfile: the functions with the "
                             "most time of their own")
    args = parser.parse_args()
    for key in ("prompts", "generations", "new_tokens", "threads"):
        if getattr(args, key, None) is None:
            setattr(args, key, bench_step.MODELS[args.model].defaults[key])
    return args


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    args = parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from dynalign.distributed import init_distributed
    from dynalign.engine import PolicyEngine
    from dynalign.packing import pack_groups
    from dynalign.rollout import sampling_params
    from dynalign.train import build_policy_sampler, make_batch, rewards_to_advantages

    args.model_path = bench_step.model_path(bench_step.MODELS[args.model])
    cfg = bench_step._dynalign_config(args)
    init_distributed()
    engine = PolicyEngine.from_config(cfg)
    if engine.packing is None:
        raise SystemExit("bench_update: this model's attention takes no block mask (see grpo.pack_groups)")
    sampler = build_policy_sampler(cfg, engine)  # the loop's sampler, without its judge
    g = cfg.grpo
    params = sampling_params(cfg.rollout, g.max_completion_length, seed=cfg.seed,
                             max_prompt_length=g.max_prompt_length)
    prompts = [[{"role": "user", "content": p}] for p in bench_step.PROMPTS[:args.prompts]]
    rollouts = sampler.sample(prompts, g.group_size, params)
    rewards = torch.tensor(bench_step.cheap_reward(rollouts.texts))  # [N]
    advantages, keep, _ = rewards_to_advantages(rewards, rollouts, cfg)
    batch = make_batch(rollouts, advantages, keep)

    packing = engine.packing
    packed = pack_groups(batch.input_ids, batch.attention_mask, batch.completion_length, packing.max_tokens)
    rows, width = batch.input_ids.shape
    print(f"model:   {args.model}, {args.finetune} fine-tuning, ZeRO-{args.zero_stage}, "
          f"{torch.get_num_threads()} thread(s); {args.prompts} prompts x {args.generations} answers x "
          f"<= {args.new_tokens} new tokens")
    print(f"padded:  {rows} rows x {width} positions = {rows * width} "
          f"({int(batch.attention_mask.sum())} tokens)")
    print(f"packed:  {packed.num_rows} rows x {packed.input_ids.shape[1]} positions = "
          f"{packed.input_ids.numel()} ({int((packed.segments >= 0).sum())} tokens)")
    # the positions that predict an answer token: all the LM head runs on (packing.logits_at)
    answers = batch.attention_mask[:, -batch.completion_length:].sum(1)  # [N]
    print(f"LM head: packed {len(torch.unique(packed.source))} positions (kept columns: {packed.num_rows} x "
          f"{len(packed.kept)}), padded {int(answers.clamp(min=1).sum())} (kept columns: {rows} x "
          f"{batch.completion_length + 1})")
    with ExitStack() as stack:  # closes the engines, a variant's own first
        stack.callback(engine.close)
        variants = VARIANTS[args.compare](engine, cfg, stack)
        times: dict[str, list[float]] = {name: [] for name, _ in variants}
        for repeat in range(args.repeats + 1):  # the first round warms both up
            for name, block in variants:
                with block() as stepped:
                    start = time.perf_counter()
                    stepped.train_step(batch)
                    if repeat:
                        times[name].append(time.perf_counter() - start)
        (base, base_times), (other, other_times) = times.items()
        base_median, other_median = statistics.median(base_times), statistics.median(other_times)
        print(f"update:  {base} {base_median:.4f} s, {other} {other_median:.4f} s (medians of "
              f"{args.repeats}, alternating); {base} / {other} = {base_median / other_median:.2f}x")
        if args.profile:
            profile(lambda: engine.train_step(batch))


if __name__ == "__main__":
    main()
