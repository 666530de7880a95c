"""The report's tables and text: ``report.csv`` (one row per value), ``runs.csv`` (one row per
run) and ``report.md``."""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dynalign.eval.stats import CI_LEVEL, Interval
from dynalign.report.compare import METRIC_NAMES, METRICS, AxisSummary, Metric, ValueSummary, run_reward
from dynalign.report.records import RunRecord

NA = "n/a"
MARKS = {1: " ▲", -1: " ▼", 0: ""}
RUN_COLUMNS = ("axis", "value", "seed", "status", "steps", "final_reward", "reward_last_steps", "ca_score",
               "win_rate", "capability", "capability_min_delta", "judge_failure_rate", "time_per_step_s",
               "eval_iteration", "source", "run")


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers rounded, missing values (None, NaN) as ``n/a``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NA
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _signed(value: float) -> str:
    return NA if math.isnan(value) else f"{value:+.3f}"


def _csv_cell(value: Any) -> str:
    if isinstance(value, float) and not math.isnan(value):
        return repr(value)  # full precision: the CSV is for further analysis
    return fmt(value)


def _write_rows(path: Path, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows([_csv_cell(c) for c in row] for row in rows)


# ------------------------------------------------------------------ CSV


def value_columns() -> list[str]:
    columns = ["axis", "value", "baseline", "seeds", "status", "steps"]
    for m in METRICS:
        columns += [f"{m}_mean", f"{m}_ci_low", f"{m}_ci_high", f"{m}_diff", f"{m}_diff_ci_low",
                    f"{m}_diff_ci_high", f"{m}_supported", f"{m}_negligible"]
    return columns + ["capability", "capability_seeds", "judge_failure_rate", "time_per_step_s"]


def value_row(v: ValueSummary) -> list[Any]:
    row: list[Any] = [v.axis, v.value, v.is_baseline, v.seeds, v.status, v.steps]
    for m in METRICS:
        metric = v.metrics[m]
        diff = metric.difference or Interval(math.nan, math.nan, math.nan, 0)
        e = metric.estimate
        row += [e.mean, e.low, e.high, diff.mean, diff.low, diff.high, metric.mark, metric.negligible]
    counts = "; ".join(f"{verdict}: {n}" for verdict, n in v.capability_counts.items())
    return row + [v.capability, counts or None, v.judge_failure_rate, v.time_per_step_s]


def write_csvs(axes: Sequence[AxisSummary], records: Sequence[RunRecord], out_dir: Path,
               last_steps: int) -> None:
    """``report.csv``: the table, one row per value, full precision; ``runs.csv``: one row per run."""
    _write_rows(out_dir / "report.csv", value_columns(), [value_row(v) for a in axes for v in a.values])
    rows = [[r.axis, r.value, r.seed, r.status, len(r.steps), r.final_reward, run_reward(r, last_steps),
             r.ca_score, r.win_rate, r.capability, r.capability_min_delta, r.judge_failure_rate,
             r.time_per_step_s, r.eval_iteration, r.source, r.run] for r in records]
    _write_rows(out_dir / "runs.csv", RUN_COLUMNS, rows)


# ------------------------------------------------------------------ markdown


def metric_cell(metric: Metric) -> str:
    """``mean ± half-width`` (the 95% interval over seeds), the mean alone with one seed, and a
    mark when the difference from the baseline is supported."""
    e = metric.estimate
    if math.isnan(e.mean):
        return NA
    text = f"{e.mean:.3f}" if math.isnan(e.low) else f"{e.mean:.3f} ± {e.half_width:.3f}"
    return text + MARKS[metric.mark]


def capability_cell(v: ValueSummary) -> str:
    counts = v.capability_counts
    if not counts:
        return NA
    if len(counts) == 1:
        return f"{v.capability} ({sum(counts.values())}/{v.seeds} seeds)"
    return f"{v.capability} ({', '.join(f'{n} {verdict}' for verdict, n in counts.items())})"


def markdown_table(axes: Sequence[AxisSummary]) -> list[str]:
    last = axes[0].last_steps if axes else 0
    header = ("axis", "value", "seeds", "runs", f"reward (last {last} steps)", "CA score", "win rate",
              "capability", "judge failure rate", "s / step")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for axis in axes:
        for v in axis.values:
            value = f"`{v.value}`" + (" (baseline)" if v.is_baseline else "")
            cells = (v.axis, value, str(v.seeds), v.status, *(metric_cell(v.metrics[m]) for m in METRICS),
                     capability_cell(v),
                     fmt(v.judge_failure_rate), fmt(v.time_per_step_s, 2))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _difference(name: str, metric: Metric) -> str:
    label = METRIC_NAMES[name]
    d = metric.difference
    if metric.note is not None:
        return f"{label} not compared ({metric.note})"
    if d is None or math.isnan(d.mean):
        return f"{label} {NA}"
    if math.isnan(d.low):
        return f"{label} {_signed(d.mean)} ({d.seeds} paired seed{'s' * (d.seeds != 1)}: no interval)"
    negligible = " (negligible)" if metric.negligible else ""
    return f"{label} {_signed(d.mean)} [{_signed(d.low)}, {_signed(d.high)}]{MARKS[metric.mark]}{negligible}"


def _listed(found: Sequence[tuple[ValueSummary, str, Interval]]) -> str:
    return "; ".join(f"`{v.value}` {'higher' if d.sign > 0 else 'lower'} {METRIC_NAMES[m]} "
                     f"({_signed(d.mean)} [{_signed(d.low)}, {_signed(d.high)}])" for v, m, d in found)


def conclusion(axis: AxisSummary) -> str:
    """What the axis supports, in words."""
    level = f"{CI_LEVEL:.0%}"
    if len(axis.values) < 2:
        return "One value: nothing to compare."
    if axis.max_seeds < 2:
        return ("**One seed per value: no intervals and no tests.** They need at least 2 seeds "
                "(`make ablations SEEDS=3`, or `seed=0,1,2` in the sweep); the numbers are single runs, "
                "not findings.")
    if not axis.compared():
        base = next(v for v in axis.values if v.is_baseline)
        if all(math.isnan(m.estimate.mean) for m in base.metrics.values()):
            return (f"The baseline `{axis.baseline}` has no reward, CA score or win rate (judge failure rate "
                    f"{fmt(base.judge_failure_rate)}): nothing to test against. `--baseline "
                    f"{axis.axis}=VALUE` tests against another value.")
        return (f"No value has numbers on 2 or more finished seeds it shares with the baseline "
                f"`{axis.baseline}`: nothing can be tested.")
    supported, negligible = axis.supported(), axis.negligible()
    small = (f" Supported but smaller than the smallest difference of interest, so negligible: "
             f"{_listed(negligible)}." if negligible else "")
    if not supported:
        qualifier = " that matters" if negligible else ""
        return (f"**No difference from `{axis.baseline}`{qualifier} is supported at the {level} level**: "
                f"every difference below is inside the noise between seeds and prompts"
                f"{' or too small to matter' if negligible else ''}.{small}")
    return (f"**Supported at the {level} level** (against `{axis.baseline}`): {_listed(supported)}.{small} "
            "Every other difference is inside the noise.")


def axis_section(axis: AxisSummary, plots: Mapping[str, str]) -> list[str]:
    seeds = (f"{axis.min_seeds} seed{'s' * (axis.min_seeds != 1)}" if axis.min_seeds == axis.max_seeds
             else f"{axis.min_seeds}-{axis.max_seeds} seeds")
    lines = [f"## {axis.axis}", ""]
    if axis.reward_note:
        lines += [f"Note: {axis.reward_note}.", ""]
    lines += [f"Baseline `{axis.baseline}`; {seeds} per value. {conclusion(axis)}", ""]
    for v in axis.values:
        if not v.is_baseline:
            lines.append(f"- `{v.value}` - `{axis.baseline}`: "
                         + "; ".join(_difference(m, v.metrics[m]) for m in METRICS))
    lines += [""] if len(axis.values) > 1 else []
    if axis.axis in plots:
        lines += [f"![reward per step, {axis.axis}]({plots[axis.axis]})", ""]
    return lines


DEFINITIONS = (
    "Each row is one value of an axis over its seeds (its finished runs, one per training seed). A cell is "
    "the mean over seeds ± the half-width of its 95% interval: a Student t interval with seeds - 1 degrees "
    "of freedom whose variance adds the spread between seeds and, for the CA score and the win rate, the "
    "spread between evaluation prompts (it errs wide); with one seed there is no interval. **Reward**: the "
    "run's mean judge reward over its last {last} logged steps (all of them if it logged fewer; judge scale; "
    "a self-judge moves with the policy, so compare rewards within an axis only). **CA score**: the "
    "external judge's mean Collective "
    "Agency score of the policy at its newest evaluated iteration; **win rate**: pairwise against the base "
    "model, ties count half. **Capability**: the lm-eval non-inferiority verdict of each seed's evaluation "
    "(preserved: every task's 95% interval of policy - baseline lies above -`eval.capability_margin`; "
    "degraded: some task's lies below it; else not shown), combined over seeds by the same rule. "
    "**Tests**: each value against the axis's baseline on the seeds both have, paired by seed and, for the "
    "CA score and the win rate, by prompt within a seed; ▲/▼ marks a difference whose 95% interval "
    "excludes 0 (a two-sided test at the 5% level; pairing cancels what a seed's runs share, so a mark can "
    "stand where the two values' own intervals overlap), unless the difference is smaller than the "
    "smallest difference of interest ({min_effects}; `--min-effect`): such a difference is called "
    "negligible and not marked. `n/a`: not measured (not evaluated: "
    "`make ablations EVAL=1`). Judge failure rate: share of judgements without a parseable verdict, mean "
    "over steps and seeds. s / step: median wall time of one GRPO step. Every run: [runs.csv](runs.csv).")


TINY_MODEL = "tiny"
RANDOM_WEIGHTS = (
    "**Every run here trains the embedded tiny model, whose weights are random.** Its answers mean "
    "nothing, so its rewards and scores move by chance and by the method's mechanics alone: this report "
    "checks that the ablations run end to end and that the statistics work, and no difference in it, "
    "marked or not, is a finding about alignment.")


def _min_effects(axes: Sequence[AxisSummary]) -> str:
    effects: dict[str, float] = {}
    for axis in axes:
        for v in axis.values:
            effects.update({m: metric.min_effect for m, metric in v.metrics.items() if metric.difference})
    return ", ".join(f"{METRIC_NAMES[m]} {effects[m]:g}" for m in METRICS if m in effects) or "none"


def render_markdown(axes: Sequence[AxisSummary], records: Sequence[RunRecord], plots: Mapping[str, str], *,
                    title: str, sources: Sequence[str]) -> str:
    """``report.md``: the table, the definitions, per axis its conclusion, differences and reward plot,
    then the CA/capability plot."""
    failed = [r for r in records if r.status in ("failed", "incomplete")]
    lines = [f"# {title}", "",
             f"{len(records)} runs from {', '.join(f'`{s}`' for s in sources)}; built "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}. Table as CSV: [report.csv](report.csv).", ""]
    if failed:
        lines += [f"**{len(failed)} run(s) did not finish**: "
                  + ", ".join(f"{r.axis} `{r.value}`" + (f" seed {r.seed}" if r.seed is not None else "")
                              + f" ({r.status})" for r in failed)
                  + ". Their log is the sweep's output; a run with no metrics never trained. Unfinished runs "
                  "are left out of the statistics.", ""]
    if records and all(r.model == TINY_MODEL for r in records):
        lines += [RANDOM_WEIGHTS, ""]
    last = axes[0].last_steps if axes else 0
    lines += markdown_table(axes) + ["", DEFINITIONS.format(last=last, min_effects=_min_effects(axes)), ""]
    for axis in axes:
        lines += axis_section(axis, plots)
    lines += ["## CA score vs capability", ""]
    if "ca_vs_capability" in plots:
        lines += [f"![CA score vs capability delta]({plots['ca_vs_capability']})", ""]
    else:
        lines += [f"{NA}: no run has both a CA score and a capability test "
                  "(run `make ablations EVAL=1`).", ""]
    return "\n".join(lines)
