"""The categorical draw behind sampling: torch.multinomial's tokens, by a cheaper route."""

from __future__ import annotations

import pytest
import torch

from dynalign.rollout import draws
from dynalign.rollout.draws import draw, exponential_race, matches_multinomial


def distributions(rows: int, vocab: int, seed: int, *, filtered: bool = False) -> torch.Tensor:
    """[rows, vocab] softmaxes of peaked random logits; ``filtered``: two thirds of each row at
    -inf first (what top-k or top-p leave), so those entries have probability 0."""
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    if filtered:
        logits[:, torch.arange(vocab) % 3 != 0] = -torch.inf
    return torch.softmax(logits, -1)


@pytest.mark.parametrize("shape", [(1, 5), (16, 1024), (8, 262144)])  # one prompt, the tiny model, Gemma
@pytest.mark.parametrize("filtered", [False, True])
def test_the_race_draws_multinomials_tokens_and_moves_the_generator_as_far(shape, filtered):
    for seed in range(5):
        probs = distributions(*shape, seed, filtered=filtered)
        torch_gen, race_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        expected = torch.multinomial(probs, 1, generator=torch_gen)[:, 0]
        drawn = exponential_race(probs, generator=race_gen)
        assert torch.equal(drawn, expected)
        assert torch.equal(race_gen.get_state(), torch_gen.get_state())
        if filtered:
            assert bool((drawn % 3 == 0).all())  # never an entry of probability 0


def test_the_race_samples_the_distribution():
    """Independently of how torch draws: 40,000 draws of p = (0.1, 0.2, 0.3, 0.4), four rows at a
    time, land within 0.01 of p (the standard error is at most 0.0025)."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(10_000):
        drawn = exponential_race(p.expand(4, 4).contiguous(), generator=generator)  # [4]
        counts += torch.bincount(drawn, minlength=4)
    assert torch.allclose(counts / counts.sum(), p, atol=0.01), counts / counts.sum()


def test_draw_on_the_default_generator_equals_multinomial():
    probs = distributions(16, 1024, seed=3)
    torch.manual_seed(11)
    expected, after = torch.multinomial(probs, 1)[:, 0], torch.rand(4)
    torch.manual_seed(11)
    assert torch.equal(draw(probs), expected)
    assert torch.equal(torch.rand(4), after)  # the global stream continues where multinomial's would


def test_draw_falls_back_to_multinomial_where_the_race_is_not_its_draw(monkeypatch):
    """Where the installed torch draws otherwise (the check fails), or for a dtype the race does
    not cover, multinomial itself runs."""
    def refuse(*args, **kwargs):
        raise AssertionError("the race ran")

    probs = distributions(4, 64, seed=5)
    torch.manual_seed(2)
    expected = torch.multinomial(probs, 1)[:, 0]
    monkeypatch.setattr(draws, "exponential_race", refuse)
    monkeypatch.setattr(draws, "matches_multinomial", lambda shape, dtype: False)
    torch.manual_seed(2)
    assert torch.equal(draw(probs), expected)
    monkeypatch.undo()
    monkeypatch.setattr(draws, "exponential_race", refuse)
    half = probs.to(torch.bfloat16)
    torch.manual_seed(2)
    expected = torch.multinomial(half, 1)[:, 0]
    torch.manual_seed(2)
    assert torch.equal(draw(half), expected)


def test_a_transposed_batch_is_drawn_by_multinomial(monkeypatch):
    """multinomial fills its variates in memory order: for another layout the race would pair
    them with other entries, so it does not run."""
    monkeypatch.setattr(draws, "exponential_race", lambda *a, **k: pytest.fail("the race ran"))
    probs = distributions(64, 4, seed=6).t().contiguous().t()  # [64, 4], column-major
    torch.manual_seed(4)
    expected = torch.multinomial(probs, 1)[:, 0]
    torch.manual_seed(4)
    assert torch.equal(draw(probs), expected)


def test_a_row_that_is_no_distribution_is_refused_by_multinomial():
    probs = distributions(3, 32, seed=1)
    probs[1] = torch.nan  # a model that produced NaN logits
    with pytest.raises(RuntimeError, match="probability tensor contains either"):
        draw(probs)
    with pytest.raises(RuntimeError):
        draw(torch.zeros(2, 8))  # no mass at all


def test_the_check_is_made_once_per_shape_and_dtype():
    matches_multinomial.cache_clear()
    assert matches_multinomial((2, 16), torch.float32)
    assert matches_multinomial((2, 16), torch.float32)
    assert matches_multinomial.cache_info().hits == 1 and matches_multinomial.cache_info().misses == 1
