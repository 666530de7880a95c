"""One rank of a world of two, started by hand with SLURM's variables: ``TIMEOUT_S LATE_S``.

Both ranks join through :func:`dynalign.distributed.init_distributed` with a collective timeout
of ``TIMEOUT_S`` seconds and then make a group of their own (as DeepSpeed makes its ZeRO groups,
after the world's). Rank 1 sleeps ``LATE_S`` seconds and leaves; rank 0 all-reduces over the
later group meanwhile, under the run's own error handling, and prints how long it waited.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from dynalign.distributed import failure_ends_launch, init_distributed

timeout_s, late_s = float(sys.argv[1]), float(sys.argv[2])
info = init_distributed(timedelta(seconds=timeout_s))
print(f"rank {info.rank} of {info.world_size}", flush=True)
later = dist.new_group([0, 1])
if info.rank == 1:
    time.sleep(late_s)
    sys.exit(0)
start = time.monotonic()
with failure_ends_launch():  # ends the process on the timeout: the wait is told on the way out
    try:
        dist.all_reduce(torch.ones(1), group=later)
    finally:
        print(f"waited {time.monotonic() - start:.1f} s", flush=True)
