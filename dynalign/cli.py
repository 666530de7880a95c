"""Shared glue for the ``python -m dynalign.*`` entry points."""

from __future__ import annotations

import os
import sys

from omegaconf import DictConfig

from dynalign.config import ConfigError, TrainConfig, to_train_config
from dynalign.config.preflight import preflight


def validated_config(cfg: DictConfig, world_size: int | None = None, entry: str | None = None) -> TrainConfig:
    """Validate a composed config, or exit with status 2 and a one-line error naming the key.

    The values first (:meth:`TrainConfig.validate`), then what they point at on disk for the
    entry point ``entry`` (:func:`~dynalign.config.preflight.preflight`: models, checkpoint,
    datasets, rubric files), all before any model is loaded. ``entry`` defaults to Hydra's job
    name (``train`` for ``python -m dynalign.train``). The world size defaults to the
    launcher's ``WORLD_SIZE`` (torchrun, deepspeed), so launch-time rules are checked before
    any process group or model exists.
    """
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        config = to_train_config(cfg, world_size)
        preflight(config, entry or entry_point())
    except ConfigError as err:
        print(f"dynalign: invalid config: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return config


def entry_point() -> str:
    """The running entry point: Hydra names the job after the module of its main (``train``)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().job.name if HydraConfig.initialized() else "train"
