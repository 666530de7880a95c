"""Token-level conventions shared by every sampler backend.

Prompt rendering and tokenization, where a completion ends (EOS, stop string, length),
its text, and the padding into :class:`Rollouts` tensors live here once, so the
transformers and vLLM backends produce identical prompt tokens and identical
masks/texts for identical completion tokens. See :mod:`dynalign.rollout.base` for the
conventions in words.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from dynalign.rollout.base import Prompt, Rollouts, SamplingParams


def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    """Raw text as is; chat messages through the chat template, ready for the assistant turn."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


def encode_text(tokenizer: Any, text: str, *, chat: bool = False,
                max_length: int | None = None) -> list[int]:
    """Token ids of ``text``; ``chat`` text (a rendered template) gets no extra special tokens.

    Raw text gets the tokenizer's special tokens (BOS for Llama-style tokenizers) unless it
    already starts with the BOS string, so a prompt rendered elsewhere never gets two BOS.
    ``max_length`` keeps the last tokens (prompts are left-truncated).
    """
    bos = getattr(tokenizer, "bos_token", None)
    special = not chat and not (bos and text.startswith(bos))
    ids = list(tokenizer(text, add_special_tokens=special)["input_ids"])
    if max_length is not None and len(ids) > max_length:
        ids = ids[len(ids) - max_length:]
    return ids


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt],
                   max_length: int | None = None) -> list[list[int]]:
    """Token ids of each prompt (raw text or chat messages)."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of prompts, not one string")
    return [encode_text(tokenizer, render_prompt(tokenizer, p), chat=not isinstance(p, str),
                        max_length=max_length) for p in prompts]


def prepare_request(tokenizer: Any, prompts: Sequence[Prompt], n: int, params: SamplingParams, *,
                    stop: Sequence[str] = (), max_prompt_length: int | None = None,
                    ) -> tuple[SamplingParams, list[list[int]]]:
    """What every sampler does first: check ``n``, add the model's ``stop`` strings to ``params``,
    and tokenize the prompts (left-truncated to the call's or the sampler's prompt limit)."""
    if n < 1:
        raise ValueError(f"n must be >= 1 (got {n})")
    params = params.with_stops(stop)
    return params, encode_prompts(tokenizer, prompts, params.max_prompt_length or max_prompt_length)


def eos_token_ids(tokenizer: Any, generation_config: Any = None) -> frozenset[int]:
    """Every token that ends an answer: the tokenizer's EOS and the generation config's."""
    ids: set[int] = set()
    for source in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else source)
    if not ids:
        raise ValueError("the tokenizer and generation config define no EOS token")
    return frozenset(ids)


class Completion(NamedTuple):
    """One finished answer: kept tokens, their text, why it ended, its sampling log-probs."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    logprobs: list[float] | None = None


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def finish_completion(tokenizer: Any, token_ids: Sequence[int], *, eos_ids: frozenset[int],
                      stops: Sequence[str] = (), logprobs: Sequence[float] | None = None) -> Completion:
    """Cut raw generated tokens at the first EOS (kept) or stop string (its last token kept).

    Generated tokens after the end (a backend's padding, or tokens a batched ``generate``
    produced for rows that had finished) are dropped. Without EOS or stop string the
    answer ran out of tokens: finish reason ``"length"``.
    """
    ids = [int(t) for t in token_ids]
    end = next((i + 1 for i, t in enumerate(ids) if t in eos_ids), None)
    reason = "length"
    if end is not None:
        ids, reason = ids[:end], "stop"
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cut = find_stop(text, stops) if stops else -1
    if cut >= 0:
        # The shortest prefix whose text holds a stop string: decoded text only grows with
        # more tokens, so bisect on "a stop string is in decode(ids[:k])".
        low, high = 1, len(ids)
        while low < high:
            mid = (low + high) // 2
            if find_stop(tokenizer.decode(ids[:mid], skip_special_tokens=True), stops) >= 0:
                high = mid
            else:
                low = mid + 1
        ids, reason = ids[:low], "stop"
        text = tokenizer.decode(ids, skip_special_tokens=True)
        text = text[:find_stop(text, stops)]
    kept = None if logprobs is None else [float(x) for x in logprobs[:len(ids)]]
    return Completion(ids, text, reason, kept)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids [B, L] left-padded with ``pad_id`` and their mask [B, L]."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, L]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, L]
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.as_tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


def right_pad(rows: Sequence[Sequence[float]], pad: float, dtype: torch.dtype) -> tuple[torch.Tensor,
                                                                                      torch.Tensor]:
    """Values [B, L] right-padded with ``pad`` and their mask [B, L]."""
    width = max((len(r) for r in rows), default=0)
    values = torch.full((len(rows), width), pad, dtype=dtype)  # [B, L]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, L]
    for i, row in enumerate(rows):
        if row:
            values[i, :len(row)] = torch.as_tensor(row, dtype=dtype)
            mask[i, :len(row)] = 1
    return values, mask


def build_rollouts(prompt_ids: Sequence[Sequence[int]], completions: Sequence[Completion], n: int,
                   pad_id: int, **extra: Any) -> Rollouts:
    """Pad per-prompt ids and prompt-major completions (``len(prompt_ids) * n``) into Rollouts."""
    if len(completions) != len(prompt_ids) * n:
        raise ValueError(f"expected {len(prompt_ids)} prompts x {n} completions, got {len(completions)}")
    repeated = [ids for ids in prompt_ids for _ in range(n)]
    prompt_tensor, prompt_mask = left_pad(repeated, pad_id)  # [N, P]
    completion_ids, completion_mask = right_pad([c.token_ids for c in completions], pad_id,
                                                torch.long)  # [N, C]
    logprobs = None
    sampled = [c.logprobs for c in completions if c.logprobs is not None]
    if completions and len(sampled) == len(completions):
        logprobs, _ = right_pad(sampled, 0.0, torch.float32)  # [N, C]
    return Rollouts(
        prompt_ids=prompt_tensor,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        texts=[c.text for c in completions],
        finish_reasons=[c.finish_reason for c in completions],
        prompt_index=torch.arange(len(prompt_ids)).repeat_interleave(n),
        logprobs=logprobs,
        extra=dict(extra),
    )
