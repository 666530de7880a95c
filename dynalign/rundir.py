"""The layout of a training run's directory, spelled once.

::

    <run>/
      checkpoints/            DeepSpeed checkpoints; ``latest`` names the newest complete one
      iter_<k>/               Hugging Face export of the policy after iteration k
      prompts/iter_<k>.json   the prompts iteration k trained on (every rank reads them)
      prompts/iter_<kkk>/     a generation by the policy for iteration k (generator output)
      eval/iter_<k>/          evaluation of iter_<k>/ (eval_results.json, ...)
      metrics.jsonl           one line per step (the tracker's local mirror)
      samples.jsonl           sampled rollouts with their judgements
      summary.json            the run's final numbers, written when it ends
      .dynalign.lock          held by the run that owns the directory (its process, host, start)

A run owns its directory: :meth:`RunDir.owned` holds an exclusive lock for the run's lifetime,
so a second run there refuses to start and names the first. :func:`resolve_model_dir` turns a
run directory (or a model directory) into the Hugging Face directory to load.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dynalign.config.checks import ConfigError

ITER_DIR = re.compile(r"iter_(\d+)")
LATEST = "latest"  # DeepSpeed's (and dynalign's) marker of the newest complete checkpoint
CHECKPOINT_STATE = "dynalign_state.json"  # what makes a directory one checkpoint (dynalign.engine.checkpoint)
RESUMABLE = "resumable"  # a checkpoint state's optional bool, absent = true: false once its run dropped
# DeepSpeed's files (dynalign.engine.checkpoint.drop_training_state); the load and preflight refuse it so
NOT_RESUMABLE = ("keeps no optimizer or module state (its run ended with checkpoint_optimizer_at_end=false), "
                 "so training cannot continue from it; the run's final weights are its last iter_<k>/ "
                 "export: start a new run from it with model.name_or_path=<run>/iter_<k>")
MODEL_CONFIG = "config.json"  # what makes a directory a Hugging Face model
LOCK_FILE = ".dynalign.lock"
# dynalign.io's temporary siblings (.NAME.<pid>-<8 hex>.tmp) and a swap's old copy (.NAME.old-<pid>)
LEFTOVER = re.compile(r"\..+\.(\d+-[0-9a-f]{8}\.tmp|old-\d+)")


class RunDirError(RuntimeError):
    """A run directory this run may not use (owned by another run, holding one, unwritable)."""


def resumable(state: object) -> bool:
    """False for the state of a checkpoint whose run dropped DeepSpeed's files (its
    ``checkpoint_optimizer_at_end=false``): nothing is left in it to train on from."""
    return not isinstance(state, dict) or state.get(RESUMABLE, True) is not False


def iteration_of(path: str | Path) -> int | None:
    """``k`` for a directory named ``iter_<k>``, else None."""
    match = ITER_DIR.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def _iterations(parent: Path, required: str) -> list[tuple[int, Path]]:
    """``(k, parent/iter_<k>)`` of every such directory holding ``required``, by ``k``."""
    if not parent.is_dir():
        return []
    found = [(iteration_of(d), d) for d in parent.iterdir() if d.is_dir() and (d / required).exists()]
    return sorted((k, d) for k, d in found if k is not None)


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory; nothing is created or read until asked."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def export(self, k: int) -> Path:
        """The Hugging Face directory of the policy after iteration ``k``."""
        return self.path / f"iter_{k}"

    def exports(self) -> list[tuple[int, Path]]:
        """``(k, iter_<k>/)`` of every complete export (its config.json written), oldest first."""
        return _iterations(self.path, MODEL_CONFIG)

    def newest_export(self) -> Path | None:
        exports = self.exports()
        return exports[-1][1] if exports else None

    @property
    def prompts(self) -> Path:
        return self.path / "prompts"

    def prompts_file(self, k: int) -> Path:
        """The prompts iteration ``k`` trained on, as a JSON list."""
        return self.prompts / f"iter_{k}.json"

    def generated_prompts(self, k: int) -> Path:
        """Where the policy writes iteration ``k``'s prompt generation."""
        return self.prompts / f"iter_{k:03d}"

    def eval_dir(self, k: int) -> Path:
        """The evaluation of ``iter_<k>/``."""
        return self.path / "eval" / f"iter_{k}"

    def evaluations(self, results_file: str) -> list[tuple[int, Path]]:
        """``(k, eval/iter_<k>/)`` of every evaluation that wrote ``results_file``, oldest first."""
        return _iterations(self.path / "eval", results_file)

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def samples(self) -> Path:
        return self.path / "samples.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def eval_history(self) -> Path:
        """One line per in-training evaluation (written by :mod:`dynalign.eval.report`)."""
        return self.path / "eval" / "eval_history.jsonl"

    # ------------------------------------------------------------------ ownership

    @contextlib.contextmanager
    def owned(self) -> Iterator[None]:
        """Hold the directory's lock while the block runs; refuse if another run holds it.

        The lock is ``flock`` on ``.dynalign.lock`` (released by the kernel when the process
        dies, so a killed run never leaves its directory locked); the file says who holds it.
        """
        self.check_writable()
        handle = open(self.path / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 (held open)
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                owner = handle.read().strip() or "another process"
                raise RunDirError(f"{self.path} is in use by {owner}: wait for that run to end or "
                                  "choose another hydra.run.dir") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"process {os.getpid()} on {socket.gethostname()} "
                         f"(started {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
            handle.flush()
            yield
        finally:
            handle.close()  # releases the lock

    def check_writable(self) -> None:
        """Create the directory, and prove it and ``checkpoints/`` take new files (a real write:
        permission bits say nothing for root or on network filesystems)."""
        for directory in (self.path, self.checkpoints):
            if directory == self.checkpoints and not directory.exists():
                continue
            try:
                directory.mkdir(parents=True, exist_ok=True)
                probe = directory / f".write-test-{os.getpid()}"
                probe.write_text("")
                probe.unlink()
            except OSError as err:
                raise RunDirError(f"{directory}: cannot write there ({err.strerror or err}); the run "
                                  "directory and its checkpoints/ must be writable") from None

    def previous_run(self) -> list[str]:
        """What an earlier run left here (checkpoints, logged steps, exports), by name; [] if nothing."""
        found = [p.name for p in (self.checkpoints, self.metrics, self.samples, self.summary)
                 if (p.is_dir() and any(p.iterdir())) or (p.is_file() and p.stat().st_size > 0)]
        return found + [d.name for _, d in _iterations(self.path, MODEL_CONFIG)]

    def clear_leftovers(self) -> int:
        """Delete what interrupted writes left in the run directory, ``prompts/`` and ``eval/``:
        the temporary siblings of :func:`~dynalign.io.replace_dir` and :func:`~dynalign.io.atomic_write`
        (an export of an 8B policy is 16 GB) and the old copies of a swap. Only the run owning the
        directory may call it (no write of another process is in flight). Returns the bytes freed."""
        freed = 0
        for parent in (self.path, self.prompts, self.path / "eval"):
            for path in parent.iterdir() if parent.is_dir() else ():
                if not LEFTOVER.fullmatch(path.name):
                    continue
                files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                freed += sum(p.stat().st_size for p in files)
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        return freed

    def clear_previous_run(self) -> None:
        """Delete what :meth:`previous_run` finds, with the prompts and evaluations of that run, and
        forget its W&B run id (the new run gets its own W&B run; ``wandb/`` keeps the old one's
        unsynced records)."""
        for name in ("checkpoints", "prompts", "eval"):
            shutil.rmtree(self.path / name, ignore_errors=True)
        for path in (self.metrics, self.samples, self.summary, self.path / "wandb_id.txt",
                     self.path / "wandb_run.json"):
            path.unlink(missing_ok=True)
        for export in self.path.iterdir():
            if export.is_dir() and iteration_of(export) is not None:
                shutil.rmtree(export, ignore_errors=True)


def resolve_model_dir(value: str | Path, key: str) -> Path:
    """A Hugging Face model directory from a model directory or a run directory (its newest export).

    Raises a :class:`ConfigError` naming ``key`` when the path is missing or holds neither.
    """
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(key, f"{path} does not exist")
    if not path.is_dir():
        raise ConfigError(key, f"{path} is a file; give a Hugging Face model directory or a run directory")
    if (path / MODEL_CONFIG).exists():
        return path
    export = RunDir(path).newest_export()
    if export is not None:
        return export
    if (path / LATEST).exists() or RunDir(path).checkpoints.exists():
        raise ConfigError(key, f"{path} holds DeepSpeed checkpoints, not a model: evaluate an exported "
                               "iter_<k>/ directory (train with export_each_iteration=true)")
    raise ConfigError(key, f"{path} is neither a Hugging Face model directory (no config.json) nor a "
                           "dynalign run directory (no iter_<k>/ with a config.json)")
