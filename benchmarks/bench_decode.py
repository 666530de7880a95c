"""How much of HF ``generate`` is the model's own forward: the floor under a sampler built on it.

On the tiny model, generation is most of a GRPO step (``benchmarks/bench_step.py``), and both
dynalign and TRL generate with transformers. This benchmark times, on bench_step's tiny
workload (the embedded tiny Llama, 4 chat prompts x 4 samples x 32 new tokens, temperature 1,
1 thread), three ways to produce the same number of tokens:

* ``sampler``: dynalign's ``HFSampler.sample``, what the training loop runs (chat template,
  tokenization, ``generate``, completions decoded and masked);
* ``generate``: transformers ``generate`` on the same left-padded token batch;
* ``forward loop``: one prefill and one forward per new token on a ``DynamicCache``, sampling
  by ``multinomial`` over the softmax -- no logits processors, stopping criteria or bookkeeping:
  the least any sampler that calls the model's forward once per token can take.

It prints each median with its time per decoding step and each one's ratio to ``generate``.
A forward loop close to ``generate`` means the time is the model's forward (transformers'
per-call work on a model this small), not the sampling loop around it::

    .venv/bin/python benchmarks/bench_decode.py
    .venv/bin/python benchmarks/bench_decode.py --new-tokens 128 --repeats 9
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="the embedded tiny model, or a model directory")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4, help="completions per prompt")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each way (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (bench_step's tiny rows: 1)")
    return parser.parse_args()


def median_seconds(run: Callable[[int], int], repeats: int) -> tuple[float, int]:
    """Median wall time of ``run(seed)`` over ``repeats`` runs after one warm-up, and the tokens
    it generated (the same every run)."""
    run(-1)
    times, tokens = [], 0
    for seed in range(repeats):
        start = time.perf_counter()
        tokens = run(seed)
        times.append(time.perf_counter() - start)
    return statistics.median(times), tokens


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationConfig

    from dynalign.config import ModelConfig
    from dynalign.models import resolve_model_path
    from dynalign.rollout import HFSampler, SamplingParams
    from dynalign.rollout.encoding import left_pad, prepare_request

    args = parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model_path(ModelConfig(name_or_path=args.model))
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    sampler = HFSampler(model, tokenizer, shares_weights=True)
    prompts = [[{"role": "user", "content": f"Question {i}: how do I get better at chess?"}]
               for i in range(args.prompts)]
    _, prompt_ids = prepare_request(tokenizer, prompts, args.samples, SamplingParams())
    rows = [ids for ids in prompt_ids for _ in range(args.samples)]
    ids, mask = left_pad(rows, sampler.pad_id)
    new = args.new_tokens
    # no EOS: every way generates exactly `new` tokens a row (a random model's EOS is rare anyway)
    config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=1.0,
                              top_k=0, top_p=1.0, pad_token_id=sampler.pad_id, use_cache=True,
                              return_dict_in_generate=True)

    def run_sampler(seed: int) -> int:
        params = SamplingParams(max_new_tokens=new, temperature=1.0, seed=max(seed, 0))
        rollouts = sampler.sample(prompts, args.samples, params)
        return int(rollouts.completion_mask.sum())

    @torch.no_grad()
    def run_generate(seed: int) -> int:
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        return out.sequences[:, ids.shape[1]:].numel()

    @torch.no_grad()
    def run_forward_loop(seed: int) -> int:
        torch.manual_seed(seed)
        attention = mask
        out = model(input_ids=ids, attention_mask=attention, past_key_values=DynamicCache(), use_cache=True,
                    logits_to_keep=1)
        tokens = [torch.multinomial(out.logits[:, -1].softmax(-1), 1)]
        for _ in range(new - 1):
            attention = torch.cat([attention, attention.new_ones(len(rows), 1)], 1)
            out = model(input_ids=tokens[-1], attention_mask=attention, past_key_values=out.past_key_values,
                        use_cache=True)
            tokens.append(torch.multinomial(out.logits[:, -1].softmax(-1), 1))
        return torch.cat(tokens, 1).numel()

    load, params = os.getloadavg()[0], sum(p.numel() for p in model.parameters())
    print(f"bench_decode: {args.model} ({params / 1e6:.2f} M parameters), "
          f"{args.prompts} prompts x {args.samples} samples x {new} new tokens, {args.threads} thread(s), "
          f"{platform.processor() or platform.machine()}, load average {load:.2f}")
    results = {name: median_seconds(run, args.repeats) for name, run in
               (("sampler", run_sampler), ("generate", run_generate), ("forward loop", run_forward_loop))}
    base = results["generate"][0]
    print(f"  {'way':<14} {'median s':>9} {'ms / step':>10} {'tokens':>7} {'vs generate':>12}")
    for name, (seconds, tokens) in results.items():
        per_step = seconds / new * 1e3
        print(f"  {name:<14} {seconds:>9.4f} {per_step:>10.2f} {tokens:>7} {seconds / base:>11.2f}x")
    print(f"  load average {os.getloadavg()[0]:.2f} after; the forward loop is "
          f"{results['forward loop'][0] / base:.0%} of generate's time")


if __name__ == "__main__":
    main()
