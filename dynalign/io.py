"""Atomic file writes: a reader sees the old file (or directory) or the new one, never half of one.

Every file is written under a temporary name in the same directory (``.<name>.<token>.tmp``),
flushed, fsynced and renamed over its final name with ``os.replace`` (atomic on POSIX); the
directory is then fsynced so the rename survives a crash. Temporary files get the usual
permissions (umask), like any file ``open`` creates.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_dir(directory: str | Path) -> None:
    """Persist renames inside ``directory`` (POSIX; a no-op where directories cannot be synced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: str | Path, write: Callable[[Any], None], *, mode: str = "w") -> None:
    """Call ``write(file)`` on a temporary sibling of ``path``, then rename it into place.

    ``mode`` is ``"w"`` (text, UTF-8) or ``"wb"``. Parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda handle: handle.write(text))


def write_json(path: str | Path, value: Any, *, indent: int | None = 1, sort_keys: bool = False,
               ensure_ascii: bool = False) -> None:
    """Write ``value`` as JSON to ``path`` atomically (``json.dump`` options passed through)."""
    atomic_write(path, lambda handle: json.dump(value, handle, ensure_ascii=ensure_ascii, indent=indent,
                                                sort_keys=sort_keys))


def replace_dir(target: str | Path, fill: Callable[[Path], None]) -> None:
    """Fill a temporary sibling directory, then swap it in for ``target`` (an old copy is removed)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(target)
    tmp.mkdir()
    try:
        fill(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)  # left by a crashed swap
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_once(target: str | Path, fill: Callable[[Path], None], *, marker: str = "config.json") -> Path:
    """``target``, filled by ``fill(directory)`` the first time it is asked for.

    ``target`` counts as built once it holds ``marker``. Builders on one machine take turns
    under a file lock beside it (the ranks of a launch all ask at once); the build goes to a
    temporary sibling swapped in by :func:`replace_dir`, so an interrupted build never leaves
    a half-written directory behind.
    """
    target = Path(target)
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / marker).exists():
            replace_dir(target, fill)
        if not (target / marker).exists():
            raise RuntimeError(f"building {target} wrote no {marker}")
    return target


def cut_jsonl(path: str | Path, keep: Callable[[dict[str, Any]], bool]) -> int:
    """Rewrite the JSON-lines file ``path`` atomically with the records ``keep`` accepts.

    Lines that do not parse (a write torn by a kill, always the last one) are dropped with the
    rejected records; kept lines stay byte for byte. Returns how many lines were dropped; a
    missing file is left missing.
    """
    path = Path(path)
    if not path.exists():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and _keeps(line, keep)]
    dropped = sum(1 for line in lines if line.strip()) - len(kept)
    if dropped or len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped


def _keeps(line: str, keep: Callable[[dict[str, Any]], bool]) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and keep(record)
