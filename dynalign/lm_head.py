"""The LM head of a transformers causal LM: finding it, and not running it where nothing is read.

The head is the largest matmul of a small model with a large vocabulary (Gemma 3 270M: a
262,144 x 640 weight, 671 MB in float32, more than the rest of the model), and a forward that
keeps the logits of a single position still reads that whole weight (45-60 ms on the 2-core
CPU machine). A forward run only to extend a KV cache (a shared prefix read once) passes
:data:`NO_LOGITS` as ``logits_to_keep`` and runs no head at all.
"""

from __future__ import annotations

from typing import Any

import torch

NO_LOGITS = torch.empty(0, dtype=torch.long)  # logits_to_keep that keeps no position


def output_head(model: Any) -> torch.nn.Module | None:
    """The LM head module of a transformers causal LM (inside a DeepSpeed engine or a peft
    wrapper), or None when the model has none to hook."""
    module = getattr(model, "module", model)  # a DeepSpeed engine's model
    get = getattr(module, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, torch.nn.Module) else None
