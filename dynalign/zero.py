"""ZeRO-3 helpers shared by the training engine and the samplers (no engine, no rollout here).

Under ZeRO-3 a parameter holds only its rank's shard (DeepSpeed marks it with ``ds_id``);
:func:`gathered` makes the full tensors visible inside a block. Every helper is a no-op on
ordinary tensors, so the same code runs on whole models and on stages 0-2.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor


def is_zero3_param(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ZeRO-3 partitioned parameter."""
    return hasattr(tensor, "ds_id")


def is_partitioned(model: torch.nn.Module) -> bool:
    """Whether any parameter of ``model`` is ZeRO-3 partitioned."""
    return any(is_zero3_param(p) for p in model.parameters())


@contextlib.contextmanager
def gathered(params: Iterable[Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Full ``params`` inside the block under ZeRO-3 (no-op for ordinary tensors).

    With ``modifier_rank`` set, that rank's changes to the full tensors are partitioned back
    onto every rank when the block ends.
    """
    zero_params = [p for p in params if is_zero3_param(p)]
    if not zero_params:
        yield
        return
    import deepspeed  # already imported: it partitioned these parameters

    with deepspeed.zero.GatheredParameters(zero_params, modifier_rank=modifier_rank):
        yield


def cpu_clone(tensor: Tensor) -> Tensor:
    """A detached CPU copy of ``tensor``."""
    return tensor.detach().to("cpu", copy=True)


def gathered_clone(tensor: Tensor) -> Tensor:
    """A detached CPU copy of the full ``tensor`` (gathered under ZeRO-3); collective."""
    with gathered([tensor]):
        return cpu_clone(tensor)


@torch.no_grad()
def copy_into(target: Tensor, source: Tensor, rank: int) -> None:
    """``target <- source`` (full values); under ZeRO-3 rank 0's copy is partitioned; collective."""
    with gathered([source, target], modifier_rank=0):
        if rank == 0 or not is_zero3_param(target):
            target.data.copy_(source.data)


@contextlib.contextmanager
def hf_zero3_init(ds_config: dict[str, Any] | None) -> Iterator[Any]:
    """Make ``from_pretrained`` build partitioned (zero.Init) iff ``ds_config`` is ZeRO-3.

    ``hf_zero3_init(None)`` loads a plain, whole model while a ZeRO-3 engine is alive in the
    process (a judge, a rollout model, a test's comparison).

    Yields the ``HfDeepSpeedConfig`` (None below stage 3); the caller keeps it alive, since
    transformers holds it by weak reference (``generate`` under ZeRO-3 reads it for
    ``synced_gpus``). Another engine's setting in the same process is restored afterwards.
    """
    from transformers.integrations import deepspeed as hf_ds

    previous_ref = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    previous = previous_ref() if previous_ref is not None else None
    hf_config = None
    if ds_config is not None and ds_config["zero_optimization"].get("stage") == 3:
        hf_config = hf_ds.HfDeepSpeedConfig(ds_config)  # registers itself
    else:
        hf_ds.unset_hf_deepspeed_config()
    try:
        yield hf_config
    finally:
        if hf_config is None and previous is not None:
            hf_ds.set_hf_deepspeed_config(previous)


def release_hf_config(hf_config: Any) -> None:
    """Unregister ``hf_config`` if it is still transformers' current DeepSpeed config, so later
    ``from_pretrained`` calls build whole models again."""
    from transformers.integrations import deepspeed as hf_ds

    current = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    if hf_config is not None and current is not None and current() is hf_config:
        hf_ds.unset_hf_deepspeed_config()
