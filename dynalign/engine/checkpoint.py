"""Checkpoints of the policy engine: layout, RNG states, safetensors shards, save, load, rotation.

Layout
------
``<root>/step_<global_step>/`` holds DeepSpeed's files (``*_model_states.pt``, one
``zero_pp_rank_<r>_*_optim_states.pt`` per rank: fp32 master weights, AdamW moments, LR
scheduler, DeepSpeed counters), ``rng_rank<r>.safetensors`` (python, numpy, torch CPU and CUDA
generators of each rank: tensors plus JSON metadata, see :func:`rng_tensors`),
``dynalign_state.json`` (engine counters, world size, the caller's JSON ``client_state`` and
the size of every other file of the checkpoint) and, once the reference has been moved,
``reference/`` (safetensors). It is written as ``<root>/.tmp-step_<n>`` and renamed;
``<root>/latest`` (the tag, DeepSpeed's convention) is replaced atomically last, so a crash
leaves the previous checkpoint loadable. Needs a filesystem shared by all ranks.

A checkpoint is *complete* when its ``dynalign_state.json`` is readable, its ``global_step``
matches the directory's ``<n>`` and every file it lists is there with the size it was written
with (:func:`checkpoint_complete`; the sizes catch a crash's truncation, they are no signature).
:func:`resumable_checkpoint` is what ``resume=auto`` loads: what ``latest`` names, or, without a
usable one (a crash before it was first written, or it was deleted), the newest complete
checkpoint (:func:`newest_complete_checkpoint`).

Loading from an untrusted source
--------------------------------
Loading a checkpoint never unpickles arbitrary objects, so a checkpoint received from someone
else cannot run code:

* dynalign's own files are JSON and safetensors (no pickle at all);
* DeepSpeed's ``.pt`` files are read by :func:`safe_torch_load`: ``torch.load(weights_only=True)``,
  which rebuilds only tensors, containers and primitive values, plus the few plain-data types
  DeepSpeed writes (:func:`deepspeed_safe_globals`). DeepSpeed reads every file of the resume
  path through its engine's ``checkpoint_engine.load``, which :func:`load` replaces for the
  duration (:func:`safe_deepspeed_loads`); the paths that call ``torch.load(weights_only=False)``
  directly (universal checkpoints, ``zero_to_fp32`` when optimizer states are not loaded) are
  not taken: optimizer states are always loaded, and universal checkpoints are refused;
* ``latest`` must hold exactly ``step_<digits>``, naming a sibling directory: no path can
  redirect the load elsewhere.

Every missing, truncated, corrupt or refused file raises :class:`CheckpointError`, whose message
is one line that starts with the file's path.

At a run's end
--------------
A run that ends with ``checkpoint_optimizer_at_end=false`` calls :func:`drop_training_state`:
its checkpoints give up DeepSpeed's files (12 bytes a trainable parameter: fp32 master weights
and the two AdamW moments; below ZeRO-3 also the module) and keep the run's record
(counters, position, RNG states, the moved reference). Their state says ``"resumable": false``
and :func:`load` refuses them (:func:`check_resumable`); the run's final weights are its last
``iter_<k>/`` export.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from dynalign.distributed import barrier
from dynalign.io import atomic_write_text, fsync_dir, write_json
from dynalign.rundir import CHECKPOINT_STATE, LATEST, NOT_RESUMABLE, RESUMABLE, resumable
from dynalign.zero import copy_into, gathered_clone

if TYPE_CHECKING:
    from dynalign.engine.policy import PolicyEngine

CHECKPOINT_PREFIX = "step_"  # checkpoint directories: <root>/step_<global_step>
LATEST_FILE = LATEST  # names the newest complete checkpoint (DeepSpeed's convention too)
STATE_FILE = CHECKPOINT_STATE  # engine counters, client_state, the files written
REFERENCE_DIR = "reference"  # reference weights, saved once update_reference() has moved them
SHARD_BYTES = 4 << 30  # safetensors shard size of export_hf and the saved reference
RNG_FORMAT = "dynalign-rng-1"  # the metadata tag of rng_rank<r>.safetensors
_TAG = re.compile(r"step_([0-9]+)")  # ASCII digits only: str.isdigit() also takes '²'
_LATEST_MAX_BYTES = 64  # a tag is short; a larger 'latest' is not one


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt, refused or inconsistent.

    ``path`` is the offending file (or directory); the message is one line starting with it,
    so a log line points at what to look at.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = " ".join(reason.split())
        super().__init__(f"{self.path}: {self.reason}")


def _failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


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


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.safetensors"


def rng_tensors(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """An :func:`rng_state` as safetensors tensors and metadata, without pickle.

    Tensors: ``torch`` and ``cuda.<i>`` (the generators' uint8 states), ``python`` (the 625
    ints of ``random.getstate()``) and ``numpy`` (the 624 MT19937 keys), as int64 (exact: all
    are below 2**32). Metadata: ``format``, and JSON of the scalars, ``python``
    (version, gauss_next) and ``numpy`` (pos, has_gauss, cached_gaussian: JSON floats round-trip).
    """
    version, keys, gauss_next = state["python"]
    kind, mt_keys, pos, has_gauss, cached_gaussian = state["numpy"]
    if kind != "MT19937":
        raise ValueError(f"numpy bit generator {kind!r} is not MT19937")
    tensors = {"torch": state["torch"], "python": torch.tensor(keys, dtype=torch.int64),
               "numpy": torch.from_numpy(np.asarray(mt_keys, dtype=np.int64))}
    tensors.update({f"cuda.{index}": cuda for index, cuda in enumerate(state.get("cuda", []))})
    metadata = {"format": RNG_FORMAT,
                "python": json.dumps({"version": version, "gauss_next": gauss_next}),
                "numpy": json.dumps({"pos": int(pos), "has_gauss": int(has_gauss),
                                     "cached_gaussian": float(cached_gaussian)})}
    return tensors, metadata


def rng_from_tensors(tensors: dict[str, Tensor], metadata: dict[str, str]) -> dict[str, Any]:
    """The inverse of :func:`rng_tensors`; each state is checked by restoring it into a scratch
    generator, so a bad file fails here, before anything of the engine has been changed."""
    if metadata.get("format") != RNG_FORMAT:
        raise ValueError(f"metadata format is {metadata.get('format')!r}, expected {RNG_FORMAT!r}")
    python, numpy = json.loads(metadata["python"]), json.loads(metadata["numpy"])
    state: dict[str, Any] = {
        "python": (python["version"], tuple(int(v) for v in _int_values(tensors["python"])),
                   python["gauss_next"]),
        "numpy": ("MT19937", _int_values(tensors["numpy"]).astype(np.uint32), numpy["pos"],
                  numpy["has_gauss"], numpy["cached_gaussian"]),
        "torch": tensors["torch"]}
    cuda = sorted((int(name.split(".", 1)[1]), t) for name, t in tensors.items() if name.startswith("cuda."))
    if cuda:
        state["cuda"] = [t for _, t in cuda]
    random.Random().setstate(state["python"])
    np.random.RandomState().set_state(state["numpy"])
    for generator_state in (state["torch"], *state.get("cuda", [])):
        if generator_state.dtype != torch.uint8 or generator_state.dim() != 1:
            raise ValueError("a torch generator state is not a 1-d uint8 tensor")
    torch.Generator().set_state(state["torch"])
    return state


def _int_values(tensor: Tensor) -> np.ndarray:
    """The values of a 1-d int64 tensor of 32-bit words (a generator's key)."""
    values = tensor.numpy()
    if tensor.dtype != torch.int64 or values.ndim != 1 or values.min() < 0 or values.max() >= 1 << 32:
        raise ValueError("a generator key is not a 1-d int64 tensor of 32-bit values")
    return values


def write_rng(file: Path, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tensors, metadata = rng_tensors(state)
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(file), metadata=metadata)


def read_rng(file: Path) -> dict[str, Any]:
    """The RNG states of ``file`` (written by :func:`write_rng`), checked; raises :class:`CheckpointError`."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        return rng_from_tensors(tensors, metadata)
    except Exception as exc:  # untrusted bytes: any failure is the file's
        raise CheckpointError(file, f"unreadable RNG state: {_failure(exc)}") from exc


# --------------------------------------------------------- DeepSpeed's files, safely


def deepspeed_safe_globals() -> list[Callable[..., Any] | tuple[Callable[..., Any], str]]:
    """The non-tensor types DeepSpeed 0.19.8 pickles into its checkpoint files, and no more.

    Found by saving ZeRO stage 0-3 checkpoints (float32, bfloat16, float16, optimizer offload,
    LoRA) and listing ``torch.serialization.get_unsafe_globals_in_checkpoint``: the ZeRO stage
    (an int enum) and the loss scaler (plain attributes) in the optimizer shards, and the
    ``fragment_address`` dataclass (two ints) of ZeRO 1/2 shards. ``weights_only`` rebuilds
    them by setting attributes; none runs code of the file's choosing.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def safe_torch_load(path: str | os.PathLike, map_location: Any = None) -> Any:
    """``torch.load`` that refuses arbitrary globals (``weights_only=True`` plus
    :func:`deepspeed_safe_globals`); any failure raises :class:`CheckpointError` naming ``path``."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()), warnings.catch_warnings():
            # a file not written by torch.save: the refusal below says what matters about it
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(path, f"refused to load: {_unpickler_detail(exc)} (only tensors, "
                                    "plain values and DeepSpeed's own types are loaded)") from exc
    except Exception as exc:  # corrupt, truncated or missing: name the file
        raise CheckpointError(path, f"unreadable: {_failure(exc)}") from exc


def _unpickler_detail(exc: pickle.UnpicklingError) -> str:
    """What torch's refusal says about the file, without its advice on weights_only=False."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(exc).splitlines()]
    return " ".join(line for line in lines if line and not line.startswith(boilerplate)) or str(exc)


@functools.cache
def _safe_engine_class() -> type:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, loading through :func:`safe_torch_load`."""

        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_torch_load(path, map_location)

    return SafeCheckpointEngine


@contextlib.contextmanager
def safe_deepspeed_loads(ds_engine: Any) -> Iterator[None]:
    """Make ``ds_engine`` read checkpoint files through :func:`safe_torch_load` for the duration.

    DeepSpeed reads the model states (``SDLoaderFactory``), the ZeRO optimizer shards
    (``_get_all_zero_checkpoint_state_dicts``) and the client optimizer file through
    ``ds_engine.checkpoint_engine.load``. Swapped back afterwards, so saving keeps the engine
    the DeepSpeed config chose.
    """
    saved = ds_engine.checkpoint_engine
    ds_engine.checkpoint_engine = _safe_engine_class()()
    try:
        yield
    finally:
        ds_engine.checkpoint_engine = saved


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


def safetensors_files(directory: Path) -> list[Path]:
    """The safetensors files of a directory written by :func:`write_safetensors_shards`.

    The index may only name plain files of ``directory``; raises :class:`CheckpointError`.
    """
    index = directory / "model.safetensors.index.json"
    if not index.exists():
        return [directory / "model.safetensors"]
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if not all(isinstance(n, str) and _plain_name(n) for n in names):
            raise ValueError("the weight map names a file outside the directory")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(index, f"unreadable safetensors index: {_failure(exc)}") from exc
    return [directory / name for name in names]


def read_safetensors_dir(directory: Path) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` of a directory written by :func:`write_safetensors_shards`, lazily;
    an unreadable file raises :class:`CheckpointError` naming it."""
    from safetensors import safe_open

    for file in safetensors_files(directory):
        try:
            with safe_open(str(file), framework="pt") as handle:
                names = list(handle.keys())
                tensors = ((name, handle.get_tensor(name)) for name in names)
                yield from tensors
        except Exception as exc:  # untrusted bytes (errors of the consumer are not thrown in here)
            raise CheckpointError(file, f"unreadable safetensors: {_failure(exc)}") from exc


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
    """``n`` of a ``step_<n>`` directory name, else None (``.tmp-*`` and ``.trash-*`` included)."""
    match = _TAG.fullmatch(path.name)
    return int(match.group(1)) if match else None


def _plain_name(name: str) -> bool:
    """A relative path that stays inside its directory: no root, no '..', no empty part."""
    parts = name.split("/")
    return not name.startswith("/") and "\\" not in name and all(p not in ("", ".", "..") for p in parts)


def read_latest(root: Path) -> str | None:
    """The tag ``<root>/latest`` holds, None without one.

    It must be exactly ``step_<digits>`` (surrounding whitespace aside): never a path, so it
    cannot send the load outside ``root``. Raises :class:`CheckpointError` naming ``latest``.
    """
    latest = root / LATEST_FILE
    if not os.path.lexists(latest):
        return None
    try:
        with open(latest, "rb") as handle:
            raw = handle.read(_LATEST_MAX_BYTES + 1)
    except OSError as exc:
        raise CheckpointError(latest, f"unreadable: {_failure(exc)}") from exc
    text = raw[:_LATEST_MAX_BYTES].decode("ascii", "replace")  # a tag is ASCII: anything else fails below
    if len(raw) > _LATEST_MAX_BYTES or not _TAG.fullmatch(text.strip()):
        raise CheckpointError(latest, f"holds {text!r}, not a checkpoint tag {CHECKPOINT_PREFIX}<digits>")
    return text.strip()


def resolve_checkpoint(directory: str | os.PathLike) -> tuple[Path, str]:
    """``(root, tag)`` of a checkpoint root (via ``latest``) or of one checkpoint directory.

    A root's ``latest`` must name an existing sibling ``step_<n>`` directory (else
    :class:`CheckpointError` naming ``latest``); a directory holding ``dynalign_state.json`` is
    taken as the checkpoint itself. Neither: ``FileNotFoundError``.
    """
    path = Path(directory)
    tag = read_latest(path)
    if tag is not None:
        if not (path / tag).is_dir():
            raise CheckpointError(path / LATEST_FILE, f"names {tag}, which is not a directory of {path}")
        return path, tag
    if (path / STATE_FILE).is_file():
        return path.parent, path.name
    raise FileNotFoundError(f"no checkpoint at {path}: expected a '{LATEST_FILE}' file or {STATE_FILE}")


def checkpoint_complete(path: Path) -> bool:
    """Whether ``path`` (``<root>/step_<n>``) is a whole checkpoint: its state is readable,
    records step ``n`` and every file it lists is there with the size it was written with."""
    try:
        state = read_state(path)
        check_files(path, state)
    except CheckpointError:
        return False
    return state["global_step"] == checkpoint_step(path)


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete ``<root>/step_<n>`` by ascending ``n``, ignoring ``latest``.

    ``.tmp-step_<n>`` (a save in progress or crashed) and ``.trash-step_<n>`` (a replaced one)
    never count.
    """
    if not root.is_dir():
        return []
    steps = sorted((step, p) for p in root.iterdir()
                   if (step := checkpoint_step(p)) is not None and p.is_dir())
    return [p for _, p in steps if checkpoint_complete(p)]


def newest_complete_checkpoint(root: Path) -> Path | None:
    """The complete ``<root>/step_<n>`` with the largest ``n``, ignoring ``latest``; None if none:
    what a root whose ``latest`` is missing (a crash before it was first written, or it was
    deleted) resumes from."""
    return next(reversed(complete_checkpoints(root)), None)


def resumable_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``resume=auto`` loads from the checkpoints root ``root``; None if none.

    The one ``latest`` names when that is complete; otherwise (``latest`` missing, or naming a
    directory a crash removed or left incomplete) :func:`newest_complete_checkpoint`. A
    ``latest`` that is not a ``step_<digits>`` tag raises :class:`CheckpointError`: dynalign
    never writes one, so it was tampered with, and guessing past it could silently resume
    from an older step.
    """
    tag = read_latest(root)
    if tag is not None and checkpoint_complete(root / tag):
        return root / tag
    return newest_complete_checkpoint(root)


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


# ------------------------------------------------------------------ state file

# dynalign_state.json: key -> type (bool is no int here, though Python says it is)
_STATE_TYPES: dict[str, type] = {"client_state": dict, "global_step": int, "skipped_steps": int,
                                 "reference_updated": bool, "world_size": int, "files": dict}


def read_state(path: Path) -> dict[str, Any]:
    """``dynalign_state.json`` of the checkpoint ``path``, checked; raises :class:`CheckpointError`."""
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(file, f"unreadable: {_failure(exc)}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(file, "is not a JSON object")
    for key, kind in _STATE_TYPES.items():
        value = state.get(key)
        if type(value) is not kind or (isinstance(value, int) and value < 0):
            raise CheckpointError(file, f"{key} is {value!r}, expected a {kind.__name__}")
    if type(state.get(RESUMABLE, True)) is not bool:
        raise CheckpointError(file, f"{RESUMABLE} is {state[RESUMABLE]!r}, expected a bool")
    files = state["files"]
    if not all(_plain_name(name) and type(size) is int for name, size in files.items()):
        raise CheckpointError(file, "files must map relative paths inside the checkpoint to sizes")
    return state


def check_resumable(path: Path, state: dict[str, Any]) -> None:
    """Refuse the checkpoint ``path`` (its checked ``state``) when its run dropped DeepSpeed's files
    (:func:`drop_training_state`): nothing is left to train on from. The load, ``resume=auto``'s
    check before any model loads and preflight's of ``resume=PATH`` say the same."""
    if not resumable(state):
        raise CheckpointError(path, NOT_RESUMABLE)


def file_sizes(path: Path) -> dict[str, int]:
    """Size of every file under ``path`` by relative POSIX path, the state file left out."""
    return {p.relative_to(path).as_posix(): p.stat().st_size for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != STATE_FILE}


def checkpoint_bytes(path: Path) -> int:
    """Size on disk of the checkpoint ``path``: the files its state lists, and the state file."""
    return sum(read_state(path)["files"].values()) + (path / STATE_FILE).stat().st_size


def check_files(path: Path, state: dict[str, Any]) -> None:
    """Every file ``state`` lists is under ``path`` with its size; raises :class:`CheckpointError`."""
    for name, size in state["files"].items():
        file = path / name
        try:
            actual = file.stat().st_size
        except OSError as exc:
            raise CheckpointError(file, f"missing: {_failure(exc)}") from exc
        if actual != size:
            raise CheckpointError(file, f"truncated or changed: {actual} bytes, {size} written")


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
    """What DeepSpeed does not save: RNG states, the moved reference, counters, ``client_state``.

    The state file is written last, by rank 0 once every rank has written its files, and lists
    them all with their sizes: what :func:`checkpoint_complete` checks.
    """
    write_rng(path / rng_file(engine.rank), rng)
    if engine.reference_updated:
        if engine.rank == 0:
            (path / REFERENCE_DIR).mkdir()
        write_gathered(engine, engine.reference_tensors(), path / REFERENCE_DIR)
    barrier()
    if engine.rank == 0:
        state = {"client_state": client_state, "global_step": engine.global_step,
                 "skipped_steps": engine.skipped_steps, "reference_updated": engine.reference_updated,
                 "world_size": engine.world_size, "files": file_sizes(path)}
        write_json(path / STATE_FILE, state, indent=2, sort_keys=True, ensure_ascii=True)


def load(engine: PolicyEngine, directory: str | os.PathLike) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save` into ``engine``; collective; returns ``client_state``.

    Everything dynalign reads itself (state, file sizes, RNG states) is checked before the
    engine is touched. Safe on untrusted checkpoints (see the module docstring); any bad file
    raises :class:`CheckpointError` naming it.
    """
    root, tag = resolve_checkpoint(directory)
    path = root / tag
    state = read_state(path)
    check_resumable(path, state)
    if state["world_size"] != engine.world_size:
        raise CheckpointError(path / STATE_FILE,
                              f"written by {state['world_size']} rank(s), this run has {engine.world_size}: "
                              "ZeRO checkpoints need the same world size")
    check_files(path, state)
    rng = read_rng(path / rng_file(engine.rank))
    _load_deepspeed(engine.ds_engine, root, tag)
    if state["reference_updated"] and engine.grpo.beta > 0:
        _load_reference(engine, path / REFERENCE_DIR)
    elif engine.reference_updated:
        raise RuntimeError("this engine's reference was moved; load a checkpoint whose reference "
                           "is the base model into a fresh engine")
    engine.global_step, engine.skipped_steps = state["global_step"], state["skipped_steps"]
    set_rng_state(rng)
    barrier()
    return state["client_state"]


def _load_deepspeed(ds_engine: Any, root: Path, tag: str) -> None:
    """DeepSpeed's part, every file through :func:`safe_torch_load`."""
    path = root / tag
    if ds_engine.load_universal_checkpoint():
        raise CheckpointError(path, "DeepSpeed loads universal checkpoints with weights_only=False; "
                                    "dynalign does not load them (drop checkpoint.load_universal)")
    try:
        # load_optimizer_states=True also keeps ZeRO-3 off zero_to_fp32, which unpickles freely
        with safe_deepspeed_loads(ds_engine):
            loaded, _ = ds_engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
    except CheckpointError:
        raise
    except Exception as exc:  # a file that unpickled but does not fit: name the checkpoint
        raise CheckpointError(path, f"DeepSpeed could not load it: {_failure(exc)}") from exc
    if loaded is None:
        raise CheckpointError(path, "DeepSpeed found no model states file in it")


def _load_reference(engine: PolicyEngine, directory: Path) -> None:
    targets = dict(engine.reference_tensors())
    for name, tensor in read_safetensors_dir(directory):
        target = targets.pop(name, None)
        if target is None:
            raise CheckpointError(directory, f"holds {name!r}, which is not a reference weight")
        copy_into(target, tensor, engine.rank)
    if targets:
        raise CheckpointError(directory, f"reference weights missing: {sorted(targets)[:5]}")
    engine.reference_updated = True


def drop_training_state(engine: PolicyEngine, root: str | os.PathLike) -> int:
    """Drop DeepSpeed's files from every complete checkpoint under ``root``: what a run that ended
    needs no more to continue (module docstring, *At a run's end*); collective, rank 0 deletes.

    The state is rewritten first (``"resumable": false``, the dropped files no longer listed),
    then the files go, so a crash in between leaves a complete, refused checkpoint. Returns
    the bytes freed (0 on ranks other than 0, and for checkpoints already dropped).
    """
    freed = 0
    if engine.rank == 0:
        for path in complete_checkpoints(Path(root)):
            state = read_state(path)
            state["files"] = {name: size for name, size in state["files"].items()
                              if "/" in name or not name.endswith(".pt")}
            state[RESUMABLE] = False
            write_json(path / STATE_FILE, state, indent=2, sort_keys=True, ensure_ascii=True)
            for file in path.glob("*.pt"):  # DeepSpeed's: module states, ZeRO optimizer shards
                freed += file.stat().st_size
                file.unlink()
    barrier()
    return freed


def record_client_state(engine: PolicyEngine, directory: str | os.PathLike,
                        client_state: dict[str, Any]) -> None:
    """Replace the ``client_state`` of the newest checkpoint under ``directory`` (atomically, rank 0):
    what the caller did after saving (an evaluation) is then on record; collective."""
    if engine.rank == 0:
        root, tag = resolve_checkpoint(directory)
        state = read_state(root / tag)
        state["client_state"] = client_state
        write_json(root / tag / STATE_FILE, state, indent=2, sort_keys=True, ensure_ascii=True)
    barrier()
