"""Pure statistics: bootstrap intervals, pairwise outcomes, judge calibration, intervals over
seeds and prompts (the ablation report), and the capability-preservation test.

No models, no I/O: numbers in, numbers out, so every rule here is tested with hand-made
judgements. Missing values are NaN (a judgement that did not parse) and are left out,
never replaced by a default.

Pairwise protocol (:mod:`dynalign.judge.pairwise`): each (policy, baseline) pair is judged
in both orders, the policy as side ``a``; the votes of each order are ``"a" | "b" | "tie"``
and the pair's outcome, the policy's point of view, is a win, tie or loss when both orders
produced a verdict. A pair with an order that produced no verdict is a judge failure:
counted, left out of the win rate.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from statistics import NormalDist
from typing import Any, NamedTuple

import numpy as np

from dynalign.judge.pairwise import LOSS, TIE, WIN, pair_outcome

Scores = Sequence[float] | np.ndarray  # a 1-D run of scores, NaN where missing

CI_LEVEL = 0.95
OUTCOME_POINTS = {WIN: 1.0, TIE: 0.5, LOSS: 0.0}


def _finite(values: Scores) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).ravel()  # [N]
    return x[~np.isnan(x)]


def nan_mean(values: Scores) -> float:
    """Mean of the non-NaN values; NaN when there are none."""
    x = _finite(values)
    return float(x.mean()) if x.size else math.nan


def bootstrap_ci(values: Scores, *, samples: int = 1000, seed: int = 0,
                 level: float = CI_LEVEL,
                 statistic: Callable[[np.ndarray], np.ndarray] = lambda r: r.mean(axis=1),
                 ) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over the non-NaN ``values``.

    ``statistic`` maps resamples [B, n] to [B]. The same ``seed`` gives the same interval.
    (NaN, NaN) when there are no values or ``samples == 0``.
    """
    x = _finite(values)  # [n]
    if x.size == 0 or samples <= 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    resamples = x[rng.integers(0, x.size, size=(samples, x.size))]  # [B, n]
    stats = statistic(resamples)  # [B]
    alpha = (1.0 - level) / 2
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(low), float(high)


def mean_with_ci(values: Scores, *, samples: int = 1000,
                 seed: int = 0) -> dict[str, float]:
    """``{"mean", "ci_low", "ci_high", "n", "missing"}`` of the values (NaN-aware)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    low, high = bootstrap_ci(x, samples=samples, seed=seed)
    n = int((~np.isnan(x)).sum())
    return {"mean": nan_mean(x), "ci_low": low, "ci_high": high, "n": n, "missing": int(x.size - n)}


# ------------------------------------------------------------------ pairwise


def win_rate(outcomes: Sequence[str | None]) -> float:
    """(wins + 0.5 ties) / decided pairs; failed pairs (None) are left out; NaN if none decided."""
    points = [OUTCOME_POINTS[o] for o in outcomes if o is not None]
    return sum(points) / len(points) if points else math.nan


def longer_answer_win_rate(outcomes: Sequence[str | None], policy_lengths: Sequence[float],
                           baseline_lengths: Sequence[float]) -> float:
    """Share of the pairs with a winner (no tie, no failure, unequal lengths) won by the longer
    answer: ~0.5 when length does not sway the judge, near 1 under length bias."""
    longer_won = []
    for outcome, p, b in zip(outcomes, policy_lengths, baseline_lengths, strict=True):
        if outcome in (WIN, LOSS) and p != b:
            longer_won.append(float((outcome == WIN) == (p > b)))
    return sum(longer_won) / len(longer_won) if longer_won else math.nan


def pairwise_summary(policy_first: Sequence[str | None], baseline_first: Sequence[str | None], *,
                     samples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Win rate with its bootstrap interval and the counts behind it, from per-pair order verdicts."""
    outcomes = [pair_outcome(a, b) for a, b in zip(policy_first, baseline_first, strict=True)]
    counts = Counter(outcomes)
    decided = len(outcomes) - counts[None]
    both_parsed = [(a, b) for a, b in zip(policy_first, baseline_first, strict=True)
                   if a is not None and b is not None]
    low, high = bootstrap_ci([OUTCOME_POINTS[o] for o in outcomes if o is not None], samples=samples,
                             seed=seed)
    return {
        "win_rate": win_rate(outcomes), "ci_low": low, "ci_high": high,
        "wins": counts[WIN], "ties": counts[TIE], "losses": counts[LOSS], "failed": counts[None],
        "decided": decided, "total": len(outcomes),
        "failure_rate": counts[None] / len(outcomes) if outcomes else math.nan,
        # share of decided pairs whose two orders agreed (1.0: no position bias seen)
        "order_agreement": (sum(a == b for a, b in both_parsed) / len(both_parsed)
                            if both_parsed else math.nan),
    }


# ------------------------------------------------------------------ calibration


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.arange(1, x.size + 1, dtype=np.float64)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _paired(x: Scores, y: Scores) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if a.size != b.size:
        raise ValueError(f"{a.size} scores against {b.size}")
    keep = ~np.isnan(a) & ~np.isnan(b)
    return a[keep], b[keep]


def pearson(x: Scores, y: Scores) -> float:
    """Pearson correlation over the pairs where both are present; NaN under 2 pairs or no spread."""
    a, b = _paired(x, y)
    if a.size < 2:
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else math.nan


def spearman(x: Scores, y: Scores) -> float:
    """Spearman rank correlation (average ranks for ties) over the pairs where both are present."""
    a, b = _paired(x, y)
    if a.size < 2:
        return math.nan
    return pearson(_average_ranks(a), _average_ranks(b))


def mean_abs_diff(x: Scores, y: Scores) -> float:
    a, b = _paired(x, y)
    return float(np.abs(a - b).mean()) if a.size else math.nan


def calibration_stats(self_scores: Sequence[float], external_scores: Sequence[float]) -> dict[str, float]:
    """How well the self-judge tracks the external judge on the same answers.

    ``spearman``/``pearson``: agreement in ranking/linear terms; ``mad``: mean |self - external|;
    ``bias``: mean (self - external), positive when the policy grades itself more leniently;
    ``n``: pairs where both judges produced a score.
    """
    a, b = _paired(self_scores, external_scores)
    return {"spearman": spearman(a, b), "pearson": pearson(a, b), "mad": mean_abs_diff(a, b),
            "bias": float((a - b).mean()) if a.size else math.nan, "n": int(a.size)}


def to_unit_scale(values: Sequence[float], low: float, high: float) -> np.ndarray:
    """Scores of a ``[low, high]`` scale mapped to [0, 1] (to compare rubrics of different scales)."""
    return (np.asarray(values, dtype=np.float64) - low) / (high - low)


# ------------------------------------------------------------------ intervals over seeds
#
# An ablation's numbers vary with the training seed far more than a single run shows, so a value
# of an axis is summarised over its seeds, and the evaluation's prompts are a sample too. Both
# enter one interval (:func:`seed_prompt_interval`): a Student t interval with ``seeds - 1``
# degrees of freedom whose variance adds the spread between seeds and the spread between prompts.
# A bootstrap over 2-5 seeds would understate the first (with two seeds it marks every difference
# whose two seeds agree in sign), so it is not used at the seed level.


class Interval(NamedTuple):
    """A mean with its two-sided interval; ``low``/``high`` are NaN when it cannot be had."""

    mean: float
    low: float
    high: float
    seeds: int  # seeds with a value (the interval needs at least 2)

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def sign(self) -> int:
        """+1 / -1 when the interval lies above / below 0 (a difference the test supports), else 0."""
        return 1 if self.low > 0 else -1 if self.high < 0 else 0


def t_critical(df: int, level: float = CI_LEVEL) -> float:
    """The t with P(|T| <= t) = ``level`` for Student's t with ``df`` (>= 1) degrees of freedom.

    Bisection on the closed-form two-sided probability of integer degrees of freedom
    (Abramowitz & Stegun 26.7.3-4); df 1 and 2 have closed forms: tan(pi level / 2) and
    level * sqrt(2 / (1 - level^2)).
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1 (got {df})")
    low, high = 0.0, 1.0
    while _t_two_sided(high, df) < level:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_two_sided(mid, df) < level else (low, mid)
    return (low + high) / 2


def _t_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df``."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: (2/pi)(theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, series = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            series += term
        return 2 / math.pi * (theta + s * math.cos(theta) * series)
    term, series = 1.0, 1.0  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    for k in range(1, df // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        series += term
    return s * series


def normal_critical(level: float = CI_LEVEL) -> float:
    """The z with P(|Z| <= z) = ``level`` (1.96 at 95%)."""
    return NormalDist().inv_cdf((1 + level) / 2)


def seed_prompt_interval(table: Sequence[Sequence[float]] | Sequence[float] | np.ndarray,
                         level: float = CI_LEVEL) -> Interval:
    """Mean of a [seeds, prompts] table (NaN: missing) and its t interval over seeds and prompts.

    The mean weighs seeds alike: the mean over seeds of each seed's mean over its prompts.
    Its variance is var(seed means) / seeds + var(prompt means) / prompts (each with ddof 1;
    the second is 0 with one column, e.g. a run-level number), which counts the residual noise
    twice and so errs wide; the interval is mean +- t(seeds - 1) * sqrt(variance). Under two
    seeds it is (NaN, NaN): one run says nothing about how another seed would land.
    A table of paired differences (policy A - policy B per seed and prompt) tests A against B.
    """
    x = np.asarray(table, dtype=np.float64)  # [S, P]
    if x.ndim == 1:
        x = x[:, None]  # one value per seed
    seeds = x[~np.isnan(x).all(axis=1)]  # [S', P]: seeds with some value
    if seeds.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    seed_means = np.nanmean(seeds, axis=1)  # [S']
    mean, n = float(seed_means.mean()), int(seed_means.size)
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    prompts = seeds[:, ~np.isnan(seeds).all(axis=0)]  # [S', P']
    prompt_means = np.nanmean(prompts, axis=0)  # [P']
    variance = seed_means.var(ddof=1) / n
    if prompt_means.size >= 2:
        variance += prompt_means.var(ddof=1) / prompt_means.size
    half = t_critical(n - 1, level) * math.sqrt(variance)
    return Interval(mean, mean - half, mean + half, n)


def step_bands(curves: Sequence[Sequence[float]] | np.ndarray,
               level: float = CI_LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per step (column) of [seeds, steps] curves: mean, interval low, interval high over seeds."""
    x = np.asarray(curves, dtype=np.float64)  # [S, T]
    columns = [seed_prompt_interval(x[:, t], level) for t in range(x.shape[1])]
    return (np.array([c.mean for c in columns]), np.array([c.low for c in columns]),
            np.array([c.high for c in columns]))


def last_steps_mean(rewards: Scores, k: int) -> float:
    """Mean of the last ``k`` logged steps' rewards (NaN steps left out): a run's final reward
    that one noisy step does not decide."""
    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k})")
    x = np.asarray(rewards, dtype=np.float64).ravel()
    return nan_mean(x[-k:])


# ------------------------------------------------------------------ capability preservation
#
# Non-inferiority per lm-eval task: the policy keeps the baseline's capability when the 95%
# interval of (policy - baseline), signed so that positive is better, lies above -margin.


PRESERVED, NOT_SHOWN, DEGRADED = "preserved", "not shown", "degraded"
VERDICT_CODES = {PRESERVED: 1, NOT_SHOWN: 0, DEGRADED: -1}  # numeric, for W&B
# lm-eval metrics where lower is better (its registry's higher_is_better=False); a task's own
# higher_is_better, when given, wins
LOWER_IS_BETTER = frozenset({"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "ter",
                             "brier_score"})
# a task's one capability number: the first of these it reports, else its first metric by name
MAIN_METRICS = ("acc_norm", "acc", "exact_match", "f1", "mc2", "mc1", "prompt_level_strict_acc")


def metric_base(metric: str) -> str:
    """``"exact_match,strict-match"`` -> ``"exact_match"`` (lm-eval's ``metric,filter``)."""
    return metric.split(",", 1)[0]


def stderr_key(metric: str) -> str:
    """lm-eval's standard-error key of a metric: ``acc`` -> ``acc_stderr``,
    ``exact_match,strict-match`` -> ``exact_match_stderr,strict-match``."""
    base, sep, filter_name = metric.partition(",")
    return f"{base}_stderr{sep}{filter_name}"


def main_metric(metrics: Mapping[str, Any]) -> str | None:
    """The task's capability metric among ``metrics`` (standard errors left out): the first of
    :data:`MAIN_METRICS`, else the first by name; None when there is none."""
    names = sorted(m for m in metrics if "_stderr" not in m)
    for preferred in MAIN_METRICS:
        found = next((m for m in names if metric_base(m) == preferred), None)
        if found is not None:
            return found
    return names[0] if names else None


def capability_verdict(delta: float, stderr: float, margin: float, *,
                       level: float = CI_LEVEL) -> tuple[float, float, str]:
    """``(low, high, verdict)`` of a better-is-positive delta with its standard error.

    The interval is delta +- z * stderr; ``preserved`` when low > -margin, ``degraded`` when
    high < -margin, ``not shown`` otherwise, and without an interval: when the delta or its stderr
    is missing (NaN), or the stderr is 0. lm-eval's stderr is estimated from the items, and 0 means
    every item scored alike on both sides (e.g. 0 of 4 right): the items cannot tell the spread,
    which is not the same as there being none.
    """
    if math.isnan(delta) or math.isnan(stderr) or stderr <= 0:
        return math.nan, math.nan, NOT_SHOWN
    half = normal_critical(level) * stderr
    low, high = delta - half, delta + half
    return low, high, PRESERVED if low > -margin else DEGRADED if high < -margin else NOT_SHOWN


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def task_capability(policy: Mapping[str, Any], baseline: Mapping[str, Any], *, margin: float,
                    higher_is_better: Mapping[str, bool] | None = None,
                    level: float = CI_LEVEL) -> dict[str, Any] | None:
    """One task's test on its main metric; None when the two sides share no metric.

    ``delta`` is policy - baseline, sign-flipped for lower-is-better metrics, so positive is
    better. Its standard error is sqrt(se_policy^2 + se_baseline^2) from lm-eval's
    ``<metric>_stderr``: it ignores that both sides answer the same items (a positive
    covariance), so it errs wide, never towards "preserved".
    """
    metric = main_metric({m: v for m, v in policy.items() if m in baseline})
    if metric is None:
        return None
    base = metric_base(metric)
    higher = (higher_is_better or {}).get(base, base not in LOWER_IS_BETTER)
    sign = 1.0 if higher else -1.0
    p, b = _number(policy[metric]), _number(baseline[metric])
    p_se, b_se = _number(policy.get(stderr_key(metric))), _number(baseline.get(stderr_key(metric)))
    delta, stderr = sign * (p - b), math.sqrt(p_se ** 2 + b_se ** 2)
    low, high, verdict = capability_verdict(delta, stderr, margin, level=level)
    return {"metric": metric, "higher_is_better": bool(higher), "policy": p, "baseline": b,
            "policy_stderr": p_se, "baseline_stderr": b_se, "delta": delta, "stderr": stderr,
            "ci_low": low, "ci_high": high, "verdict": verdict, "verdict_code": VERDICT_CODES[verdict]}


def overall_verdict(verdicts: Sequence[str]) -> str:
    """``preserved`` only if every task is (and there is one); ``degraded`` if some task is."""
    if verdicts and all(v == PRESERVED for v in verdicts):
        return PRESERVED
    return DEGRADED if DEGRADED in verdicts else NOT_SHOWN


def capability_summary(policy: Mapping[str, Mapping[str, Any]], baseline: Mapping[str, Mapping[str, Any]], *,
                       margin: float, tasks: Sequence[str] | None = None,
                       higher_is_better: Mapping[str, Mapping[str, bool]] | None = None,
                       level: float = CI_LEVEL) -> dict[str, Any]:
    """Capability preservation of lm-eval results ``{task: {metric: value}}`` (both sides).

    ``tasks``: the tasks asked for (a group such as ``mmlu`` is judged on its aggregate, not
    on each subtask); default every task both sides have. ``higher_is_better``: lm-eval's
    ``{task: {metric: bool}}`` when known. Returns ``{"margin", "level", "verdict",
    "verdict_code", "tasks": {task: task_capability(...)}}``.
    """
    names = [t for t in (tasks if tasks is not None else policy) if t in policy and t in baseline]
    per_task = {}
    for task in names:
        tested = task_capability(policy[task], baseline[task], margin=margin, level=level,
                                 higher_is_better=(higher_is_better or {}).get(task))
        if tested is not None:
            per_task[task] = tested
    verdict = overall_verdict([t["verdict"] for t in per_task.values()])
    return {"margin": margin, "level": level, "verdict": verdict, "verdict_code": VERDICT_CODES[verdict],
            "tasks": per_task}
