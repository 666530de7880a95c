"""The LM head helpers: a forward that keeps no logits, and the head run vocabulary-major."""

from __future__ import annotations

import pytest
import torch

from dynalign.lm_head import NO_LOGITS, output_head, vocabulary_rows


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()


def rows_multiplied(head: torch.nn.Module) -> tuple[list[int], object]:
    """Rows the head's own forward multiplies, call by call (a hook to remove)."""
    seen: list[int] = []
    hook = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0][..., 0].numel()))
    return seen, hook


@torch.no_grad()
def test_no_logits_extends_the_cache_as_a_full_forward_and_runs_no_head_row(tiny):
    from transformers import DynamicCache

    ids = torch.tensor([[5, 9, 13, 2, 7], [3, 3, 8, 1, 4]])  # [2, 5]
    full, empty = DynamicCache(), DynamicCache()
    reference = tiny(input_ids=ids, past_key_values=full, use_cache=True, logits_to_keep=1).logits
    seen, hook = rows_multiplied(output_head(tiny))
    try:
        out = tiny(input_ids=ids, past_key_values=empty, use_cache=True, logits_to_keep=NO_LOGITS).logits
    finally:
        hook.remove()
    assert out.shape == (2, 0, reference.shape[-1])
    assert seen == [0]
    for a, b in zip(full.layers, empty.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    # the cache continues as one that ran the head
    nxt = torch.tensor([[11], [6]])
    after_full = tiny(input_ids=nxt, past_key_values=full, use_cache=True).logits
    after_empty = tiny(input_ids=nxt, past_key_values=empty, use_cache=True).logits
    assert torch.equal(after_full, after_empty)


@torch.no_grad()
@pytest.mark.parametrize("keep", [1, 2, 5])
def test_vocabulary_rows_gives_the_heads_logits_without_the_head_multiplying_a_row(tiny, keep):
    ids = torch.tensor([[5, 9, 13, 2, 7], [3, 3, 8, 1, 4], [2, 4, 6, 8, 10]])  # [3, 5]
    reference = tiny(input_ids=ids, logits_to_keep=keep).logits  # [3, keep, V]
    head = output_head(tiny)
    with vocabulary_rows(tiny):
        seen, hook = rows_multiplied(head)  # runs after the block's own hook
        try:
            out = tiny(input_ids=ids, logits_to_keep=keep).logits
        finally:
            hook.remove()
    assert seen == [0]
    assert out.shape == reference.shape
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    logp, expected = torch.log_softmax(out, -1), torch.log_softmax(reference, -1)
    torch.testing.assert_close(logp, expected, rtol=0, atol=1e-5)
    # the hooks are gone after the block: the head multiplies its rows again
    seen, hook = rows_multiplied(head)
    try:
        tiny(input_ids=ids, logits_to_keep=keep)
    finally:
        hook.remove()
    assert seen == [3 * keep]


def test_vocabulary_rows_computes_weight_times_hidden_transposed():
    head = torch.nn.Linear(4, 6, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1],
                                        [1, 1, 1, 1], [1, -1, 0, 2]]))  # [V=6, H=4]
    model = torch.nn.Module()
    model.get_output_embeddings = lambda: head  # type: ignore[assignment]
    hidden = torch.tensor([[[1.0, 0.0, -1.0, 2.0], [0.5, 0.5, 0.5, 0.5]]])  # [1, 2, 4]
    expected = torch.tensor([[[1.0, 0.0, -1.0, 2.0, 2.0, 5.0],  # by hand: each weight row . hidden
                              [0.5, 0.5, 0.5, 0.5, 2.0, 1.0]]])  # [1, 2, 6]
    with torch.no_grad(), vocabulary_rows(model):
        out = head(hidden)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("head", [torch.nn.Linear(4, 6, bias=True), torch.nn.Identity()],
                         ids=["with-bias", "not-linear"])
def test_other_heads_run_as_they_are(head):
    model = torch.nn.Module()
    model.get_output_embeddings = lambda: head  # type: ignore[assignment]
    seen: list[int] = []
    head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    hidden = torch.randn(3, 4)
    with torch.no_grad(), vocabulary_rows(model):
        out = head(hidden)
    assert seen == [3]  # the head's own forward ran on every row
    with torch.no_grad():
        assert torch.equal(out, head(hidden))
    assert len(head._forward_pre_hooks) == 1 and not head._forward_hooks  # only the test's own


def test_the_hooks_are_removed_when_the_block_raises(tiny):
    head = output_head(tiny)
    before = (len(head._forward_pre_hooks), len(head._forward_hooks))
    with pytest.raises(RuntimeError, match="inside"), vocabulary_rows(tiny):
        assert len(head._forward_pre_hooks) == before[0] + 1
        raise RuntimeError("inside")
    assert (len(head._forward_pre_hooks), len(head._forward_hooks)) == before


@torch.no_grad()
def test_the_samplers_judge_reads_run_the_head_on_no_row_and_give_the_models_log_probs(tiny_model_path):
    from dynalign.config import ModelConfig
    from dynalign.models import load_hf_sampler

    sampler = load_hf_sampler(ModelConfig(name_or_path=str(tiny_model_path)), batch_size=4)
    head = output_head(sampler.model)
    seen: list[int] = []  # rows the head's own forward got (a forward hook sees its final input)
    head.register_forward_hook(lambda _m, args, _out: seen.append(args[0][..., 0].numel()))
    texts = ["The rubric, then the first answer:", "The rubric, then the second answer, longer:"]
    rows = sampler.encode_texts(texts)
    candidates = list(range(20))
    with sampler.reuse_prefixes():
        reused = sampler.token_logprobs(rows, candidates, last=2)  # [2, 2, 20]
    scratch = sampler.token_logprobs(rows, candidates, last=2)
    assert seen and set(seen) == {0}  # prefix passes: no logits; reads: vocabulary-major
    seen.clear()
    for row, got_reused, got_scratch in zip(rows, reused, scratch, strict=True):
        logits = sampler.model(input_ids=torch.tensor([row])).logits[0, -2:]  # [2, V] the model's own
        assert seen[-1] == len(row)
        expected = torch.log_softmax(logits, -1)[:, candidates]  # [2, 20]
        torch.testing.assert_close(got_reused, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(got_scratch, expected, rtol=0, atol=1e-5)


def test_a_bfloat16_head_runs_as_it_is():
    head = torch.nn.Linear(4, 6, bias=False).to(torch.bfloat16)
    model = torch.nn.Module()
    model.get_output_embeddings = lambda: head  # type: ignore[assignment]
    with vocabulary_rows(model):
        assert not head._forward_pre_hooks and not head._forward_hooks
