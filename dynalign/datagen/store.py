"""Files of a generation run, written so that a ``kill -9`` at any moment loses nothing.

Layout of ``output_dir``::

    state.json                 run fingerprint + next shard/call index + seed schedule
    shards/shard_00000.json    one per shard: its calls (meta-prompt, completion, seed),
    shards/shard_00001.json    the rows it kept, and its filter/dedup counts
    dataset/                   datasets.DatasetDict (train, eval)   <- written at the end
    prompts.jsonl              the same rows, one JSON object each, with a split column
    summary.json               counts per filter, dedup rate, diversity, coverage

Every file is written atomically (:mod:`dynalign.io`), so a reader sees the old file or
the new one, never half of one. The shards are the source of truth: a shard exists completely or
not at all, and a restart continues after the last one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from dynalign.config import ConfigError
from dynalign.io import atomic_write, write_json
from dynalign.io import replace_dir as replace_dir  # the pipeline swaps its dataset directory in

STATE_VERSION = 1
_SHARD_NAME = re.compile(r"^shard_(\d{5,})\.json$")


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    atomic_write(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


class RunStore:
    """The shard files and the state file of one generation run in ``output_dir``."""

    def __init__(self, output_dir: str | Path) -> None:
        self.root = Path(output_dir)
        self.shard_dir = self.root / "shards"
        self.state_path = self.root / "state.json"

    def shard_path(self, index: int) -> Path:
        return self.shard_dir / f"shard_{index:05d}.json"

    def open(self, fingerprint: dict[str, Any], calls_per_shard: int) -> list[dict]:
        """Start a run or resume one: returns the shards already written, in order.

        A run directory made with a different fingerprint (seed, models, templates,
        filters...) is refused with a :class:`ConfigError` naming the first differing key:
        continuing it would mix two runs in one dataset.
        """
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*self.root.glob(".*.tmp"), *self.root.glob(".*.old-*"),
                      *self.shard_dir.glob(".*.tmp")]:  # a killed write
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        if self.state_path.exists():
            previous = json.loads(self.state_path.read_text(encoding="utf-8"))["fingerprint"]
            for key in sorted(set(previous) | set(fingerprint)):
                if previous.get(key) != fingerprint.get(key):
                    raise ConfigError(key, f"{self.root} holds a generation run made with {key}="
                                      f"{previous.get(key)!r}, now {fingerprint.get(key)!r}; use the same "
                                      "value to resume it, or another generator.output_dir")
        shards = self._read_shards()
        if not self.state_path.exists():
            self.write_state(fingerprint, next_shard=len(shards), calls_per_shard=calls_per_shard, extra={})
        return shards

    def _read_shards(self) -> list[dict]:
        found = sorted((int(m.group(1)), p) for p in self.shard_dir.iterdir()
                       if (m := _SHARD_NAME.match(p.name)))
        indices = [i for i, _ in found]
        if indices != list(range(len(indices))):
            raise RuntimeError(f"{self.shard_dir}: shard files are not contiguous from 0: {indices}")
        return [json.loads(p.read_text(encoding="utf-8")) for _, p in found]

    def write_shard(self, shard: dict) -> None:
        write_json(self.shard_path(shard["shard"]), shard)

    def write_state(self, fingerprint: dict[str, Any], *, next_shard: int, calls_per_shard: int,
                    extra: dict[str, Any]) -> None:
        write_json(self.state_path, {
            "version": STATE_VERSION,
            "fingerprint": fingerprint,
            "next_shard": next_shard,
            "next_call": next_shard * calls_per_shard,
            **extra,
        })
