"""Rollout throughput: the same workload through the HF ``generate`` sampler and the vLLM sampler.

Workload (defaults): 16 chat prompts x 8 samples x 128 new tokens, temperature 1, on a
tiny-architecture Llama built locally (hidden 256, 4 layers, 4 heads of 64, 2 KV heads,
3.16 M parameters). A random model never emits EOS, so every answer is exactly
``--new-tokens`` long and both backends generate the same number of tokens.

Run it with the interpreter that has both backends::

    make bench-rollout                      # = .venv-vllm/bin/python benchmarks/bench_rollout.py
    .venv-vllm/bin/python benchmarks/bench_rollout.py --new-tokens 64 --repeats 5
    # bench_step's tiny workload: the embedded tiny Llama, 4 x 4 x 32, HF on 1 thread
    .venv-vllm/bin/python benchmarks/bench_rollout.py --model tiny --prompts 4 --samples 4 \
        --new-tokens 32 --hf-threads 1 --repeats 9

The machine's load average is printed with the figures: on a shared machine, other processes
on the same cores make OpenMP threads spin-wait, which slows multi-threaded HF generate by up
to 10x (compare ``--hf-threads 1``); read the figures together with the load.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

BENCH_MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, seed=0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None,
                        help="a model directory, or 'tiny' (the embedded tiny Llama of bench_step's tiny "
                             "rows); by default the 3.16 M-parameter Llama above")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8, help="completions per prompt (n)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per backend (median reported)")
    parser.add_argument("--hf-batch-size", type=int, default=128, help="sequences per generate call")
    parser.add_argument("--hf-threads", type=int, default=0,
                        help="torch threads for HF generate; 0 keeps torch's default (one per core)")
    parser.add_argument("--backends", default="hf,vllm")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "dynalign-bench"),
                        help="where the benchmark model is built (reused across runs)")
    return parser.parse_args()


def make_prompts(count: int) -> list:
    topics = ["learning", "cooking", "gardening", "physics", "music", "history", "chess", "sleep"]
    return [[{"role": "user", "content": f"Question {i}: how do I get better at {topics[i % len(topics)]}?"}]
            for i in range(count)]


def time_backend(sampler, prompts, args, params_cls) -> list[tuple[float, int]]:
    """(seconds, completion tokens) of each timed run, after one warm-up run."""
    sampler.sample(prompts[:2], 2, params_cls(max_new_tokens=8, seed=0))  # warm-up
    runs = []
    for repeat in range(args.repeats):
        params = params_cls(max_new_tokens=args.new_tokens, temperature=1.0, seed=repeat)
        start = time.perf_counter()
        out = sampler.sample(prompts, args.samples, params)
        runs.append((time.perf_counter() - start, int(out.completion_mask.sum())))
    return runs


def report(name: str, runs: list[tuple[float, int]], start_s: float | None = None) -> float:
    rates = [tokens / seconds for seconds, tokens in runs]
    rate = statistics.median(rates)
    secs = ", ".join(f"{seconds:.2f}" for seconds, _ in runs)
    start = f"  (engine start {start_s:.1f} s)" if start_s is not None else ""
    print(f"{name:5s} {rate:10,.0f} tokens/s   median of {len(runs)}; {runs[0][1]} tokens/run; "
          f"runs: {secs} s{start}", flush=True)
    return rate


def main() -> None:
    args = parse_args()
    import torch

    if args.hf_threads:
        torch.set_num_threads(args.hf_threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dynalign.config import ModelConfig, TinyModelConfig, VLLMConfig
    from dynalign.models import resolve_model_path
    from dynalign.rollout import HFSampler, SamplingParams
    from dynalign.tiny_model import ensure_tiny_model

    if args.model is None:
        path = str(ensure_tiny_model(TinyModelConfig(cache_dir=args.cache_dir, **BENCH_MODEL)))
    else:
        path = resolve_model_path(ModelConfig(name_or_path=args.model))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    backends = args.backends.split(",")
    prompts = make_prompts(args.prompts)
    print(f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), load average "
          f"{os.getloadavg()[0]:.2f}")
    config = model.config
    print(f"model:   {config.model_type} {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"head_dim {config.head_dim}, {params / 1e6:.2f} M parameters, fp32")
    print(f"work:    {args.prompts} prompts x {args.samples} samples x {args.new_tokens} new tokens, "
          f"temperature 1.0")

    rates: dict[str, float] = {}
    if "hf" in backends:
        hf = HFSampler(model, tokenizer, batch_size=args.hf_batch_size)
        rates["hf"] = report("hf", time_backend(hf, prompts, args, SamplingParams))
    if "vllm" in backends:
        import vllm

        from dynalign.rollout.vllm_sampler import VLLMSampler

        start = time.perf_counter()
        engine = VLLMSampler(str(path), tokenizer, VLLMConfig(kv_cache_space_gib=1.0),
                             max_model_len=512, seed=0, dtype="float32", enforce_eager=args.enforce_eager)
        start_s = time.perf_counter() - start
        runs = time_backend(engine, prompts, args, SamplingParams)
        mode = "eager" if args.enforce_eager else "compiled"
        rates["vllm"] = report("vllm", runs, start_s)
        print(f"         vllm {vllm.__version__} ({mode}), in-process, KV cache 1 GiB")
        started = time.perf_counter()
        engine.update_weights(model.state_dict().items())
        print(f"sync:    update_weights (full state dict) {1e3 * (time.perf_counter() - started):.1f} ms")
        engine.close()
    if len(rates) == 2:
        print(f"ratio:   vllm / hf = {rates['vllm'] / rates['hf']:.1f}x")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
