"""Judge statistics for one step: what the rewards look like and how often the judge failed.

``judge_stats`` returns flat float metrics (keys below, prefixed ``judge/`` by default):

- ``reward_mean``, ``reward_std``, ``{aspect}_mean``, ``{aspect}_std`` over parsed rewards;
- ``reward_nan_rate`` (candidates left without a reward), ``parse_failure_rate`` and
  ``parse_fail/{reason}`` over every single judgement (k per candidate in generate mode);
- ``hist/reward/{s}``, ``hist/{aspect}/{s}``: counts per integer bucket (nearest integer);
- ``length_pearson``, ``length_spearman``: correlation of completion length with reward,
  the length-bias signal (NaN with fewer than 2 parsed rewards or no spread);
- ``score_mass_mean`` (logprob mode): probability the judge puts on the score tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dynalign.judge.parse import parse_failure_stats
from dynalign.judge.scoring import JudgeResult


def _mean_std(values: torch.Tensor) -> tuple[float, float]:
    values = values[~torch.isnan(values)]
    if values.numel() == 0:
        return math.nan, math.nan
    return values.mean().item(), values.std(unbiased=False).item()


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    if x.numel() < 2:
        return math.nan
    x, y = x - x.mean(), y - y.mean()
    denominator = (x.square().sum() * y.square().sum()).sqrt()
    return (x * y).sum().div(denominator).item() if denominator > 0 else math.nan


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 with ties given their average rank."""
    order = torch.argsort(x)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(x.numel(), dtype=x.dtype)
    for value in torch.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def length_correlations(lengths: torch.Tensor | Sequence[float],
                        rewards: torch.Tensor) -> tuple[float, float]:
    """(Pearson, Spearman) between completion length and reward over the parsed rewards."""
    lengths = torch.as_tensor(lengths, dtype=torch.float64).flatten()  # [N]
    rewards = rewards.to(torch.float64).flatten()  # [N]
    if lengths.numel() != rewards.numel():
        raise ValueError(f"{lengths.numel()} lengths for {rewards.numel()} rewards")
    keep = ~torch.isnan(rewards) & ~torch.isnan(lengths)
    x, y = lengths[keep], rewards[keep]
    return _pearson(x, y), _pearson(_ranks(x), _ranks(y)) if x.numel() >= 2 else math.nan


def _histogram(values: torch.Tensor, low: int, high: int) -> dict[int, float]:
    values = values[~torch.isnan(values)]
    buckets = torch.floor(values + 0.5).clamp(low, high).long()
    return {s: float((buckets == s).sum()) for s in range(low, high + 1)}


def judge_stats(result: JudgeResult, completion_lengths: torch.Tensor | Sequence[float], *,
                prefix: str = "judge/") -> dict[str, float]:
    """Per-step judge metrics (see the module doc); ``completion_lengths`` [N] in tokens."""
    stats: dict[str, float] = {}
    stats["reward_mean"], stats["reward_std"] = _mean_std(result.rewards)
    for a, name in enumerate(result.aspect_names):
        stats[f"{name}_mean"], stats[f"{name}_std"] = _mean_std(result.scores[:, a])
    stats["reward_nan_rate"] = torch.isnan(result.rewards).float().mean().item() if len(result) else math.nan
    failures = parse_failure_stats([r for row in result.judgement_reasons for r in row])
    stats["parse_failure_rate"] = failures.pop("failure_rate")
    stats["judgements"] = failures.pop("count")
    stats.update({f"parse_fail/{k.removeprefix('rate/')}": v for k, v in failures.items()})
    low, high = result.scale
    for score, count in _histogram(result.rewards, low, high).items():
        stats[f"hist/reward/{score}"] = count
    for a, name in enumerate(result.aspect_names):
        for score, count in _histogram(result.scores[:, a], low, high).items():
            stats[f"hist/{name}/{score}"] = count
    pearson, spearman = length_correlations(completion_lengths, result.rewards)
    stats["length_pearson"], stats["length_spearman"] = pearson, spearman
    if result.score_mass is not None:
        stats["score_mass_mean"] = _mean_std(result.score_mass.flatten())[0]
    return {prefix + key: float(value) for key, value in stats.items()}
