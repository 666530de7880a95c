"""Float32 CPU linears through oneDNN within a block: the same products, the modules restored."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from dynalign import onednn
from dynalign.onednn import onednn_available, onednn_linears

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="torch has no working oneDNN linear here")


def linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


def counting_op():
    """A patch that counts the oneDNN products and computes them."""
    return mock.patch.object(onednn, "_onednn_linear", side_effect=onednn._onednn_linear)


@needs_onednn
def test_a_layer_with_hand_computed_products():
    layer = torch.nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 0.5]]))
        layer.bias.copy_(torch.tensor([0.25, -2.0]))
    x = torch.tensor([[[1.0, 1.0, 1.0], [2.0, -1.0, 4.0]]])  # [1, 2, 3]
    expected = torch.tensor([[[6.25, -2.5], [12.25, -2.0]]])  # by hand: W x + b
    with torch.no_grad(), counting_op() as op, onednn_linears(layer):
        out = layer(x)
    assert op.call_count == 1
    assert torch.equal(out, expected)


@needs_onednn
@torch.no_grad()
def test_the_tiny_models_logits_match_and_every_linear_goes_through_onednn(tiny_lm):
    ids = torch.tensor([[5, 9, 13, 2, 7, 1], [3, 3, 8, 1, 4, 6]])  # [2, 6]
    reference = tiny_lm(input_ids=ids).logits  # [2, 6, V]
    with counting_op() as op, onednn_linears(tiny_lm):
        out = tiny_lm(input_ids=ids).logits
    assert op.call_count == len(linears(tiny_lm))  # each layer of one forward, the LM head included
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    assert all("forward" not in m.__dict__ for m in linears(tiny_lm))  # the class forward is back
    assert torch.equal(tiny_lm(input_ids=ids).logits, reference)


@needs_onednn
def test_with_grad_on_a_layer_backpropagates_hand_computed_gradients_through_onednn():
    layer = torch.nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 0.5]]))
        layer.bias.copy_(torch.tensor([0.25, -2.0]))
    x = torch.tensor([[[1.0, 1.0, 1.0], [2.0, -1.0, 4.0]]], requires_grad=True)  # [1, 2, 3]
    upstream = torch.tensor([[[1.0, -2.0], [0.5, 3.0]]])  # dL/dy [1, 2, 2]
    with counting_op() as op, onednn_linears(layer):
        out = layer(x)
        (out * upstream).sum().backward()
    assert op.call_count == 3  # y = x W^T + b, then grad_x and grad_W
    assert torch.equal(out.detach(), torch.tensor([[[6.25, -2.5], [12.25, -2.0]]]))
    # by hand: grad_x = upstream W, grad_W = sum over rows of upstream^T x, grad_b = sum of upstream
    assert torch.equal(x.grad, torch.tensor([[[3.0, 2.0, 2.0], [-2.5, 1.0, 3.0]]]))
    assert torch.equal(layer.weight.grad, torch.tensor([[2.0, 0.5, 3.0], [4.0, -5.0, 10.0]]))
    assert torch.equal(layer.bias.grad, torch.tensor([1.5, 1.0]))


@needs_onednn
@pytest.mark.parametrize("wants", ["input", "weight", "both"])
def test_the_backward_computes_only_the_gradients_asked_for_and_matches_autograd(wants):
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(4, 5, 16, generator=gen), torch.randn(24, 16, generator=gen)  # no bias
    upstream = torch.randn(4, 5, 24, generator=gen)
    x.requires_grad_(wants in ("input", "both"))
    weight.requires_grad_(wants in ("weight", "both"))
    wanted = [t for t in (x, weight) if t.requires_grad]
    with counting_op() as op:
        got = torch.autograd.grad((onednn.OneDNNLinear.apply(x, weight, None) * upstream).sum(), wanted)
    expected = torch.autograd.grad((F.linear(x, weight) * upstream).sum(), wanted)
    assert op.call_count == 1 + len(wanted)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)


@needs_onednn
def test_a_forward_set_on_the_instance_is_restored_also_when_the_block_raises():
    layer = torch.nn.Linear(4, 3)
    own = layer.forward = lambda x: x  # e.g. a library's wrapper
    with pytest.raises(RuntimeError, match="inside"), onednn_linears(layer):
        assert layer.forward is not own
        raise RuntimeError("inside")
    assert layer.forward is own


@pytest.mark.parametrize("layer", [torch.nn.Linear(4, 3).to(torch.bfloat16),
                                   type("Subclass", (torch.nn.Linear,), {})(4, 3), torch.nn.Identity()],
                         ids=["bfloat16", "a-subclass", "not-linear"])
def test_other_modules_keep_their_forward(layer):
    with counting_op() as op, onednn_linears(layer):
        assert "forward" not in layer.__dict__
        layer(torch.randn(2, 4, dtype=next(layer.parameters(), torch.empty(0)).dtype))
    assert op.call_count == 0


def test_without_a_working_op_everything_runs_as_it_is():
    onednn_available.cache_clear()
    try:
        with mock.patch.object(onednn, "_onednn_linear", side_effect=RuntimeError("no such op")):
            assert not onednn_available()
            layer = torch.nn.Linear(4, 3)
            with onednn_linears(layer):
                assert "forward" not in layer.__dict__
    finally:
        onednn_available.cache_clear()


@needs_onednn
@torch.no_grad()
def test_the_samplers_judge_reads_go_through_onednn_and_give_the_models_log_probs(tiny_model_path):
    from dynalign.config import ModelConfig
    from dynalign.lm_head import output_head
    from dynalign.models import load_hf_sampler

    sampler = load_hf_sampler(ModelConfig(name_or_path=str(tiny_model_path)), batch_size=4)
    head_rows: list[int] = []  # rows the LM head got, forward by forward
    head = output_head(sampler.model)
    head.register_forward_pre_hook(lambda _m, args: head_rows.append(args[0][..., 0].numel()))
    texts = ["The rubric, then the first answer:", "The rubric, then the second answer, longer:"]
    rows = sampler.encode_texts(texts)
    candidates = list(range(20))
    with counting_op() as op:
        with sampler.reuse_prefixes():
            reused = sampler.token_logprobs(rows, candidates, last=2)  # [2, 2, 20]
        scratch = sampler.token_logprobs(rows, candidates, last=2)
    assert op.call_count > 0
    assert head_rows[0] == 0  # the shared prefix's pass ran no LM head row
    for row, got_reused, got_scratch in zip(rows, reused, scratch, strict=True):
        logits = sampler.model(input_ids=torch.tensor([row])).logits[0, -2:]  # [2, V] F.linear's
        expected = torch.log_softmax(logits, -1)[:, candidates]  # [2, 20]
        torch.testing.assert_close(got_reused, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(got_scratch, expected, rtol=0, atol=1e-5)


def test_with_mkldnn_switched_off_every_layer_runs_as_it_is():
    layer = torch.nn.Linear(4, 3)
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        with onednn_linears(layer):
            assert "forward" not in layer.__dict__
    finally:
        torch.backends.mkldnn.enabled = was
    with onednn_linears(layer):
        assert "forward" in layer.__dict__ or not onednn_available()
