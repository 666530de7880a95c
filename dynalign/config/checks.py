"""The checks every config group uses; a failure is a :class:`ConfigError` naming the full key."""

from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """A config value that cannot work; ``key`` is the full dotted key (``grpo.group_size``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


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

