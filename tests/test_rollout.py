"""The sampler contract on the transformers backend, with the tiny local model (fast, CPU)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dynalign.config import RolloutConfig
from dynalign.rollout import (
    HFSampler,
    Sampler,
    SamplingParams,
    build_sampler,
    draws,
    sampling_params,
    zero3_gather,
)
from dynalign.rollout.encoding import (
    encode_prompts,
    eos_token_ids,
    finish_completion,
    left_pad,
    prepare_request,
)

CHAT = [{"role": "user", "content": "What is a good way to learn?"}]
PROMPTS = ["def fibonacci(n):", CHAT, "The quick brown fox"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def model(tiny_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()


@pytest.fixture
def sampler(model, tokenizer):
    return HFSampler(model, tokenizer, batch_size=4, max_prompt_length=64)


def biased_towards_eos(model, tokenizer, p_eos: float):
    """A copy of ``model`` whose logits favour EOS (P(EOS) would be ~p_eos were logits uniform)."""
    biased = copy.deepcopy(model)
    vocab = biased.config.vocab_size
    bias = torch.zeros(vocab)
    bias[tokenizer.eos_token_id] = math.log(p_eos / (1 - p_eos) * (vocab - 1))
    biased.lm_head.register_forward_hook(lambda module, inputs, logits: logits + bias)
    return biased


def teacher_forced_logprobs(model, rollouts) -> torch.Tensor:
    inputs = rollouts.model_inputs()
    with torch.no_grad():
        logits = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                       position_ids=inputs.position_ids).logits
    width = rollouts.completion_ids.shape[1]
    logp = torch.log_softmax(logits[:, -width - 1:-1].float(), -1)  # [N, C, V]
    return logp.gather(-1, rollouts.completion_ids[..., None]).squeeze(-1)  # [N, C]


# ------------------------------------------------------------------ registry


def test_build_sampler_hf_and_unknown_backend(model, tokenizer):
    sampler = build_sampler(RolloutConfig(backend="hf", batch_size=3), tokenizer=tokenizer, model=model,
                            shares_weights=True)
    assert sampler.batch_size == 3 and not sampler.needs_weight_sync
    assert isinstance(sampler, Sampler)  # satisfies the protocol the loop, judge and generator use
    with pytest.raises(ValueError, match="rollout.backend.*valid: hf, vllm"):
        build_sampler(RolloutConfig(backend="nope"), tokenizer=tokenizer, model=model)
    with pytest.raises(ValueError, match="needs model_path"):  # refused before vllm is imported
        build_sampler(RolloutConfig(backend="vllm"), tokenizer=tokenizer, model=model)
    assert zero3_gather(model) is None  # a plain (not ZeRO-3 partitioned) model needs no gathering


def test_sampling_params_from_config_and_validation():
    params = sampling_params(RolloutConfig(temperature=0.7, top_p=0.9, top_k=5), 16, seed=3, stop=["\n"])
    assert (params.temperature, params.top_p, params.top_k, params.max_new_tokens) == (0.7, 0.9, 5, 16)
    assert params.stop == ("\n",) and params.seed == 3
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -1}, {"max_new_tokens": 0}, {"stop": [""]}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


# -------------------------------------------------------------- shapes, order


def test_shapes_order_and_padding(sampler, tokenizer):
    n, params = 3, SamplingParams(max_new_tokens=6, seed=0)
    out = sampler.sample(PROMPTS, n, params)
    N = len(PROMPTS) * n
    assert len(out) == N and out.completion_ids.shape == (N, 6) and out.completion_mask.shape == (N, 6)
    assert out.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # prompt-major
    encoded = encode_prompts(tokenizer, PROMPTS)
    for row in range(N):
        ids = encoded[row // n]
        width = out.prompt_ids.shape[1]
        assert out.prompt_ids[row, width - len(ids):].tolist() == ids  # left-padded
        assert out.prompt_mask[row].sum() == len(ids) and out.prompt_mask[row, width - len(ids):].all()
        assert (out.prompt_ids[row, :width - len(ids)] == tokenizer.pad_token_id).all()
    # The random tiny model never emits EOS: every answer runs to the limit.
    assert out.finish_reasons == ["length"] * N and out.truncated.all()
    assert out.completion_mask.all() and out.logprobs is None
    assert out.texts == tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
    inputs = out.model_inputs()
    assert torch.equal(inputs.input_ids, torch.cat([out.prompt_ids, out.completion_ids], 1))
    assert torch.equal(inputs.attention_mask, torch.cat([out.prompt_mask, out.completion_mask], 1))
    assert inputs.position_ids[0, -1] == out.prompt_mask[0].sum() + 5


def test_chat_prompts_use_the_template_and_raw_text_does_not(tokenizer):
    chat_ids, raw_ids = encode_prompts(tokenizer, [CHAT, "plain text"])
    assert chat_ids == list(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                                          return_dict=True)["input_ids"])
    assert tokenizer.decode(chat_ids).endswith("<|im_start|>assistant\n")
    assert raw_ids == tokenizer("plain text")["input_ids"]
    with pytest.raises(TypeError):
        encode_prompts(tokenizer, "a string is not a list of prompts")


def test_prompts_are_left_truncated(sampler, tokenizer):
    long = "word " * 200
    out = sampler.sample([long], 1, SamplingParams(max_new_tokens=2, temperature=0))
    assert out.prompt_ids.shape[1] == 64
    assert out.prompt_ids[0].tolist() == tokenizer(long)["input_ids"][-64:]
    wider = sampler.sample([long], 1, SamplingParams(max_new_tokens=2, temperature=0, max_prompt_length=100))
    assert wider.prompt_ids.shape[1] == 100


# ------------------------------------------------------------ EOS and stops


def test_eos_masks_and_finish_reasons_both_cases(model, tokenizer):
    sampler = HFSampler(biased_towards_eos(model, tokenizer, p_eos=0.005), tokenizer, batch_size=8)
    out = sampler.sample(PROMPTS, 8, SamplingParams(max_new_tokens=10, seed=1))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    reasons = set(out.finish_reasons)
    assert reasons == {"stop", "length"}, reasons  # both kinds in one batch
    rows = zip(out.completion_ids, out.completion_mask, out.finish_reasons, out.texts, strict=True)
    for ids, mask, reason, text in rows:
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()  # contiguous, then zeros
        assert (ids[length:] == pad).all()
        kept = ids[:length].tolist()
        if reason == "stop":
            assert kept[-1] == eos and eos not in kept[:-1]  # EOS kept and covered by the mask
        else:
            assert length == 10 and eos not in kept
        assert text == tokenizer.decode(kept, skip_special_tokens=True) and "<|im_end|>" not in text
    assert out.truncated.tolist() == [r == "length" for r in out.finish_reasons]


def test_immediate_eos(model, tokenizer):
    sampler = HFSampler(biased_towards_eos(model, tokenizer, p_eos=1 - 1e-9), tokenizer)
    out = sampler.sample(["hello"], 2, SamplingParams(max_new_tokens=8, seed=0))
    assert out.completion_ids.tolist() == [[tokenizer.eos_token_id]] * 2
    assert out.completion_mask.tolist() == [[1], [1]] and out.texts == ["", ""]
    assert out.finish_reasons == ["stop", "stop"] and not out.truncated.any()


def test_stop_strings_cut_text_and_mask(sampler, tokenizer):
    greedy = SamplingParams(max_new_tokens=16, temperature=0)
    full = sampler.sample(PROMPTS, 1, greedy)
    stops = [text[4:6] for text in full.texts]  # a stop string in the middle of each answer
    for i, prompt in enumerate(PROMPTS):
        out = sampler.sample([prompt], 1, SamplingParams(max_new_tokens=16, temperature=0, stop=(stops[i],)))
        length = int(out.completion_mask[0].sum())
        kept = out.completion_ids[0, :length].tolist()
        assert out.finish_reasons == ["stop"]
        assert kept == full.completion_ids[i, :length].tolist()  # same greedy tokens up to the stop
        assert stops[i] in tokenizer.decode(kept) and stops[i] not in tokenizer.decode(kept[:-1])
        cut = full.texts[i].find(stops[i])
        assert out.texts[0] == full.texts[i][:cut]  # the stop string itself is not in the text
        assert (out.completion_ids[0, length:] == tokenizer.pad_token_id).all()


def test_finish_completion_by_hand(tokenizer):
    eos = frozenset({tokenizer.eos_token_id})
    ids = tokenizer("alpha beta. gamma", add_special_tokens=False)["input_ids"]
    done = finish_completion(tokenizer, ids + [tokenizer.eos_token_id, 5, 6], eos_ids=eos)
    assert done == (ids + [tokenizer.eos_token_id], "alpha beta. gamma", "stop", None)
    done = finish_completion(tokenizer, ids, eos_ids=eos, stops=("a. g", "zzz"), logprobs=[-1.0] * len(ids))
    assert done.text == "alpha bet" and done.finish_reason == "stop"
    assert "a. g" in tokenizer.decode(done.token_ids) and len(done.logprobs) == len(done.token_ids)
    assert finish_completion(tokenizer, ids, eos_ids=eos, stops=("zzz",)).finish_reason == "length"
    generation_config = type("Cfg", (), {"eos_token_id": [7, 8]})()
    assert eos_token_ids(tokenizer, generation_config) == {7, 8, tokenizer.eos_token_id}


# -------------------------------------------------------------- determinism


def test_seed_gives_determinism_and_leaves_global_rng_alone(sampler):
    params = SamplingParams(max_new_tokens=8, seed=123)
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    a = sampler.sample(PROMPTS, 2, params)
    assert torch.equal(torch.rand(3), expected_next)  # sampling did not consume the global RNG
    b = sampler.sample(PROMPTS, 2, params)
    c = sampler.sample(PROMPTS, 2, SamplingParams(max_new_tokens=8, seed=124))
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert not torch.equal(a.completion_ids, c.completion_ids)
    assert not torch.equal(a.completion_ids[0], a.completion_ids[1])  # a group's answers differ


def test_sampling_is_untruncated_and_ignores_the_models_generation_defaults(model, tokenizer):
    """top_k=0 means the full vocabulary (transformers' default would be 50), and a model's
    generation_config (here top_k=1, min_p=0.5, a repetition penalty) does not leak into sampling."""
    opinionated = copy.deepcopy(model)
    opinionated.generation_config.update(top_k=1, top_p=0.1, min_p=0.5, repetition_penalty=5.0,
                                         do_sample=True)
    sampler = HFSampler(opinionated, tokenizer)
    out = sampler.sample(PROMPTS, 4, SamplingParams(max_new_tokens=8, seed=0, logprobs=True))
    assert not torch.equal(out.completion_ids[0], out.completion_ids[1])
    inputs = out.model_inputs()
    with torch.no_grad():
        logits = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).logits[:, -9:-1]
    ranks = (logits > logits.gather(-1, out.completion_ids[..., None])).sum(-1)  # [N, C] 0 = argmax
    assert int(ranks.max()) > 50  # tokens from outside the top 50 are sampled


def transformers_sampling(model, tokenizer, sampler, prompts, n, params) -> torch.Tensor:
    """[N, C] what transformers' own ``generate(do_sample=True)`` draws for the sampler's token
    batch at the params' seed (its warpers, its softmax, its ``torch.multinomial``)."""
    from transformers import GenerationConfig

    params, prompt_ids = prepare_request(tokenizer, prompts, n, params)
    ids, mask = left_pad([row for row in prompt_ids for _ in range(n)], sampler.pad_id)
    config = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=True,
                              temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                              eos_token_id=sorted(sampler.eos_ids), pad_token_id=sampler.pad_id)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]


@pytest.mark.parametrize("knobs", [{}, {"temperature": 0.7, "top_k": 20}, {"temperature": 1.3, "top_p": 0.9},
                                   {"temperature": 0.5, "top_k": 5, "top_p": 0.5}])
def test_samples_are_the_tokens_transformers_sampling_draws_at_the_seed(model, tokenizer, knobs,
                                                                        monkeypatch):
    """The sampler runs ``generate`` greedy with its own last processor (warpers, then a cheaper
    draw than ``torch.multinomial``): the tokens are still exactly those of ``do_sample=True``."""
    races = []
    race = draws.exponential_race
    def counted(probs, generator=None):  # the sampler's draws (the one-off check brings its own generator)
        races.extend([probs.shape] if generator is None else [])
        return race(probs, generator=generator)

    monkeypatch.setattr(draws, "exponential_race", counted)
    sampler = HFSampler(model, tokenizer)
    params = SamplingParams(max_new_tokens=12, seed=7, **knobs)
    out = sampler.sample(PROMPTS, 3, params)
    assert len(races) == out.completion_ids.shape[1]  # every step drew by the race, not by multinomial
    expected = transformers_sampling(model, tokenizer, sampler, PROMPTS, 3, params)  # [N, C']
    assert out.completion_ids.shape[1] == expected.shape[1]  # the same longest answer
    assert torch.equal(out.completion_ids, expected)  # pads where EOS ended a row, in both


def test_greedy_and_train_mode_restored(sampler, model):
    model.train()
    try:
        out = sampler.sample(["hello"], 2, SamplingParams(max_new_tokens=5, temperature=0))
        assert model.training
    finally:
        model.eval()
    assert torch.equal(out.completion_ids[0], out.completion_ids[1])


# ------------------------------------------------------------------ log-probs


def test_sampling_logprobs_match_a_forward_pass(sampler, model):
    out = sampler.sample(PROMPTS, 2, SamplingParams(max_new_tokens=8, seed=5, temperature=0.8, top_k=50,
                                                    logprobs=True))
    assert out.logprobs.shape == out.completion_ids.shape and out.logprobs.dtype == torch.float32
    expected = teacher_forced_logprobs(model, out)
    mask = out.completion_mask.bool()
    torch.testing.assert_close(out.logprobs[mask], expected[mask], atol=2e-5, rtol=0)


def test_next_token_logprobs_match_a_forward_pass(sampler, model, tokenizer):
    texts = ["Score: ", "<|im_start|>user\nRate this.<|im_end|>\n<|im_start|>assistant\nScore:"]
    candidates = [tokenizer.convert_tokens_to_ids(str(s)) for s in range(6)]
    got = sampler.next_token_logprobs(texts, candidates)
    assert got.shape == (2, 6)
    for row, text in enumerate(texts):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
        torch.testing.assert_close(got[row], logp[candidates], atol=1e-5, rtol=0)


# -------------------------------------------------------------------- weights


def test_update_weights_changes_outputs(model, tokenizer):
    sampler = HFSampler(copy.deepcopy(model), tokenizer)
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    before = sampler.sample(PROMPTS, 1, greedy)
    target = copy.deepcopy(model)
    torch.manual_seed(7)
    with torch.no_grad():
        for param in target.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    sampler.update_weights(target.state_dict().items())
    after = sampler.sample(PROMPTS, 1, greedy)
    expected = HFSampler(target, tokenizer).sample(PROMPTS, 1, greedy)
    assert not torch.equal(before.completion_ids, after.completion_ids)
    assert torch.equal(after.completion_ids, expected.completion_ids)
    with pytest.raises(KeyError, match="no parameter"):
        sampler.update_weights([("not.a.weight", torch.zeros(1))])


def test_shared_weights_skip_the_sync(model, tokenizer):
    sampler = HFSampler(model, tokenizer, shares_weights=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sampler.update_weights((k, torch.zeros_like(v)) for k, v in before.items())
    assert not sampler.needs_weight_sync
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_gather_is_entered_once_per_sample_call(model, tokenizer):
    from contextlib import contextmanager

    entered = []

    @contextmanager
    def gather():
        entered.append(1)
        yield

    sampler = HFSampler(model, tokenizer, batch_size=2, gather=gather, shares_weights=True)
    sampler.sample(PROMPTS, 2, SamplingParams(max_new_tokens=4))  # 6 sequences: 3 generate calls
    assert entered == [1]
