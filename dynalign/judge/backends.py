"""Who answers the judge prompts: a :class:`Sampler` (self, frozen, local external) or an
OpenAI-compatible HTTP endpoint, behind one small interface.

A backend does two things: ``generate`` (sample k judgements per conversation, for
``generate`` mode) and ``verdict_distributions`` (the renormalised distribution over the
score tokens at every aspect's verdict slot, for ``logprob`` mode). Nothing else of a
sampler or an API is used.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol

import torch

from dynalign.config import ConfigError, ExternalJudgeConfig
from dynalign.judge.logprob import expected_scores, score_slots, verdict_prefix
from dynalign.judge.parse import BACKEND_ERROR, NO_SCORE_LOGPROBS, OK, parse_verdict
from dynalign.judge.rubric import Rubric
from dynalign.rollout.base import Message, Sampler, SamplingParams, reusing_prefixes

Conversation = list[Message]


class SlotDistributions(NamedTuple):
    """What logprob mode reads at the verdict slots of N judge prompts."""

    probs: torch.Tensor  # [N, A, S] distribution over the S scores of each aspect (NaN rows: unread)
    mass: torch.Tensor  # [N, A] probability on the score tokens before renormalising
    reasons: list[str]  # [N] "ok" or why the slots could not be read
    texts: list[str]  # [N] text the judge generated to get there ("" when the prefix was forced)


class JudgeBackend(Protocol):
    def generate(self, conversations: Sequence[Conversation], n: int,
                 params: SamplingParams) -> list[list[str | None]]:
        """[N][n] judge outputs; None where the call failed after retries."""
        ...

    def verdict_distributions(self, conversations: Sequence[Conversation], nonces: Sequence[str],
                              rubric: Rubric, params: SamplingParams) -> SlotDistributions:
        ...


def nan_distributions(n: int, rubric: Rubric) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.full((n, len(rubric.aspects), len(rubric.scores)), math.nan),
            torch.full((n, len(rubric.aspects)), math.nan))


# ------------------------------------------------------------------ sampler-backed


class SamplerBackend:
    """A judge that is a :class:`Sampler`: the policy itself, a frozen copy or another local model.

    ``owns_sampler``: the sampler was loaded for this judge alone (a frozen copy, a local external
    judge), so :meth:`close` closes it too; the policy's sampler is its owner's to close.
    """

    def __init__(self, sampler: Sampler, *, owns_sampler: bool = False) -> None:
        self.sampler = sampler
        self.owns_sampler = owns_sampler

    def generate(self, conversations: Sequence[Conversation], n: int,
                 params: SamplingParams) -> list[list[str | None]]:
        self._check_not_truncated(conversations)
        with reusing_prefixes(self.sampler):  # the rubric all judge prompts share is prefilled once
            texts = self.sampler.sample(list(conversations), n, params).texts  # [N * n], prompt-major
        return [list(texts[i * n:(i + 1) * n]) for i in range(len(conversations))]

    def _check_not_truncated(self, conversations: Sequence[Conversation]) -> None:
        """A sampler that left-truncates prompts would cut the rubric off the judge prompt."""
        limit = getattr(self.sampler, "max_prompt_length", None)
        if limit is None or not conversations:
            return
        tokenizer: Any = self.sampler.tokenizer
        longest = max(len(tokenizer.encode(self.render(c), add_special_tokens=False)) for c in conversations)
        if longest > limit:
            raise ValueError(f"a judge prompt has {longest} tokens but this sampler truncates prompts to "
                             f"max_prompt_length={limit}: the judge would lose its rubric. Judge with a "
                             "sampler whose max_prompt_length fits the judge prompts (or None).")

    def close(self) -> None:
        """Let go of the sampler, closing it first when it is this judge's own; idempotent."""
        if self.owns_sampler and self.sampler is not None:
            self.sampler.close()
        self.sampler = None  # type: ignore[assignment]  # closed: judging fails from here on

    def render(self, conversation: Conversation) -> str:
        """The judge prompt as the text the model continues (its chat template, generation turn open)."""
        tokenizer: Any = self.sampler.tokenizer
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in conversation) + "\n\n"

    def verdict_distributions(self, conversations: Sequence[Conversation], nonces: Sequence[str],
                              rubric: Rubric, params: SamplingParams) -> SlotDistributions:
        n = len(conversations)
        probs, mass = nan_distributions(n, rubric)  # [N, A, S], [N, A]
        bases = [self.render(c) for c in conversations]
        # the prompts read together are one batch of the sampler's prefix cache
        with reusing_prefixes(self.sampler, getattr(self.sampler, "batch_size", 8)) as group:
            size = group or max(n, 1)
            for start in range(0, n, size):
                rows = slice(start, start + size)
                probs[rows], mass[rows] = self._read_slots(bases[rows], nonces[rows], rubric)
        return SlotDistributions(probs, mass, [OK] * n, [""] * n)

    def _read_slots(self, bases: Sequence[str], nonces: Sequence[str],
                    rubric: Rubric) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, A, S] and [N, A]: each aspect's score distribution after the judge prompts
        ``bases``, each slot conditioned on the most likely scores of the slots before it."""
        scores = rubric.scores
        probs, mass = nan_distributions(len(bases), rubric)
        chosen: list[list[int]] = [[] for _ in bases]
        for a in range(len(rubric.aspects)):
            contexts = [base + verdict_prefix(rubric, nonce, a, chosen[i])
                        for i, (base, nonce) in enumerate(zip(bases, nonces, strict=True))]
            slots = score_slots(self.sampler.tokenizer, contexts[0], scores)
            logprobs = slots.logprobs(self.sampler, contexts)  # [N, S] log P(" s" | context)
            _, mass[:, a], probs[:, a] = expected_scores(logprobs, scores)
            for i, best in enumerate(probs[:, a].argmax(-1).tolist()):
                chosen[i].append(scores[best])  # the next slot sees the most likely score here
        return probs, mass


# ------------------------------------------------------------------ HTTP


class OpenAIChatBackend:
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint (OpenAI, vLLM serve, TGI, ...).

    Requests run on a thread pool of ``concurrency`` workers; the ``openai`` client does
    the timeouts and the retries (with backoff, on connection errors, timeouts, 429 and
    5xx). A conversation whose request still fails yields None (``backend_error``); if
    every request of a call fails the endpoint is taken to be down and the error raised.
    Logprob mode asks for one greedy verdict with ``top_logprobs`` and reads the score
    distribution at each aspect's score token (single-digit scales only).
    """

    TOP_LOGPROBS = 20  # the most OpenAI's API (and vLLM's default) returns per position

    def __init__(self, base_url: str, model: str, api_key: str, *, timeout_s: float = 60.0,
                 max_retries: int = 3, concurrency: int = 16) -> None:
        import openai

        self.model = model
        # the pool bounds the requests in flight; the client's connection pool is larger
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s,
                                    max_retries=max_retries)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="judge-http")

    @classmethod
    def from_config(cls, cfg: ExternalJudgeConfig, key: str = "judge.external") -> OpenAIChatBackend:
        cfg.validate(key)
        api_key = os.environ.get(cfg.api_key_env)
        if not api_key:
            raise ConfigError(f"{key}.api_key_env", f"environment variable {cfg.api_key_env} is not set "
                              "(set it to any value for a server that does not check keys)")
        assert cfg.base_url is not None
        return cls(cfg.base_url, cfg.model, api_key, timeout_s=cfg.timeout_s,
                   max_retries=cfg.max_retries, concurrency=cfg.concurrency)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.client.close()

    def _request(self, conversation: Conversation, n: int, params: SamplingParams, **extra: Any):
        if params.stop:
            extra["stop"] = list(params.stop)
        if params.seed is not None:
            extra["seed"] = params.seed
        messages: Any = conversation  # plain role/content dicts, as the API takes them
        return self.client.chat.completions.create(
            model=self.model, messages=messages, n=n, temperature=params.temperature,
            top_p=params.top_p, max_tokens=params.max_new_tokens, **extra)

    def _complete(self, conversation: Conversation, n: int, params: SamplingParams) -> list[str]:
        texts: list[str] = []
        while len(texts) < n:  # some servers ignore ``n``: ask again for the rest
            response = self._request(conversation, n - len(texts), params)
            if not response.choices:
                raise RuntimeError("the endpoint returned no choices")
            texts += [c.message.content or "" for c in sorted(response.choices, key=lambda c: c.index)]
        return texts[:n]

    def _map(self, fn, items: Sequence[Any]) -> list[Any]:
        """``fn`` over ``items`` on the pool; a failed item is None unless all of them fail."""
        futures = [self._pool.submit(fn, item) for item in items]
        results, errors = [], []
        for future in futures:
            try:
                results.append(future.result())
            except Exception as err:  # any failed call is a missing judgement
                results.append(None)
                errors.append(err)
        if items and len(errors) == len(items):
            raise RuntimeError(f"every judge request to {self.client.base_url} failed: "
                               f"{errors[0]!r}") from errors[0]
        return results

    def generate(self, conversations: Sequence[Conversation], n: int,
                 params: SamplingParams) -> list[list[str | None]]:
        outputs = self._map(lambda c: self._complete(c, n, params), conversations)
        return [out if out is not None else [None] * n for out in outputs]

    def verdict_distributions(self, conversations: Sequence[Conversation], nonces: Sequence[str],
                              rubric: Rubric, params: SamplingParams) -> SlotDistributions:
        if rubric.scale_min < 0 or rubric.scale_max > 9:
            raise ValueError("logprob mode over HTTP reads one token per score: the rubric scale must "
                             f"lie within 0-9 (got {rubric.scale_min}-{rubric.scale_max})")
        greedy = SamplingParams(max_new_tokens=params.max_new_tokens, temperature=0.0, seed=params.seed)

        def ask(conversation: Conversation):
            response = self._request(conversation, 1, greedy, logprobs=True, top_logprobs=self.TOP_LOGPROBS)
            return response.choices[0]

        choices = self._map(ask, conversations)
        probs, mass = nan_distributions(len(conversations), rubric)
        reasons, texts = [], []
        for i, (choice, nonce) in enumerate(zip(choices, nonces, strict=True)):
            tokens = getattr(getattr(choice, "logprobs", None), "content", None) if choice else None
            content = (choice.message.content or "") if choice else ""
            text = "".join(t.token for t in tokens) if tokens else content
            reason = BACKEND_ERROR if choice is None else parse_verdict(text, rubric, nonce).reason
            if reason == OK and not tokens:
                reason = BACKEND_ERROR  # the endpoint ignored logprobs=True
            if reason == OK:
                slots = [_slot_distribution(tokens, text, nonce, name, rubric)
                         for name in rubric.aspect_names]
                if any(slot is None for slot in slots):
                    reason = NO_SCORE_LOGPROBS
                else:
                    for a, (slot_probs, slot_mass) in enumerate(slots):
                        probs[i, a], mass[i, a] = slot_probs, slot_mass
            reasons.append(reason)
            texts.append(text)
        return SlotDistributions(probs, mass, reasons, texts)


def _slot_distribution(tokens, text: str, nonce: str, name: str, rubric: Rubric):
    """(probs [S], mass) at ``name``'s score token in the (last) verdict of ``text``; None if unreadable."""
    block = list(re.finditer(rf"<verdict-{re.escape(nonce)}>", text, re.IGNORECASE))[-1]
    name_pattern = r"[\s_-]+".join(map(re.escape, name.split("_")))
    field = re.compile(rf"(?<![A-Za-z0-9_])[\"']?{name_pattern}[\"'*`\s]*[:=][^\S\n]*[\"*`]*", re.IGNORECASE)
    match = field.search(text, block.end())
    if match is None:
        return None
    position, start = match.end(), 0  # position: the score's first character
    for token in tokens:
        if start <= position < start + len(token.token):
            break
        start += len(token.token)
    else:
        return None
    candidates = [(t.token, t.logprob) for t in token.top_logprobs or []]
    if token.token not in {c for c, _ in candidates}:
        candidates.append((token.token, token.logprob))
    logprobs = torch.full((len(rubric.scores),), -math.inf)  # [S]
    for candidate, logprob in candidates:
        digit = candidate.strip()
        if digit.isascii() and digit.isdigit() and rubric.scale_min <= int(digit) <= rubric.scale_max:
            j = int(digit) - rubric.scale_min
            logprobs[j] = torch.logaddexp(logprobs[j], torch.tensor(float(logprob)))
    if torch.isinf(logprobs).all():
        return None
    _, mass, probs = expected_scores(logprobs[None], rubric.scores)  # [1], [1, S]
    return probs[0], mass[0]
