"""Rubrics: a value written down as aspects, each scored on an integer scale.

Rubrics are data. The shipped ones live in ``conf/judge/NAME.yaml`` (the ``rubric`` node
of a judge-group file, so ``judge=NAME`` selects them in Hydra); any other YAML file can
be loaded by path. The YAML is checked against :class:`dynalign.config.RubricConfig`
and frozen into a :class:`Rubric`, which also carries the rule that turns the aspect
scores into one reward (``combine``: picked by name from :data:`COMBINE_FUNCTIONS`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dynalign.config import CONF_DIR, AspectConfig, ConfigError, RubricConfig, aspect_levels

RUBRIC_DIR = CONF_DIR / "judge"


def _mean(scores: Sequence[float], weights: Sequence[float]) -> float:
    return sum(scores) / len(scores)


def _weighted(scores: Sequence[float], weights: Sequence[float]) -> float:
    return sum(w * s for w, s in zip(weights, scores, strict=True)) / sum(weights)


def _min(scores: Sequence[float], weights: Sequence[float]) -> float:
    return min(scores)


# How aspect scores become one reward, by name (rubric.combine).
COMBINE_FUNCTIONS: dict[str, Callable[[Sequence[float], Sequence[float]], float]] = {
    "mean": _mean,
    "weighted": _weighted,
    "min": _min,
}


@dataclass(frozen=True)
class Aspect:
    """One scored aspect: what it means and what each (anchored) score level looks like."""

    name: str
    description: str
    levels: tuple[tuple[int, str], ...]  # (score, descriptor), ascending; may anchor only some scores
    weight: float = 1.0


@dataclass(frozen=True)
class Rubric:
    """An immutable, validated rubric; build it with :func:`load_rubric` or :meth:`from_config`."""

    name: str
    description: str
    scale_min: int
    scale_max: int
    combine: str
    aspects: tuple[Aspect, ...]

    @property
    def aspect_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.aspects)

    @property
    def scores(self) -> tuple[int, ...]:
        """Every valid score, ascending."""
        return tuple(range(self.scale_min, self.scale_max + 1))

    def combine_scores(self, scores: Sequence[float]) -> float:
        """One reward from the aspect scores (in aspect order); NaN if any score is NaN."""
        if len(scores) != len(self.aspects):
            raise ValueError(f"expected {len(self.aspects)} aspect scores, got {len(scores)}")
        if any(math.isnan(s) for s in scores):
            return math.nan
        return float(COMBINE_FUNCTIONS[self.combine](list(scores), [a.weight for a in self.aspects]))

    @classmethod
    def from_config(cls, cfg: RubricConfig, key: str = "judge.rubric") -> Rubric:
        """Validate a :class:`RubricConfig` (errors name ``key``) and freeze it.

        :meth:`RubricConfig.validate` holds every rule, so a config that passed validation
        always freezes.
        """
        cfg.validate(key)
        aspects = tuple(_aspect(a, cfg, f"{key}.aspects.{i}") for i, a in enumerate(cfg.aspects))
        return cls(name=cfg.name, description=cfg.description.strip(), scale_min=cfg.scale_min,
                   scale_max=cfg.scale_max, combine=cfg.combine, aspects=aspects)


def _aspect(cfg: AspectConfig, rubric: RubricConfig, key: str) -> Aspect:
    levels = aspect_levels(cfg, rubric.scale_min, rubric.scale_max, key)  # the rule validate() applied
    return Aspect(name=cfg.name, description=cfg.description.strip(), levels=levels, weight=float(cfg.weight))


def shipped_rubrics() -> list[str]:
    """Names of the rubrics under ``conf/judge/``."""
    return sorted(p.stem for p in RUBRIC_DIR.glob("*.yaml"))


RubricLike = Union[str, Path, RubricConfig, Rubric, Mapping, DictConfig]  # noqa: UP007 - runtime alias


def load_rubric(source: RubricLike) -> Rubric:
    """A rubric by shipped name (``"ca_rubric"``), YAML path, config object or mapping.

    A YAML file may be a judge-group file (its ``rubric`` node is used) or a bare rubric.
    """
    if isinstance(source, Rubric):
        return source
    if isinstance(source, RubricConfig):
        return Rubric.from_config(source)
    if isinstance(source, (Mapping, DictConfig)):
        return _from_mapping(source, "judge.rubric")
    path = _resolve_path(str(source))
    return _load_file(str(path.resolve()), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _load_file(path: str, mtime_ns: int) -> Rubric:
    """Rubrics are frozen, so a file is parsed once per version (``mtime_ns`` keys the cache)."""
    node = OmegaConf.load(path)
    if isinstance(node, DictConfig) and "rubric" in node:
        node = node.rubric
    return _from_mapping(node, f"{path}:rubric")


def _resolve_path(source: str) -> Path:
    path = Path(source).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"rubric file {path} does not exist")
        return path
    shipped = RUBRIC_DIR / f"{source}.yaml"
    if not shipped.is_file():
        raise ValueError(f"unknown rubric {source!r}; shipped: {', '.join(shipped_rubrics())}, "
                         "or give a path to a YAML file")
    return shipped


def _from_mapping(node, key: str) -> Rubric:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RubricConfig), node)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{key}.{getattr(err, 'full_key', '') or ''}".rstrip("."),
                          str(err).splitlines()[0]) from None
    assert isinstance(cfg, RubricConfig)
    return Rubric.from_config(cfg, key)
