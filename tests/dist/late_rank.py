"""``python -m dynalign.train`` whose rank 1 starts its first GRPO step ``SECONDS`` late.

Usage: ``python tests/dist/late_rank.py SECONDS key=value ...`` (Hydra overrides as for the CLI),
once per rank of a launch that sets ``SLURM_PROCID`` or ``RANK``. Rank 1's first step sleeps
before it samples (in ``sampling_params``, which each step asks for first), so rank 0 waits in
that step's first collective for as long as the group lets it.
"""

from __future__ import annotations

import os
import runpy
import sys
import time

import dynalign.rollout

late_by = float(sys.argv.pop(1))
sampling_params = dynalign.rollout.sampling_params


def late_sampling_params(*args, **kwargs):
    time.sleep(late_by)
    dynalign.rollout.sampling_params = sampling_params
    return sampling_params(*args, **kwargs)


if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "1":
    dynalign.rollout.sampling_params = late_sampling_params
runpy.run_module("dynalign.train", run_name="__main__", alter_sys=True)
