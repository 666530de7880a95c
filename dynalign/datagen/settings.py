"""Generator options as the datagen pipeline reads them.

The fields, their checks and how a ``generator.models`` entry reads live with the schema
(:mod:`dynalign.config.generator`); these are the names the pipeline calls them by.
"""

from __future__ import annotations

from dynalign.config.generator import GeneratorConfig, parse_model_spec

__all__ = ["max_calls", "parse_model_spec", "validate_generator"]


def max_calls(cfg: GeneratorConfig) -> int:
    """Meta-prompts to try before giving up: ``generator.max_calls``, or 4x what the target needs."""
    return cfg.call_budget


def validate_generator(cfg: GeneratorConfig, key: str = "generator") -> None:
    """Raise a :class:`~dynalign.config.ConfigError` naming the first bad ``generator`` value."""
    cfg.validate(key)
