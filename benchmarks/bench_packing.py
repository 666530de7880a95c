"""The update phase with each prompt read once (``grpo.pack_groups``, packed rows) or once per
answer (padded rows), on ``make bench``'s workload, in one process.

One dynalign engine (ZeRO-3 by default) samples one batch of rollouts as a GRPO step does
(bench_step's prompts, group size, lengths and python reward), then times ``train_step`` on that
batch with packed and with padded rows, alternating one step of each per repeat, so the host's
drift falls on both sides of the ratio. It prints the rows and token positions each layout
reads, each median, and padded / packed.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_packing.py [--model tiny|gemma3_270m] [--repeats 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_step  # noqa: E402  (its workload, config and python reward)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(bench_step.MODELS), default="tiny")
    parser.add_argument("--finetune", choices=bench_step.FINETUNES, default="full")
    parser.add_argument("--zero-stage", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10, help="timed steps of each layout")
    parser.add_argument("--threads", type=int, help="torch threads; default: bench_step's for the model")
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
        raise SystemExit("bench_packing: this model's attention takes no block mask (see grpo.pack_groups)")
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
    times: dict[str, list[float]] = {"packed": [], "padded": []}
    layouts = {"packed": packing, "padded": None}
    for repeat in range(args.repeats + 1):  # the first round warms both up
        for name, layout in layouts.items():
            engine.packing = layout
            start = time.perf_counter()
            engine.train_step(batch)
            if repeat:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"update:  packed {medians['packed']:.4f} s, padded {medians['padded']:.4f} s (medians of "
          f"{args.repeats}, alternating); padded / packed = {medians['padded'] / medians['packed']:.2f}x")
    engine.close()


if __name__ == "__main__":
    main()
