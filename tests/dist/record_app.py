"""A Hydra app composing dynalign's training config whose job only saves its launch record
(:func:`dynalign.cli.launch_record`) to ``<output>/.hydra/``: run with ``hydra.output_subdir=S``,
Hydra writes its own copy to ``<output>/S/`` beside it."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from dynalign.cli import launch_record, save_launch_record
from dynalign.config import register_configs

register_configs()


@hydra.main(config_path="../../conf", config_name="train", version_base="1.3")
def main(cfg) -> None:
    save_launch_record(Path(HydraConfig.get().runtime.output_dir), launch_record(cfg))


if __name__ == "__main__":
    main()
