"""Float32 linear layers on the CPU through oneDNN, for the judge's forwards.

torch multiplies a float32 ``nn.Linear`` on the CPU with MKL's sgemm. oneDNN, which torch ships
too, does the same products about twice as fast on the AMD EPYC CPU of the 2-core machine
dynalign's benchmarks ran on (2 threads: Gemma 3 270M's MLP projection on the judge's 8 x 182
positions at 326 against 163 GFLOP/s, its 262,144 x 640 LM head on 16 rows in 42 against 141
ms). The sums run in another order, so results differ in the last bits (relative ~5e-6).

:func:`onednn_linears` runs every float32 CPU ``nn.Linear`` of a model (the LM head included,
and a LoRA layer's base and adapters) through ``torch.ops.mkldnn._linear_pointwise`` within a
block, under no grad only. The op is torch's own (one of its inductor backend's) but private,
so :func:`onednn_available` checks it once per process against ``F.linear``, and where it is
missing, disagrees, or ``torch.backends.mkldnn.enabled`` is off, every layer runs as it is. The
judge's reads use it; sampling does not, since logits that differ in the last bit could change
a sampled token at a fixed seed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeGuard

import torch
import torch.nn.functional as F
from torch import Tensor


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.cache
def onednn_available() -> bool:
    """Whether torch's oneDNN linear exists here and gives ``F.linear``'s products (checked once,
    on a small random layer, within float32 rounding)."""
    if not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(shape, generator=gen) for shape in ((3, 5, 64), (48, 64), (48,)))
    try:
        with torch.no_grad():
            out = _onednn_linear(x, weight, bias)
    except (AttributeError, RuntimeError, TypeError):  # no such op, or another signature
        return False
    expected = F.linear(x, weight, bias)
    return out.shape == expected.shape and bool(torch.allclose(out, expected, rtol=1e-5, atol=1e-5))


def _eligible(module: torch.nn.Module) -> TypeGuard[torch.nn.Linear]:
    """A plain ``nn.Linear`` with its whole float32 weight on the CPU (not a ZeRO-3 partition)."""
    if type(module) is not torch.nn.Linear:
        return False
    weight = module.weight
    return (weight.device.type == "cpu" and weight.dtype == torch.float32
            and weight.shape == (module.out_features, module.in_features))


def _forward_through_onednn(module: torch.nn.Linear, x: Tensor) -> Tensor:
    if torch.is_grad_enabled() or x.dtype != torch.float32:  # the op has no backward; one dtype
        return F.linear(x, module.weight, module.bias)
    return _onednn_linear(x, module.weight, module.bias)


@contextmanager
def onednn_linears(model: Any) -> Iterator[None]:
    """Within the block, every eligible ``nn.Linear`` of ``model`` (float32, on the CPU, whole)
    computes through oneDNN while grad is off; the modules' own ``forward`` is back afterwards."""
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
