"""Generator options: how ``generator.models`` entries are read, and the generator's checks."""

from __future__ import annotations

import math
from typing import Any

from dynalign.config import ConfigError


def parse_model_spec(spec: str) -> tuple[str, str]:
    """``(kind, name)`` of one ``generator.models`` entry.

    ``policy`` -> the configured ``model`` (the loop's own sampler); ``openai:NAME`` -> the
    served model NAME at ``generator.endpoint.base_url``; ``hf:PATH`` or any other string ->
    a local directory or hub id loaded with transformers (``tiny`` is the embedded model).
    """
    spec = str(spec).strip()
    if spec == "policy":
        return "policy", "policy"
    for kind in ("openai", "hf"):
        if spec.startswith(kind + ":"):
            return kind, spec[len(kind) + 1:].strip()
    return "hf", spec


def max_calls(cfg: Any) -> int:
    """Meta-prompts to try before giving up: ``generator.max_calls``, or 4x what the target needs."""
    limit = cfg.max_calls
    if limit is not None:
        return int(limit)
    return 4 * math.ceil(cfg.num_prompts / cfg.prompts_per_call)


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


def validate_generator(cfg: Any, key: str = "generator") -> None:
    """Checks of the proposed fields (move into ``GeneratorConfig.validate`` with them)."""
    models = list(cfg.models)
    _require(len(models) > 0, f"{key}.models", "name at least one generator model (e.g. [policy])")
    for i, spec in enumerate(models):
        kind, name = parse_model_spec(spec)
        _require(bool(name), f"{key}.models.{i}", f"empty model name in {spec!r}")
        if kind == "openai":
            _require(bool(cfg.endpoint.base_url), f"{key}.endpoint.base_url",
                     f"required by models entry {spec!r}")
    endpoint = cfg.endpoint
    _require(endpoint.timeout_s > 0, f"{key}.endpoint.timeout_s", f"must be > 0 (got {endpoint.timeout_s})")
    _require(endpoint.max_retries >= 0, f"{key}.endpoint.max_retries",
             f"must be >= 0 (got {endpoint.max_retries})")
    _require(endpoint.concurrency > 0, f"{key}.endpoint.concurrency",
             f"must be > 0 (got {endpoint.concurrency})")
    _require(cfg.calls_per_shard > 0, f"{key}.calls_per_shard",
             f"must be > 0 (got {cfg.calls_per_shard})")
    limit = cfg.max_calls
    _require(limit is None or limit > 0, f"{key}.max_calls", f"must be > 0 or null (got {limit})")
    min_chars, max_chars = cfg.min_chars, cfg.max_chars
    _require(min_chars >= 1, f"{key}.min_chars", f"must be >= 1 (got {min_chars})")
    _require(max_chars > min_chars, f"{key}.max_chars", f"must be > min_chars={min_chars} (got {max_chars})")
    for name in ("min_prose_fraction", "min_ascii_fraction"):
        value = getattr(cfg, name)
        _require(0.0 <= value <= 1.0, f"{key}.{name}", f"must be in [0, 1] (got {value})")
    for name in ("max_meta_overlap", "dedup_threshold"):
        value = getattr(cfg, name)
        _require(0.0 < value <= 1.0, f"{key}.{name}", f"must be in (0, 1] (got {value})")
