"""Logprob scoring helpers (G-Eval style): forced verdict prefixes and score-token lookup.

Instead of sampling a verdict, the judge prompt is followed by the verdict written up to
an aspect's score slot (``<verdict-NONCE>\\nknowledge:``). The probability that the judge
writes each score there, renormalised over the scores, gives a probability-weighted
expected score. Aspects are read in rubric order, each slot conditioned on the most
likely score of the aspects before it, as the verdict would be written.

What "writes the score" means in tokens depends on the tokenizer: GPT-2-style BPEs have a
token ``" 4"`` (space folded into the digit), Llama-3/Qwen-style ones write ``" "`` then
``"4"``, and small vocabularies mix both (``" 4"`` exists, ``" 5"`` does not). The
probability of the text ``" s"`` is therefore summed over its one- and two-token
spellings: ``P(" s" | ctx) + P(" " | ctx) * P("s" | ctx + " ")``. A score with neither
spelling (``"10"`` in most vocabularies: two digit tokens) is refused with an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dynalign.judge.rubric import Rubric


def verdict_prefix(rubric: Rubric, nonce: str, aspect: int, previous: Sequence[int]) -> str:
    """The verdict written up to aspect ``aspect``'s score slot, earlier slots filled with ``previous``."""
    names = rubric.aspect_names
    lines = [f"<verdict-{nonce}>"]
    lines += [f"{name}: {score}" for name, score in zip(names[:aspect], previous, strict=True)]
    lines.append(f"{names[aspect]}:")
    return "\n".join(lines)


def _added_token(context_ids: Sequence[int], full_ids: Sequence[int]) -> int | None:
    """The one token that ``full_ids`` adds after ``context_ids``, else None."""
    if len(full_ids) == len(context_ids) + 1 and list(full_ids[:len(context_ids)]) == list(context_ids):
        return full_ids[-1]
    return None


def _single_token_after(tokenizer: Any, context: str, text: str) -> int | None:
    """The one token that ``text`` adds after ``context`` (tokenized together), else None."""
    base, full = tokenizer([context, context + text], add_special_tokens=False)["input_ids"]
    return _added_token(base, full)


@dataclass(frozen=True)
class ScoreSlots:
    """The token spellings of ``" s"`` after a context ending in ``name:``."""

    scores: tuple[int, ...]
    direct: dict[int, int]  # score -> the single token writing " s" right after the context
    space_id: int | None  # the token writing " " alone after the context, when there is one
    after_space: dict[int, int]  # score -> the single token writing "s" after that space token

    def logprobs(self, sampler: Any, contexts: Sequence[str]) -> torch.Tensor:
        """[N, S] log P(" s" | context) of every score, from the sampler's next-token log-probs.

        A sampler that reads token rows (``token_logprobs``) reads both spellings of a context
        in one pass when the context followed by " " is its tokens plus the space token:
        the log-probs after its last two tokens are those after the context and after " ".
        """
        first_ids = list(self.direct.values()) + ([self.space_id] if self.after_space else [])
        second_ids = list(self.after_space.values())
        if not hasattr(sampler, "token_logprobs"):
            first = sampler.next_token_logprobs(list(contexts), first_ids)  # [N, K1]
            second = (sampler.next_token_logprobs([c + " " for c in contexts], second_ids)
                      if self.after_space else None)  # [N, K2]
            return self._combine(first, second)
        rows = sampler.encode_texts(contexts)
        if not self.after_space:
            return self._combine(sampler.token_logprobs(rows, first_ids)[:, -1], None)
        spaced = sampler.encode_texts([c + " " for c in contexts])
        if all(_added_token(r, s) == self.space_id for r, s in zip(rows, spaced, strict=True)):
            both = sampler.token_logprobs(spaced, first_ids + second_ids, last=2)  # [N, 2, K1 + K2]
            return self._combine(both[:, 0, :len(first_ids)], both[:, 1, len(first_ids):])
        return self._combine(sampler.token_logprobs(rows, first_ids)[:, -1],
                             sampler.token_logprobs(spaced, second_ids)[:, -1])

    def _combine(self, first: torch.Tensor, second: torch.Tensor | None) -> torch.Tensor:
        """[N, S] from the log-probs of the first tokens [N, K1] (the direct spellings, then the
        space) and of the digits after the space [N, K2]."""
        first = first.double()  # [N, K1]
        out = torch.full((len(first), len(self.scores)), float("-inf"), dtype=torch.float64)  # [N, S]
        for col, score in enumerate(self.direct):
            out[:, self.scores.index(score)] = first[:, col]
        if second is not None and self.after_space:
            space = first[:, -1]  # [N] log P(" " | context)
            for col, score in enumerate(self.after_space):
                j = self.scores.index(score)
                out[:, j] = torch.logaddexp(out[:, j], space + second[:, col].double())
        return out


def score_slots(tokenizer: Any, context: str, scores: Sequence[int]) -> ScoreSlots:
    """How to read the scores after ``context``; a ValueError if some score cannot be read."""
    # every tokenization it needs in one call: the context, then with " " and with each " s"
    # (``context + " " + "s"`` is the text of ``context + " s"``: one tokenization serves both)
    encoded = tokenizer([context, context + " "] + [context + f" {s}" for s in scores],
                        add_special_tokens=False)["input_ids"]
    base, spaced, written = encoded[0], encoded[1], encoded[2:]
    direct = {s: t for s, ids in zip(scores, written, strict=True)
              if (t := _added_token(base, ids)) is not None}
    space_id = _added_token(base, spaced)
    after_space: dict[int, int] = {}
    if space_id is not None and len(direct) < len(scores):
        for s, ids in zip(scores, written, strict=True):
            # in context when the tokenizer spells " s" as " ", "s"; else the lone digit token,
            # a spelling a merging tokenizer never produces itself (its probability is ~0 there)
            token = _added_token(spaced, ids)
            alone = tokenizer.encode(str(s), add_special_tokens=False)
            if token is None and len(alone) == 1 and tokenizer.decode(alone) == str(s):
                token = alone[0]
            if token is not None:
                after_space[s] = token
    unreadable = [s for s in scores if s not in direct and s not in after_space]
    if unreadable:
        spelled = {s: tokenizer.convert_ids_to_tokens(tokenizer.encode(f" {s}", add_special_tokens=False))
                   for s in unreadable}
        raise ValueError(
            f"judge.mode=logprob reads each score from one next-token distribution, but in this "
            f"tokenizer the scores {unreadable} take several tokens after 'name:' ({spelled}). Use "
            "judge.mode=generate, or a rubric scale whose scores are single tokens (e.g. 0-5).")
    return ScoreSlots(tuple(scores), direct, space_id, after_space)


def expected_scores(logprobs: torch.Tensor, scores: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor,
                                                                           torch.Tensor]:
    """Renormalise log-probs over the scores and take the expected score.

    logprobs: [N, S] log-probabilities of writing each of the S scores (-inf: impossible).
    Returns (expected [N], mass [N] = probability on the scores before renormalising,
    probs [N, S] renormalised).
    """
    logprobs = logprobs.double()  # [N, S]
    probs = torch.softmax(logprobs, dim=-1)  # [N, S] renormalised over the scores only
    mass = torch.logsumexp(logprobs, dim=-1).exp()  # [N]
    values = torch.tensor([float(s) for s in scores], dtype=probs.dtype)  # [S]
    return (probs @ values).float(), mass.float(), probs.float()  # [N], [N], [N, S]
