"""A small on-disk cache for what an evaluation recomputes identically: baseline answers and
baseline lm-eval results. Keys hash the model's fingerprint and every setting that matters;
values are JSON files under ``$DYNALIGN_CACHE/eval`` (default ``~/.cache/dynalign/eval``),
written atomically so concurrent evaluations never read half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def model_fingerprint(path: str) -> dict[str, Any]:
    """What identifies a model's weights: its resolved directory and the size and mtime of its
    files (a hub id stands for itself)."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        return {"id": path}
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))
    return {"path": str(directory.resolve()),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def cache_root() -> Path:
    base = os.environ.get("DYNALIGN_CACHE") or Path.home() / ".cache" / "dynalign"
    return Path(base).expanduser() / "eval"


def cache_key(kind: str, **parts: Any) -> str:
    blob = json.dumps({"kind": kind, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def read_cache(kind: str, key: str) -> Any:
    """The cached value, or None (absent, torn or unreadable: recompute)."""
    path = cache_root() / kind / f"{key}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_cache(kind: str, key: str, value: Any) -> None:
    from dynalign.io import atomic_write_text

    atomic_write_text(cache_root() / kind / f"{key}.json", json.dumps(value))
