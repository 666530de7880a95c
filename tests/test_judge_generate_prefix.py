"""Generate-mode judging on the HF sampler with shared prefixes prefilled once (read_prefixes).

Every decode that reuses the prefix is compared with the from-scratch ``generate`` of the same
rows: the cache may change the order of the float work, never the tokens the model reads or
decodes. The models are random; their matrices are redrawn at a larger scale, because at the
initial scale every prompt greedily decodes the same token and equal answers would prove nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from dynalign.rollout import HFSampler, Rollouts, SamplingParams
from dynalign.rollout.encoding import encode_prompts
from dynalign.rollout.prefix_cache import plan_prefixes

TOL = 1e-4  # float32 log-probs through a different order of the same work
SHARED = "# Rubric\n" + "Score how far the answer lets everyone involved act meaningfully. " * 12
ANSWERS = ["Share food.", "No.", "Compost, donate and plan meals together with the neighbours.",
           "Ask the council for a shared fridge.", "Ignore it."]
PROMPTS = [SHARED + f"\n# Answer\n{a}\n# Verdict\n" for a in ANSWERS]  # rows of unequal lengths
BATCH = 4  # 5 prompts x 2 samples: batches of 4, 4 and 2 rows, each on a copy of one prefix


def sharpened(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every matrix redrawn from N(0, 0.3²): greedy answers that depend on the prompt."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def tiny(tiny_model_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    return sharpened(AutoModelForCausalLM.from_pretrained(tiny_model_path)), tiny_tokenizer


@pytest.fixture(scope="module")
def sliding(tiny_tokenizer):
    """A random two-layer Gemma 3 on the tiny tokenizer with a sliding window of 8 tokens (one
    local, one global layer): prompts, shared prefix and answers are all longer than the window."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=16, sliding_window=8, max_position_embeddings=512,
                              layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False,
                              pad_token_id=tiny_tokenizer.pad_token_id,
                              eos_token_id=tiny_tokenizer.eos_token_id)
    return sharpened(Gemma3ForCausalLM(config)), tiny_tokenizer


@pytest.fixture(params=["tiny", "sliding"])
def model(request):
    return request.getfixturevalue(request.param)


@contextmanager
def recording_forwards(module: torch.nn.Module) -> Iterator[list[tuple[int, int]]]:
    """The [batch, width] of the input ids of every forward of ``module`` inside the block."""
    shapes: list[tuple[int, int]] = []

    def record(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        shapes.append(tuple(ids.shape))

    handle = module.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield shapes
    finally:
        handle.remove()


def both_ways(sampler: HFSampler, params: SamplingParams, n: int = 2,
              ) -> tuple[Rollouts, Rollouts, list[tuple[int, int]]]:
    """The prompts sampled from scratch, then inside ``reuse_prefixes`` (with its forwards)."""
    plain = sampler.sample(PROMPTS, n, params)
    with recording_forwards(sampler.model) as shapes, sampler.reuse_prefixes():
        reused = sampler.sample(PROMPTS, n, params)
    return plain, reused, shapes


def assert_same_answers(plain: Rollouts, reused: Rollouts) -> None:
    assert torch.equal(plain.completion_ids, reused.completion_ids)
    assert torch.equal(plain.completion_mask, reused.completion_mask)
    assert plain.texts == reused.texts and plain.finish_reasons == reused.finish_reasons
    assert plain.logprobs is not None and reused.logprobs is not None
    assert torch.allclose(plain.logprobs, reused.logprobs, atol=TOL, rtol=0)  # per decoded token


def test_the_reused_prefixes_leave_every_row_a_token_of_its_own():
    def plan(rows):
        return plan_prefixes(rows, [len(r) - 1 for r in rows])  # what the sampler reads once

    assert plan([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 9]]).shared == 2
    assert plan([[1, 2], [1, 2, 3]]).shared == 1  # the shorter row prefills its last token
    samples = plan([[1, 2, 3], [1, 2, 3], [1, 4, 5], [1, 4, 5]])  # 2 samples of 2 prompts
    assert samples.shared == 1 and samples.reusable == (2, 2, 2, 2)  # each prompt but its last token
    assert [(list(rows), n) for rows, n in samples.runs] == [([0, 1], 2), ([2, 3], 2)]
    assert plan([[4, 2], [5, 2]]).reusable == (0, 0)  # nothing shared


@pytest.mark.parametrize("n", [2, 3])  # 3: runs of 3 samples that cross batches of 4 rows
def test_greedy_decoding_reads_each_prefix_once_and_decodes_the_same_tokens(model, n):
    lm, tokenizer = model
    sampler = HFSampler(lm, tokenizer, batch_size=BATCH)
    greedy = SamplingParams(max_new_tokens=12, temperature=0, logprobs=True)
    plain, reused, shapes = both_ways(sampler, greedy, n)
    assert_same_answers(plain, reused)
    # answers differ between prompts and tokens within an answer: nothing constant is compared
    assert len(set(plain.texts)) > 1 and len(set(plain.completion_ids[0].tolist())) > 1
    rows = encode_prompts(tokenizer, PROMPTS)
    repeated = [r for r in rows for _ in range(n)]  # prompt-major, as sampled
    plan = plan_prefixes(repeated, [len(r) - 1 for r in repeated])
    shared = plan.shared
    assert shared >= len(encode_prompts(tokenizer, [SHARED])[0]) - 1  # the rubric (its last token may merge)
    assert plan.reusable == tuple(len(r) - 1 for r in repeated)  # each prompt's n samples: one run
    expected = [(1, shared)]  # the rubric, read once with batch 1
    for start in range(0, len(repeated), BATCH):
        batch = range(start, min(start + BATCH, len(repeated)))
        prompts = {i // n for i in batch}  # a prompt whose samples two batches hold is read by both
        expected.append((len(prompts), max(len(rows[p]) for p in prompts) - 1 - shared))  # their own tokens
        expected += [(len(batch), 1)] * 12  # generate prefills each row's last token, then decodes
    assert shapes == expected


def test_rows_ended_early_by_eos_or_a_stop_string_end_alike(model, monkeypatch):
    lm, tokenizer = model
    params = SamplingParams(max_new_tokens=12, temperature=0, logprobs=True)
    free = HFSampler(lm, tokenizer, batch_size=BATCH).sample(PROMPTS, 1, params)
    # EOS: the 4th token the second answer decodes (it ends there; the others run on)
    monkeypatch.setattr(lm.generation_config, "eos_token_id", [tokenizer.eos_token_id,
                                                                int(free.completion_ids[1, 3])])
    plain, reused, _ = both_ways(HFSampler(lm, tokenizer, batch_size=BATCH), params, n=1)  # a batch of 1 too
    assert_same_answers(plain, reused)
    assert "stop" in plain.finish_reasons and "length" in plain.finish_reasons
    assert plain.completion_lengths.min() <= 4
    monkeypatch.undo()
    # a stop string: three characters the fourth answer writes
    stop = free.texts[3][4:7]
    params = SamplingParams(max_new_tokens=12, temperature=0, logprobs=True, stop=(stop,))
    plain, reused, _ = both_ways(HFSampler(lm, tokenizer, batch_size=BATCH), params, n=1)
    assert_same_answers(plain, reused)
    assert "stop" in plain.finish_reasons and "length" in plain.finish_reasons


def test_sampled_decoding_is_reproducible_and_draws_as_from_scratch(model):
    lm, tokenizer = model
    sampler = HFSampler(lm, tokenizer, batch_size=BATCH)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7, logprobs=True)
    plain, reused, _ = both_ways(sampler, params)
    with sampler.reuse_prefixes():
        again = sampler.sample(PROMPTS, 2, params)
        other = sampler.sample(PROMPTS[:1], 2, SamplingParams(max_new_tokens=12, temperature=1.0, seed=8))
    assert torch.equal(reused.completion_ids, again.completion_ids)  # same seed, same tokens
    assert reused.texts[:2] != other.texts  # another seed, other tokens
    assert not torch.equal(reused.completion_ids[0], reused.completion_ids[1])  # two samples of one prompt
    # the same random numbers drawn in the same order: the same tokens as from scratch
    assert_same_answers(plain, reused)


def test_the_self_judge_writes_the_same_verdicts_with_and_without_reuse(tiny, compose_cfg):
    from test_prefix_cache import WithoutReuse

    from dynalign.judge import build_judge

    lm, tokenizer = tiny
    cfg = compose_cfg(["judge.source=self", "judge.mode=generate", "judge.temperature=0",
                       "judge.num_samples=2", "judge.max_new_tokens=16"]).judge
    sampler = HFSampler(lm, tokenizer, batch_size=BATCH)
    questions = ["How can our town reduce food waste?"] * 3 + ["What is a good way to learn?"] * 3
    answers = ANSWERS[:3] + ["Teach someone else.", "Read.", "Practise a little every day."]
    plain = build_judge(cfg, WithoutReuse(sampler)).score(questions, answers, seed=0)
    with recording_forwards(lm) as shapes:
        reused = build_judge(cfg, sampler).score(questions, answers, seed=0)
    assert reused.texts == plain.texts and reused.judgement_reasons == plain.judgement_reasons
    assert torch.equal(reused.rewards.isnan(), plain.rewards.isnan())
    assert len({texts[0] for texts in plain.texts}) == len(answers)  # every candidate its own verdict text
    assert [t[0] == t[1] for t in plain.texts] == [True] * len(answers)  # greedy: k samples alike
    assert sum(batch == 1 for batch, _ in shapes) == 1 and shapes[0][1] > 500  # the rubric, read once


@pytest.mark.filterwarnings("ignore::FutureWarning")  # DeepSpeed's torch.distributed calls
def test_zero3_judge_gathers_once_and_decodes_as_the_whole_model(tiny_model_path):
    from test_zero3_generation import build_engine, counting_fetches, unhooked_sampler

    from dynalign.config import ModelConfig
    from dynalign.judge import SamplerBackend
    from dynalign.models import load_hf_sampler

    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    params = SamplingParams(max_new_tokens=8, temperature=0, logprobs=True)
    whole = load_hf_sampler(ModelConfig(name_or_path=str(tiny_model_path)), batch_size=BATCH)
    expected = whole.sample(conversations, 2, params)
    with build_engine("zero3", tiny_model_path) as engine:
        sampler = unhooked_sampler(engine, batch_size=BATCH)
        gather, gathers = sampler.gather, []
        sampler.gather = lambda: gathers.append(1) or gather()
        with counting_fetches() as fetches, recording_forwards(engine.module) as shapes:
            with sampler.reuse_prefixes():
                reused = sampler.sample(conversations, 2, params)
            texts = SamplerBackend(sampler).generate(conversations, 2, params)
        assert gathers == [1, 1]  # once per call, as without reuse
        assert fetches == {"fetch_sub_module": 0, "reset_step": 0}
        assert shapes.count(shapes[0]) == 2 and shapes[0][1] > 300  # the rubric, read once per call
        assert_same_answers(expected, reused)
        assert texts == [expected.texts[2 * i:2 * i + 2] for i in range(len(PROMPTS))]
        # a partitioned module sampled without a gather decodes in lock-step: nothing read apart
        lockstep = HFSampler(engine.module, engine.tokenizer, batch_size=BATCH)
        with recording_forwards(engine.module) as shapes:
            fallback = SamplerBackend(lockstep).generate(conversations[:2], 1, params)
        assert all(s[0] == 2 for s in shapes) and fallback == [[t] for t in expected.texts[:4:2]]
