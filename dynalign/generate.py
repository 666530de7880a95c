"""``python -m dynalign.generate``: write a prompt dataset with the configured generator models.

It composes the same config tree as ``python -m dynalign.train`` (``conf/train.yaml``), so
the ``generator`` group means exactly what it means inside the training loop, and
``generator.models: [policy]`` is the configured ``model``::

    python -m dynalign.generate generator=ca_prompts generator.num_prompts=5000
    python -m dynalign.generate 'generator.models=[openai:my-model]' \\
        generator.endpoint.base_url=http://localhost:8000/v1

Run the same command again to resume an interrupted run (see :mod:`dynalign.datagen`).
Exit status 2 and a message naming the key for a bad config value.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from dynalign.cli import launch_record, run_main, save_launch_record, validated_config
from dynalign.config import ConfigError, TrainConfig, register_configs
from dynalign.datagen.settings import validate_generator

register_configs()


def _policy_factory(config: TrainConfig):
    """Load the configured model only if a shard actually needs it."""

    def load():
        from dynalign.models import load_hf_sampler

        return load_hf_sampler(config.model, batch_size=config.rollout.batch_size)

    return load


def _fail(err: ConfigError) -> None:
    print(f"dynalign: invalid config: {err}", file=sys.stderr)
    raise SystemExit(2) from None


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    save_launch_record(Path(HydraConfig.get().runtime.output_dir), launch_record(cfg))
    config = validated_config(cfg)
    try:
        validate_generator(config.generator)
    except ConfigError as err:
        _fail(err)
    from dynalign.datagen.pipeline import generate_prompts

    try:
        generate_prompts(config.generator, _policy_factory(config), model_name=config.model.name_or_path,
                         iteration=0, batch_size=config.rollout.batch_size)
    except ConfigError as err:  # e.g. output_dir holds a run made with other settings
        _fail(err)
    print(f"dynalign: prompts written to {config.generator.output_dir}/dataset "
          f"(summary: {config.generator.output_dir}/summary.json)")


if __name__ == "__main__":
    run_main(main)
