"""Checkpoints of the policy engine: layout, RNG states, safetensors shards, save, load, rotation.

``<root>/step_<global_step>/`` holds DeepSpeed's files (``*_model_states.pt``, one
``zero_pp_rank_<r>_*_optim_states.pt`` per rank: fp32 master weights, AdamW moments, LR
scheduler, DeepSpeed counters), ``rng_rank<r>.pt`` (python, numpy, torch CPU and CUDA
generators of each rank), ``dynalign_state.json`` (engine counters, world size and the
caller's JSON ``client_state``: iteration, step, data position) and, once the reference has
been moved, ``reference/`` (safetensors). It is written as ``<root>/.tmp-step_<n>`` and
renamed; ``<root>/latest`` (the tag, DeepSpeed's convention) is replaced atomically last, so
a crash leaves the previous checkpoint loadable. Needs a filesystem shared by all ranks.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from dynalign.distributed import barrier
from dynalign.io import atomic_write_text, fsync_dir, write_json
from dynalign.zero import copy_into, gathered_clone

if TYPE_CHECKING:
    from dynalign.engine.policy import PolicyEngine

CHECKPOINT_PREFIX = "step_"  # checkpoint directories: <root>/step_<global_step>
LATEST_FILE = "latest"  # names the newest complete checkpoint (DeepSpeed's convention too)
STATE_FILE = "dynalign_state.json"  # engine counters + the caller's client_state
REFERENCE_DIR = "reference"  # reference weights, saved once update_reference() has moved them
SHARD_BYTES = 4 << 30  # safetensors shard size of export_hf and the saved reference


# ---------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -------------------------------------------------------------------- safetensors


def write_safetensors_shards(tensors: Iterable[tuple[str, Tensor]], directory: Path,
                             max_shard_bytes: int = SHARD_BYTES) -> None:
    """Stream ``(name, tensor)`` into ``model.safetensors`` (or shards + index) in ``directory``.

    Holds at most one shard in memory. Names and layout follow ``save_pretrained``, so
    ``from_pretrained`` reads the directory.
    """
    from safetensors.torch import save_file

    shard: dict[str, Tensor] = {}
    shard_bytes = 0
    files: list[list[str]] = []  # names per shard, in order
    total = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        save_file(shard, str(directory / f".shard-{len(files):05d}"), metadata={"format": "pt"})
        files.append(list(shard))
        shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[name] = tensor.contiguous()
        shard_bytes += size
        total += size
    if shard or not files:
        flush()
    if len(files) == 1:
        os.replace(directory / ".shard-00000", directory / "model.safetensors")
        return
    weight_map = {}
    for index, names in enumerate(files):
        final = f"model-{index + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(directory / f".shard-{index:05d}", directory / final)
        weight_map.update(dict.fromkeys(names, final))
    index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_json(directory / "model.safetensors.index.json", index_doc, indent=2, ensure_ascii=True)


def read_safetensors_dir(directory: Path) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` of a directory written by :func:`write_safetensors_shards`, lazily."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    for file in files:
        with safe_open(str(directory / file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, handle.get_tensor(name)


def write_gathered(engine: PolicyEngine, tensors: Iterable[tuple[str, Tensor]], directory: Path) -> None:
    """Full copies of ``tensors`` into safetensors in ``directory`` on rank 0; collective."""
    full = ((name, gathered_clone(t)) for name, t in tensors)
    if engine.rank == 0:
        write_safetensors_shards(full, directory)
    elif engine.zero3:
        for _ in full:  # take part in the gathers
            pass


# ---------------------------------------------------------------------- layout


def checkpoint_step(path: Path) -> int | None:
    suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def resolve_checkpoint(directory: str | os.PathLike) -> tuple[Path, str]:
    """``(root, tag)`` of a checkpoint root (via ``latest``) or of one checkpoint directory."""
    path = Path(directory)
    if (path / LATEST_FILE).is_file():
        return path, (path / LATEST_FILE).read_text().strip()
    if (path / STATE_FILE).is_file():
        return path.parent, path.name
    raise FileNotFoundError(f"no checkpoint at {path}: expected a '{LATEST_FILE}' file or {STATE_FILE}")


def commit(root: Path, tmp_tag: str, tag: str) -> None:
    """Rename the written ``tmp_tag`` to ``tag`` and point ``latest`` at it (rank 0)."""
    final, trash = root / tag, root / f".trash-{tag}"
    if final.exists():  # the same step saved again: keep the old one until the new is in
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
    os.replace(root / tmp_tag, final)
    fsync_dir(root)
    atomic_write_text(root / LATEST_FILE, tag)
    shutil.rmtree(trash, ignore_errors=True)


def rotate(root: Path, tag: str, keep: int | None) -> None:
    """Remove all but the newest ``keep`` checkpoints (None: keep all); ``tag`` always stays."""
    if keep is None:
        return
    steps = {p: checkpoint_step(p) for p in root.iterdir() if p.is_dir()}
    done = sorted((p for p, step in steps.items() if step is not None), key=lambda p: steps[p] or 0)
    for old in done[:-keep] if keep > 0 else done:
        if old.name != tag:
            shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------ save, load


def save(engine: PolicyEngine, directory: str | os.PathLike, client_state: dict[str, Any] | None,
         keep: int | None) -> Path:
    """Checkpoint ``engine`` into ``<directory>/step_<global_step>``; collective; RNG states kept."""
    client_json = json.dumps(client_state or {})  # fail before writing anything
    rng = rng_state()
    root = Path(directory)
    tag = f"{CHECKPOINT_PREFIX}{engine.global_step}"
    tmp_tag = f".tmp-{tag}"
    if engine.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)  # left by a crashed save
    barrier()
    engine.ds_engine.save_checkpoint(str(root), tag=tmp_tag, client_state={}, save_latest=False)
    write_extras(engine, root / tmp_tag, rng, json.loads(client_json))
    barrier()
    if engine.rank == 0:
        commit(root, tmp_tag, tag)
        rotate(root, tag, keep)
    barrier()
    set_rng_state(rng)
    return root / tag


def write_extras(engine: PolicyEngine, path: Path, rng: dict[str, Any], client_state: dict[str, Any]) -> None:
    """What DeepSpeed does not save: RNG states, the moved reference, counters, ``client_state``."""
    torch.save(rng, path / f"rng_rank{engine.rank}.pt")
    if engine.reference_updated:
        if engine.rank == 0:
            (path / REFERENCE_DIR).mkdir()
        write_gathered(engine, engine.reference_tensors(), path / REFERENCE_DIR)
    if engine.rank == 0:
        state = {"client_state": client_state, "global_step": engine.global_step,
                 "skipped_steps": engine.skipped_steps, "reference_updated": engine.reference_updated,
                 "world_size": engine.world_size}
        write_json(path / STATE_FILE, state, indent=2, sort_keys=True, ensure_ascii=True)


def load(engine: PolicyEngine, directory: str | os.PathLike) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save` into ``engine``; collective; returns ``client_state``."""
    root, tag = resolve_checkpoint(directory)
    path = root / tag
    state = json.loads((path / STATE_FILE).read_text())
    if state["world_size"] != engine.world_size:
        raise ValueError(f"{path} was written by {state['world_size']} rank(s), this run has "
                         f"{engine.world_size}: ZeRO checkpoints need the same world size")
    loaded, _ = engine.ds_engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    if state["reference_updated"] and engine.grpo.beta > 0:
        _load_reference(engine, path / REFERENCE_DIR)
    elif engine.reference_updated:
        raise RuntimeError("this engine's reference was moved; load a checkpoint whose reference "
                           "is the base model into a fresh engine")
    engine.global_step, engine.skipped_steps = state["global_step"], state["skipped_steps"]
    set_rng_state(torch.load(path / f"rng_rank{engine.rank}.pt", weights_only=False))
    barrier()
    return state["client_state"]


def _load_reference(engine: PolicyEngine, directory: Path) -> None:
    targets = dict(engine.reference_tensors())
    for name, tensor in read_safetensors_dir(directory):
        copy_into(targets.pop(name), tensor, engine.rank)
    if targets:
        raise RuntimeError(f"reference weights missing from {directory}: {sorted(targets)[:5]}")
    engine.reference_updated = True
