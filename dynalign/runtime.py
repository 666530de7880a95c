"""Process-level helpers of a run: phase timers, preemption, seeding, run-directory stamps."""

from __future__ import annotations

import os
import random
import signal
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from omegaconf import OmegaConf


class PhaseTimer:
    """Wall time per named phase (``gen``, ``judge``, ``update``...), read out as ``time/<phase>``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    def pop(self, total: str | None = "step") -> dict[str, float]:
        """The times since the last pop, as metrics, with their sum as ``time/<total>`` (if named)."""
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        if total is not None:
            out[f"time/{total}"] = sum(self.seconds.values())
        self.seconds.clear()
        return out


class Preemption:
    """Turns SIGTERM (and SIGUSR1, which SLURM can send before a timeout) into a flag.

    The loop checks ``requested`` after each step, saves a checkpoint and exits cleanly, so a
    preempted job loses at most the step in flight.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> Preemption:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every device): the one seeding function of the package."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(seed: int, *parts: int) -> int:
    """A sampling seed that depends only on the run seed and where the run is (iteration, step,
    rank), so a resumed run samples exactly what the uninterrupted one did."""
    value = seed
    for part in parts:
        value = (value * 1_000_003 + part) % (2**31 - 1)
    return value


def run_stamp(fmt: str = "%Y-%m-%d/%H-%M-%S") -> str:
    """A timestamp that every rank of one launch agrees on, for Hydra's run directory.

    ``DYNALIGN_RUN_STAMP`` wins when set (multi-node jobs should set it, or pass
    ``hydra.run.dir``). Under torchrun or the deepspeed launcher the ranks of a node share a
    parent process, whose start time they all read; a plain process uses the current time.
    """
    if os.environ.get("DYNALIGN_RUN_STAMP"):
        return os.environ["DYNALIGN_RUN_STAMP"]
    when = time.time()
    if "LOCAL_RANK" in os.environ:
        import psutil

        when = psutil.Process(os.getppid()).create_time()
    return datetime.fromtimestamp(when).strftime(fmt)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_stamp"):
        # cached: every job of a sweep (Hydra re-resolves the sweep directory for each, in this
        # process or, with submitit, on the node that runs it) gets the stamp the sweep began with
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)
