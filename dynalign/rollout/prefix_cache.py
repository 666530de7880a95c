"""Next-token log-probs of a batch of token sequences that reuse the KV cache of shared prefixes.

A judge asks many next-token questions whose texts share long prefixes: every judge prompt
of a step starts with the same rubric, and in logprob mode each candidate's prompt is read
again for every aspect slot, each time a few tokens longer. :class:`PrefixCache` keeps one
batched KV cache: row i holds the tokens of the i-th text of the last query. A query of N
token sequences is answered by ONE batched forward over the tokens no cache holds yet,
with logits at the last ``last`` positions of each row only. Its past comes either

* from the previous query (the same N rows, each a few tokens longer: the judge's next
  aspect slot), by cropping the cache, or
* from the prefixes the N sequences share (:func:`read_prefixes`): the one all of them share
  (the rubric), encoded once with batch 1, then the longer one each run of consecutive rows
  shares (one group's user prompt: its judge prompts carry one nonce), encoded in one batched
  pass on copies of the first; each row's past is a copy of its run's. A plan picks this or
  the shared prefix alone, whichever runs fewer token positions (:func:`plan_prefixes`).

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

:func:`read_prefixes` does the same for ``generate`` (a judge that writes its verdict): the
prefixes of a call's prompts are read once each and copied, by the same layout rules, under each
batch of prompts as :func:`~dynalign.rollout.encoding.left_pad` lays them out, so that
``generate`` only prefills the rest of each prompt (at least its last token) and then decodes as
usual; the k samples of one judge prompt are one run, so the whole prompt is read once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dynalign.lm_head import NO_LOGITS


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


def group_rows(rows: Sequence[Sequence[int]], shared: int, caps: Sequence[int]) -> list[tuple[range, int]]:
    """Runs of consecutive rows, each with how many leading tokens its rows share (at most each
    row's ``caps[i]``), ``shared`` being what every row shares: ``[(rows, length)]``.

    The judge prompts of one group (same user prompt, same nonce) and the samples of one prompt
    follow each other. A run of k rows sharing L tokens reads L - ``shared`` of them once instead
    of k times; a row joins the run before it when that makes the run save more, else it starts
    a run of its own.
    """
    runs: list[tuple[range, int]] = []
    start, length = 0, caps[0] if rows else 0
    for i in range(1, len(rows) + 1):
        if i < len(rows):
            joined = min(common_prefix_length(rows[start][:length], rows[i]), caps[i])
            size = i - start  # rows in the run so far
            if size * (joined - shared) > (size - 1) * (length - shared):
                length = joined
                continue
        runs.append((range(start, i), length))
        if i < len(rows):
            start, length = i, caps[i]
    return runs


@dataclass(frozen=True)
class PrefixPlan:
    """Which prefixes of a batch of rows to read once: the ``shared`` tokens every row shares
    (batch 1), then, in one batched pass on copies of it, the longer prefix each run of rows
    shares (``runs``: row indices and length, 2 rows or more each). Row i then continues from
    its first ``reusable[i]`` tokens."""

    shared: int
    runs: tuple[tuple[range, int], ...]
    reusable: tuple[int, ...]  # [N]

    @property
    def prefix_rows(self) -> list[int]:
        """Tokens held by each row of the prefix cache: one per run, then one holding the shared
        tokens alone when some row belongs to no run (none needed when nothing is shared)."""
        if not self.runs:
            return [self.shared]
        held = [length for _, length in self.runs]
        loners = len(self.reusable) - sum(len(rows) for rows, _ in self.runs)
        return held + [self.shared] if loners and self.shared else held

    @property
    def cost(self) -> int:
        """Token positions the prefix passes run."""
        if not self.runs:
            return self.shared
        held = self.prefix_rows
        return self.shared + plan_rows(held, [self.shared] * len(held)).cost


def plan_prefixes(rows: Sequence[Sequence[int]], caps: Sequence[int]) -> PrefixPlan:
    """The cheaper way to read ``rows`` from scratch: the shared prefix alone, or it and then each
    run's longer prefix (:func:`group_rows`), with at most ``caps[i]`` tokens of row i from them."""
    shared = min(shared_prefix_length(rows), min(caps, default=0))
    flat = PrefixPlan(shared, (), (shared,) * len(rows))
    runs = tuple((members, length) for members, length in group_rows(rows, shared, caps)
                 if len(members) > 1 and length > shared)
    if not runs:
        return flat
    reusable = [shared] * len(rows)
    for members, length in runs:
        for i in members:
            reusable[i] = length
    grouped = PrefixPlan(shared, runs, tuple(reusable))
    lengths = [len(r) for r in rows]
    costs = [p.cost + plan_rows(lengths, p.reusable).cost for p in (flat, grouped)]
    return grouped if costs[1] < costs[0] else flat


def new_block(rows: Sequence[Sequence[int]], plan: Plan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's tokens past ``plan.keep``, right-aligned in one block: ids, positions and mask,
    [B, plan.new] each (only a row with nothing kept is shorter than the block: pads precede it)."""
    ids = torch.zeros((len(rows), plan.new), dtype=torch.long)
    positions = torch.zeros((len(rows), plan.new), dtype=torch.long)
    mask = torch.zeros((len(rows), plan.new), dtype=torch.long)
    for i, (row, k) in enumerate(zip(rows, plan.keep, strict=True)):
        tokens = row[k:]
        ids[i, plan.new - len(tokens):] = torch.as_tensor(list(tokens), dtype=torch.long)
        positions[i, plan.new - len(tokens):] = torch.arange(k, k + len(tokens))
        mask[i, plan.new - len(tokens):] = 1
    return ids, positions, mask


# runs the model on ids, mask, positions, extending the cache it is given (what it returns is unused)
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], object]


@dataclass(frozen=True)
class Prefixes:
    """The KV cache of a :class:`PrefixPlan`'s prefixes for some of its rows: row r of ``cache``
    holds ``held[r]`` tokens ending at its last column ``width``; row i continues from cache row
    ``source[i]``, of which it may keep the first ``plan.reusable[i]`` tokens. ``shared`` is the
    batch-1 cache of the tokens every row shares, for the next batch of the same plan.

    Given a :meth:`past` with the batch's left-padded ids and mask, transformers' ``generate``
    runs only the columns the past does not hold (it continues a cache shorter than the mask),
    derives the same positions from the mask, and decodes as from scratch.
    """

    plan: PrefixPlan
    shared: Any  # DynamicCache [1, H, plan.shared, D]
    cache: Any  # DynamicCache [R, H, width, D], every layer full
    width: int
    held: tuple[int, ...]  # [R]
    source: dict[int, int]  # row index -> cache row

    def past(self, rows: Sequence[int], keep: Plan) -> tuple[Any, torch.Tensor]:
        """The past of the batch rows ``rows`` (indices) as ``keep`` keeps them: DynamicCache
        [B, H, P, D] with each row's kept tokens ending at its last column, and its mask [B, P]."""
        from transformers import DynamicCache

        sources = [self.source[i] for i in rows]
        index, mask = past_index(sources, self.held, self.width, keep.keep)
        return (gather_cache(self.cache, sources, index) if self.width else DynamicCache()), mask

    def keep(self, rows: Sequence[Sequence[int]], indices: Sequence[int]) -> Plan:
        """How the batch ``rows`` (the rows ``indices`` of the plan) keeps these prefixes."""
        return plan_rows([len(r) for r in rows], [self.plan.reusable[i] for i in indices])


def read_prefixes(forward: Forward, rows: Sequence[Sequence[int]], plan: PrefixPlan,
                  indices: Sequence[int] | None = None, shared: Any = None) -> Prefixes:
    """Run ``plan``'s prefix passes with ``forward`` (which extends the cache it is given) for the
    rows ``indices`` of ``rows`` (default: all): the tokens every row shares with batch 1 (unless
    ``shared`` holds them: a :attr:`Prefixes.shared` of the same plan), then the own tokens of
    every run with a row among them, in one batched pass on copies of it, laid out as
    :class:`PrefixCache` lays a query out. A batch at a time keeps the cache to its rows."""
    from transformers import DynamicCache

    wanted = range(len(rows)) if indices is None else indices
    tokens = list(rows[0][:plan.shared]) if rows else []
    if shared is None:
        shared = DynamicCache()
        if tokens:
            forward(torch.tensor([tokens]), torch.ones(1, len(tokens), dtype=torch.long),
                    torch.arange(len(tokens))[None], shared)
    runs = [(members, length) for members, length in plan.runs if any(i in members for i in wanted)]
    if not runs:
        return Prefixes(plan, shared, shared, len(tokens), (len(tokens),), dict.fromkeys(wanted, 0))
    held = [length for _, length in runs]
    prefixes = [rows[members[0]][:length] for members, length in runs]
    source = dict.fromkeys(wanted, len(held))  # a row in no run: the row holding the shared tokens alone
    for r, (members, _) in enumerate(runs):
        source.update({i: r for i in members if i in source})
    if tokens and len(held) in source.values():
        held.append(len(tokens))
        prefixes.append(tokens)
    else:  # nothing shared: such a row keeps nothing, and any cache row serves
        source = {i: min(r, len(runs) - 1) for i, r in source.items()}
    keep = plan_rows(held, [len(tokens)] * len(held))
    index, past_mask = past_index([0] * len(held), [len(tokens)], len(tokens), keep.keep)
    past = gather_cache(shared, [0] * len(held), index) if tokens else DynamicCache()
    ids, positions, mask = new_block(prefixes, keep)
    forward(ids, torch.cat([past_mask, mask], 1), positions, past)
    return Prefixes(plan, shared, past, past_mask.shape[1] + keep.new, tuple(held), source)


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
        prefixes = plan_prefixes(rows, [len(r) - last for r in rows])
        fresh = plan_rows([len(r) for r in rows], prefixes.reusable)
        if continued is not None and continued.cost <= prefixes.cost + fresh.cost:
            self._reuse_rows(continued)
            return self._read(rows, continued, last)
        read = read_prefixes(self._prefill, rows, prefixes)
        self._cache, self._mask = read.past(range(len(rows)), fresh)
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

    def _read(self, rows: list[list[int]], plan: Plan, last: int) -> torch.Tensor:
        """Run each row's new tokens (right-aligned in the new block) on the prepared past."""
        ids, positions, mask = new_block(rows, plan)  # [B, M] each
        self._mask = torch.cat([self._mask, mask], 1)  # [B, P + M]
        logprobs = self._forward(ids, self._mask, positions, self._cache, last)
        self._rows = rows
        return logprobs

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> None:
        """Extend ``cache`` by ``ids`` (a :data:`Forward`), running no LM head."""
        self._run(ids, mask, positions, cache, NO_LOGITS)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any,
                 last: int) -> torch.Tensor:
        return torch.log_softmax(self._run(ids, mask, positions, cache, last).float(), -1)  # [B, last, V]

    def _run(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any,
             keep: int | torch.Tensor) -> torch.Tensor:
        self.tokens_read += ids.numel()
        self.passes += 1
        return self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                          position_ids=positions.to(self.device), past_key_values=cache,
                          use_cache=True, logits_to_keep=keep).logits  # [B, last, V]
