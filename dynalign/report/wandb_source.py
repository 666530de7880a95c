"""The report's records of runs that live in W&B, read like the ones on disk.

A W&B run of dynalign carries what its run directory holds (:mod:`dynalign.tracking`): the
composed config and the launch (``config["hydra"]``: overrides, swept keys, job number), every
step in the history, the final numbers in the summary, and the newest evaluation's
``eval_results.json`` in the summary (:data:`~dynalign.tracking.SUMMARY_KEY`). :func:`mirror_run`
writes those back as the files :func:`~dynalign.report.records.read_local_run` reads::

    .hydra/config.yaml, overrides.yaml, hydra.yaml    the config and the launch
    metrics.jsonl                                     the history, one line per row, at its global_step
    summary.json                                      the summary of a run that ended
    eval/iter_<k>/eval_results.json                   the newest evaluation
    eval/iter_<k>/eval_samples.jsonl                  its rows without their texts (scores, outcomes)

so a W&B run becomes the same :class:`~dynalign.report.records.RunRecord` as its directory
would, through the same reader. The rows' texts (prompts, answers, reasons) are in W&B's
``eval/samples`` table, not in the summary: a report does not read them.
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from dynalign.eval.report import RESULTS_FILE, SAMPLES_FILE
from dynalign.report.records import GROUP_PREFIX, WANDB_STATES, RunRecord, read_local_run
from dynalign.rundir import RunDir
from dynalign.tracking import PROMPTS_KEY, STEP_METRIC, SUMMARY_KEY

LAUNCH_KEY = "hydra"  # the config section the tracker adds: overrides, swept keys, job number
ENDED_STATES = ("finished",)  # a run in another state wrote no summary.json (crashed, killed, running)


def _plain(value: Any) -> Any:
    """W&B's summary and config values as plain JSON values (their own mapping types included)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def history_lines(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``metrics.jsonl`` lines from history rows: ``step`` is the row's ``global_step`` (its W&B
    ``_step`` before that axis existed); W&B's own keys and table cells are left out."""
    lines = []
    for row in rows:
        step = row.get(STEP_METRIC, row.get("_step"))
        if step is None:
            continue
        metrics = {k: v for k, v in row.items()
                   if not k.startswith("_") and k != STEP_METRIC and not isinstance(v, Mapping)}
        if metrics:
            lines.append({"step": int(step), **metrics})
    return lines


def mirror_run(run: Any, root: Path) -> Path:
    """Write the run directory of ``run`` (a ``wandb.apis.public.Run``) under ``root``; its path."""
    config = _plain(dict(run.config))
    launch = config.pop(LAUNCH_KEY, None) or {}
    summary = _plain(dict(getattr(run, "summary_metrics", None) or run.summary))  # plain JSON when it has it
    run_dir = root / Path(str(run.group or "adhoc")).name / f"{launch.get('job_num') or 0}_{run.id}"
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    hydra = {"hydra": {"job": {"num": launch.get("job_num")},
                       "sweeper": {"params": dict.fromkeys(launch.get("swept") or [], "")}}}
    for name, content in (("config", config), ("overrides", list(launch.get("overrides") or [])),
                          ("hydra", hydra)):
        (run_dir / ".hydra" / f"{name}.yaml").write_text(yaml.safe_dump(content), encoding="utf-8")
    files = RunDir(run_dir)
    lines = history_lines(run.scan_history())
    files.metrics.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    if run.state in ENDED_STATES or summary.get("preempted"):
        # its scalars: table cells, eval_results and eval_prompts have files of their own
        ended = {k: v for k, v in summary.items()
                 if not k.startswith("_") and not isinstance(v, (Mapping, list))}
        files.summary.write_text(json.dumps(ended, indent=2), encoding="utf-8")
    results = summary.get(SUMMARY_KEY)
    if isinstance(results, Mapping):
        out = files.eval_dir(int(results.get("iteration") or 0))
        out.mkdir(parents=True, exist_ok=True)
        (out / RESULTS_FILE).write_text(json.dumps(results, indent=2), encoding="utf-8")
        rows = summary.get(PROMPTS_KEY) or []
        (out / SAMPLES_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return run_dir


def wandb_record(run: Any, root: Path) -> RunRecord:
    """The record of a W&B run, read from its mirror; its ``run`` is the W&B path and its status
    W&B's state (a preempted run says so in its summary)."""
    record = read_local_run(mirror_run(run, root))
    record.source, record.run = "wandb", "/".join(map(str, run.path))
    if record.status != "preempted":
        record.status = WANDB_STATES.get(run.state, str(run.state))
    return record


def wandb_records(path: str, api: Any = None) -> list[RunRecord]:
    """The runs of ``ENTITY/PROJECT`` in ``ablation-*`` groups, from the W&B API alone; [] with a
    warning when W&B is not installed or not reachable."""
    try:
        if api is None:
            import wandb

            api = wandb.Api(timeout=30)
        runs = api.runs(path, filters={"group": {"$regex": f"^{GROUP_PREFIX}"}})
        with tempfile.TemporaryDirectory(prefix="dynalign-wandb-") as tmp:
            return [wandb_record(run, Path(tmp)) for run in runs]
    except Exception as err:  # noqa: BLE001 - the report must not depend on a server
        warnings.warn(f"W&B runs of {path} not read ({type(err).__name__}: {err}); "
                      "the report uses the local records only", stacklevel=2)
        return []
