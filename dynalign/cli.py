"""Shared glue for the ``python -m dynalign.*`` entry points."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dynalign.config import ConfigError, TrainConfig, to_train_config
from dynalign.config.preflight import preflight
from dynalign.io import atomic_write_text


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


LAUNCH_RECORD_DIR = ".hydra"  # in a run's directory: the launch's config, Hydra config and overrides


def launch_record(cfg: DictConfig) -> dict[str, str]:
    """The files Hydra writes to ``<output>/.hydra/`` for the running job, by name: the composed
    config (``config.yaml``), Hydra's own (``hydra.yaml``) and the command line's overrides
    (``overrides.yaml``), each as Hydra renders it.

    conf/train.yaml sets ``hydra.output_subdir: null``, so Hydra writes none of them before the
    job starts: a launch refused a directory (another run holds it, or an earlier run's records
    are there) would otherwise replace that run's record with its own. Each entry point saves
    them (:func:`save_launch_record`) once the output directory is its own.
    """
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.instance().cfg  # {"hydra": ...}, as Hydra saves it
    return {"config.yaml": OmegaConf.to_yaml(cfg), "hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
            "overrides.yaml": OmegaConf.to_yaml(HydraConfig.get().overrides.task)}


def save_launch_record(out_dir: Path, record: dict[str, str]) -> None:
    """Write :func:`launch_record`'s files to ``out_dir/.hydra/`` (each whole or not at all)."""
    for name, text in record.items():
        atomic_write_text(out_dir / LAUNCH_RECORD_DIR / name, text)


def entry_point() -> str:
    """The running entry point: Hydra names the job after the module of its main (``train``)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().job.name if HydraConfig.initialized() else "train"


# Hydra's command-line flags (hydra/_internal/utils.py, get_args_parser; a test compares) and
# what each takes: "none", "one" value, or "optional": one of INFO_CHOICES when one follows.
_NO_VALUE = "--help -h --hydra-help --version --resolve --run -r --multirun -m --shell-completion -sc"
_ONE_VALUE = "--cfg -c --package -p --config-path -cp --config-name -cn --config-dir -cd --experimental-rerun"
HYDRA_FLAGS: dict[str, str] = {
    **dict.fromkeys(_NO_VALUE.split(), "none"),
    **dict.fromkeys(_ONE_VALUE.split(), "one"),
    **dict.fromkeys(("--info", "-i"), "optional"),
}
INFO_CHOICES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
_NEGATIVE_NUMBER = re.compile(r"-\d+$|-\d*\.\d+$")  # a value to argparse, not a flag


def _is_flag(arg: str) -> bool:
    return arg.startswith("-") and arg not in ("-", "--") and not _NEGATIVE_NUMBER.match(arg)


def _flag_takes(arg: str) -> str:
    """What follows flag ``arg``: "none", "one" value or an "optional" one (see HYDRA_FLAGS)."""
    if "=" in arg:  # --cfg=job: the value is attached
        return "none"
    if arg in HYDRA_FLAGS:
        return HYDRA_FLAGS[arg]
    if arg.startswith("--"):  # argparse accepts a unique prefix of a long flag (--multi)
        takes = {HYDRA_FLAGS[flag] for flag in HYDRA_FLAGS if flag.startswith(arg)}
        if len(takes) == 1:
            return takes.pop()
    return "none"  # an attached short value (-cjob), or a flag argparse will refuse by itself


def hydra_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` (without the program name) with Hydra's flags and their values first, then the
    overrides, each part in its original order.

    Hydra's parser reads the overrides as one positional list, so a flag after an override
    (``model=llama3_8b -m grpo.lr=1e-6,3e-6``) would be refused as an unrecognized argument.
    A flag keeps the value it takes (``--cfg job``, ``-cp DIR``, even one with ``=`` in it);
    ``--info`` takes the next word only when it is one of its choices. Everything after ``--``
    is an override; a ``--`` is put back before the overrides when the original had one, or
    when the last flag goes without the value it may take (a bare ``--info``; a ``--package``
    missing its value, which Hydra then refuses) and would otherwise take the first override.
    """
    flags: list[str] = []
    overrides: list[str] = []
    separated = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            separated = True
            overrides += argv[i:]
            break
        if not _is_flag(arg):
            overrides.append(arg)
            continue
        flags.append(arg)
        takes = _flag_takes(arg)
        value = argv[i] if i < len(argv) else None
        if value is not None and (
            (takes == "one" and not _is_flag(value) and value != "--")
            or (takes == "optional" and value in INFO_CHOICES)
        ):
            flags.append(value)
            i += 1
    valueless = bool(flags) and _is_flag(flags[-1]) and _flag_takes(flags[-1]) != "none"
    if overrides and (separated or valueless):
        return [*flags, "--", *overrides]
    return [*flags, *overrides]


def run_main(main: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` entry point with Hydra's flags allowed anywhere among the overrides
    (the ``__main__`` path of every ``python -m dynalign.*`` command)."""
    sys.argv[1:] = hydra_argv(sys.argv[1:])
    main()
