"""Pure statistics of an evaluation: bootstrap intervals, pairwise outcomes, judge calibration.

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
from collections.abc import Callable, Sequence

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
