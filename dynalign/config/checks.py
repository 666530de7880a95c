"""The checks every config group uses; a failure is a :class:`ConfigError` naming the full key."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any


class ConfigError(ValueError):
    """A config value that cannot work; ``key`` is the full dotted key (``grpo.group_size``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


def choice(value: Any, choices: Any, key: str) -> None:
    valid = sorted(choices)
    require(value in valid, key, f"unknown value {value!r}; valid: {', '.join(map(str, valid))}")


def in_range(value: float, low: float, high: float, key: str, *, high_open: bool = False) -> None:
    ok = low <= value < high if high_open else low <= value <= high
    bracket = ")" if high_open else "]"
    require(ok and not math.isnan(value), key, f"must be in [{low}, {high}{bracket} (got {value})")


def positive(value: float, key: str) -> None:
    require(value > 0, key, f"must be > 0 (got {value})")


def non_finite(value: Any, key: str = "") -> Iterator[tuple[str, float]]:
    """``(full key, value)`` of every NaN or infinite float in a tree of dataclasses, lists and dicts."""
    if isinstance(value, float):
        if not math.isfinite(value):
            yield key, value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from non_finite(getattr(value, f.name), _join(key, f.name))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from non_finite(item, _join(key, str(i)))
    elif isinstance(value, dict):
        for name, item in value.items():
            yield from non_finite(item, _join(key, str(name)))


def finite(tree: Any, key: str = "") -> None:
    """Every float under ``tree`` is a finite number.

    One rule for all of them: a range check such as ``lr > 0`` lets ``inf`` through, and a NaN
    fails every comparison silently, so either would only show up steps into a run.
    """
    for where, value in non_finite(tree, key):
        raise ConfigError(where, f"must be a finite number (got {value})")


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name
