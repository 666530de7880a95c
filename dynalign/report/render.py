"""The report's table and text: ``report.csv`` and ``report.md``."""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dynalign.report.records import RunRecord, by_axis

COLUMNS = ("axis", "value", "status", "steps", "final_reward", "ca_score", "win_rate", "capability_delta",
           "judge_failure_rate", "time_per_step_s", "eval_iteration", "source", "run")
NA = "n/a"


def axis_note(runs: Sequence[RunRecord]) -> str | None:
    """A caveat for an axis whose runs differ in the judge (who, rubric, scoring mode): their rewards
    are not comparable."""
    keys = sorted({k for r in runs for k in r.keys if k == "judge" or k.startswith("judge.")})
    if not keys:
        return None
    return (f"the runs differ in {', '.join(f'`{k}`' for k in keys)}, so each is rewarded by a different "
            "judge, rubric or scoring mode: compare them by CA score and judge failure rate, not by reward")


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers rounded, missing values (None, NaN) as ``n/a``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NA
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_csv(records: Sequence[RunRecord], path: Path) -> None:
    """One row per run, full precision, ``n/a`` where a value is missing."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for record in records:
            writer.writerow([_csv_cell(record.cell(c)) for c in COLUMNS])


def _csv_cell(value: Any) -> str:
    if isinstance(value, float) and not math.isnan(value):
        return repr(value)  # full precision: the CSV is for further analysis
    return fmt(value)


def markdown_table(records: Sequence[RunRecord]) -> list[str]:
    header = ("axis", "value", "status", "steps", "final reward", "CA score", "win rate", "capability Δ",
              "judge failure rate", "s / step")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        cells = (r.axis, f"`{r.value}`", r.status, str(len(r.steps)), fmt(r.final_reward),
                 fmt(r.ca_score), fmt(r.win_rate), fmt(r.capability_delta), fmt(r.judge_failure_rate),
                 fmt(r.time_per_step_s, 2))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(records: Sequence[RunRecord], plots: Mapping[str, str], *, title: str,
                    sources: Sequence[str]) -> str:
    """``report.md``: the table, the definitions, one reward plot per axis, the CA/capability plot."""
    failed = [r for r in records if r.status in ("failed", "incomplete")]
    lines = [f"# {title}", "",
             f"{len(records)} runs from {', '.join(f'`{s}`' for s in sources)}; built "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}. Table as CSV: [report.csv](report.csv).", ""]
    if failed:
        lines += [f"**{len(failed)} run(s) did not finish**: "
                  + ", ".join(f"{r.axis} `{r.value}` ({r.status})" for r in failed)
                  + ". Their log is the sweep's output; a run with no metrics never trained.", ""]
    lines += markdown_table(records) + [""]
    lines += ["Final reward: the run's mean judge reward at its last step (judge scale). CA score: the "
              "external judge's mean Collective Agency score of the policy at its newest evaluated "
              "iteration; win rate: pairwise against the base model, ties count half; capability Δ: "
              "lm-eval policy - baseline, mean over tasks of each task's main metric (`n/a`: the run was "
              "not evaluated; `make ablations EVAL=1`). Judge failure rate: share of judgements without "
              "a parseable verdict, mean over steps. s / step: median wall time of one GRPO step.", ""]
    for axis, runs in by_axis(records).items():
        lines += [f"## {axis}", ""]
        note = axis_note(runs)
        if note:
            lines += [f"Note: {note}.", ""]
        if axis in plots:
            lines += [f"![reward per step, {axis}]({plots[axis]})", ""]
    lines += ["## CA score vs capability", ""]
    if "ca_vs_capability" in plots:
        lines += [f"![CA score vs capability delta]({plots['ca_vs_capability']})", ""]
    else:
        lines += [f"{NA}: no run has both a CA score and a capability delta "
                  "(run `make ablations EVAL=1`).", ""]
    return "\n".join(lines)
