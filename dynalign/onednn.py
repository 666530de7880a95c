"""Float32 linear layers on the CPU through oneDNN: the judge's reads and the training forwards.

torch multiplies a float32 ``nn.Linear`` on the CPU with MKL's sgemm. oneDNN, which torch ships
too, does the same products about twice as fast on the AMD EPYC CPU of the 2-core machine
dynalign's benchmarks ran on (2 threads: Gemma 3 270M's MLP projection on the judge's 8 x 182
positions at 326 against 163 GFLOP/s, its 262,144 x 640 LM head on 16 rows in 42 against 141
ms). The sums run in another order, so results differ in the last bits (relative ~5e-6).

:func:`onednn_linears` runs every float32 CPU ``nn.Linear`` of a model (the LM head included,
and a LoRA layer's base and adapters) through ``torch.ops.mkldnn._linear_pointwise`` within a
block. The op has no backward, so with grad on a layer runs :class:`OneDNNLinear`, whose
backward is two more products through the same op on transposed views: ``grad_x = grad_y W``
and ``grad_W = grad_y^T x``. The op is torch's own (one of its inductor backend's) but private,
so :func:`onednn_available` checks it once per process against ``F.linear``, and where it is
missing, disagrees, or ``torch.backends.mkldnn.enabled`` is off, every layer runs as it is.

The judge's reads, the training forwards and backwards and the policy and reference log-probs
use it; sampling does not, since logits that differ in the last bit could change a sampled token
at a fixed seed. Under ZeRO-3 a layer's weight is whole only while DeepSpeed's hooks hold it
gathered, so the check is made at each call: a partition runs ``F.linear`` (DeepSpeed's).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, TypeGuard

import torch
import torch.nn.functional as F
from torch import Tensor


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.cache
def onednn_available() -> bool:
    """Whether torch's oneDNN linear exists here and gives ``F.linear``'s products, also on
    transposed views (checked once, on a small random layer, within float32 rounding)."""
    if not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(shape, generator=gen) for shape in ((3, 5, 64), (48, 64), (48,)))
    try:
        with torch.no_grad():
            out = _onednn_linear(x, weight, bias)
            rows, grads = x.reshape(-1, 64), out.reshape(-1, 48)  # [15, 64], [15, 48]
            grad_x = _onednn_linear(grads, weight.t(), None)  # the backward's products: transposed views
            grad_weight = _onednn_linear(grads.t(), rows.t(), None)
    except (AttributeError, RuntimeError, TypeError):  # no such op, or another signature
        return False
    pairs = ((out, F.linear(x, weight, bias)), (grad_x, grads @ weight), (grad_weight, grads.t() @ rows))
    return all(got.shape == want.shape and bool(torch.allclose(got, want, rtol=1e-5, atol=1e-5))
               for got, want in pairs)


class OneDNNLinear(torch.autograd.Function):
    """``y = x W^T + b`` through oneDNN, with a backward through it too.

    ``grad_x = grad_y W`` and ``grad_W = grad_y^T x`` are oneDNN linears on transposed views
    (the op reads strides: nothing is copied), ``grad_b`` sums ``grad_y`` over its rows. The
    weight is saved as it is, as DeepSpeed's own ZeRO-3 linear does: its hooks gather it again
    before the layer's backward; one that is still a partition then is gathered for the product.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        wants_x, wants_weight, wants_bias = ctx.needs_input_grad
        grad_x = grad_weight = grad_bias = None
        if wants_x:
            with _whole(weight):
                grad_x = _onednn_linear(grad, weight.t(), None)  # [..., in]
        rows = grad.reshape(-1, grad.shape[-1])  # [R, out]
        if wants_weight:
            grad_weight = _onednn_linear(rows.t(), x.reshape(-1, x.shape[-1]).t(), None)  # [out, in]
        if ctx.has_bias and wants_bias:
            grad_bias = rows.sum(0)  # [out]
        return grad_x, grad_weight, grad_bias


def _whole(weight: Tensor) -> AbstractContextManager:
    """Gather ``weight`` for the block if ZeRO-3 holds only a partition of it now."""
    shape = getattr(weight, "ds_shape", None)
    if shape is None or weight.shape == shape:
        return nullcontext()
    from dynalign.zero import gathered

    return gathered([weight])


def _eligible(module: torch.nn.Module) -> TypeGuard[torch.nn.Linear]:
    """A plain ``nn.Linear`` with a float32 weight on the CPU (whole, or a ZeRO-3 partition:
    :func:`_forward_through_onednn` checks at each call)."""
    if type(module) is not torch.nn.Linear:
        return False
    weight = module.weight
    return weight.device.type == "cpu" and weight.dtype == torch.float32


def _forward_through_onednn(module: torch.nn.Linear, x: Tensor) -> Tensor:
    weight, bias = module.weight, module.bias
    if x.dtype != torch.float32 or weight.shape != (module.out_features, module.in_features):
        return F.linear(x, weight, bias)  # another dtype, or a ZeRO-3 partition
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return OneDNNLinear.apply(x, weight, bias)
    return _onednn_linear(x, weight, bias)


@contextmanager
def onednn_linears(model: Any) -> Iterator[None]:
    """Within the block, every eligible ``nn.Linear`` of ``model`` (float32, on the CPU, whole at
    the call) computes through oneDNN, with grad on through :class:`OneDNNLinear`; the modules'
    own ``forward`` is back afterwards. A backward run after the block still goes through
    oneDNN; one that recomputes the forward (gradient checkpointing) belongs inside the block."""
    root = getattr(model, "module", model)  # a DeepSpeed engine's model
    modules = root.modules() if isinstance(root, torch.nn.Module) else ()
    layers = [m for m in modules if _eligible(m)]
    if not layers or not torch.backends.mkldnn.enabled or not onednn_available():
        yield
        return
    own = [m.__dict__.get("forward") for m in layers]  # a forward set on the instance, to restore
    for m in layers:
        m.forward = functools.partial(_forward_through_onednn, m)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m, forward in zip(layers, own, strict=True):
            if forward is None:
                del m.forward
            else:
                m.forward = forward  # type: ignore[method-assign]
