"""The self-judge with and without reuse of shared prefixes, in one process.

Workload (defaults): ``--prompts`` user prompts x ``--answers`` answers each, judged in
``--mode`` (``logprob``, or ``generate``: one verdict of ``--max-new-tokens`` tokens per answer,
sampled at the judge's default temperature with a fixed seed) with ``--rubric`` by an HF sampler
on ``--model`` (``tiny``, ``gemma3_270m`` or a local directory): the rows of one step's
self-judge. The same judge prompts (same nonces) are judged twice per round, reading every text
from scratch (the path every sampler had before, and the one vLLM still takes, which caches
prefixes itself) and with :meth:`~dynalign.rollout.hf_sampler.HFSampler.reuse_prefixes` (or,
with ``--compare kernels``, two ways of running the linears: see below); the
order alternates between rounds so both see the same machine load. Printed: seconds per answer
of each and the token positions the model's forwards ran per answer (pads included: the work,
as a count that no machine load changes), their ratio, and the largest difference of an expected
score between the two (logprob) or how many verdict texts they wrote alike (generate).

    .venv/bin/python benchmarks/bench_judge.py                       # tiny model, ca_rubric
    .venv/bin/python benchmarks/bench_judge.py --model gemma3_270m --rubric ca_compact --rounds 1
    .venv/bin/python benchmarks/bench_judge.py --mode generate --prompts 4 --answers 4
    .venv/bin/python benchmarks/bench_judge.py --model gemma3_270m --rubric ca_compact --rounds 1 --profile
    .venv/bin/python benchmarks/bench_judge.py --model gemma3_270m --rubric ca_compact --compare kernels \
        --rounds 9

``--compare kernels`` times the prefix-reuse path twice instead: as torch runs it (every linear
by ``F.linear``, the LM head in every forward) and as dynalign does (float32 CPU linears through
oneDNN, :mod:`dynalign.onednn`; no LM head in the passes that only extend the cache).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from unittest import mock

QUESTIONS = ["How can our town reduce food waste?", "My neighbour keeps parking across my driveway. "
             "What should I do?", "How should a small team share credit for a success?",
             "What is a good way to learn a new language as an adult?"]
ANSWERS = ["Start a shared fridge and compost the rest; ask shops to donate surplus food.",
           "Talk to them calmly first, leave a friendly note, then ask the council if it continues.",
           "Do nothing, it is not your problem.",
           "Name each person's part in public, and ask the team how they want to be thanked.",
           "Practise a little every day with people who speak it, and read things you enjoy.",
           "Shout at them until they stop."]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, gemma3_270m or a local model directory")
    parser.add_argument("--rubric", default="ca_rubric")
    parser.add_argument("--mode", default="logprob", choices=["logprob", "generate"])
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="generate mode: verdict length (default: judge.max_new_tokens's default)")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--answers", type=int, default=4, help="answers per prompt (the group size)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--compare", default="reuse", choices=sorted(VARIANTS),
                        help="reuse: from scratch vs prefix reuse; kernels: prefix reuse with torch's "
                             "linears vs dynalign's (oneDNN, no LM head where nothing is read)")
    parser.add_argument("--profile", action="store_true",
                        help="then one more call with prefix reuse under torch's profiler: the shape of each "
                             "forward and the ops that took the most time")
    return parser.parse_args()


def judge_inputs(rubric, prompts: int, answers: int, reasoning: bool):
    from dynalign.judge import render_judge_prompts

    pairs = [(QUESTIONS[p % len(QUESTIONS)], ANSWERS[(p + a) % len(ANSWERS)])
             for p in range(prompts) for a in range(answers)]
    rendered = render_judge_prompts(rubric, [q for q, _ in pairs], [a for _, a in pairs], reasoning=reasoning,
                                    rng=random.Random(0))
    return [m for m, _ in rendered], [n for _, n in rendered]


def main() -> None:
    args = parse_args()
    import torch

    from dynalign.config import JudgeConfig, ModelConfig
    from dynalign.judge import SamplerBackend, load_rubric
    from dynalign.models import load_hf_sampler
    from dynalign.rollout.base import SamplingParams

    rubric = load_rubric(args.rubric)
    sampler = load_hf_sampler(ModelConfig(name_or_path=args.model), batch_size=args.prompts * args.answers)
    generate = args.mode == "generate"
    conversations, nonces = judge_inputs(rubric, args.prompts, args.answers, reasoning=generate)
    defaults = JudgeConfig()
    args.max_new_tokens = args.max_new_tokens or defaults.max_new_tokens
    params = (SamplingParams(max_new_tokens=args.max_new_tokens, temperature=defaults.temperature, seed=0)
              if generate else SamplingParams(max_new_tokens=8))
    backend = SamplerBackend(sampler)
    values = torch.tensor([float(s) for s in rubric.scores])

    def judge():
        if generate:
            return [texts[0] for texts in backend.generate(conversations, 1, params)]  # [N] verdicts
        return backend.verdict_distributions(conversations, nonces, rubric, params).probs @ values  # [N, A]

    read = [0]  # token positions the model's forwards ran (pads included): the work, as a count

    def count(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        read[0] += ids.numel()

    sampler.model.register_forward_pre_hook(count, with_kwargs=True)
    variants = VARIANTS[args.compare](sampler)  # (label, context) baseline first
    times: list[list[float]] = [[], []]
    positions = [0, 0]
    diff, alike = 0.0, len(conversations)
    for r in range(args.rounds):
        results: list = [None, None]
        for v in ((0, 1) if r % 2 == 0 else (1, 0)):
            read[0] = 0
            start = time.perf_counter()
            with variants[v][1]():
                results[v] = judge()
            times[v].append(time.perf_counter() - start)
            positions[v] = read[0]
        if generate:
            alike = min(alike, sum(a == b for a, b in zip(*results, strict=True)))
        else:
            diff = max(diff, float((results[1] - results[0]).abs().max()))
    n = len(conversations)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}; model {args.model}, rubric {args.rubric}, {args.mode} mode"
          + (f" ({args.max_new_tokens} new tokens)" if generate else "")
          + f", {args.prompts} prompts x {args.answers} answers, {args.rounds} rounds")
    medians = [statistics.median(t) for t in times]
    for (label, _), median, runs, read_positions in zip(variants, medians, times, positions, strict=True):
        print(f"{label:<16} {median / n:8.3f} s/answer   runs: {', '.join(f'{t:.2f}' for t in runs)} s   "
              f"{read_positions / n:,.0f} token positions/answer")
    print(f"speed-up         {medians[0] / medians[1]:8.2f}x")
    if generate:
        print(f"verdict texts alike {alike}/{n}")
    else:
        print(f"max |expected score difference| {diff:.2e}")
    if args.profile:
        profile(sampler.model, judge)


def reuse_variants(sampler) -> list[tuple[str, Callable[[], AbstractContextManager]]]:
    """Every text read from scratch (the path of any sampler without a prefix cache), then with
    :meth:`~dynalign.rollout.hf_sampler.HFSampler.reuse_prefixes`."""

    @contextmanager
    def from_scratch() -> Iterator[None]:
        sampler.reuse_prefixes = None  # reusing_prefixes() then reads every text from scratch
        try:
            yield
        finally:
            del sampler.reuse_prefixes

    return [("from scratch", from_scratch), ("prefix reuse", nullcontext)]


def kernel_variants(_sampler) -> list[tuple[str, Callable[[], AbstractContextManager]]]:
    """Prefix reuse as torch runs it (every linear by ``F.linear``, the LM head in every forward:
    the passes that only extend the cache compute the logits of their last position), then as
    dynalign runs it (:mod:`dynalign.onednn`, :data:`dynalign.lm_head.NO_LOGITS`)."""

    @contextmanager
    def torch_kernels() -> Iterator[None]:
        from dynalign.rollout import hf_sampler, prefix_cache

        with ExitStack() as stack:
            for module in (hf_sampler, prefix_cache):
                stack.enter_context(mock.patch.object(module, "NO_LOGITS", 1))
            plain = mock.patch.object(hf_sampler, "onednn_linears", lambda _model: nullcontext())
            stack.enter_context(plain)
            yield

    return [("torch's linears", torch_kernels), ("dynalign's", nullcontext)]


VARIANTS = {"reuse": reuse_variants, "kernels": kernel_variants}


def profile(model, judge) -> None:
    """One judge call with prefix reuse under torch's profiler: each forward's [batch, positions]
    and the ops with the most time of their own."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    shapes: list[tuple[int, ...]] = []

    def record(_module, args, kwargs):
        shapes.append(tuple(kwargs.get("input_ids", args[0] if args else None).shape))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    start = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        judge()
    seconds = time.perf_counter() - start
    hook.remove()
    print(f"profiled call: {seconds:.2f} s; forwards [batch, positions]: {shapes}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
