"""A real vLLM engine (CPU build, in-process) on the tiny model: sampling, scoring, weight sync.

Runs in ``.venv-vllm`` (``make test-vllm``); skipped where ``vllm`` is not installed. One
engine serves the whole module: an eager engine starts in ~15 s on 2 cores (a compiled one
takes ~30-50 s, its torch.compile warm-up included).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from dynalign.config import VLLMConfig  # noqa: E402
from dynalign.rollout import HFSampler, Sampler, SamplingParams  # noqa: E402
from dynalign.rollout.encoding import encode_prompts  # noqa: E402
from dynalign.rollout.vllm_sampler import VLLMSampler  # noqa: E402

ORIGINAL_SET_NUM_THREADS = torch.set_num_threads  # before any engine exists
CHAT = [{"role": "user", "content": "What is a good way to learn?"}]
PROMPTS = ["def fibonacci(n):", CHAT, "The quick brown fox"]
# fp32 on both sides; measured here: ~1e-6 (ENV.md: < 2e-5). A stale engine is off by > 1e-2.
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def trainer(tiny_model_path):
    """The trainer's copy of the policy: a plain transformers model."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)


@pytest.fixture(scope="module")
def engine_start(tiny_model_path, tokenizer):
    torch.manual_seed(1234)
    rng_before = torch.random.get_rng_state()
    start = time.perf_counter()
    # enforce_eager: no torch.compile warm-up (~15 s start instead of ~45 s); same numerics.
    sampler = VLLMSampler(str(tiny_model_path), tokenizer, VLLMConfig(kv_cache_space_gib=1.0),
                          max_model_len=512, seed=0, dtype="float32", enforce_eager=True)
    seconds = time.perf_counter() - start
    rng_kept = torch.equal(torch.random.get_rng_state(), rng_before)
    yield sampler, seconds, rng_kept
    sampler.close()


@pytest.fixture
def engine(engine_start):
    return engine_start[0]


def teacher_forced_logprobs(model, rollouts) -> torch.Tensor:
    """[N, C] log-probs of the rollouts' completion tokens under ``model`` (masked positions 0)."""
    inputs = rollouts.model_inputs()
    with torch.no_grad():
        logits = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                       position_ids=inputs.position_ids).logits
    width = rollouts.completion_ids.shape[1]
    logp = torch.log_softmax(logits[:, -width - 1:-1].float(), -1)  # [N, C, V]
    logp = logp.gather(-1, rollouts.completion_ids[..., None]).squeeze(-1)  # [N, C]
    return logp * rollouts.completion_mask


def max_logprob_gap(model, rollouts) -> float:
    return float((teacher_forced_logprobs(model, rollouts) - rollouts.logprobs).abs().max())


# ----------------------------------------------------------------- process


def test_engine_start_leaves_the_process_usable(engine_start):
    sampler, seconds, rng_kept = engine_start
    assert isinstance(sampler, Sampler)
    print(f"vLLM engine start: {seconds:.1f} s")
    assert torch.set_num_threads is ORIGINAL_SET_NUM_THREADS  # vLLM's no-op was undone
    assert rng_kept  # vLLM reseeded the global RNG; the state was put back
    sampler.sleep()  # sleep mode needs a GPU: both are no-ops on CPU
    sampler.wake_up()


# ---------------------------------------------------------------- sampling


def test_sample_shapes_order_and_logprobs(engine, tokenizer, trainer):
    out = engine.sample(PROMPTS, 3, SamplingParams(max_new_tokens=12, seed=0, logprobs=True))
    N = len(PROMPTS) * 3
    assert out.completion_ids.shape == (N, 12) and out.logprobs.shape == (N, 12)
    assert out.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    encoded = encode_prompts(tokenizer, PROMPTS)  # the same tokens the HF backend feeds
    for row in range(N):
        ids = encoded[row // 3]
        assert out.prompt_ids[row, out.prompt_ids.shape[1] - len(ids):].tolist() == ids
        assert out.prompt_mask[row].sum() == len(ids)
    assert out.finish_reasons == ["length"] * N and out.completion_mask.all()  # random model: no EOS
    assert out.texts == tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
    assert not torch.equal(out.completion_ids[0], out.completion_ids[1])  # a group's answers differ
    assert max_logprob_gap(trainer, out) < LOGPROB_ATOL


def test_seed_determinism(engine):
    torch.manual_seed(0)
    expected_next = torch.rand(2)
    torch.manual_seed(0)
    a = engine.sample(PROMPTS, 2, SamplingParams(max_new_tokens=8, seed=7))
    assert torch.equal(torch.rand(2), expected_next)  # sampling left the global RNG alone
    b = engine.sample(PROMPTS, 2, SamplingParams(max_new_tokens=8, seed=7))
    c = engine.sample(PROMPTS, 2, SamplingParams(max_new_tokens=8, seed=8))
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    unseeded = [engine.sample(PROMPTS, 1, SamplingParams(max_new_tokens=8)) for _ in range(2)]
    assert not torch.equal(unseeded[0].completion_ids, unseeded[1].completion_ids)  # fresh each call


def test_seeded_batch_larger_than_one_engine_step(engine):
    """More prompt tokens than one step holds (4096 on CPU): seeded requests must still work."""
    prompts = [f"Question {i}: " + "tell me more about it, " * 8 for i in range(32)]  # ~60 tokens each
    out = engine.sample(prompts, 4, SamplingParams(max_new_tokens=2, seed=0))
    assert int(out.prompt_mask.sum()) > 4096 and out.completion_mask.all()


def test_stop_strings(engine, tokenizer):
    full = engine.sample(PROMPTS, 1, SamplingParams(max_new_tokens=16, temperature=0))
    for i, prompt in enumerate(PROMPTS):
        stop = full.texts[i][4:6]
        out = engine.sample([prompt], 1, SamplingParams(max_new_tokens=16, temperature=0, stop=(stop,)))
        length = int(out.completion_mask[0].sum())
        kept = out.completion_ids[0, :length].tolist()
        assert out.finish_reasons == ["stop"]
        assert kept == full.completion_ids[i, :length].tolist()
        assert stop in tokenizer.decode(kept) and stop not in tokenizer.decode(kept[:-1])
        assert out.texts[0] == full.texts[i][:full.texts[i].find(stop)]


def test_next_token_logprobs_match_hf(engine, trainer, tokenizer):
    texts = ["Score: ", "<|im_start|>user\nRate this.<|im_end|>\n<|im_start|>assistant\nScore:"]
    candidates = [tokenizer.convert_tokens_to_ids(str(s)) for s in range(6)]
    got = engine.next_token_logprobs(texts, candidates)
    expected = HFSampler(trainer, tokenizer).next_token_logprobs(texts, candidates)
    assert got.shape == (2, 6)
    torch.testing.assert_close(got, expected, atol=LOGPROB_ATOL, rtol=0)


# ------------------------------------------------------------------ weights


def test_sync_after_a_training_step(engine, trainer):
    """(b) log-probs match the trainer after a real AdamW step + sync, (c) without a new engine."""
    params = SamplingParams(max_new_tokens=16, seed=3, logprobs=True)
    before = engine.sample(PROMPTS, 4, params)
    assert max_logprob_gap(trainer, before) < LOGPROB_ATOL

    # One real optimizer step on the trainer's copy: raise the log-likelihood of half the answers.
    trained = copy.deepcopy(trainer).train()
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    inputs = before.model_inputs()
    logits = trained(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                     position_ids=inputs.position_ids).logits
    width = before.completion_ids.shape[1]
    logp = torch.log_softmax(logits[:, -width - 1:-1], -1).gather(-1, before.completion_ids[..., None])
    advantages = torch.tensor([1.0, -1.0]).repeat(len(before) // 2)[:, None]  # [N, 1]
    loss = -(logp.squeeze(-1) * advantages * before.completion_mask).sum() / before.completion_mask.sum()
    loss.backward()
    optimizer.step()
    trained.eval()

    llm = engine.llm
    engine.update_weights(trained.named_parameters())  # tied head omitted: the sampler adds it
    assert engine.llm is llm and engine.weight_version >= 1
    print(f"weight sync: {engine.last_sync_seconds * 1e3:.1f} ms")
    assert engine.last_sync_seconds < 2.0  # in place; an engine restart takes ~15-45 s

    after = engine.sample(PROMPTS, 4, params)  # same prompts: their KV blocks are in the prefix cache
    gap_new, gap_old = max_logprob_gap(trained, after), max_logprob_gap(trainer, after)
    print(f"max |vLLM - trainer| after the step: {gap_new:.2e} (vs the old weights: {gap_old:.2e})")
    assert gap_new < LOGPROB_ATOL
    assert gap_old > 1e-2  # the step changed the policy, and vLLM follows it
    engine.update_weights(trainer.state_dict().items())  # back to the base weights for other tests
    assert max_logprob_gap(trainer, engine.sample(PROMPTS, 2, params)) < LOGPROB_ATOL


@pytest.mark.slow  # DeepSpeed start-up: ~1-2 min on 2 busy cores
def test_sync_from_policy_engine_zero3(engine, tiny_model_path, tokenizer, monkeypatch):
    """The training core's own step and export (DeepSpeed ZeRO-3 on CPU) feed the engine."""
    engine_module = pytest.importorskip("dynalign.engine")
    # vLLM initialised torch.distributed (world 1) without the launcher variables DeepSpeed reads.
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    from dynalign.config import DeepSpeedConfig, GRPOConfig, ModelConfig

    grpo = GRPOConfig(lr=1e-2, group_size=4, prompts_per_step=3, micro_batch_size=6)
    policy = engine_module.PolicyEngine(ModelConfig(name_or_path=str(tiny_model_path)), grpo,
                                        DeepSpeedConfig(stage=3), seed=0)
    try:
        params = SamplingParams(max_new_tokens=16, seed=11, logprobs=True)

        def batch(rollouts):
            inputs = rollouts.model_inputs()
            advantages = torch.tensor([1.0, -1.0]).repeat(len(rollouts) // 2)
            return engine_module.TrainBatch(inputs.input_ids, inputs.attention_mask, inputs.completion_mask,
                                            advantages)

        def gap(rollouts):
            mask = rollouts.completion_mask.bool()
            trainer_logprobs = policy.policy_logprobs(batch(rollouts))
            return float((trainer_logprobs[mask] - rollouts.logprobs[mask]).abs().max())

        before = engine.sample(PROMPTS, 4, params)
        assert gap(before) < LOGPROB_ATOL
        policy.train_step(batch(before).with_logprobs(old=before.logprobs))
        llm = engine.llm
        engine.update_weights(policy.export_weights())
        assert engine.llm is llm
        after = engine.sample(PROMPTS, 4, params)
        assert gap(after) < LOGPROB_ATOL
        assert float((after.logprobs - before.logprobs).abs().max()) > 1e-2
    finally:
        policy.close()


def test_bytes_transport(engine, trainer):
    """The multiprocess path (worker extension receiving serialized chunks), exercised in-process."""
    shifted = copy.deepcopy(trainer)
    with torch.no_grad():
        for param in shifted.parameters():
            param.mul_(1.05)
    params = SamplingParams(max_new_tokens=8, seed=5, logprobs=True)
    engine.engine.transport = "bytes"
    try:
        engine.update_weights(shifted.state_dict().items())
        assert max_logprob_gap(shifted, engine.sample(PROMPTS, 2, params)) < LOGPROB_ATOL
    finally:
        engine.engine.transport = "tensors"
        engine.update_weights(trainer.state_dict().items())


def test_eos_is_kept_and_masked(engine, trainer, tokenizer):
    """Weights that make EOS likely: answers end with EOS, kept in the tokens and the mask."""
    eos = tokenizer.eos_token_id
    eager = copy.deepcopy(trainer)
    with torch.no_grad():
        weight = eager.model.embed_tokens.weight
        weight[eos] *= 30.0  # tied head: a large EOS row gives EOS a large |logit| (sign varies by step)
    engine.update_weights(eager.state_dict().items())
    try:
        out = engine.sample(PROMPTS, 8, SamplingParams(max_new_tokens=10, seed=0))
        assert "stop" in out.finish_reasons
        rows = zip(out.completion_ids, out.completion_mask, out.finish_reasons, strict=True)
        for ids, mask, reason in rows:
            length = int(mask.sum())
            assert mask[:length].all() and not mask[length:].any()
            assert (ids[length:] == tokenizer.pad_token_id).all()
            kept = ids[:length].tolist()
            assert (kept[-1] == eos) == (reason == "stop") and eos not in kept[:-1]
    finally:
        engine.update_weights(trainer.state_dict().items())


def test_bench_rollout_times_both_backends_on_the_tiny_model(tiny_model_path):
    """``bench_rollout.py --model DIR`` times HF and vLLM on that model: the same tokens per run
    from both (a random model never stops early), and their ratio."""
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "benchmarks/bench_rollout.py", "--model", str(tiny_model_path),
                           "--prompts", "1", "--samples", "2", "--new-tokens", "4", "--repeats", "1",
                           "--hf-threads", "1", "--enforce-eager"],
                          cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = proc.stdout
    line = re.MULTILINE
    assert re.search(r"^model: +llama 2 layers, hidden 128, head_dim 64, 0\.43 M parameters", out, line)
    assert re.search(r"^work: +1 prompts x 2 samples x 4 new tokens", out, line)
    tokens = dict(re.findall(r"^(hf|vllm) +[\d,]+ tokens/s +median of 1; (\d+) tokens/run", out, line))
    assert tokens == {"hf": "8", "vllm": "8"}
    assert re.search(r"^ratio: +vllm / hf = [\d.]+x$", out, line)
