"""ZeRO-3 helpers shared by the training engine and the samplers (no engine, no rollout here).

Under ZeRO-3 a parameter holds only its rank's shard (DeepSpeed marks it with ``ds_id``);
:func:`gathered` makes the full tensors visible inside a block. Every helper is a no-op on
ordinary tensors, so the same code runs on whole models and on stages 0-2.

DeepSpeed also hangs forward hooks on every submodule of a ZeRO-3 engine's model (on each
decoder layer as a whole, not inside it, once :func:`leaf_layers` made the layers leaves): they
fetch and release each module's parameters around its call and record the order for prefetching;
the engine adds two on the root that walk every submodule at each call; and ZeRO-3 replaces
torch's ``F.linear`` process-wide with an autograd function that re-gathers the weight for
backward. :func:`unhooked` takes all of that off for a block (generation), with everything
gathered once, and puts the same hooks and the same ``F.linear`` back afterwards.
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


def leaf_layers(model: torch.nn.Module) -> list[str]:
    """Make each decoder layer of ``model`` one ZeRO-3 unit, before ``deepspeed.initialize``.

    DeepSpeed then hooks the layer alone (a "leaf module"), not each linear and norm inside it:
    one fetch and one release of all its parameters per call, one backward hook, a trace of
    layers. The decoder layers are the instances of the classes transformers keeps whole on one
    device (``_no_split_modules``). Returns the names of the classes marked (none: the model
    names none, and DeepSpeed keeps its per-module hooks).
    """
    from deepspeed.utils import set_z3_leaf_modules

    names = set(getattr(model, "_no_split_modules", None) or ())
    classes = {type(module) for module in model.modules() if type(module).__name__ in names}
    if classes:
        set_z3_leaf_modules(model, list(classes))
    return sorted(cls.__name__ for cls in classes)


def zero3_offload(ds_engine: Any) -> Any | None:
    """The object that owns ``ds_engine``'s ZeRO-3 module hooks (DeepSpeed's
    ``DeepSpeedZeRoOffload``), or None below stage 3 or for anything that is not an engine.

    The ZeRO-3 optimizer holds it as ``parameter_offload``; an engine built without an
    optimizer uses the offload object itself as its optimizer.
    """
    optimizer = getattr(ds_engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", optimizer)
    return offload if hasattr(offload, "forward_hooks") and hasattr(offload, "backward_hooks") else None


def zero3_hook_handles(offload: Any) -> list[Any]:
    """The handles of every hook ``offload`` registered: each submodule's fetch/release and
    backward-marking hooks, and the root's step reset.

    The root hook must go too: while the coordinator's trace is incomplete, its ``reset_step``
    checks the recorded module order against rank 0's (broadcasts), collectives that ranks
    generating different lengths would call different numbers of times.
    """
    root = getattr(offload, "fwd_pre_hook", None)
    return [*offload.forward_hooks, *offload.backward_hooks, *([root] if root is not None else [])]


def engine_hook_handles(ds_engine: Any) -> list[Any]:
    """The handles of the engine's own hooks on its root module (``_forward_prologue`` and
    ``_forward_epilogue``): under ZeRO-3 each walks every submodule at every call to flag
    parameter discovery, which a gathered, hook-free module does not need."""
    names = ("module_forward_pre_hook", "module_forward_post_hook")
    return [h for name in names if (h := getattr(ds_engine, name, None)) is not None]


@contextlib.contextmanager
def plain_linear() -> Iterator[None]:
    """torch's own ``F.linear`` in the block, if DeepSpeed replaced it; the replacement is back after.

    ZeRO-3's ``memory_efficient_linear`` (on by default) swaps ``torch.nn.functional.linear``
    for an autograd function that saves the parameter, not a view of its gathered data, so
    training keeps no gathered weight alive until backward. Without gradients it only costs:
    the function's per-call overhead roughly doubles the time of a small decode step.
    """
    import torch.nn.functional as F

    try:
        from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses
    except ImportError:
        yield
        return
    original = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    current = F.linear
    if original is None or current is original:
        yield
        return
    F.linear = original
    try:
        yield
    finally:
        F.linear = current


@contextlib.contextmanager
def detached_hooks(handles: Iterable[Any]) -> Iterator[None]:
    """The hooks behind ``handles`` (torch ``RemovableHandle``) are off their modules in the block.

    Afterwards the same hook objects return under the same ids, in their original place among
    the module's other hooks, so the handles stay valid (``remove()`` still works) and hooks
    run in the same order as before. Hooks others add or remove meanwhile are kept as they are.
    """
    handles = list(handles)
    ids = {h.id for h in handles}
    tables = {id(t): t for h in handles if (t := h.hooks_dict_ref()) is not None and h.id in t}
    saved = [(table, list(table.items())) for table in tables.values()]
    for table, _ in saved:
        for key in ids & table.keys():
            del table[key]
    try:
        yield
    finally:
        for table, items in saved:
            _restore_hooks(table, items, ids)


def _restore_hooks(table: dict[int, Any], items: list[tuple[int, Any]], ids: set[int]) -> None:
    """``table`` <- ``items`` (the detached ``ids`` and the hooks still present), then hooks added since."""
    before = {key for key, _ in items}
    restored = [(k, v) for k, v in items if k in ids or k in table]
    restored += [(k, v) for k, v in table.items() if k not in before]
    table.clear()
    table.update(restored)


@contextlib.contextmanager
def unhooked(ds_engine: Any) -> Iterator[torch.nn.Module]:
    """``ds_engine``'s module, whole and free of DeepSpeed's ZeRO-3 module hooks, in the block.

    Collective on entry and exit (the gather and the re-partitioning); in between the module
    runs as a plain one: no parameter fetch, release or trace bookkeeping per module call and
    no collective, so ranks may run different numbers of forwards, and torch's own ``F.linear``
    (:func:`plain_linear`). The coordinator is left exactly as the last training pass left it.
    Inference only: the block must neither change the parameters nor back-propagate (no
    backward hooks). Below stage 3, yields the module.
    """
    module = ds_engine.module
    offload = zero3_offload(ds_engine)
    if offload is None:
        yield module
        return
    handles = [*zero3_hook_handles(offload), *engine_hook_handles(ds_engine)]
    with gathered(module.parameters()), detached_hooks(handles), plain_linear():
        yield module


def copy_to(tensor: Tensor, device: torch.device | None = None) -> Tensor:
    """A detached copy of ``tensor`` on ``device`` (None: CPU)."""
    return tensor.detach().to(device or "cpu", copy=True)


def gathered_clone(tensor: Tensor) -> Tensor:
    """A detached CPU copy of the full ``tensor`` (gathered under ZeRO-3); collective."""
    with gathered([tensor]):
        return copy_to(tensor)


def full_bytes(tensor: Tensor) -> int:
    """Bytes of the whole ``tensor``, also while ZeRO-3 holds only this rank's partition."""
    return int(getattr(tensor, "ds_numel", tensor.numel())) * tensor.element_size()


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


def destroy_engine(ds_engine: Any) -> None:
    """Take a DeepSpeed engine apart so that its model, optimizer and partitions can be freed.

    Its own ``destroy`` removes the ZeRO-3 module and gradient hooks; two process-wide references
    that ZeRO-3 (deepspeed 0.19) keeps to every engine it ever made go too: its root module on the
    stack of modules in forward (``parameter_offload.FWD_MODULE_STACK``, pushed at start-up and never
    popped), and the coordinator's cache of the parameters to release, an ``lru_cache`` on a method,
    keyed by coordinator and module. No collective; the process group is not touched.
    """
    if ds_engine is None:
        return
    destroy = getattr(ds_engine, "destroy", None)
    if callable(destroy):
        destroy()
    from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator

    stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
    module = getattr(ds_engine, "module", None)
    if isinstance(stack, list) and module is not None:
        stack[:] = [m for m in stack if m is not module]
    cached = _lru_cache_in(getattr(partitioned_param_coordinator.PartitionedParameterCoordinator,
                                   "_PartitionedParameterCoordinator__params_to_release", None))
    if cached is not None:
        cached.cache_clear()  # every coordinator's entries: a cache, refilled on use


def _lru_cache_in(fn: Any, depth: int = 3) -> Any:
    """The ``functools.lru_cache`` wrapper that is ``fn`` or that ``fn`` wraps (by ``__wrapped__``
    or, for a decorator without ``functools.wraps``, its closure), else None."""
    for _ in range(depth + 1):
        if fn is None or hasattr(fn, "cache_clear"):
            return fn
        inner = [cell.cell_contents for cell in getattr(fn, "__closure__", None) or ()]
        fn = getattr(fn, "__wrapped__", None) or next((c for c in inner if callable(c)), None)
    return None
