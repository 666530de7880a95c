"""Experiment tracking behind one small interface: W&B plus a local JSONL mirror.

The console shows a few of each step's metrics beside the progress bar (:func:`console_postfix`).
Only rank 0 tracks; other ranks get a :class:`NullTracker`, so callers never branch on
the rank. The JSONL mirror (``metrics.jsonl``, ``samples.jsonl`` in the run directory)
is always written, so a report can be built without a W&B server. W&B failures (no
network, bad key, a crash inside wandb) are reported once and never stop training.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from dynalign.config import LoggerConfig
from dynalign.rundir import RunDir

# What the progress bar shows of a step besides the reward: (label, metric key, format); a metric
# the step did not log (kl without grpo.beta) is left out. Not the loss: on-policy (one pass,
# grpo.num_iterations=1) the ratio is 1 and the advantages have zero mean, so it is ~0 every step.
CONSOLE_METRICS = (
    ("kl", "train/kl_mean", "{:.4f}"),  # to the reference policy
    ("grad", "train/grad_norm", "{:.2f}"),  # before clipping
    ("entropy", "train/entropy", "{:.2f}"),  # nats per answer token: how far the policy has moved
)


def console_postfix(metrics: Mapping[str, float]) -> dict[str, str]:
    """A step's headline numbers: the reward (mean ± std over the step's answers), then
    :data:`CONSOLE_METRICS`."""
    shown = {"reward": f"{metrics['reward/mean']:.3f}±{metrics['judge/reward_std']:.3f}"}
    shown |= {label: fmt.format(metrics[key]) for label, key, fmt in CONSOLE_METRICS if key in metrics}
    return shown


class Tracker(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_samples(self, rows: Sequence[Mapping[str, Any]], step: int) -> None: ...

    def finish(self, summary: Mapping[str, Any] | None = None) -> None: ...

    def close(self) -> None:
        """Release what a run that did not :meth:`finish` (an error) still holds; no-op after it."""
        ...


class NullTracker:
    """Does nothing: the tracker of every rank but 0, and of ``logger=none`` for W&B."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_samples(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        pass

    def finish(self, summary: Mapping[str, Any] | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null reads back as "missing", which is what it means
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _jsonable(value.item())
    return value


class JsonlTracker:
    """Appends one JSON object per line to ``metrics.jsonl`` and ``samples.jsonl``."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._files = RunDir(self.run_dir)
        self._metrics = open(self._files.metrics, "a", encoding="utf-8")  # noqa: SIM115
        self._samples = open(self._files.samples, "a", encoding="utf-8")  # noqa: SIM115

    @staticmethod
    def _write(handle, record: Mapping[str, Any]) -> None:
        handle.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        handle.flush()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._write(self._metrics, {"step": step, **metrics})

    def log_samples(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        for row in rows:
            self._write(self._samples, {"step": step, **row})

    def finish(self, summary: Mapping[str, Any] | None = None) -> None:
        if summary:
            self._files.summary.write_text(
                json.dumps({k: _jsonable(v) for k, v in summary.items()}, indent=2))
        self.close()

    def close(self) -> None:
        self._metrics.close()
        self._samples.close()


@dataclass(frozen=True)
class RunInfo:
    """Where a run lives and how it is named in W&B."""

    run_dir: Path
    name: str  # built from the command-line overrides
    group: str  # the sweep: all runs of one ``-m`` share it
    config: dict  # the composed config, logged as a nested dict


def resolve_wandb_mode(mode: str) -> str:
    """``auto`` is online with an API key available, offline without one."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


class WandbTracker:
    """A W&B run; every call is guarded so a W&B failure degrades to a warning."""

    def __init__(self, cfg: LoggerConfig, info: RunInfo) -> None:
        self._run: Any = None
        self._failed = False
        self._guard("init", lambda: self._init(cfg, info))

    def _init(self, cfg: LoggerConfig, info: RunInfo) -> None:
        import wandb

        id_file = info.run_dir / "wandb_id.txt"  # a resumed run continues the same W&B run
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=cfg.group or info.group, name=info.name,
            job_type=cfg.job_type, tags=list(cfg.tags), config=info.config, dir=str(info.run_dir),
            mode=resolve_wandb_mode(cfg.mode),  # type: ignore[arg-type]  # one of wandb's modes
            id=run_id, resume="allow",
            settings=wandb.Settings(init_timeout=cfg.init_timeout_s, silent=True),
        )
        self._run = run
        record = {"id": run.id, "name": run.name, "group": run.group,
                  "project": run.project, "mode": resolve_wandb_mode(cfg.mode), "dir": run.dir}
        (info.run_dir / "wandb_run.json").write_text(json.dumps(record, indent=2))

    def _guard(self, what: str, fn) -> None:
        if self._failed:
            return
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            self._failed = True
            warnings.warn(f"W&B {what} failed ({type(err).__name__}: {err}); "
                          "continuing with the local JSONL mirror only", stacklevel=2)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self._run is not None:
            self._guard("log", lambda: self._run.log(dict(metrics), step=step))

    def log_samples(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        if self._run is None or not rows:
            return

        def _table() -> None:
            import wandb

            names = list(rows[0])
            columns: list[str | int] = [*names]  # wandb's annotation
            table = wandb.Table(columns=columns, data=[[_jsonable(r.get(c)) for c in names] for r in rows])
            # one key per step: a table logged under a fixed key would replace the earlier ones
            self._run.log({f"samples/step_{step:06d}": table}, step=step)

        self._guard("log_samples", _table)

    def finish(self, summary: Mapping[str, Any] | None = None) -> None:
        if self._run is None:
            return

        def _finish() -> None:
            if summary:
                self._run.summary.update({k: _jsonable(v) for k, v in summary.items()})
            self._run.finish()

        self._guard("finish", _finish)
        self._run = None

    def close(self) -> None:
        """A run that ended without :meth:`finish` is marked failed (exit code 1) and closed, so the
        next job of a sweep starts a W&B run of its own."""
        if self._run is not None:
            run, self._run = self._run, None
            self._guard("close", lambda: run.finish(exit_code=1))


class MultiTracker:
    """Fans every call out to several trackers."""

    def __init__(self, *trackers: Tracker) -> None:
        self.trackers = trackers

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for t in self.trackers:
            t.log(metrics, step)

    def log_samples(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        for t in self.trackers:
            t.log_samples(rows, step)

    def finish(self, summary: Mapping[str, Any] | None = None) -> None:
        for t in self.trackers:
            t.finish(summary)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def _wandb(cfg: LoggerConfig, info: RunInfo) -> Tracker:
    return NullTracker() if cfg.mode == "disabled" else WandbTracker(cfg, info)


# logger.backend -> the tracker beside the JSONL mirror; the config's valid names.
TRACKERS: dict[str, Callable[[LoggerConfig, RunInfo], Tracker]] = {
    "wandb": _wandb,
    "none": lambda cfg, info: NullTracker(),
}


def build_tracker(cfg: LoggerConfig, info: RunInfo, rank: int) -> Tracker:
    """Rank 0: the JSONL mirror, plus ``logger.backend``'s tracker. Other ranks: nothing."""
    if rank != 0:
        return NullTracker()
    return MultiTracker(JsonlTracker(info.run_dir), TRACKERS[cfg.backend](cfg, info))
