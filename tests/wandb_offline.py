"""What W&B's offline mode wrote, read back for tests (no server, no ``wandb sync``).

An offline run is ``<dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb``: W&B's transaction log,
a 7-byte header then 32 KiB blocks of chunks (checksum, length, type: full / first / middle /
last), each record a serialized ``wandb.proto.wandb_internal_pb2.Record``. :func:`read_run`
replays one into the config, summary and history a server would show, plus its artifacts.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

HEADER = b":W&B"
BLOCK = 32 * 1024
CHUNK_HEADER = 7  # crc32 (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[pb.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == HEADER, f"{path} is not a W&B transaction log"
    pos, pending = 7, b""
    while pos + CHUNK_HEADER <= len(data):
        block_end = (pos // BLOCK + 1) * BLOCK
        if block_end - pos < CHUNK_HEADER:  # a block's tail too short for a chunk is padding
            pos = block_end
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        if kind not in (FULL, FIRST, MIDDLE, LAST):  # zeros: the rest of the block is padding
            pos = block_end
            continue
        chunk = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == FULL:
            payload = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        else:
            payload, pending = pending + chunk, b""
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def _set(target: dict, item: Any) -> None:
    path = list(item.nested_key) or [item.key]
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = json.loads(item.value_json)


@dataclass
class OfflineRun:
    """One offline run file replayed."""

    path: Path
    id: str = ""
    name: str = ""
    group: str = ""
    resumed: bool = False
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # one row per W&B step
    artifacts: list[Any] = field(default_factory=list)  # pb.ArtifactRecord
    step_metrics: dict[str, str] = field(default_factory=dict)  # define_metric: name or glob -> x-axis

    def artifact(self, name: str) -> list[Any]:
        """The logged versions of artifact ``name``, oldest first."""
        return [a for a in self.artifacts if a.name == name]


def finished_records(log: Path, timeout: float = 60.0) -> list[pb.Record]:
    """The records of a run that finished: W&B's service writes the log on its own time, after
    ``run.finish()`` returns, so wait for the run's ``exit`` record."""
    deadline = time.monotonic() + timeout
    while True:
        found = list(records(log))
        if any(r.WhichOneof("record_type") == "exit" for r in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def read_run(offline_dir: Path) -> OfflineRun:
    (log,) = Path(offline_dir).glob("run-*.wandb")
    run = OfflineRun(path=Path(offline_dir))
    for record in finished_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.id, run.name, run.group = r.run_id, r.display_name, r.run_group
            run.resumed = r.resume or r.resumed  # offline: resume asked for (the server resolves it)
            for item in r.config.update:
                _set(run.config, item)
        elif kind == "config":
            for item in record.config.update:
                _set(run.config, item)
        elif kind == "summary":
            for item in record.summary.update:
                _set(run.summary, item)
        elif kind == "history":
            row: dict = {}
            for item in record.history.item:
                _set(row, item)
            run.history.append(row)
        elif kind == "artifact":
            run.artifacts.append(record.artifact)
        elif kind == "metric":
            run.step_metrics[record.metric.name or record.metric.glob_name] = record.metric.step_metric
    return run


def read_runs(wandb_dir: Path) -> Sequence[OfflineRun]:
    """Every offline run under ``<dir>/wandb``, oldest first (a resumed run is one more of them)."""
    return [read_run(d) for d in sorted(Path(wandb_dir).glob("offline-run-*"))]
