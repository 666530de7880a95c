"""The LM head helpers: a forward that keeps no logits."""

from __future__ import annotations

import torch

from dynalign.lm_head import NO_LOGITS, output_head


def rows_multiplied(head: torch.nn.Module) -> tuple[list[int], object]:
    """Rows the head's own forward multiplies, call by call (a hook to remove)."""
    seen: list[int] = []
    hook = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0][..., 0].numel()))
    return seen, hook


@torch.no_grad()
def test_no_logits_extends_the_cache_as_a_full_forward_and_runs_no_head_row(tiny_lm):
    from transformers import DynamicCache

    ids = torch.tensor([[5, 9, 13, 2, 7], [3, 3, 8, 1, 4]])  # [2, 5]
    full, empty = DynamicCache(), DynamicCache()
    reference = tiny_lm(input_ids=ids, past_key_values=full, use_cache=True, logits_to_keep=1).logits
    seen, hook = rows_multiplied(output_head(tiny_lm))
    try:
        out = tiny_lm(input_ids=ids, past_key_values=empty, use_cache=True, logits_to_keep=NO_LOGITS).logits
    finally:
        hook.remove()
    assert out.shape == (2, 0, reference.shape[-1])
    assert seen == [0]
    for a, b in zip(full.layers, empty.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    # the cache continues as one that ran the head
    nxt = torch.tensor([[11], [6]])
    after_full = tiny_lm(input_ids=nxt, past_key_values=full, use_cache=True).logits
    after_empty = tiny_lm(input_ids=nxt, past_key_values=empty, use_cache=True).logits
    assert torch.equal(after_full, after_empty)
