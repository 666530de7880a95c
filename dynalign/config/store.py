"""The schema in Hydra: ``train_schema`` and the ``experiment`` group in the ConfigStore, and
the one conversion of a composed config into a validated :class:`TrainConfig`."""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dynalign.config.checks import ConfigError
from dynalign.config.schema import TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
EXPERIMENTS_DIR = REPO_ROOT / "experiments"


def register_configs() -> None:
    """Register the schema so Hydra type-checks every group file against it."""
    from dynalign.runtime import register_resolvers

    register_resolvers()
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    register_experiments(cs)


def register_experiments(cs: ConfigStore, root: Path | None = None) -> None:
    """Make ``experiments/*.yaml`` the optional ``experiment`` group (``+experiment=NAME``).

    The files hold only diffs against ``conf/train.yaml`` (``# @package _global_`` and a
    ``defaults`` list of ``override /group: option`` lines), as Hydra experiment configs do.
    """
    root = root or EXPERIMENTS_DIR
    for path in sorted(root.rglob("*.yaml")):
        rel = path.relative_to(root).with_suffix("")
        cs.store(group="/".join(("experiment", *rel.parts[:-1])), name=rel.name,
                 node=OmegaConf.load(path), package="_global_")


def to_train_config(cfg: DictConfig, world_size: int = 1) -> TrainConfig:
    """Turn a composed Hydra config into a validated :class:`TrainConfig`.

    The values are merged once more into a fresh, strict schema: Hydra lets ``+key=value``
    append keys that no dataclass declares, and this is where such keys are refused.
    """
    values = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(values, dict)
    values.pop("hydra", None)
    try:
        node = OmegaConf.merge(OmegaConf.structured(TrainConfig), values)
        obj = OmegaConf.to_object(node)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "<config>"
        message = str(err).splitlines()[0]
        raise ConfigError(key, message) from None
    assert isinstance(obj, TrainConfig)
    return obj.validate(world_size)
