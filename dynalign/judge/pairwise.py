"""Pairwise judging: which of two answers is better, asked in both orders (position swap).

Each pair ``(a, b)`` is rendered twice with the nonce-tagged pairwise prompt, once with ``a``
shown as answer A and once with ``b`` shown as A, so an answer cannot cast the verdict and a
judge that always picks a position cannot produce a winner. Each order's verdict is mapped
back to ``"a" | "b" | "tie"``; the pair's outcome (``a``'s point of view) is that verdict when
both orders agree and a tie when they disagree (a verdict that flips with the order is
position bias, not a preference); an order with no verdict leaves the pair undecided (None).

In ``logprob`` mode a sampler-backed judge reads the probability of ``A`` / ``B`` / ``tie`` at
the verdict slot instead of sampling; an HTTP judge samples greedily instead (there is no slot
to read without a verdict).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from dynalign.judge.backends import SamplerBackend
from dynalign.judge.parse import BACKEND_ERROR, OK, parse_pairwise_verdict
from dynalign.judge.prompt import render_pairwise_prompt
from dynalign.rollout.base import Prompt, reusing_prefixes

if TYPE_CHECKING:
    import torch

    from dynalign.judge.scoring import Judge

PAIRWISE_CHOICES = ("A", "B", "tie")  # as the verdict writes them
SIDES = ("a", "b", "tie")
ORDER_LABELS = ({"A": "a", "B": "b", "tie": "tie"},  # a shown first
                {"A": "b", "B": "a", "tie": "tie"})  # b shown first
WIN, TIE, LOSS = "win", "tie", "loss"


def order_vote(votes: Sequence[str | None]) -> str | None:
    """One order's verdict from its k judgements (``"a" | "b" | "tie"`` or None).

    The most frequent parsed vote wins; a draw between the top votes is a tie; None when no
    judgement of this order parsed.
    """
    counts = Counter(v for v in votes if v is not None)
    if not counts:
        return None
    unknown = set(counts) - set(SIDES)
    if unknown:
        raise ValueError(f"unknown pairwise votes {sorted(unknown)}; valid: {', '.join(SIDES)}")
    (top, n), *rest = counts.most_common()
    return "tie" if rest and rest[0][1] == n else top


def pair_outcome(a_first: str | None, b_first: str | None) -> str | None:
    """``"win" | "tie" | "loss"`` for ``a`` from the verdicts of the two orders.

    Both orders agree: their verdict. They disagree (including one tie and one winner): a tie.
    Either order missing: None (a judge failure, excluded from a win rate).
    """
    if a_first is None or b_first is None:
        return None
    if a_first != b_first:
        return TIE
    return {"a": WIN, "b": LOSS, "tie": TIE}[a_first]


@dataclass(frozen=True)
class PairJudgement:
    """One pair ``(a, b)`` judged in both orders; votes are ``"a" | "b" | "tie"`` or None."""

    a_first: tuple[str | None, ...]  # votes with a's answer shown as A
    b_first: tuple[str | None, ...]  # votes with b's answer shown as A
    reasons: tuple[str, ...]  # "ok" or the failure code of every judgement, a-first order first
    texts: tuple[str, ...]  # the judge's outputs ("" in logprob mode)

    @property
    def outcome(self) -> str | None:
        """``win | tie | loss`` for ``a``, or None (an order without a verdict)."""
        return pair_outcome(order_vote(self.a_first), order_vote(self.b_first))


def choice_logprobs(sampler: Any, contexts: Sequence[str], choices: Sequence[str]) -> torch.Tensor:
    """[N, C] log P(choice | context), a choice's tokens summed (the contexts end alike, so the
    choices tokenize alike after each of them)."""
    import torch

    tokenizer = sampler.tokenizer
    base = tokenizer.encode(contexts[0], add_special_tokens=False)
    continuations = []
    for choice in choices:
        full = tokenizer.encode(contexts[0] + choice, add_special_tokens=False)
        if full[:len(base)] != base or len(full) == len(base):
            raise ValueError(f"{choice!r} merges with the end of the verdict prefix in this tokenizer")
        continuations.append(full[len(base):])
    firsts = sorted({c[0] for c in continuations})
    first = sampler.next_token_logprobs(list(contexts), firsts).double()  # [N, F]
    out = torch.stack([first[:, firsts.index(c[0])] for c in continuations], 1)  # [N, C]
    for j, tokens in enumerate(continuations):
        for t in range(1, len(tokens)):  # later tokens of multi-token choices
            prefixed = [c + tokenizer.decode(tokens[:t]) for c in contexts]
            out[:, j] += sampler.next_token_logprobs(prefixed, [tokens[t]])[:, 0].double()
    return out


def _votes_by_logprob(backend: SamplerBackend, rendered: Sequence[tuple[list, str]]) -> list[list[str]]:
    import torch

    if not rendered:
        return []
    contexts = [backend.render(messages) + f"<verdict-{nonce}>\nwinner:" for messages, nonce in rendered]
    choices = [f" {c}" for c in PAIRWISE_CHOICES]
    with reusing_prefixes(backend.sampler) as group:
        size = group or max(len(contexts), 1)
        logprobs = torch.cat([choice_logprobs(backend.sampler, contexts[i:i + size], choices)
                              for i in range(0, len(contexts), size)])  # [2N, 3]
    return [[PAIRWISE_CHOICES[i]] for i in logprobs.argmax(-1).tolist()]


def _votes_by_generation(judge: Judge, rendered: Sequence[tuple[list, str]], seed: int | None = None):
    """Letters, reasons and texts [2N][k] of ``judge.num_samples`` sampled verdicts per order."""
    params = judge.params if judge.mode == "generate" else replace(judge.params, temperature=0.0)
    if seed is not None:
        params = replace(params, seed=seed)
    outputs = judge.backend.generate([m for m, _ in rendered], judge.num_samples, params)  # [2N][k]
    letters, reasons, texts = [], [], []
    for (_, nonce), outs in zip(rendered, outputs, strict=True):
        parsed = [(None, BACKEND_ERROR) if t is None else parse_pairwise_verdict(t, nonce) for t in outs]
        letters.append([w for w, _ in parsed])
        reasons.append([r for _, r in parsed])
        texts.append([t or "" for t in outs])
    return letters, reasons, texts


def judge_pairs(judge: Judge, prompts: Sequence[Prompt], a: Sequence[str], b: Sequence[str], *,
                seed: int | None = None) -> list[PairJudgement]:
    """Judge every pair ``(a[i], b[i])`` as answers to ``prompts[i]``, in both orders, with
    ``judge``'s backend, rubric, scoring mode and samples per order (one batched call).

    ``seed`` makes the call reproducible (nonces and judge sampling), as for ``Judge.score``.
    """
    rng = None if seed is None else random.Random(seed)
    rendered = []
    for prompt, first, second in zip(prompts, a, b, strict=True):
        rendered.append(render_pairwise_prompt(judge.rubric, prompt, first, second, rng=rng))  # a is A
        rendered.append(render_pairwise_prompt(judge.rubric, prompt, second, first, rng=rng))  # b is A
    if judge.mode == "logprob" and isinstance(judge.backend, SamplerBackend):
        letters = _votes_by_logprob(judge.backend, rendered)  # [2N][1]
        reasons, texts = [[OK] for _ in rendered], [[""] for _ in rendered]
    else:
        letters, reasons, texts = _votes_by_generation(judge, rendered, seed)
    pairs = []
    for i in range(len(prompts)):
        votes = [[None if w is None else ORDER_LABELS[o][w] for w in letters[2 * i + o]] for o in (0, 1)]
        pairs.append(PairJudgement(tuple(votes[0]), tuple(votes[1]),
                                   tuple(reasons[2 * i] + reasons[2 * i + 1]),
                                   tuple(texts[2 * i] + texts[2 * i + 1])))
    return pairs
