"""Next-token log-probs that reuse the KV cache of the token prefixes a model has already read.

A judge asks many next-token questions whose texts share long prefixes: every judge prompt
of a step starts with the same rubric, and in logprob mode each candidate's prompt is read
again for every aspect slot (and once more after a forced space), each time a few tokens
longer. :class:`PrefixCache` keeps the KV caches of the last ``slots`` token sequences it
read. A query continues the cached sequence sharing the longest token prefix with it (in
place when it extends that sequence, from a cut copy otherwise) and runs the model on the
new tokens only, reading the logits of the last position alone.

The texts are tokenized whole, as without the cache, so the model sees the same tokens at
the same positions; only the order of the floating-point work changes (log-probs agree to
~1e-5 in float32). Each sequence has its own cache and batch row, so there is no padding,
and sliding-window attention sees exactly the tokens it would see in one pass: the caches
are built without sliding-window layers (which would drop the tokens a cut copy needs), and
the model's mask still applies the window.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class _Slot:
    tokens: list[int]  # the sequence the cache holds, all of it read
    cache: Any  # transformers DynamicCache of ``tokens``
    last: torch.Tensor  # [V] float32 log-softmax at the position after ``tokens`` (CPU)
    used: int  # last query that touched it (least recently used goes first)


class PrefixCache:
    """KV caches of up to ``slots`` token sequences read by ``model`` (callers hold no grad and
    any ZeRO-3 gather: see :meth:`dynalign.rollout.hf_sampler.HFSampler.reuse_prefixes`)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, slots: int = 8) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1 (got {slots})")
        self.model = model
        self.device = device
        self.slots = slots
        self._slots: list[_Slot] = []
        self._clock = 0
        self.tokens_read = 0  # tokens run through the model (the cost)
        self.tokens_asked = 0  # tokens of the queries (the cost without the cache)

    def logprobs(self, ids: Sequence[int]) -> torch.Tensor:
        """[V] float32 log-softmax of the next token after ``ids`` (CPU)."""
        ids = list(ids)
        if not ids:
            raise ValueError("a query needs at least one token")
        self._clock += 1
        self.tokens_asked += len(ids)
        slot, shared = self._closest(ids)
        if slot is not None and shared == len(ids) == len(slot.tokens):
            slot.used = self._clock
            return slot.last
        keep = min(shared, len(ids) - 1)  # the last token is always run: its logits are the answer
        if slot is not None and keep == len(slot.tokens):
            cache = slot.cache  # ``ids`` extends the slot's sequence: continue it in place
            self._slots.remove(slot)
        elif slot is not None and keep > 0:
            cache = copy.deepcopy(slot.cache)
            cache.crop(keep - len(slot.tokens))  # a negative argument removes that many tokens
        else:
            cache, keep = _empty_cache(), 0
        last = self._read(ids[keep:], cache, keep)
        self._slots.append(_Slot(ids, cache, last, self._clock))
        if len(self._slots) > self.slots:
            self._slots.remove(min(self._slots, key=lambda s: s.used))
        return last

    def _closest(self, ids: list[int]) -> tuple[_Slot | None, int]:
        best, shared = None, 0
        for slot in self._slots:
            n = common_prefix_length(slot.tokens, ids)
            if n > shared or (n == shared and best is not None and slot.used > best.used):
                best, shared = slot, n
        return best, shared

    def _read(self, new: list[int], cache: Any, past: int) -> torch.Tensor:
        self.tokens_read += len(new)
        input_ids = torch.tensor([new], device=self.device)  # [1, T]
        positions = torch.arange(past, past + len(new), device=self.device)[None]  # [1, T]
        logits = self.model(input_ids=input_ids, position_ids=positions, past_key_values=cache,
                            use_cache=True, logits_to_keep=1).logits  # [1, 1, V]
        return torch.log_softmax(logits[0, -1].float(), -1).cpu()  # [V]


def _empty_cache() -> Any:
    """A cache whose layers all keep every token (no sliding-window layers: see the module doc)."""
    from transformers import DynamicCache

    return DynamicCache()
