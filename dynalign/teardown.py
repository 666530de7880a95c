"""The end of a job: what it used, measured, and its memory given back.

A Hydra sweep runs its jobs one after another in the same process (one process per rank under
torchrun). Each job closes what it opened (the training loop's ``ExitStack``: the tracker, the
samplers and judges, the DeepSpeed engine); :func:`release_memory` then hands the freed memory
back, so the next job starts where the first one did. :func:`memory_metrics` are what a job
logs in its summary: how much host (and GPU) memory it held, to size the next launch by.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import sys
from pathlib import Path

import psutil
import torch

GIB = 2**30
PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")  # writing "5" restarts VmHWM, the peak RSS


def memory_metrics() -> dict[str, float]:
    """``mem/rss_gib``: resident host memory now; ``mem/peak_rss_gib``: its peak since the job
    began (on Linux; elsewhere since the process began); ``mem/cuda_peak_gib`` (with CUDA): the
    most GPU memory tensors held since the job began."""
    metrics = {"mem/rss_gib": psutil.Process().memory_info().rss / GIB, "mem/peak_rss_gib": _peak_rss() / GIB}
    if torch.cuda.is_available():
        metrics["mem/cuda_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    return metrics


def device_free_gib() -> float | None:
    """Free memory of this process's CUDA device in GiB, as the driver sees it (what a colocated
    engine asleep gives back shows here); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info()[0] / GIB


def release_memory() -> None:
    """Give the memory of the objects a job let go of back (Python's cycles, the free pages of the C
    heap, the CUDA cache) and restart the peaks :func:`memory_metrics` reads, so the next job's
    are its own."""
    gc.collect()
    trim_heap()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with contextlib.suppress(OSError):  # not Linux, or a kernel without it: the peak stays the process's
        PROC_CLEAR_REFS.write_text("5")


def trim_heap() -> None:
    """Hand the free pages of glibc's heap back to the OS (``malloc_trim``).

    glibc returns the free top of its heap by itself, but not free blocks below a block still in
    use: a job's freed tensors between the few objects that outlive it stay resident, and where
    they fall differs from job to job. Under another C library (no ``malloc_trim``) nothing.
    """
    with contextlib.suppress(AttributeError):
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols: the C library it runs on


def _peak_rss() -> float:
    """Bytes: VmHWM on Linux (restartable), else the process's maximum resident set size."""
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB elsewhere
