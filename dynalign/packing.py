"""Training forwards that read each group's prompt once.

A GRPO batch holds G answers per prompt, each in a row of its own: the prompt, left-padded,
then the answer, right-padded (:class:`~dynalign.engine.batch.TrainBatch`). The prompt's hidden
states do not depend on the answer that follows it (attention is causal), so that layout
computes each prompt G times, and every pad once. :func:`pack_groups` lays the rows out as one
row per prompt instead: the prompt's tokens, then its answers' tokens one after the other, then
padding to the longest such row. :func:`packed_attention_mask` lets each answer attend to its
prompt and causally to itself, never to a sibling; positions continue the prompt's in every answer, so
each answer token sees exactly what it saw in its own row. The logits that predict the answers'
tokens are read back into the padded ``[N, C]`` layout (``PackedBatch.source``: the kept row that
predicts each answer token; one kept row predicts the first token of every answer of its row;
:func:`logits_at` runs the LM head on those rows only):
losses and statistics are those of the padded layout, up to the float rounding of differently
shaped matmuls.

A packed row holds as many answers as fit in ``max_tokens`` (at least one): the attention of a
packed row is computed densely under the mask, so its cost grows with the square of its length.

The mask replaces the model's own, which :func:`packing_for` checks the model takes: sdpa or
eager attention, and sliding windows only as per-layer-type masks (Gemma 3's ``layer_types``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dynalign.lm_head import output_head

PROMPT, PADDING = 0, -1  # segment ids; answers are 1, 2, ... within their packed row
MASKABLE_ATTENTION = ("sdpa", "eager")  # attention implementations that take any 4D mask
LAYER_TYPES = ("full_attention", "sliding_attention")  # per-layer masks this module can build


@dataclass(frozen=True)
class PackedBatch:
    """``N`` padded rows of prompt + answer, as ``R`` packed rows of ``L`` tokens."""

    input_ids: Tensor  # [R, L] a prompt's tokens, then its answers' tokens, then padding
    position_ids: Tensor  # [R, L] 0.. over the prompt; each answer continues its prompt's positions
    segments: Tensor  # [R, L] PROMPT, k >= 1 for the row's k-th answer, PADDING
    kept: Tensor  # [K] columns whose logits are read, ascending (the model's ``logits_to_keep``)
    source: Tensor  # [N, C] index into the [R * K] kept logits of the one predicting each answer token

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]


@dataclass(frozen=True)
class Packing:
    """How to pack for one model (see :func:`packing_for`)."""

    max_tokens: int  # longest packed row, unless one prompt and answer alone are longer
    additive_dtype: torch.dtype | None = None  # eager attention adds a float mask; sdpa takes booleans
    sliding_window: int | None = None  # the window of the model's sliding layers; None: none


def packing_for(config: Any, dtype: torch.dtype, max_tokens: int) -> Packing | None:
    """How to pack for a transformers model with this config, or None if its attention cannot
    take a packed batch's mask: an implementation without arbitrary masks (flash attention), or
    a sliding window that the model applies outside per-layer-type masks (Mistral-style)."""
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in MASKABLE_ATTENTION:
        return None
    window = getattr(config, "sliding_window", None)
    types = set(getattr(config, "layer_types", None) or ())
    if not types <= set(LAYER_TYPES):
        return None
    if "sliding_attention" not in types:
        if window is not None and not types and getattr(config, "use_sliding_window", True):
            return None  # a window applied to every layer, which a 4D mask would bypass
        window = None
    return Packing(max_tokens=max_tokens, additive_dtype=dtype if implementation == "eager" else None,
                   sliding_window=window)


def _prompt_starts(prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
    """[N] True where a row's prompt differs from the row before it (a new packed group)."""
    ids_differ = (prompt_ids[1:] != prompt_ids[:-1]) & (prompt_mask[1:] | prompt_mask[:-1])  # [N-1, P]
    differ = ids_differ.any(1) | (prompt_mask[1:] != prompt_mask[:-1]).any(1)  # [N-1]
    return torch.cat([differ.new_ones(1), differ])  # [N]


def pack_groups(input_ids: Tensor, attention_mask: Tensor, completion_length: int,
                max_tokens: int) -> PackedBatch:
    """Pack consecutive rows that share a prompt into rows of at most ``max_tokens`` tokens.

    ``input_ids``/``attention_mask`` [N, P + C]: left-padded prompts, then right-padded answers
    (the last ``completion_length`` = C columns). A packed row is started by a row whose prompt
    differs from the previous row's, or whose answer would take the row past ``max_tokens``
    (its prompt is then repeated). The padded layout's contract carries over: answer positions
    past an answer's end get meaningless values (``source`` points at its prompt's last token).
    """
    n, length = input_ids.shape
    p = length - completion_length
    if not 0 < completion_length < length:
        raise ValueError(f"completion_length must be in [1, {length - 1}] for {length} input columns "
                         f"(got {completion_length})")
    mask = attention_mask.bool()
    prompt_mask, answer_mask = mask[:, :p], mask[:, p:]  # [N, P], [N, C]
    if (prompt_mask[:, 1:] < prompt_mask[:, :-1]).any() or (answer_mask[:, 1:] > answer_mask[:, :-1]).any():
        raise ValueError("pack_groups needs left-padded prompts and right-padded answers")
    prompt_lengths, answer_lengths = prompt_mask.sum(1).tolist(), answer_mask.sum(1).tolist()
    if min(prompt_lengths) < 1:
        raise ValueError("pack_groups needs a prompt of at least one token in every row")
    starts = _prompt_starts(input_ids[:, :p], prompt_mask).tolist()

    rows: list[list[int]] = []  # the padded rows each packed row holds
    used = 0
    for i in range(n):
        size = answer_lengths[i]
        if starts[i] or used + size > max_tokens:
            rows.append([])
            used = prompt_lengths[i]
        rows[-1].append(i)
        used += size
    width = max(prompt_lengths[r[0]] + sum(answer_lengths[i] for i in r) for r in rows)

    ids = input_ids.new_zeros(len(rows), width)  # [R, L] token 0 under padding: a valid id
    positions = torch.zeros(len(rows), width, dtype=torch.long, device=input_ids.device)  # [R, L]
    segments = torch.full((len(rows), width), PADDING, dtype=torch.long, device=input_ids.device)  # [R, L]
    columns = torch.empty(n, completion_length, dtype=torch.long)  # [N, C] predicting column, per row
    packed_row = torch.empty(n, dtype=torch.long)  # [N]
    for r, members in enumerate(rows):
        plen = prompt_lengths[members[0]]
        ids[r, :plen] = input_ids[members[0], p - plen:p]
        positions[r, :plen] = torch.arange(plen)
        segments[r, :plen] = PROMPT
        cursor = plen
        for k, i in enumerate(members, start=1):
            size = answer_lengths[i]
            ids[r, cursor:cursor + size] = input_ids[i, p:p + size]
            positions[r, cursor:cursor + size] = torch.arange(plen, plen + size)
            segments[r, cursor:cursor + size] = k
            # token 0 is predicted by the prompt's last token, token j > 0 by the answer's token j - 1
            columns[i] = plen - 1
            if size > 1:
                columns[i, 1:size] = torch.arange(cursor, cursor + size - 1)
            packed_row[i] = r
            cursor += size
    kept = torch.unique(columns)  # [K] ascending
    source = packed_row[:, None] * len(kept) + torch.searchsorted(kept, columns)  # [N, C]
    device = input_ids.device
    return PackedBatch(input_ids=ids, position_ids=positions, segments=segments, kept=kept.to(device),
                       source=source.to(device))


def packed_attention_mask(packed: PackedBatch, packing: Packing) -> Tensor | dict[str, Tensor]:
    """The packed rows' attention masks [R, 1, L, L], as the model of ``packing`` takes them.

    A query sees keys at or before it: in its prompt, or in its own answer. A prompt token sees
    its prompt; padding sees padding (never empty, so no softmax over nothing). With sliding
    layers, a dict per layer type, the sliding one also within the window by position.
    """
    seg = packed.segments
    width = seg.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=seg.device).tril()  # [L, L]
    query, key = seg[:, :, None], seg[:, None, :]  # [R, L, 1], [R, 1, L]
    allowed = causal & (((key == PROMPT) & (query != PADDING)) | (key == query))  # [R, L, L]
    masks = {"full_attention": allowed}
    if packing.sliding_window is not None:
        pos = packed.position_ids
        near = (pos[:, :, None] - pos[:, None, :]) < packing.sliding_window  # [R, L, L]
        masks["sliding_attention"] = allowed & near
    out = {name: _as_model_mask(m[:, None], packing) for name, m in masks.items()}  # [R, 1, L, L] each
    return out if packing.sliding_window is not None else out["full_attention"]


def _as_model_mask(allowed: Tensor, packing: Packing) -> Tensor:
    if packing.additive_dtype is None:
        return allowed
    blocked = torch.finfo(packing.additive_dtype).min
    return torch.zeros(allowed.shape, dtype=packing.additive_dtype, device=allowed.device).masked_fill_(
        ~allowed, blocked)


def packed_logits(model: Any, input_ids: Tensor, attention_mask: Tensor, completion_length: int,
                  packing: Packing) -> tuple[Tensor, Tensor]:
    """One forward of a padded batch's packed rows: the logits of the positions that predict an
    answer token (:func:`logits_at`) and ``source`` [N, C], the row of those logits that predicts
    each answer token of the padded layout."""
    packed = pack_groups(input_ids, attention_mask, completion_length, packing.max_tokens)
    return logits_at(model, packed.source, input_ids=packed.input_ids,
                     attention_mask=packed_attention_mask(packed, packing),
                     position_ids=packed.position_ids, logits_to_keep=packed.kept)


def logits_at(model: Any, source: Tensor, **inputs: Any) -> tuple[Tensor, Tensor]:
    """``model(**inputs)``'s logits at the rows ``source`` reads, and where each token reads them.

    ``inputs`` keep [R, K] positions (``logits_to_keep``); ``source`` [N, C] indexes their
    flattened [R * K] rows. A forward pre-hook on the model's LM head hands it the distinct rows
    that ``source`` reads, so the head (the costliest matmul of a large vocabulary, and its
    [., V] output, the largest tensor of the update) runs on no position nobody reads: not on
    the union of the packed rows' columns, not on an answer's padding. Returns the logits
    [1, U, V] and ``source`` renumbered into them; without a head to hook (a model that computes
    its logits otherwise: the hook never runs), the [R, K, V] logits and ``source`` as given.
    """
    head = output_head(model)
    if head is None:
        return model(**inputs).logits, source
    rows, renumbered = torch.unique(source, return_inverse=True)  # [U] ascending, [N, C]
    calls = 0  # times the head ran

    def read_rows(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        nonlocal calls
        calls += 1
        hidden = args[0]  # [R, K, H]
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows.to(hidden.device))[None],
                *args[1:])  # [1, U, H]

    hook = head.register_forward_pre_hook(read_rows)
    try:
        logits = model(**inputs).logits
    finally:
        hook.remove()
    if not calls:  # the model computes its logits without calling its head module
        return logits, source
    if logits.shape[:-1] != (1, rows.numel()) or calls > 1:
        raise RuntimeError(f"the model's logits {tuple(logits.shape)} are not one call of its LM head on the "
                           f"{rows.numel()} rows read ({calls} calls)")
    return logits, renumbered
