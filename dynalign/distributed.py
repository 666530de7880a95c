"""Process-group plumbing: one process per rank, on CPU (gloo) or CUDA (nccl).

Works in four launch modes with the same code:

* a plain ``python -m dynalign.train``: no launcher variables, so a world of one is set up
  on a free localhost port (``mpirun`` with several ranks but no torch launcher is refused
  rather than silently training N separate models);
* ``torchrun --nproc_per_node N ...`` and the ``deepspeed`` launcher: ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` come from the environment;
* the tasks of an ``srun`` step (by hand, or a ``hydra/launcher=slurm`` job with several tasks):
  those variables are derived from SLURM's own (:func:`slurm_launch`) when no torch launcher
  set them;
* a process where ``torch.distributed`` is already initialised (a test, vLLM in-process, the
  next job of a sweep): the existing group is reused, never re-created.

The group this module creates lives as long as the process: every job of a Hydra sweep that
runs in it joins the same group (one per sweep, not per job), and it is destroyed at exit.
Every collective waits at most ``distributed.timeout_minutes`` (:func:`init_distributed`).

Side effects that only rank 0 should have go through :func:`print0` and the tracker (a
``NullTracker`` on other ranks, see :mod:`dynalign.tracking`) instead of ``if rank == 0``
branches. Step metrics are combined over ranks by :func:`reduce_metrics`, in one collective.
``DS_ACCELERATOR`` must be set before ``deepspeed`` is imported: :func:`ensure_ds_accelerator`
does that, so import deepspeed only after calling it.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import re
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# An srun step's rendezvous port: SLURM_PORT_BASE + SLURM_JOB_ID % SLURM_PORT_SPAN, below Linux's
# ephemeral range (32768-60999), so two jobs sharing a node meet on different ports.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 12000, 20000


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


# ------------------------------------------------------------------ SLURM


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[03-05,9],cpu1`` -> ``gpu03``,
    ``rack[1-2]-n[07-08]`` -> ``rack1-n07``."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):  # the first entry ends at a comma outside brackets
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", nodelist[:end].strip())


def slurm_tasks_per_node(spec: str) -> list[int]:
    """SLURM's per-node task counts, node by node: ``4(x2),3`` -> ``[4, 4, 3]``."""
    counts: list[int] = []
    for part in spec.split(","):
        found = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if found is None:
            raise ValueError(f"not a SLURM tasks-per-node list: {spec!r}")
        counts += [int(found[1])] * int(found[2] or 1)
    return counts


def slurm_launch(env: Mapping[str, str]) -> dict[str, str]:
    """The launcher variables of one task of a several-task ``srun`` step, from SLURM's own.

    Empty when a torch launcher set them already (``torchrun`` inside ``srun`` wins), outside
    an ``srun`` step (a batch script's own process is one task, whatever ``--ntasks`` says) and
    for a step of one task. Rank, world size and local rank are ``SLURM_PROCID``,
    ``SLURM_STEP_NUM_TASKS`` (else ``SLURM_NTASKS``) and ``SLURM_LOCALID``; rank 0's host, the
    first of ``SLURM_STEP_NODELIST`` (else ``SLURM_NODELIST``), is the rendezvous, on a port
    derived from ``SLURM_JOB_ID``. ``MASTER_ADDR`` / ``MASTER_PORT`` set by hand are kept.
    ``LOCAL_WORLD_SIZE`` (the tasks on this node, which the launch plan and vLLM's
    tensor-parallel groups read) comes from ``SLURM_STEP_TASKS_PER_NODE`` (else
    ``SLURM_TASKS_PER_NODE``) at ``SLURM_NODEID``, when SLURM sets them.
    """
    if "RANK" in env or "WORLD_SIZE" in env or "SLURM_STEP_ID" not in env:
        return {}
    world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
    if int(world) <= 1:
        return {}
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST")
    needed = {"SLURM_PROCID": env.get("SLURM_PROCID"), "SLURM_LOCALID": env.get("SLURM_LOCALID"),
              "SLURM_STEP_NODELIST or SLURM_NODELIST": nodelist, "SLURM_JOB_ID": env.get("SLURM_JOB_ID")}
    missing = [name for name, value in needed.items() if not value]
    if missing:
        raise RuntimeError(f"an srun step of {world} tasks without {', '.join(missing)}: cannot tell "
                           "this task's rank; start each node with torchrun instead (see the README)")
    port = SLURM_PORT_BASE + int(env["SLURM_JOB_ID"]) % SLURM_PORT_SPAN
    launch = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": world, "LOCAL_RANK": env["SLURM_LOCALID"],
              "MASTER_ADDR": env.get("MASTER_ADDR") or first_slurm_host(str(nodelist)),
              "MASTER_PORT": env.get("MASTER_PORT") or str(port)}
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node and env.get("SLURM_NODEID", "").isdigit():
        counts = slurm_tasks_per_node(per_node)
        node = int(env["SLURM_NODEID"])
        if node < len(counts):
            launch["LOCAL_WORLD_SIZE"] = str(counts[node])
    return launch


def adopt_slurm_launch() -> None:
    """Export :func:`slurm_launch`'s variables, so that everything after (the run directory's
    timestamp, which rank owns it, DeepSpeed) sees a launched rank; idempotent."""
    os.environ.update(slurm_launch(os.environ))


def _check_ranks_known() -> None:
    """Refuse to start N independent worlds of one under mpirun (or PMI) without a torch launcher."""
    for variable in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if int(os.environ.get(variable, "1") or 1) > 1:
            raise RuntimeError(f"{variable}={os.environ[variable]} but RANK/WORLD_SIZE are unset: start "
                               "each node with torchrun, the deepspeed launcher or srun (see the README)")


# ------------------------------------------------------------------ the process group


@dataclass
class _GroupState:
    created: bool = False  # init_distributed made the group (and destroys it at exit)
    timeout: timedelta | None = None  # the collective timeout it last set


_GROUP = _GroupState()
# What a collective that outlived its group's timeout raises: gloo's two messages, NCCL's watchdog.
COLLECTIVE_TIMEOUT = re.compile(r"timed out waiting \d+ ?ms|application timeout caused pair closure|"
                                r"collective operation timeout", re.IGNORECASE)


SHM_OP = "deepspeed_shm_comm"  # the op DeepSpeed's comm layer JIT-builds (or loads) at every init
STALE_BUILD_LOCK_S = 600.0  # torch's JIT build of it takes about a minute; a lock 10 min old is left over


def build_lock(op: str = SHM_OP) -> Path:
    """The lock file torch takes in its JIT build directory of ``op`` to build or even to load it."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(op, verbose=False)) / "lock"


def stale_build_lock(lock: Path | None = None, now: float | None = None) -> tuple[Path, float] | None:
    """``lock`` (default: :func:`build_lock` of :data:`SHM_OP`) and its age in seconds, when it is
    older than :data:`STALE_BUILD_LOCK_S`; else None.

    A process that waits for the lock polls until the file is gone. A build killed midway
    (Ctrl-C during a first run) leaves it, and every later run then waits forever without a word.
    """
    lock = build_lock() if lock is None else lock
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except OSError:
        return None
    return (lock, age) if age > STALE_BUILD_LOCK_S else None


@contextmanager
def naming_stale_build_lock(poll_s: float = 5.0) -> Iterator[None]:
    """Within the block (DeepSpeed's comm init, which loads :data:`SHM_OP`), say once on stderr
    when torch's build lock of that op is stale (:func:`stale_build_lock`): at once when it is
    already, else as soon as a lock it waits for grows that old (an interrupted build a minute
    before this launch leaves a fresh one). torch polls it forever without a word."""
    lock = build_lock()  # looked up here: a thread importing torch while DeepSpeed imports deadlocked
    done = threading.Event()

    def watch() -> None:
        while True:
            if stale := stale_build_lock(lock):
                print(f"dynalign: DeepSpeed waits for {stale[0]} ({stale[1] / 60:.0f} min old) to go before "
                      f"it loads its {SHM_OP} op; an interrupted build leaves it behind: if no DeepSpeed "
                      "build is running, delete it", file=sys.stderr, flush=True)
                return
            if done.wait(poll_s):
                return

    watcher = threading.Thread(target=watch, name="dynalign-build-lock", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()


@contextmanager
def quiet_compiler_probe() -> Iterator[None]:
    """Within the block (DeepSpeed's comm init), no INFO lines from the C compiler.

    DeepSpeed probes which of its ops this machine can build by compiling test programs (libaio's
    ``io_submit``), and setuptools logs each ``gcc`` command at INFO: through its ``compilers``
    logger, or the root logger in older setuptools (vLLM's pinned one). Under Hydra's job
    logging they reach the console of every run. Records at WARNING and above still pass.
    """
    loggers = [logging.getLogger(), logging.getLogger("compilers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def quiet_collective_deprecations() -> None:
    """Silence torch.distributed's deprecation notices for the collectives DeepSpeed calls.

    DeepSpeed's ZeRO-3 gathers and reduce-scatters through ``all_gather_into_tensor`` and
    ``reduce_scatter_tensor``, which this torch deprecates with a ``FutureWarning`` that a
    training step, a benchmark or an evaluation would print over and over: nothing dynalign's
    user can act on. Only ``FutureWarning``s raised from ``torch.distributed`` are filtered.
    """
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def init_distributed(timeout: timedelta | None = None) -> DistInfo:
    """Initialise (or join) the process group through DeepSpeed's comm layer; idempotent.

    DeepSpeed picks the backend from its accelerator: nccl on CUDA; on CPU oneCCL when it is
    installed, else gloo. On CUDA the process is bound to ``cuda:LOCAL_RANK`` first. A world
    of one uses a ``tcp://`` rendezvous on a free port and exports only ``LOCAL_RANK`` (which
    DeepSpeed reads), so child processes do not inherit a stale ``MASTER_PORT``/``RANK``.

    ``timeout`` (``distributed.timeout_minutes``) becomes the limit of every collective
    (:func:`set_collective_timeout`), also when the group exists already (the next job of a
    sweep); None leaves the group's (DeepSpeed's default for a new one: 10 min).
    """
    ensure_ds_accelerator()
    adopt_slurm_launch()
    launched = all(name in os.environ for name in LAUNCHER_VARIABLES)
    existed = dist.is_initialized()
    if not existed and not launched:
        if os.environ.get("WORLD_SIZE", "1") != "1":
            missing = [name for name in LAUNCHER_VARIABLES if name not in os.environ]
            raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} are unset")
        _check_ranks_known()
        os.environ.setdefault("LOCAL_RANK", "0")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    import deepspeed  # after ensure_ds_accelerator()

    quiet_collective_deprecations()
    limit: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    with naming_stale_build_lock(), quiet_compiler_probe():
        if existed or launched:
            deepspeed.init_distributed(verbose=False, **limit)
        else:
            deepspeed.init_distributed(verbose=False, auto_mpi_discovery=False, rank=0, world_size=1,
                                       init_method=f"tcp://127.0.0.1:{free_port()}", **limit)
    if not existed and not _GROUP.created:
        _GROUP.created = True
        atexit.register(close_process_group)
    if timeout is not None:
        set_collective_timeout(timeout)
    name_local_size(dist.get_world_size())
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local,
                    backend=str(dist.get_backend()), device=device)


def name_local_size(world_size: int) -> None:
    """Export ``LOCAL_SIZE`` (this node's ranks) for DeepSpeed's CPU accelerator.

    Without it, its ``device_count()`` runs ``numactl --hardware`` in a subprocess, and ZeRO-3
    asks at every gradient reduce-scatter: a fork and exec each time, for a count the launch
    knows. ``LOCAL_WORLD_SIZE`` (torchrun, srun) or a world of one replaces what the process
    inherited (a parent's count is not its children's); otherwise ``LOCAL_SIZE`` stays as it is
    (the ``deepspeed`` launcher sets it), or unset when nothing tells.
    """
    local = os.environ.get("LOCAL_WORLD_SIZE") or ("1" if world_size == 1 else "")
    if local and os.environ.get("DS_ACCELERATOR") == "cpu":
        os.environ["LOCAL_SIZE"] = local


def set_collective_timeout(timeout: timedelta) -> None:
    """Make ``timeout`` the limit of every collective of this process: on each group it is in,
    and on those made later by ``new_group`` without a timeout (DeepSpeed's ZeRO groups, vLLM's),
    which torch would give its own default instead (30 min; 10 min under NCCL)."""
    c10d = dist.distributed_c10d
    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout
    for group in list(c10d._world.pg_map):
        c10d._set_pg_timeout(timeout, group)
    _GROUP.timeout = timeout


def close_process_group() -> None:
    """Destroy the process group if :func:`init_distributed` made it; registered to run at exit,
    after the last job of a sweep (the jobs before it share the group).

    Every rank waits for the others first: a rank that tore its group down and left while another
    was still finishing its own work closed the sockets under that rank's gloo threads, which
    then aborted its exit (``terminate called without an active exception``)."""
    if _GROUP.created and dist.is_initialized():
        import deepspeed.comm

        barrier()
        deepspeed.comm.destroy_process_group()  # DeepSpeed's references to its groups go too
    _GROUP.created = False


def gather_strings(value: str) -> list[str]:
    """``value`` of every rank, in rank order (``[value]`` without a group of several ranks)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return [str(v) for v in values]


def collective_timeout(err: BaseException) -> str | None:
    """What timed out, when ``err`` is a collective that waited past its group's timeout, else None.

    The first timeout of the chain is told: a block that a timeout unwinds may try another
    collective on its way out and fail again (gloo: "Application timeout caused pair closure").
    """
    chain: list[BaseException] = []
    link: BaseException | None = err
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    for cause in reversed(chain):
        found = COLLECTIVE_TIMEOUT.search(str(cause)) if isinstance(cause, RuntimeError) else None
        if found:
            return found.string[found.start():].splitlines()[0]
    return None


@contextmanager
def failure_ends_launch() -> Iterator[None]:
    """In a world of several ranks, an error ends this process instead of letting Hydra go on to
    the sweep's next job: the other ranks are still inside this job's collectives, which the next
    job's would pair with. Their launcher (torchrun, srun) then stops them. A collective timeout is
    told in one line, any other error by its traceback. A world of one raises as usual (Hydra runs
    the next job and reports the failure at the end).

    The process leaves with ``os._exit(1)`` once the job's parts are closed and the logs flushed:
    a group whose collective broke cannot be destroyed cleanly (gloo's worker threads abort the
    interpreter's shutdown with ``terminate called without an active exception``), and nothing
    of this job is left for the exit handlers to save."""
    try:
        yield
    except Exception as err:
        if get_world_size() <= 1:
            raise
        timed_out = collective_timeout(err)
        if timed_out:
            minutes = f"={_GROUP.timeout.total_seconds() / 60:g}" if _GROUP.timeout else ""
            print(f"dynalign: rank {get_rank()}: a collective waited longer than distributed.timeout_minutes"
                  f"{minutes} for the other ranks ({timed_out}): one of them is stuck, far slower or gone "
                  "(see its log); if a rank legitimately works alone that long (rank 0 evaluating, writing "
                  "prompts or exporting), raise distributed.timeout_minutes", file=sys.stderr, flush=True)
        else:
            traceback.print_exc()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


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
