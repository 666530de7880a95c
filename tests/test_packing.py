"""Packed training forwards: each group's prompt read once, the same log-probs as padded rows."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig

from dynalign.grpo import completion_logprobs
from dynalign.packing import (
    PADDING,
    PROMPT,
    Packing,
    pack_groups,
    packed_attention_mask,
    packing_for,
)

# Packed vs padded log-probs of the tiny fp32 models: measured <= 1e-6 (differently shaped
# matmuls round differently); a wrong position, mask or source column is off by >= 1e-2.
LOGP_ATOL = 1e-5


def padded(prompts: list[list[int]], answers: list[list[int]], prompt_width: int,
           answer_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's layout: left-padded prompts, then right-padded answers (pad id 0)."""
    ids = torch.zeros(len(prompts), prompt_width + answer_width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        ids[row, prompt_width - len(prompt):prompt_width] = torch.tensor(prompt)
        ids[row, prompt_width:prompt_width + len(answer)] = torch.tensor(answer)
        mask[row, prompt_width - len(prompt):prompt_width + len(answer)] = 1
    return ids, mask


def grouped_batch(vocab: int, *, seed: int = 0, prompt_lengths=(9, 4, 6), group: int = 3,
                  answer_width: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups of ``group`` answers (lengths 1..answer_width, one full) to prompts of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    prompts, answers = [], []
    for length in prompt_lengths:
        prompt = torch.randint(3, vocab, (length,), generator=gen).tolist()
        for k in range(group):
            size = answer_width if k == 0 else int(torch.randint(1, answer_width + 1, (1,), generator=gen))
            prompts.append(prompt)
            answers.append(torch.randint(3, vocab, (size,), generator=gen).tolist())
    return padded(prompts, answers, max(prompt_lengths), answer_width)


# ------------------------------------------------------------------- the layout


def test_rows_that_share_a_prompt_become_one_packed_row():
    ids, mask = padded([[5, 6, 7], [5, 6, 7], [8, 9]], [[11, 12], [13], [14, 15]], 3, 2)
    packed = pack_groups(ids, mask, 2, max_tokens=100)
    assert packed.input_ids.tolist() == [[5, 6, 7, 11, 12, 13], [8, 9, 14, 15, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 3, 0, 0]]
    P, X = PROMPT, PADDING
    assert packed.segments.tolist() == [[P, P, P, 1, 1, 2], [P, P, 1, 1, X, X]]
    # logits of columns 1 (row 2's prompt end), 2 (prompts' end), 3 (token 11) are read
    assert packed.kept.tolist() == [1, 2, 3]
    # answer 11, 12 <- columns 2, 3 of row 0; 13 <- column 2 (a pad too); 14, 15 <- columns 1, 2 of row 1
    assert packed.source.tolist() == [[1, 2], [1, 1], [3, 4]]


def test_a_row_past_max_tokens_repeats_its_prompt():
    ids, mask = padded([[5, 6]] * 3, [[11, 12], [13, 14], [15]], 2, 2)
    packed = pack_groups(ids, mask, 2, max_tokens=6)  # prompt + two answers = 6 tokens
    assert packed.input_ids.tolist() == [[5, 6, 11, 12, 13, 14], [5, 6, 15, 0, 0, 0]]
    alone = pack_groups(ids, mask, 2, max_tokens=1)  # too small for anything: one answer per row
    assert alone.input_ids.tolist() == [[5, 6, 11, 12], [5, 6, 13, 14], [5, 6, 15, 0]]


def test_the_mask_shows_each_answer_its_prompt_and_itself_only():
    ids, mask = padded([[5, 6], [5, 6]], [[11, 12], [13]], 2, 2)
    packed = pack_groups(ids, mask, 2, max_tokens=100)  # [5, 6, 11, 12, 13]
    allowed = packed_attention_mask(packed, Packing(max_tokens=100))[0, 0].int().tolist()
    assert allowed == [[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [1, 1, 1, 0, 0],
                       [1, 1, 1, 1, 0],
                       [1, 1, 0, 0, 1]]  # 13 sees the prompt, not its sibling 11, 12
    windowed = packed_attention_mask(packed, Packing(max_tokens=100, sliding_window=2))
    assert windowed["sliding_attention"][0, 0].int().tolist() == [[1, 0, 0, 0, 0],
                                                                  [1, 1, 0, 0, 0],
                                                                  [0, 1, 1, 0, 0],
                                                                  [0, 0, 1, 1, 0],
                                                                  [0, 1, 0, 0, 1]]
    assert torch.equal(windowed["full_attention"][0, 0].int(), torch.tensor(allowed))
    additive = packed_attention_mask(packed, Packing(max_tokens=100, additive_dtype=torch.float32))
    assert torch.equal(additive[0, 0] == 0, torch.tensor(allowed).bool())
    assert additive[0, 0, 4, 2] == torch.finfo(torch.float32).min


def test_padding_sees_padding_so_no_row_of_the_mask_is_empty():
    ids, mask = padded([[5, 6, 7], [8]], [[11, 12], [13]], 3, 2)  # row 1 is 2 tokens, padded to 5
    allowed = packed_attention_mask(pack_groups(ids, mask, 2, max_tokens=100), Packing(max_tokens=100))
    assert torch.equal(allowed[1, 0, 2:, 2:], torch.ones(3, 3, dtype=torch.bool).tril())
    assert not allowed[1, 0, 2:, :2].any()
    assert allowed.any(-1).all()


def test_pack_groups_refuses_other_layouts():
    ids, mask = padded([[5, 6]], [[11, 12]], 3, 2)
    right_padded_prompt = mask.clone()
    right_padded_prompt[0, :3] = torch.tensor([1, 1, 0])
    with pytest.raises(ValueError, match="left-padded prompts"):
        pack_groups(ids, right_padded_prompt, 2, 100)
    gap = mask.clone()
    gap[0, 3] = 0
    with pytest.raises(ValueError, match="right-padded answers"):
        pack_groups(ids, gap, 2, 100)
    with pytest.raises(ValueError, match="completion_length"):
        pack_groups(ids, mask, 5, 100)


@pytest.mark.parametrize(("config", "implementation", "expected"), [
    (LlamaConfig(), "sdpa", Packing(max_tokens=64)),
    (LlamaConfig(), "eager", Packing(max_tokens=64, additive_dtype=torch.bfloat16)),
    (LlamaConfig(), "flash_attention_2", None),
    (MistralConfig(sliding_window=8), "sdpa", None),  # one window on every layer, outside the mask
    (MistralConfig(sliding_window=None), "sdpa", Packing(max_tokens=64)),
    (Gemma3TextConfig(sliding_window=8), "sdpa", Packing(max_tokens=64, sliding_window=8)),
])
def test_packing_follows_the_models_attention(config, implementation, expected):
    config._attn_implementation = implementation
    assert packing_for(config, torch.bfloat16, 64) == expected


# ----------------------------------------------------------- the same log-probs


def tiny_gemma3(sliding_window: int) -> torch.nn.Module:
    """A random 4-layer Gemma 3 text model, layers alternating sliding / full attention."""
    config = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              sliding_window=sliding_window, max_position_embeddings=128,
                              layer_types=["sliding_attention", "full_attention"] * 2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()


def assert_same_logprobs_and_gradients(model, ids, mask, completion_length, packing):
    answer = mask[:, -completion_length:].float()
    results = []
    for way in (None, packing):
        model.zero_grad()
        logp = completion_logprobs(model, ids, mask, completion_length, packing=way)
        (logp * answer).sum().backward()
        results.append((logp.detach() * answer, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (logp_padded, grads_padded), (logp_packed, grads_packed) = results
    torch.testing.assert_close(logp_packed, logp_padded, rtol=0, atol=LOGP_ATOL)
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    return logp_padded, logp_packed


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("max_tokens", [4096, 12])  # one row per prompt; prompts repeated
def test_tiny_llama_packed_equals_padded(tiny_model_path, implementation, max_tokens):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation=implementation)
    ids, mask = grouped_batch(model.config.vocab_size)
    packing = packing_for(model.config, model.dtype, max_tokens)
    assert packing is not None
    assert_same_logprobs_and_gradients(model, ids, mask, 7, packing)


def test_sliding_layers_see_their_window_in_packed_rows():
    model = tiny_gemma3(sliding_window=4)  # shorter than every row: the window matters
    ids, mask = grouped_batch(model.config.vocab_size)
    packing = packing_for(model.config, model.dtype, 4096)
    assert packing == Packing(max_tokens=4096, sliding_window=4)
    logp_padded, _ = assert_same_logprobs_and_gradients(model, ids, mask, 7, packing)
    unwindowed = completion_logprobs(model, ids, mask, 7, packing=replace(packing, sliding_window=None))
    assert (unwindowed.detach() * mask[:, -7:] - logp_padded).abs().max() > 1e-2  # the window is seen


def test_padding_rows_and_empty_answers_change_nothing(tiny_model_path):
    """An answer of no token (its row still in the batch) and rows of other groups between: the
    answers that count get the same log-probs."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    ids, mask = padded([[5, 6, 7], [5, 6, 7], [8, 9], [5, 6, 7]], [[11, 12], [], [14, 15], [16]], 3, 2)
    packing = packing_for(model.config, model.dtype, 4096)
    assert pack_groups(ids, mask, 2, 4096).num_rows == 3  # row 3's prompt follows another: a row of its own
    with torch.no_grad():
        padded_logp = completion_logprobs(model, ids, mask, 2)
        packed_logp = completion_logprobs(model, ids, mask, 2, packing=packing)
    answer = mask[:, -2:].bool()
    torch.testing.assert_close(packed_logp[answer], padded_logp[answer], rtol=0, atol=LOGP_ATOL)


def test_the_lm_head_runs_on_the_read_positions_only(tiny_model_path):
    """Packed rows keep the union of their predicting columns; the head gets each row's own."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    ids, mask = grouped_batch(model.config.vocab_size)  # prompts of 9, 4 and 6 tokens: columns differ
    heads: list[tuple[int, ...]] = []
    model.lm_head.register_forward_hook(lambda module, args, out: heads.append(tuple(args[0].shape)))
    packed = pack_groups(ids, mask, 7, 4096)
    with torch.no_grad():
        completion_logprobs(model, ids, mask, 7, packing=packing_for(model.config, model.dtype, 4096))
    # a packed row predicts its answers' tokens from its prompt's last position, then from every
    # answer token but the last
    lengths = mask[:, -7:].sum(1).view(3, 3)  # [groups, answers]
    read = int((1 + (lengths - 1).sum(1)).sum())
    assert heads == [(1, read, model.config.hidden_size)]
    assert read < packed.num_rows * len(packed.kept)  # what logits_to_keep alone runs the head on
