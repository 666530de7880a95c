"""Experiment tracking behind one small interface: W&B plus a local JSONL mirror.

The console shows a few of each step's metrics beside the progress bar (:func:`console_postfix`).
Only rank 0 tracks; other ranks get a :class:`NullTracker`, so callers never branch on
the rank. The JSONL mirror (``metrics.jsonl``, ``samples.jsonl`` in the run directory)
is always written, so a report can be built without a W&B server. W&B failures (no
network, bad key, a crash inside wandb) are reported once and never stop training.

In W&B a run is the dashboard of one training run:

* every metric is charted against ``global_step`` (the loop's step), also the evaluations an
  evaluation process adds later to the run it evaluates (:attr:`RunInfo.resume`);
* samples go into one table per run and kind, appended every time (``samples``: rollouts with
  their verdicts; ``eval/samples``: the evaluation's per-prompt rows), W&B incremental tables;
* each iteration's prompts, exported policy and evaluation files are artifacts
  (:data:`ARTIFACT_TYPES`, aliased ``iter_<k>``) that point at the run directory's files
  (``logger.artifacts=reference``) or carry them (``upload``);
* the name is the command-line overrides with the seed (``grpo.beta=0.04,seed=1``), the config
  holds the composed config plus the launch (``hydra``: overrides, swept keys, job number).
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

    def log_samples(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        """Rows of a table; a row's ``table`` field names its table (``eval``), else ``samples``."""
        ...

    def log_artifact(self, kind: str, paths: Sequence[Path], iteration: int | None = None,
                     metadata: Mapping[str, Any] | None = None) -> None:
        """Files of iteration ``iteration`` (1-based) as a versioned artifact; ``kind`` is one of
        :data:`ARTIFACT_TYPES`."""
        ...

    def log_summary(self, values: Mapping[str, Any]) -> None:
        """Values that describe the run as a whole (nested mappings allowed): W&B's run summary."""
        ...

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

    def log_artifact(self, kind: str, paths: Sequence[Path], iteration: int | None = None,
                     metadata: Mapping[str, Any] | None = None) -> None:
        pass

    def log_summary(self, values: Mapping[str, Any]) -> None:
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


def _nested_jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _nested_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nested_jsonable(v) for v in value]
    return _jsonable(value)


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

    def log_artifact(self, kind: str, paths: Sequence[Path], iteration: int | None = None,
                     metadata: Mapping[str, Any] | None = None) -> None:
        pass  # the files are in the run directory already

    def log_summary(self, values: Mapping[str, Any]) -> None:
        pass  # summary.json holds the run's final numbers; evaluations have their own files

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
    overrides: tuple[str, ...] = ()  # the command line's overrides (Hydra's ``overrides.task``)
    swept: tuple[str, ...] = ()  # the keys the sweep varies (``hydra.sweeper.params``)
    job_num: int | None = None  # the job's number in its sweep
    # a training run directory whose W&B run this process continues (an evaluation of it): its
    # run id, project and ``wandb/`` directory are used, its name, group and config kept
    resume: Path | None = None


WANDB_ID_FILE = "wandb_id.txt"  # in a run directory: the id of its W&B run, kept across resumes
WANDB_RUN_FILE = "wandb_run.json"  # in a run directory: id, name, project... of the W&B run it logged to
STEP_METRIC = "global_step"  # the x-axis of every chart: the training loop's step
# Tracker.log_artifact kinds -> W&B artifact types; artifacts are named <kind>-<run id>.
ARTIFACT_TYPES = {"prompts": "dataset", "policy": "model", "eval": "evaluation"}
SAMPLES_TABLE = "samples"  # rows without a ``table`` field; an evaluation's go to "eval/samples"
SUMMARY_KEY = "eval_results"  # in the W&B summary: the newest evaluation's eval_results.json
PROMPTS_KEY = "eval_prompts"  # ... and its per-prompt scores and outcomes (eval_samples.jsonl without texts)


def wandb_credentials() -> bool:
    """Whether W&B finds credentials for its host the way ``wandb.init`` does (``WANDB_API_KEY``,
    an identity token file, ``wandb login``'s netrc entry, its settings files), without prompting,
    verifying them over the network or changing anything."""
    import wandb

    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth
    except ImportError:  # other wandb versions: the public login, without prompt or verification
        return bool(wandb.login(prompt=False, verify=False))
    host = wandb_setup.singleton().settings.base_url
    return wbauth.authenticate_session(host=host, source="dynalign", prompt=False,
                                       update_session=False) is not None


def resolve_wandb_mode(mode: str) -> str:
    """``auto`` is online when W&B finds credentials (:func:`wandb_credentials`), offline without."""
    if mode != "auto":
        return mode
    return "online" if wandb_credentials() else "offline"


def run_name(info: RunInfo) -> str:
    """The W&B run name: the overrides, with the seed (``grpo.beta=0.04,seed=1``) unless one is there."""
    seed = info.config.get("seed")
    if seed is None or any(part.startswith("seed=") for part in info.name.split(",")):
        return info.name
    return f"{info.name},seed={seed}"


def evaluated_run(policy: Path) -> Path | None:
    """The training run directory that exported ``policy`` (``<run>/iter_<k>/``) or is ``policy``,
    when it kept its W&B run id; None for any other model directory."""
    for candidate in (policy, policy.parent):
        if (candidate / WANDB_ID_FILE).is_file():
            return candidate
    return None


def prompt_files(run_dir: Path, iteration: int) -> list[Path]:
    """What iteration ``iteration`` (0-based, as the loop counts) trained on: its prompt list, and
    the dataset the policy wrote for it when it wrote one."""
    layout = RunDir(run_dir)
    generated = layout.generated_prompts(iteration)
    return [layout.prompts_file(iteration), *([generated] if generated.is_dir() else [])]


def table_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows as W&B table rows: scalar cells, a mapping cell spread into ``column/key`` columns."""
    flat = []
    for row in rows:
        out: dict[str, Any] = {}
        for key, value in row.items():
            if isinstance(value, Mapping):
                out.update({f"{key}/{k}": _jsonable(v) for k, v in value.items()})
            else:
                out[key] = _jsonable(value)
        flat.append(out)
    return flat


class WandbTracker:
    """A W&B run; every call is guarded so a W&B failure degrades to a warning."""

    def __init__(self, cfg: LoggerConfig, info: RunInfo) -> None:
        self._run: Any = None
        self._failed = False
        self._artifacts = cfg.artifacts
        self._tables: dict[str, tuple[Any, list[str]]] = {}  # key -> (incremental table, its columns)
        self._guard("init", lambda: self._init(cfg, info))

    def _init(self, cfg: LoggerConfig, info: RunInfo) -> None:
        import wandb

        mode = resolve_wandb_mode(cfg.mode)
        settings = wandb.Settings(init_timeout=cfg.init_timeout_s, silent=True)
        trained: dict[str, Any] = {}  # the W&B record of the run this one continues
        if info.resume is not None:  # the training run's W&B run, where its own files are
            run_id = (info.resume / WANDB_ID_FILE).read_text().strip()
            record_file = info.resume / WANDB_RUN_FILE
            trained = json.loads(record_file.read_text()) if record_file.is_file() else {}
            run = wandb.init(project=trained.get("project") or cfg.project,
                             entity=trained.get("entity") or cfg.entity, id=run_id, resume="allow",
                             dir=str(info.resume), mode=mode, settings=settings)  # type: ignore[arg-type]
        else:
            id_file = info.run_dir / WANDB_ID_FILE  # a resumed run continues the same W&B run
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            launch = {"overrides": list(info.overrides), "swept": list(info.swept), "job_num": info.job_num}
            run = wandb.init(
                project=cfg.project, entity=cfg.entity, group=cfg.group or info.group, name=run_name(info),
                job_type=cfg.job_type, tags=list(cfg.tags), config={**info.config, "hydra": launch},
                dir=str(info.run_dir), mode=mode,  # type: ignore[arg-type]  # one of wandb's modes
                id=run_id, resume="allow", settings=settings)
        run.define_metric(STEP_METRIC)
        run.define_metric("*", step_metric=STEP_METRIC)
        self._run = run
        record = {"id": run.id, "name": run.name or trained.get("name"),
                  "group": run.group or trained.get("group"), "project": run.project, "entity": run.entity,
                  "mode": mode, "dir": run.dir}
        if info.resume is not None:
            record["resumed"] = str(info.resume)
        (info.run_dir / WANDB_RUN_FILE).write_text(json.dumps(record, indent=2))

    def _guard(self, what: str, fn) -> None:
        if self._failed:
            return
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            self._failed = True
            warnings.warn(f"W&B {what} failed ({type(err).__name__}: {err}); "
                          "continuing with the local JSONL mirror only", stacklevel=2)

    def _log(self, data: dict[str, Any], step: int) -> None:
        """At W&B step ``step``; a step W&B has passed (an evaluation added to a finished run) goes
        into the next row, charted at its ``global_step`` all the same."""
        self._run.log({**data, STEP_METRIC: step}, step=step if step >= self._run.step else None)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self._run is not None:
            self._guard("log", lambda: self._log(dict(metrics), step))

    def log_samples(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        if self._run is None or not rows:
            return

        def _append() -> None:
            by_key: dict[str, list[Mapping[str, Any]]] = {}
            for row in rows:
                key = f"{row['table']}/{SAMPLES_TABLE}" if row.get("table") else SAMPLES_TABLE
                by_key.setdefault(key, []).append({k: v for k, v in row.items() if k != "table"})
            self._log({key: self._table(key, [{"step": step, **r} for r in table_rows(group)])
                       for key, group in by_key.items()}, step)

        self._guard("log_samples", _append)

    def _table(self, key: str, rows: list[dict[str, Any]]) -> Any:
        """The run's incremental table under ``key`` with ``rows`` appended; its columns are the
        first rows' (a later row's missing cells are empty, its extra ones left out)."""
        import wandb

        if key not in self._tables:
            columns: list[Any] = list(dict.fromkeys(c for r in rows for c in r))
            self._tables[key] = (wandb.Table(columns=columns, log_mode="INCREMENTAL"), columns)
        table, columns = self._tables[key]
        for row in rows:
            table.add_data(*[row.get(c) for c in columns])
        return table

    def log_artifact(self, kind: str, paths: Sequence[Path], iteration: int | None = None,
                     metadata: Mapping[str, Any] | None = None) -> None:
        if self._run is None or self._artifacts == "none" or not paths:
            return

        def _artifact() -> None:
            import wandb

            artifact = wandb.Artifact(f"{kind}-{self._run.id}", type=ARTIFACT_TYPES[kind],
                                      metadata={"iteration": iteration, **(metadata or {})})
            for path in map(Path, paths):
                if self._artifacts == "upload":
                    artifact.add_dir(str(path), name=path.name) if path.is_dir() else \
                        artifact.add_file(str(path))
                else:  # a link to the file where it lies; W&B records its checksum and size
                    artifact.add_reference(path.resolve().as_uri(), name=path.name)
            aliases = [f"iter_{iteration}"] if iteration is not None else []
            self._run.log_artifact(artifact, aliases=aliases)

        self._guard("log_artifact", _artifact)

    def log_summary(self, values: Mapping[str, Any]) -> None:
        if self._run is not None:
            self._guard("log_summary", lambda: self._run.summary.update(_nested_jsonable(values)))

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

    def log_artifact(self, kind: str, paths: Sequence[Path], iteration: int | None = None,
                     metadata: Mapping[str, Any] | None = None) -> None:
        for t in self.trackers:
            t.log_artifact(kind, paths, iteration, metadata)

    def log_summary(self, values: Mapping[str, Any]) -> None:
        for t in self.trackers:
            t.log_summary(values)

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
