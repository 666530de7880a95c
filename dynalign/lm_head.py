"""The LM head of a transformers causal LM: finding it, skipping it, and running it on few rows.

The head is the largest matmul of a small model with a large vocabulary (Gemma 3 270M: a
262,144 x 640 weight, 671 MB in float32, more than the rest of the model), and a forward that
keeps the logits of a single position still reads that whole weight (45-60 ms on the 2-core
CPU machine).

* :data:`NO_LOGITS` is a ``logits_to_keep`` that keeps no position: a forward run only to extend
  a KV cache (a shared prefix read once) runs no head at all.
* :func:`vocabulary_rows` runs the head as ``weight @ hidden.T``, the vocabulary as the long
  side of the product. For few rows (the judge's score slots: 2 positions of each of 8 rows)
  float32 ``hidden @ weight.T`` (``F.linear``) is much the slower of the two on MKL: with 2
  threads on the 2-core CPU machine, a 262,144 x 640 weight, 148 against 92 ms for 16 rows, 123
  against 28 ms for 2, 523 against 404 ms for 122. The logits were bitwise equal from 16 rows on
  and within 4e-6 below.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

NO_LOGITS = torch.empty(0, dtype=torch.long)  # logits_to_keep that keeps no position


def output_head(model: Any) -> torch.nn.Module | None:
    """The LM head module of a transformers causal LM (inside a DeepSpeed engine or a peft
    wrapper), or None when the model has none to hook."""
    module = getattr(model, "module", model)  # a DeepSpeed engine's model
    get = getattr(module, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, torch.nn.Module) else None


def _plain_cpu_linear(head: torch.nn.Module | None) -> bool:
    """A bias-free ``nn.Linear`` whose whole weight is a float32 CPU tensor (not a ZeRO-3 partition)."""
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return False
    weight = head.weight
    return (weight.device.type == "cpu" and weight.dtype == torch.float32
            and weight.shape == (head.out_features, head.in_features))


@contextmanager
def vocabulary_rows(model: Any) -> Iterator[None]:
    """Within the block, the LM head of ``model`` computes its logits [..., V] as the transpose of
    ``weight @ hidden.T`` [V, N] (a view: no copy). Only for a bias-free ``nn.Linear`` head with its
    whole weight on the CPU in float32, the case measured; any other head runs as it is."""
    head = output_head(model)
    if not _plain_cpu_linear(head):
        yield
        return
    assert isinstance(head, torch.nn.Linear)
    held: list[Tensor] = []

    def take_hidden(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]  # [..., H]
        held.append(hidden)
        return (hidden[..., :0, :], *args[1:])  # the head itself then multiplies no row

    def vocabulary_major(_module: torch.nn.Module, _args: tuple[Any, ...], _out: Tensor) -> Tensor:
        hidden = held.pop()  # [..., H]
        rows = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
        logits = torch.mm(head.weight, rows.t()).t()  # [N, V], strides (1, N)
        return logits.reshape(*hidden.shape[:-1], logits.shape[-1])  # [..., V]

    hooks = [head.register_forward_pre_hook(take_hidden), head.register_forward_hook(vocabulary_major)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
