"""Next-token log-probs of a batch of token sequences that reuse the KV cache of shared prefixes.

A judge asks many next-token questions whose texts share long prefixes: every judge prompt
of a step starts with the same rubric, and in logprob mode each candidate's prompt is read
again for every aspect slot, each time a few tokens longer. :class:`PrefixCache` keeps one
batched KV cache: row i holds the tokens of the i-th text of the last query. A query of N
token sequences is answered by ONE batched forward over the tokens no cache holds yet,
with logits at the last ``last`` positions of each row only. Its past comes either

* from the previous query (the same N rows, each a few tokens longer: the judge's next
  aspect slot), by cropping the cache, or
* from the prefix all N sequences share (the rubric, and the user prompt when the rows
  are one group's answers), encoded once with batch 1 and copied under every row.

Layout: rows are LEFT-padded so that they all end at the last column, and every row's
tokens are contiguous (pads precede them all). Then the distance between two tokens of a
row is the same as in a pass over that row alone, so a sliding-window layer's mask (which
counts columns) keeps the same tokens; positions are passed explicitly, so RoPE sees the
same positions too. A row that needs fewer new tokens than another re-reads the last
tokens of its cached prefix instead of padding the new block, which would put pads between
its tokens. The caches hold every token of every layer (no sliding-window layers, which
would drop tokens a cut needs); the model's mask still applies the window.

The texts are tokenized whole, as without the cache, so the model sees the same tokens at
the same positions; only the order of the floating-point work changes (log-probs agree to
~1e-5 in float32).

:class:`SharedPrefix` does the same for ``generate`` (a judge that writes its verdict): the
prefix every prompt of a call shares is read once with batch 1 and copied, by the same layout
rules, under each batch of prompts as :func:`~dynalign.rollout.encoding.left_pad` lays them out,
so that ``generate`` only prefills the rest of each prompt and then decodes as usual.
"""

from __future__ import annotations

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


def shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every row shares."""
    shared = min((len(r) for r in rows), default=0)
    for row in rows[1:]:
        shared = common_prefix_length(rows[0][:shared], row)
    return shared


def generation_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens of the rows of a ``generate`` call to read once: the prefix they
    all share, short of the shortest row's last token (``generate`` prefills >= 1 token of each
    row); 0 for a single row, which reads its prefix once either way."""
    if len(rows) < 2:
        return 0
    return max(0, min(shared_prefix_length(rows), min(len(r) for r in rows) - 1))


@dataclass(frozen=True)
class Plan:
    """How a batch is read: ``keep[i]`` tokens of row i come from a cache, the rest is new.

    Every row's new tokens end at the same column, so the new block is ``new`` columns wide
    and each row's kept tokens end where it starts (``max(keep)`` columns of past at most).
    """

    keep: tuple[int, ...]  # [B] tokens of each row taken from the cache
    new: int  # width of the new block: the most new tokens of a row

    @property
    def cost(self) -> int:
        return len(self.keep) * self.new  # token positions the batched forward runs


def plan_rows(lengths: Sequence[int], reusable: Sequence[int]) -> Plan:
    """Row i has ``lengths[i]`` tokens, of which a cache holds the first ``reusable[i]``.

    Each row keeps as many cached tokens as it can while the new blocks stay one width:
    a row with fewer new tokens than the widest re-reads the end of its cached part.
    """
    new = max(n - r for n, r in zip(lengths, reusable, strict=True))
    return Plan(tuple(max(0, n - new) for n in lengths), new)


def past_index(sources: Sequence[int], held: Sequence[int], width: int, keep: Sequence[int],
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each column of a new left-padded past comes from in a source cache.

    The source cache is ``width`` columns wide, its row j holds ``held[j]`` tokens ending at
    its last column. Row i of the new past takes the first ``keep[i]`` tokens of source row
    ``sources[i]`` and ends them at column ``max(keep)``. Returns the source column [B, P] of
    each new column (0 where padding) and the padding mask [B, P] (1: a token).
    """
    past = max(keep, default=0)
    cols = torch.arange(past)  # [P]
    keep_t = torch.as_tensor(list(keep))[:, None]  # [B, 1]
    start = torch.as_tensor([width - held[s] for s in sources])[:, None]  # [B, 1] source column of token 0
    mask = cols[None] >= past - keep_t  # [B, P]
    index = torch.where(mask, start + cols[None] - (past - keep_t), 0)  # [B, P]
    return index, mask.long()


def gather_cache(cache: Any, sources: Sequence[int], index: torch.Tensor) -> Any:
    """A new cache whose row i, column c is ``cache``'s row ``sources[i]``, column ``index[i, c]``."""
    from transformers import DynamicCache

    rows = torch.as_tensor(list(sources))
    layers = []
    for layer in cache.layers:
        idx = index.to(layer.keys.device)[:, None, :, None]  # [B, 1, P, 1]
        picked = [t[rows.to(t.device)] for t in (layer.keys, layer.values)]  # [B, H, W, D] each
        layers.append(tuple(t.gather(2, idx.expand(-1, t.shape[1], -1, t.shape[3])) for t in picked))
    return DynamicCache(layers)


class PrefixCache:
    """One batched KV cache of the rows last read by ``model`` (callers hold no grad and any
    ZeRO-3 gather: see :meth:`dynalign.rollout.hf_sampler.HFSampler.reuse_prefixes`)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self._rows: list[list[int]] = []  # the tokens of each row of the cache, all read
        self._cache: Any = None  # DynamicCache [B, H, W, D]: row i's tokens end at column W
        self._mask = torch.zeros(0, 0, dtype=torch.long)  # [B, W] 1 where a token
        self.tokens_read = 0  # token positions run through the model (the cost, pads included)
        self.tokens_asked = 0  # tokens of the queries (the cost without any cache)
        self.passes = 0  # forward passes run

    def logprobs(self, queries: Sequence[Sequence[int]], last: int = 1) -> torch.Tensor:
        """[N, last, V] float32 log-softmax after each of the last ``last`` tokens of each row
        (on the model's device): ``[:, -1]`` is the next-token distribution after the row."""
        rows = [list(r) for r in queries]
        if not rows or min(len(r) for r in rows) < last:
            raise ValueError(f"a query needs at least {last} token(s) in every row")
        self.tokens_asked += sum(len(r) for r in rows)
        # every read position is run, so at most len - last tokens of a row come from a cache
        continued = self._continue_plan(rows, last)
        shared = min(shared_prefix_length(rows), min(len(r) for r in rows) - last)
        fresh = plan_rows([len(r) for r in rows], [shared] * len(rows))
        if continued is not None and continued.cost <= shared + fresh.cost:
            self._reuse_rows(continued)
            return self._read(rows, continued, last)
        self._encode_shared(rows[0][:shared], len(rows), fresh)
        return self._read(rows, fresh, last)

    def _continue_plan(self, rows: list[list[int]], last: int) -> Plan | None:
        """The plan that continues the cached rows (the same rows, read a little further)."""
        if self._cache is None or len(rows) != len(self._rows):
            return None
        reusable = [min(common_prefix_length(old, new), len(new) - last)
                    for old, new in zip(self._rows, rows, strict=True)]
        return plan_rows([len(r) for r in rows], reusable)

    def _reuse_rows(self, plan: Plan) -> None:
        """Turn the cache into the past of ``plan``: a crop when every row ends as many tokens
        early, else a copy that shifts each row to end at the new past's last column."""
        width = self._mask.shape[1]
        dropped = {len(old) - k for old, k in zip(self._rows, plan.keep, strict=True) if k > 0}
        if len(dropped) <= 1:  # the kept tokens of every row end at one column: cut there
            past = width - (dropped.pop() if dropped else width)
            if past < width:
                self._cache.crop(past - width)  # a negative argument removes that many tokens
            cols = torch.arange(past)[None]  # [1, P]
            self._mask = self._mask[:, :past] * (cols >= past - torch.as_tensor(plan.keep)[:, None])  # [B, P]
            return
        sources = range(len(self._rows))
        index, self._mask = past_index(sources, [len(r) for r in self._rows], width, plan.keep)
        self._cache = gather_cache(self._cache, sources, index)

    def _encode_shared(self, shared: list[int], batch: int, plan: Plan) -> None:
        """Read the prefix every row shares once, and copy it under each row as ``plan`` keeps it."""
        from transformers import DynamicCache

        cache = DynamicCache()
        if shared:
            self._forward(torch.tensor([shared]), torch.ones(1, len(shared), dtype=torch.long),
                          torch.arange(len(shared))[None], cache, last=1)
        sources = [0] * batch
        index, self._mask = past_index(sources, [len(shared)], len(shared), plan.keep)
        self._cache = gather_cache(cache, sources, index) if shared else DynamicCache()

    def _read(self, rows: list[list[int]], plan: Plan, last: int) -> torch.Tensor:
        """Run each row's new tokens (right-aligned in the new block) on the prepared past."""
        new = [r[k:] for r, k in zip(rows, plan.keep, strict=True)]
        ids = torch.full((len(rows), plan.new), 0, dtype=torch.long)  # [B, M]
        positions = torch.zeros((len(rows), plan.new), dtype=torch.long)  # [B, M]
        mask = torch.zeros((len(rows), plan.new), dtype=torch.long)  # [B, M]
        for i, (tokens, k) in enumerate(zip(new, plan.keep, strict=True)):
            # only a row with nothing kept is shorter than the block: its pads precede it all
            ids[i, plan.new - len(tokens):] = torch.as_tensor(tokens)
            positions[i, plan.new - len(tokens):] = torch.arange(k, k + len(tokens))
            mask[i, plan.new - len(tokens):] = 1
        self._mask = torch.cat([self._mask, mask], 1)  # [B, P + M]
        logprobs = self._forward(ids, self._mask, positions, self._cache, last)
        self._rows = rows
        return logprobs

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any,
                 last: int) -> torch.Tensor:
        self.tokens_read += ids.numel()
        self.passes += 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=positions.to(self.device), past_key_values=cache,
                            use_cache=True, logits_to_keep=last).logits  # [B, last, V]
        return torch.log_softmax(logits.float(), -1)  # [B, last, V]


class SharedPrefix:
    """The prefix every row of a ``generate`` call shares, read once (batch 1, positions 0..S-1).

    :meth:`past` copies its KV cache under a batch of those rows, left-padded to one width as
    :func:`~dynalign.rollout.encoding.left_pad` pads them: a row keeps as much of the prefix as
    ends where its uncached tokens begin (:func:`plan_rows`; the longest row keeps all ``S``),
    pads masked. Given that past with the same ids and mask, transformers' ``generate`` runs
    only the last ``width - S`` columns (it continues a cache whose length is shorter than the
    mask), derives the same positions from the mask, and decodes as from scratch. Callers hold
    no grad and any ZeRO-3 gather.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, tokens: Sequence[int]) -> None:
        from transformers import DynamicCache

        self.length = len(tokens)
        self.cache = DynamicCache()  # [1, H, S, D] per layer, every layer full
        model(input_ids=torch.tensor([list(tokens)], device=device),
              attention_mask=torch.ones(1, self.length, dtype=torch.long, device=device),
              position_ids=torch.arange(self.length, device=device)[None], past_key_values=self.cache,
              use_cache=True, logits_to_keep=1)

    def past(self, rows: Sequence[Sequence[int]]) -> Any:
        """DynamicCache [B, H, S, D]: the prefix under each of ``rows`` (each begins with it)."""
        plan = plan_rows([len(r) for r in rows], [self.length] * len(rows))
        sources = [0] * len(rows)
        index, _ = past_index(sources, [self.length], self.length, plan.keep)  # [B, S]
        return gather_cache(self.cache, sources, index)
