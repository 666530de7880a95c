"""The judge on the tiny local model, through the real HFSampler.

The tiny model is random: its judgements are gibberish, so generate mode exercises the
failure accounting, and logprob mode is checked against an explicit forward pass.
"""

from __future__ import annotations

import math

import pytest
import torch

from dynalign.config import ConfigError, JudgeConfig, to_train_config
from dynalign.judge import (
    FAILURE_REASONS,
    Judge,
    Rubric,
    build_judge,
    judge_pairs,
    judge_stats,
    load_rubric,
    render_judge_prompt,
    score_slots,
)
from dynalign.rollout.base import SamplingParams
from dynalign.rollout.hf_sampler import HFSampler

PROMPTS = ["How can a neighbourhood share tools?", "Explain compound interest to a teenager."]


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def sampler(tiny):
    model, tokenizer = tiny
    return HFSampler(model, tokenizer, batch_size=8)


def _hand_expected_scores(model, tokenizer, rubric, prompt, candidate, nonce):
    """The logprob-mode scores of one candidate, recomputed with explicit forward passes.

    The tiny byte-level BPE has tokens " 0".." 4" but no " 5", so the probability of writing
    " s" is P(" s") + P(" ") * P("s" | " ") (one- and two-token spellings).
    """
    vocab = tokenizer.get_vocab()
    space = vocab["\u0120"]  # "Ġ", the byte-level BPE's space

    def next_logprobs(ids):
        with torch.no_grad():
            return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)  # [V]

    messages, _ = render_judge_prompt(rubric, prompt, candidate, nonce=nonce, reasoning=False)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text += f"<verdict-{nonce}>\n"
    expected, masses = [], []
    for name in rubric.aspect_names:
        ids = tokenizer.encode(text + f"{name}:", add_special_tokens=False)
        first, after_space = next_logprobs(ids), next_logprobs(ids + [space])
        probs = []
        for s in rubric.scores:
            p = first[space].exp() * after_space[vocab[str(s)]].exp()
            if f"\u0120{s}" in vocab:
                p = p + first[vocab[f"\u0120{s}"]].exp()
            probs.append(p.item())
        assert f"\u0120{rubric.scores[0]}" in vocab and f"\u0120{rubric.scores[-1]}" not in vocab
        masses.append(sum(probs))
        probs = [p / masses[-1] for p in probs]
        expected.append(sum(p * s for p, s in zip(probs, rubric.scores, strict=True)))
        text += f"{name}: {rubric.scores[max(range(len(probs)), key=probs.__getitem__)]}\n"  # most likely
    return expected, masses


def test_logprob_mode_matches_a_forward_pass_by_hand(tiny, sampler):
    model, tokenizer = tiny
    rubric = load_rubric("ca_rubric")
    candidates = ["Start a tool library in a garage; log loans on a shared sheet.", "Money grows."]
    result = Judge(rubric, sampler, mode="logprob").score(PROMPTS, candidates)
    assert result.reasons == ["ok", "ok"]  # always defined
    for i, (prompt, candidate) in enumerate(zip(PROMPTS, candidates, strict=True)):
        nonce = result.nonces[i]
        expected, masses = _hand_expected_scores(model, tokenizer, rubric, prompt, candidate, nonce)
        assert result.scores[i].tolist() == pytest.approx(expected, abs=1e-5)
        assert result.score_mass[i].tolist() == pytest.approx(masses, rel=1e-4)
        assert result.rewards[i].item() == pytest.approx(sum(expected) / len(expected), abs=1e-5)
    assert ((result.scores >= 0) & (result.scores <= 5)).all()


def test_logprob_mode_refuses_multi_token_scores(tiny, sampler):
    _, tokenizer = tiny
    slots = score_slots(tokenizer, "<verdict-abcd1234>\nknowledge:", list(range(6)))
    assert set(slots.direct) == {0, 1, 2, 3, 4} and set(slots.after_space) == set(range(6))
    with pytest.raises(ValueError, match=r"\[10\]"):  # " 10" is two tokens in any spelling here
        score_slots(tokenizer, "<verdict-abcd1234>\nknowledge:", list(range(11)))
    ca = load_rubric("ca_rubric")
    ten_point = Rubric("ten", "", 0, 10, "mean", ca.aspects[:1])
    with pytest.raises(ValueError, match="judge.mode=generate"):
        Judge(ten_point, sampler, mode="logprob").score(["q"], ["a"])


def test_a_group_judged_end_to_end_counts_its_failures(compose_cfg, sampler):
    overrides = ["judge.source=self", "judge.mode=generate", "judge.num_samples=2", "judge.max_new_tokens=24"]
    cfg = to_train_config(compose_cfg(overrides))
    judge = build_judge(cfg.judge, sampler)
    group_size = 4  # one prompt's group of answers, as the loop judges it
    rollouts = sampler.sample(PROMPTS[:1], group_size, SamplingParams(max_new_tokens=12, seed=0))
    prompts = [PROMPTS[i] for i in rollouts.prompt_index.tolist()]
    result = judge.score(prompts, rollouts.texts)
    n = group_size
    assert result.rewards.shape == (n,) and result.scores.shape == (n, 4)
    assert torch.isnan(result.rewards).all() and torch.isnan(result.scores).all()  # gibberish judge
    assert all(r in FAILURE_REASONS for r in result.reasons)
    assert all(len(texts) == 2 for texts in result.texts)
    assert len(set(result.nonces)) == 1  # one user prompt: its candidates share a nonce
    stats = judge_stats(result, rollouts.completion_lengths)
    assert stats["judge/reward_nan_rate"] == 1.0 and stats["judge/parse_failure_rate"] == 1.0
    assert stats["judge/judgements"] == 2 * n
    assert sum(stats[f"judge/parse_fail/{r}"] for r in FAILURE_REASONS) == pytest.approx(1.0)
    assert math.isnan(stats["judge/reward_mean"]) and math.isnan(stats["judge/length_spearman"])


def test_hhh_logprob_composes_and_builds(compose_cfg, sampler):
    cfg = to_train_config(compose_cfg(["judge=hhh_rubric", "judge.mode=logprob", "judge.source=self"]))
    judge = build_judge(cfg.judge, sampler)
    assert isinstance(judge, Judge) and judge.mode == "logprob"
    assert judge.rubric.aspect_names == ("helpful", "honest", "harmless")
    result = judge.score(PROMPTS[:1], ["Share a calendar."])
    assert result.reasons == ["ok"] and 0.0 <= result.rewards.item() <= 5.0


def test_judge_sources_pick_their_sampler(compose_cfg, sampler, tiny):
    model, tokenizer = tiny
    frozen = HFSampler(model, tokenizer)
    external = HFSampler(model, tokenizer)
    base = to_train_config(compose_cfg(["judge.source=self"])).judge
    assert build_judge(base, sampler).backend.sampler is sampler
    frozen_cfg = to_train_config(compose_cfg(["judge.source=frozen"])).judge
    assert build_judge(frozen_cfg, sampler, frozen_sampler=frozen).backend.sampler is frozen
    with pytest.raises(ConfigError, match="frozen_sampler"):
        build_judge(frozen_cfg, sampler)
    ext_cfg = to_train_config(compose_cfg(["judge.source=external", "judge.external.backend=hf"])).judge
    assert build_judge(ext_cfg, sampler, external_sampler=external).backend.sampler is external
    made = build_judge(ext_cfg, sampler, make_sampler=lambda c: external if c.model == "tiny" else None)
    assert made.backend.sampler is external
    with pytest.raises(ConfigError) as err:
        build_judge(ext_cfg, sampler)
    assert err.value.key == "judge.external.backend"
    with pytest.raises(ConfigError) as err:
        build_judge(JudgeConfig(mode="sample", rubric=base.rubric), sampler)
    assert err.value.key == "judge.mode"


def test_judge_rejects_bad_arguments(sampler):
    with pytest.raises(ValueError, match="valid: generate, logprob"):
        Judge("ca_rubric", sampler, mode="pointwise")
    with pytest.raises(TypeError):
        Judge("ca_rubric", object())
    with pytest.raises(ValueError, match="2 prompts for 1 candidates"):
        Judge("ca_rubric", sampler).score(["a", "b"], ["x"])
    empty = Judge("ca_rubric", sampler).score([], [])
    assert len(empty) == 0 and empty.scores.shape == (0, 4)


def test_a_truncating_sampler_cannot_judge(tiny):
    model, tokenizer = tiny
    truncating = HFSampler(model, tokenizer, max_prompt_length=256)  # e.g. grpo.max_prompt_length
    with pytest.raises(ValueError, match="max_prompt_length=256"):
        Judge("ca_rubric", truncating).score(PROMPTS[:1], ["Share a calendar."])


def test_pairwise_on_the_tiny_model(sampler):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=0)
    judge = Judge("ca_rubric", sampler, num_samples=2, params=params)
    (pair,) = judge_pairs(judge, PROMPTS[:1], ["Lend tools."], ["Buy tools."])
    assert len(pair.a_first) == len(pair.b_first) == 2 and len(pair.reasons) == 4  # 2 orders x 2 samples
    assert pair.outcome is None  # gibberish: nothing parsed
    assert all(r in FAILURE_REASONS and r != "ok" for r in pair.reasons)


def test_pairwise_logprob_votes_read_the_verdict_slot(sampler):
    judge = Judge("ca_rubric", sampler, mode="logprob")
    pairs = judge_pairs(judge, PROMPTS[:2], ["Lend tools.", "Share."], ["Buy tools.", "Keep."])
    assert all(len(p.a_first) == len(p.b_first) == 1 for p in pairs)  # one vote per order
    assert all(v in ("a", "b", "tie") for p in pairs for v in p.a_first + p.b_first)
    assert all(p.reasons == ("ok", "ok") and p.outcome in ("win", "tie", "loss") for p in pairs)
