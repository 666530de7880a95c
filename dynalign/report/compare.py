"""An axis's runs grouped by value over their seeds: means, intervals, and tests against the
axis's baseline value.

A value's runs are its replicates: the finished runs of that value, one per training seed.
Each metric of a value is the mean over its seeds with a 95% interval over seeds and prompts
(:func:`dynalign.eval.stats.seed_prompt_interval`); each other value is compared with the
baseline value (the first in the sweep's order, or ``--baseline AXIS=VALUE``) on the seeds
both have, pairing the CA score and the win rate by prompt within each seed when the runs'
``eval_samples.jsonl`` are there. A difference is *supported* when its 95% interval excludes 0,
and *negligible* when it is supported but its mean is smaller than the metric's smallest
difference of interest (:data:`MIN_EFFECTS`, ``--min-effect``): a consistent 0.001 on a 1-5
judge scale is real to the test and nothing to a reader, so it is said in words and not marked.

    reward      mean judge reward over the run's last ``last_steps`` logged steps
    ca_score    the external judge's CA score of the policy (per prompt when available)
    win_rate    pairwise points against the base model (win 1, tie 0.5, loss 0; per prompt)
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from dynalign.eval.stats import Interval, last_steps_mean, overall_verdict, seed_prompt_interval
from dynalign.report.records import RunRecord, by_axis, finite, nan_median

METRICS = ("reward", "ca_score", "win_rate")
METRIC_NAMES = {"reward": "reward", "ca_score": "CA score", "win_rate": "win rate"}
DEFAULT_LAST_STEPS = 5
# the smallest difference worth reporting: judge points for reward and CA score, the share of
# comparisons for the win rate
MIN_EFFECTS = {"reward": 0.05, "ca_score": 0.05, "win_rate": 0.02}
MISSING = Interval(math.nan, math.nan, math.nan, 0)


@dataclass(frozen=True)
class Metric:
    """One metric of one value: its estimate over seeds and its difference from the baseline."""

    estimate: Interval
    difference: Interval | None = None  # value - baseline, paired; None on the baseline's row
    note: str | None = None  # why it is not compared with the baseline
    min_effect: float = 0.0  # the smallest difference of interest

    @property
    def mark(self) -> int:
        """+1 / -1: a difference from the baseline the 95% interval supports and that is at least
        ``min_effect``; 0: none."""
        return 0 if self.difference is None or self.negligible else self.difference.sign

    @property
    def negligible(self) -> bool:
        """A supported difference smaller than ``min_effect``."""
        d = self.difference
        return d is not None and d.sign != 0 and abs(d.mean) < self.min_effect


@dataclass
class ValueSummary:
    """The runs of one value of an axis and what they say together."""

    axis: str
    value: str
    runs: list[RunRecord]  # every run of the value, in sweep order
    used: list[RunRecord]  # its finished runs, one per seed: the statistics' replicates
    is_baseline: bool = False
    metrics: dict[str, Metric] = field(default_factory=dict)

    @property
    def seeds(self) -> int:
        return len(self.used)

    @property
    def status(self) -> str:
        counts = Counter(r.status for r in self.runs)
        return ", ".join(f"{n} {status}" for status, n in counts.items())

    @property
    def steps(self) -> int:
        return max((len(r.steps) for r in self.used), default=0)

    @property
    def judge_failure_rate(self) -> float:
        kept = finite(r.judge_failure_rate for r in self.used)
        return sum(kept) / len(kept) if kept else math.nan

    @property
    def time_per_step_s(self) -> float:
        return nan_median(r.time_per_step_s for r in self.used)

    @property
    def capability_counts(self) -> Counter[str]:
        return Counter(r.capability for r in self.used if r.capability is not None)

    @property
    def capability(self) -> str | None:
        """Over the evaluated seeds: preserved only if every seed's is; degraded if some seed's is."""
        counts = self.capability_counts
        return overall_verdict(list(counts.elements())) if counts else None


@dataclass
class AxisSummary:
    """One axis: its values' summaries, its baseline value, and what may be compared."""

    axis: str
    baseline: str
    values: list[ValueSummary]
    last_steps: int
    reward_note: str | None = None  # set when rewards of the values are not comparable

    @property
    def min_seeds(self) -> int:
        return min((v.seeds for v in self.values), default=0)

    @property
    def max_seeds(self) -> int:
        return max((v.seeds for v in self.values), default=0)

    def supported(self) -> list[tuple[ValueSummary, str, Interval]]:
        """Every (value, metric, difference) whose 95% interval excludes 0 and that is not negligible."""
        return [(v, name, m.difference) for v in self.values for name, m in v.metrics.items()
                if m.difference is not None and m.mark != 0]

    def negligible(self) -> list[tuple[ValueSummary, str, Interval]]:
        """Every supported (value, metric, difference) smaller than the metric's ``min_effect``."""
        return [(v, name, m.difference) for v in self.values for name, m in v.metrics.items()
                if m.difference is not None and m.negligible]

    def compared(self) -> bool:
        """Whether any difference could be tested (some value shares >= 2 seeds with the baseline)."""
        return any(m.difference is not None and not math.isnan(m.difference.low)
                   for v in self.values for m in v.metrics.values())


def judge_keys(runs: Iterable[RunRecord]) -> list[str]:
    """The swept keys that change the judge (who, rubric, scoring mode)."""
    return sorted({k for r in runs for k in r.keys if k == "judge" or k.startswith("judge.")})


def reward_note(runs: Sequence[RunRecord]) -> str | None:
    """A caveat for an axis whose runs differ in the judge (who, rubric, scoring mode): their rewards
    are not comparable."""
    keys = judge_keys(runs)
    if not keys:
        return None
    return (f"the runs differ in {', '.join(f'`{k}`' for k in keys)}, so each is rewarded by a different "
            "judge, rubric or scoring mode: compare them by CA score and judge failure rate, not by reward")


def replicates(runs: Sequence[RunRecord]) -> list[RunRecord]:
    """The finished runs, the first of each seed (a run of unknown seed counts as its own)."""
    used, seen = [], set()
    for run in runs:
        if run.status != "done" or (run.seed is not None and run.seed in seen):
            continue
        seen.add(run.seed)
        used.append(run)
    return used


def run_reward(run: RunRecord, last_steps: int) -> float:
    """The run's reward: the mean over its last ``last_steps`` logged steps (else its summary's)."""
    if finite(run.rewards):
        return last_steps_mean(run.rewards, last_steps)
    return run.final_reward


def _by_prompt(runs: Sequence[RunRecord], metric: str) -> list[str] | None:
    """The prompt ids to pair on when every run with a value of ``metric`` has per-prompt values."""
    attribute = {"ca_score": "ca_by_prompt", "win_rate": "win_by_prompt"}.get(metric)
    if attribute is None:
        return None
    evaluated = [r for r in runs if not math.isnan(getattr(r, metric))]
    if not evaluated or not all(getattr(r, attribute) for r in evaluated):
        return None
    return sorted({key for r in evaluated for key in getattr(r, attribute)})


def run_row(run: RunRecord, metric: str, prompts: list[str] | None, last_steps: int) -> list[float]:
    """A run's row of a [seeds, prompts] table: per prompt, or its one run-level number."""
    if metric == "reward":
        return [run_reward(run, last_steps)]
    if prompts is None:
        return [getattr(run, metric)]
    by_prompt = run.ca_by_prompt if metric == "ca_score" else run.win_by_prompt
    return [by_prompt.get(p, math.nan) for p in prompts]


def paired_difference(runs: Sequence[RunRecord], baseline: Sequence[RunRecord], metric: str,
                      prompts: list[str] | None, last_steps: int) -> Interval:
    """value - baseline over the seeds both have, by prompt within a seed when ``prompts``."""
    base = {r.seed: r for r in baseline if r.seed is not None}
    rows = []
    for run in runs:
        if run.seed in base:
            treated = run_row(run, metric, prompts, last_steps)
            control = run_row(base[run.seed], metric, prompts, last_steps)
            rows.append([t - c for t, c in zip(treated, control, strict=True)])
    return seed_prompt_interval(rows) if rows else MISSING


def summarize_axis(axis: str, runs: Sequence[RunRecord], *, last_steps: int = DEFAULT_LAST_STEPS,
                   baseline: str | None = None,
                   min_effects: Mapping[str, float] = MIN_EFFECTS) -> AxisSummary:
    """Group an axis's runs (in sweep order) by value and compare each value with the baseline."""
    grouped: dict[str, list[RunRecord]] = {}
    for run in runs:
        grouped.setdefault(run.value, []).append(run)
    if baseline is None:
        baseline = next(iter(grouped))
    elif baseline not in grouped:
        raise ValueError(f"--baseline {axis}={baseline}: no such value; the values of {axis} are "
                         + ", ".join(grouped))
    values = [ValueSummary(axis, value, members, replicates(members), is_baseline=value == baseline)
              for value, members in grouped.items()]
    note = reward_note(runs)
    used = [r for v in values for r in v.used]
    prompts = {metric: _by_prompt(used, metric) for metric in METRICS}
    base = next(v for v in values if v.is_baseline)
    for v in values:
        for metric in METRICS:
            table = [run_row(r, metric, prompts[metric], last_steps) for r in v.used]
            estimate = seed_prompt_interval(table) if table else MISSING
            if v.is_baseline:
                v.metrics[metric] = Metric(estimate)
            elif metric == "reward" and note is not None:
                v.metrics[metric] = Metric(estimate, note="different judges")
            else:
                difference = paired_difference(v.used, base.used, metric, prompts[metric], last_steps)
                v.metrics[metric] = Metric(estimate, difference, min_effect=min_effects[metric])
    return AxisSummary(axis, baseline, values, last_steps, note)


def summarize(records: Sequence[RunRecord], *, last_steps: int = DEFAULT_LAST_STEPS,
              baselines: Mapping[str, str] | None = None,
              min_effects: Mapping[str, float] | None = None) -> list[AxisSummary]:
    """Every axis of the records, in the report's order (``min_effects``: over :data:`MIN_EFFECTS`)."""
    baselines = baselines or {}
    unknown = sorted(set(baselines) - {r.axis for r in records})
    if unknown:
        raise ValueError(f"--baseline names axes without runs: {', '.join(unknown)}")
    effects = {**MIN_EFFECTS, **(min_effects or {})}
    return [summarize_axis(axis, runs, last_steps=last_steps, baseline=baselines.get(axis),
                           min_effects=effects) for axis, runs in by_axis(records).items()]
