"""Shared glue for the ``python -m dynalign.*`` entry points."""

from __future__ import annotations

import os
import sys

from omegaconf import DictConfig

from dynalign.config import ConfigError, TrainConfig, to_train_config


def validated_config(cfg: DictConfig, world_size: int | None = None) -> TrainConfig:
    """Validate a composed config, or exit with status 2 and a one-line error naming the key.

    The world size defaults to the launcher's ``WORLD_SIZE`` (torchrun, deepspeed), so
    launch-time rules are checked before any process group or model exists.
    """
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        return to_train_config(cfg, world_size)
    except ConfigError as err:
        print(f"dynalign: invalid config: {err}", file=sys.stderr)
        raise SystemExit(2) from None
