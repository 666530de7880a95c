"""Process-group plumbing: one process per rank, on CPU (gloo) or CUDA (nccl).

Works in three launch modes with the same code:

* a plain ``python -m dynalign.train``: no launcher variables, so a world of one is set up
  on a free localhost port (``srun``/``mpirun`` with several tasks but no torch launcher is
  refused rather than silently training N separate models);
* ``torchrun --nproc_per_node N ...`` and the ``deepspeed`` launcher: ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` come from the environment;
* a process where ``torch.distributed`` is already initialised (a test, vLLM in-process): the
  existing group is reused, never re-created.

Side effects that only rank 0 should have go through :func:`print0` and the tracker (a
``NullTracker`` on other ranks, see :mod:`dynalign.tracking`) instead of ``if rank == 0``
branches. Step metrics are combined over ranks by :func:`reduce_metrics`, in one collective.
``DS_ACCELERATOR`` must be set before ``deepspeed`` is imported: :func:`ensure_ds_accelerator`
does that, so import deepspeed only after calling it.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def ensure_ds_accelerator() -> str:
    """Set ``DS_ACCELERATOR=cpu`` when it is unset and there is no CUDA; returns the value (or "")."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    return os.environ.get("DS_ACCELERATOR", "")


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago (for a world of one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def _check_not_foreign_launch() -> None:
    """Refuse to start N independent worlds of one under srun/mpirun without a torch launcher."""
    for variable in ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if int(os.environ.get(variable, "1") or 1) > 1:
            raise RuntimeError(f"{variable}={os.environ[variable]} but RANK/WORLD_SIZE are unset: start "
                               "each node with torchrun or the deepspeed launcher (see the README)")


def init_distributed() -> DistInfo:
    """Initialise (or join) the process group through DeepSpeed's comm layer; idempotent.

    DeepSpeed picks the backend from its accelerator: nccl on CUDA; on CPU oneCCL when it is
    installed, else gloo. On CUDA the process is bound to ``cuda:LOCAL_RANK`` first. A world
    of one uses a ``tcp://`` rendezvous on a free port and exports only ``LOCAL_RANK`` (which
    DeepSpeed reads), so child processes do not inherit a stale ``MASTER_PORT``/``RANK``.
    """
    ensure_ds_accelerator()
    launched = all(name in os.environ for name in LAUNCHER_VARIABLES)
    if not dist.is_initialized() and not launched:
        if os.environ.get("WORLD_SIZE", "1") != "1":
            missing = [name for name in LAUNCHER_VARIABLES if name not in os.environ]
            raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} are unset")
        _check_not_foreign_launch()
        os.environ.setdefault("LOCAL_RANK", "0")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    import deepspeed  # after ensure_ds_accelerator()

    if dist.is_initialized() or launched:
        deepspeed.init_distributed(verbose=False)
    else:
        deepspeed.init_distributed(verbose=False, auto_mpi_discovery=False, rank=0, world_size=1,
                                   init_method=f"tcp://127.0.0.1:{free_port()}")
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local,
                    backend=str(dist.get_backend()), device=device)


def get_rank() -> int:
    """Global rank; 0 when no process group exists (nothing launched yet)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    """Number of ranks; 1 when no process group exists."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a world of one or without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum`` | ``max`` | ``min``) over every rank; returns ``tensor``.

    The collective runs on the backend's device (a CPU tensor is moved to CUDA under nccl and
    copied back), so callers may pass CPU scalars.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"unknown reduce op {op!r}; valid: {', '.join(ops)}")
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        moved = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(moved, op=ops[op])
        tensor.copy_(moved)
    else:
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def _several_ranks() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank; ``obj`` itself in a world of one."""
    if not _several_ranks():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj`` (picklable), in rank order, on rank ``dst``; None on the other ranks.
    ``[obj]`` in a world of one."""
    if not _several_ranks():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only, on a line of its own above a live progress bar (``tqdm.write``:
    ``file``, ``end``)."""
    if is_main_process():
        tqdm.write(" ".join(str(a) for a in args), **kwargs)


def reduce_metrics(metrics: Mapping[str, float], *, summed: Callable[[str], bool] = lambda key: False,
                   weights: Mapping[str, float] | None = None,
                   reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Every rank's share of a step's metrics combined into the whole step's, in one all-reduce.

    Keys for which ``summed(key)`` holds are counts: summed over the ranks. Every other value is
    the mean over the ranks where it is finite, each rank weighted by ``weights[key]`` (default 1:
    the ranks' shares are the same size), NaN where no rank has a finite value. Every rank must
    pass the same keys: they are sorted so that the packed tensors line up. ``reduce`` sums a
    tensor over the ranks (default: :func:`all_reduce`).
    """
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)  # [K]
    finite = torch.isfinite(values)  # [K]
    weight = torch.tensor([1.0 if summed(k) else (weights or {}).get(k, 1.0) for k in keys],
                          dtype=torch.float64) * finite  # [K] 0 where this rank has no value
    packed = torch.stack([torch.where(finite, values, 0.0) * weight, weight])  # [2, K]
    totals, weight_sums = (reduce or all_reduce)(packed).tolist()  # [K], [K] over every rank
    return {key: math.nan if weight_sum == 0 else total if summed(key) else total / weight_sum
            for key, total, weight_sum in zip(keys, totals, weight_sums, strict=True)}
