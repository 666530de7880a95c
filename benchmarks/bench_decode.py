"""How much of HF ``generate`` is the model's own forward: the floor under a sampler built on it.

On the tiny model, generation is most of a GRPO step (``benchmarks/bench_step.py``), and both
dynalign and TRL generate with transformers. This benchmark times, on bench_step's tiny
workload (the embedded tiny Llama, 4 chat prompts x 4 samples x 32 new tokens, temperature 1,
1 thread), the ways to produce the same number of tokens:

* ``sampler``: dynalign's ``HFSampler.sample``, what the training loop runs (chat template,
  tokenization, ``generate``, completions decoded and masked);
* ``sampler, multinomial``: the same with its draws made by ``torch.multinomial`` (the check of
  :mod:`dynalign.rollout.draws` made to fail), the same tokens: what the race saves;
* ``generate``: transformers ``generate`` on the same left-padded token batch;
* ``forward loop``: one prefill and one forward per new token on a ``DynamicCache``, sampling
  by ``multinomial`` over the softmax -- no logits processors, stopping criteria or bookkeeping:
  the least any sampler that calls the model's forward once per token can take;
* ``hand-written`` (Llama-architecture models): the prefill by the model, then each decoding
  step written out in torch ops on the model's own weights -- a static KV cache, q/k/v and
  gate/up each one matmul, no transformers code at all: what a per-architecture decoder (the
  way vLLM implements each model) would take. It checks that it draws the same tokens as
  ``generate`` at the same seed (the line says how many of them);
* ``compiled``: ``generate`` on transformers' static KV cache with its decoding forward compiled
  by ``torch.compile`` (inductor, C++ kernels on a CPU): transformers' own compiled decoding,
  which it turns on by itself only on accelerators. Its first call (the compilation) is timed
  apart, and it is checked against ``generate``'s tokens like the hand-written decoder;
* ``multinomial``: the ``softmax`` and ``torch.multinomial`` of every decoding step alone, on
  logits of the same shape: the draws of transformers' sampling (and TRL's);
* ``race``: the same draws by :func:`dynalign.rollout.draws.draw` (the same tokens, the
  exponential variates made in one vectorized pass), which dynalign's sampler uses.

The ways take turns (one run of each per round), and it prints each one's median with its
time per decoding step and its ratio to ``generate``.
A forward loop close to ``generate`` means the time is the model's forward (transformers'
per-call work on a model this small), not the sampling loop around it; the hand-written row is
about the least a decoder in eager torch can take for this model on this machine::

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


def median_seconds(ways: dict[str, Callable[[int], int]], repeats: int) -> dict[str, tuple[float, int]]:
    """Each way's median wall time of ``run(seed)`` over ``repeats`` runs after one warm-up, and the
    tokens it generated (the same every run). The ways take turns, one run each per round, so
    the host's drift over tens of seconds falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    tokens = {name: run(-1) for name, run in ways.items()}
    for seed in range(repeats):
        for name, run in ways.items():
            start = time.perf_counter()
            tokens[name] = run(seed)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), tokens[name]) for name in ways}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm, the same operations in the same order as transformers'."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, -1)
    return torch.cat((-second, first), -1)


def handwritten_llama_decode(model, ids: torch.Tensor, mask: torch.Tensor, new: int) -> torch.Tensor:
    """[B, new] tokens sampled (temperature 1, no filtering) from a transformers Llama: the prompt
    prefilled by the model, each later step in plain torch ops on a static KV cache."""
    from torch.nn import functional as F
    from transformers import DynamicCache

    config, layers = model.config, model.model.layers
    rows, width = ids.shape
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    eps = config.rms_norm_eps
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, P]
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=DynamicCache(),
                use_cache=True, logits_to_keep=1)
    total = width + new
    keys = torch.zeros(len(layers), rows, kv_heads, total, dim)  # [L, B, KV, T, D]
    values = torch.zeros_like(keys)
    for i, layer in enumerate(out.past_key_values.layers):
        keys[i, :, :, :width], values[i, :, :, :width] = layer.keys, layer.values
    weights = [(torch.cat([lay.self_attn.q_proj.weight, lay.self_attn.k_proj.weight,
                           lay.self_attn.v_proj.weight]), lay.self_attn.o_proj.weight,
                torch.cat([lay.mlp.gate_proj.weight, lay.mlp.up_proj.weight]), lay.mlp.down_proj.weight,
                lay.input_layernorm.weight, lay.post_attention_layernorm.weight)
               for lay in layers]
    embed, head, norm = model.model.embed_tokens.weight, model.lm_head.weight, model.model.norm.weight
    cos, sin = model.model.rotary_emb(embed[None, :1], torch.arange(total)[None])  # [1, T, D] each
    attend = torch.zeros(rows, 1, 1, total, dtype=torch.bool)  # [B, 1, 1, T] key columns a row sees
    attend[:, 0, 0, :width] = mask.bool()
    position = positions[:, -1] + 1  # [B] each row's next position
    logits = out.logits[:, -1].float()  # [B, V]
    tokens = []
    for t in range(new):
        tokens.append(torch.multinomial(logits.softmax(-1), 1))  # [B, 1]
        if t == new - 1:
            break
        column = width + t
        attend[..., column] = True
        c, s = cos[0, position, None, None], sin[0, position, None, None]  # [B, 1, 1, D]
        x = F.embedding(tokens[-1], embed)  # [B, 1, H]
        for i, (qkv_w, o_w, gate_up_w, down_w, norm1, norm2) in enumerate(weights):
            qkv = F.linear(rms_norm(x, norm1, eps), qkv_w).view(rows, 1, heads + 2 * kv_heads, dim)
            qkv = qkv.transpose(1, 2)
            q, k, v = qkv.split([heads, kv_heads, kv_heads], 1)  # [B, heads|KV, 1, D]
            keys[i, :, :, column:column + 1] = k * c + rotate_half(k) * s
            values[i, :, :, column:column + 1] = v
            seen = slice(0, column + 1)
            attn = F.scaled_dot_product_attention(q * c + rotate_half(q) * s, keys[i, :, :, seen],
                                                  values[i, :, :, seen], attn_mask=attend[..., seen],
                                                  scale=dim ** -0.5, enable_gqa=True)  # [B, heads, 1, D]
            x = x + F.linear(attn.transpose(1, 2).reshape(rows, 1, heads * dim), o_w)
            gate, up = F.linear(rms_norm(x, norm2, eps), gate_up_w).chunk(2, -1)
            x = x + F.linear(F.silu(gate) * up, down_w)
        logits = F.linear(rms_norm(x[:, -1], norm, eps), head)  # [B, V]
        position = position + 1
    return torch.cat(tokens, 1)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationConfig
    from transformers.generation import CompileConfig

    from dynalign.config import ModelConfig
    from dynalign.models import resolve_model_path
    from dynalign.rollout import HFSampler, SamplingParams, draws
    from dynalign.rollout.draws import draw
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
    compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="default")  # no CUDA graphs on a CPU
    compile_config._compile_all_devices = True  # type: ignore[assignment]  # transformers' switch for any device
    compiled_config = GenerationConfig(**config.to_diff_dict(), cache_implementation="static",
                                       compile_config=compile_config)

    def run_sampler(seed: int) -> int:
        params = SamplingParams(max_new_tokens=new, temperature=1.0, seed=max(seed, 0))
        rollouts = sampler.sample(prompts, args.samples, params)
        return int(rollouts.completion_mask.sum())

    def generating(generation_config: GenerationConfig) -> Callable[[int], int]:
        """A way that runs transformers ``generate`` with ``generation_config``."""
        @torch.no_grad()
        def run(seed: int) -> int:
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=generation_config)
            return out.sequences[:, ids.shape[1]:].numel()
        return run

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

    @torch.no_grad()
    def run_handwritten(seed: int) -> int:
        torch.manual_seed(seed)
        return handwritten_llama_decode(model, ids, mask, new).numel()

    def timed_draws(pick: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[int], int]:
        def run(seed: int) -> int:
            torch.manual_seed(seed)
            logits = torch.randn(len(rows), model.config.vocab_size)  # [B, V]
            return sum(pick(logits.softmax(-1)).numel() for _ in range(new))
        return run

    def run_sampler_multinomial(seed: int) -> int:
        checked = draws.matches_multinomial
        draws.matches_multinomial = lambda shape, dtype: False  # type: ignore[assignment]
        try:
            return run_sampler(seed)
        finally:
            draws.matches_multinomial = checked

    def drawn_at_seed_0(decode: Callable[[], torch.Tensor]) -> str:
        """How many of generate's tokens at seed 0 ``decode`` draws at seed 0, as "same/all"."""
        with torch.no_grad():
            torch.manual_seed(0)
            drawn = decode()
        same = int((drawn == reference[:, ids.shape[1]:]).sum())
        return f"{same}/{drawn.numel()}"

    with torch.no_grad():
        torch.manual_seed(0)
        reference = model.generate(input_ids=ids, attention_mask=mask, generation_config=config).sequences
    started = time.perf_counter()
    compiled_drawn = drawn_at_seed_0(lambda: model.generate(
        input_ids=ids, attention_mask=mask, generation_config=compiled_config).sequences[:, ids.shape[1]:])
    agreement = (f"; the compiled decoding (first call, compiling: {time.perf_counter() - started:.1f} s) "
                 f"drew {compiled_drawn} of generate's tokens at seed 0")
    ways: list[tuple[str, Callable[[int], int]]] = [
        ("sampler", run_sampler), ("sampler, multinomial", run_sampler_multinomial),
        ("generate", generating(config)), ("forward loop", run_forward_loop),
        ("compiled", generating(compiled_config))]
    config_of = model.config
    if config_of.model_type == "llama" and not (config_of.attention_bias or config_of.mlp_bias):
        ways.append(("hand-written", run_handwritten))
        handwritten_drawn = drawn_at_seed_0(lambda: handwritten_llama_decode(model, ids, mask, new))
        agreement += f"; the hand-written decoder drew {handwritten_drawn} of generate's tokens at seed 0"
    ways += [("multinomial", timed_draws(lambda probs: torch.multinomial(probs, 1))),
             ("race", timed_draws(draw))]

    load, params = os.getloadavg()[0], sum(p.numel() for p in model.parameters())
    print(f"bench_decode: {args.model} ({params / 1e6:.2f} M parameters), "
          f"{args.prompts} prompts x {args.samples} samples x {new} new tokens, {args.threads} thread(s), "
          f"{platform.processor() or platform.machine()}, load average {load:.2f}")
    results = median_seconds(dict(ways), args.repeats)
    base = results["generate"][0]
    print(f"  {'way':<20} {'median s':>9} {'ms / step':>10} {'tokens':>7} {'vs generate':>12}")
    for name, (seconds, tokens) in results.items():
        per_step = seconds / new * 1e3
        print(f"  {name:<20} {seconds:>9.4f} {per_step:>10.2f} {tokens:>7} {seconds / base:>11.2f}x")
    print(f"  load average {os.getloadavg()[0]:.2f} after; the forward loop is "
          f"{results['forward loop'][0] / base:.0%} of generate's time{agreement}")


if __name__ == "__main__":
    main()
