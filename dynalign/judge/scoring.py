"""The judge: candidates in, rewards out, by one of the scoring modes.

``generate``: sample k judgements per candidate, parse each, average the parsed ones
(NaN-aware: a candidate with no parsed judgement gets NaN). ``logprob``: read the score
distribution at each aspect's verdict slot and take the expected score (always defined
for a sampler-backed judge; smoother rewards). Modes are picked by name from
``SCORING_MODES`` (the valid values of ``judge.mode``). Pairwise comparison lives in
:mod:`dynalign.judge.pairwise`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from dynalign.judge.backends import JudgeBackend, SamplerBackend
from dynalign.judge.parse import BACKEND_ERROR, failed, most_common_failure, parse_verdict
from dynalign.judge.prompt import render_judge_prompts
from dynalign.judge.rubric import Rubric, RubricLike, load_rubric
from dynalign.rollout.base import Prompt, SamplingParams


@dataclass
class JudgeResult:
    """The judgement of N candidates."""

    rewards: torch.Tensor  # [N] float32 combined reward; NaN where no judgement parsed
    scores: torch.Tensor  # [N, A] float32 per-aspect scores (NaN likewise)
    reasons: list[str]  # [N] "ok" or the failure code that left the candidate without a reward
    judgement_reasons: list[list[str]]  # [N][k] reason of every single judgement (k = 1 in logprob mode)
    texts: list[list[str]]  # [N][k] the judge's raw outputs, rationales included ("" if none generated)
    nonces: list[str]  # [N] the nonce of each judge prompt (one per user prompt of the call)
    aspect_names: tuple[str, ...]
    scale: tuple[int, int] = (0, 5)  # the rubric's (scale_min, scale_max)
    score_mass: torch.Tensor | None = None  # [N, A] logprob mode: probability on the score tokens

    def __len__(self) -> int:
        return len(self.reasons)

    def aspect(self, name: str) -> torch.Tensor:
        """[N] scores of one aspect."""
        return self.scores[:, self.aspect_names.index(name)]


def score_by_generation(judge: Judge, prompts: Sequence[Prompt], candidates: Sequence[str],
                        seed: int | None = None) -> JudgeResult:
    rubric, k = judge.rubric, judge.num_samples
    rng = None if seed is None else random.Random(seed)
    rendered = render_judge_prompts(rubric, prompts, candidates, rng=rng)
    params = judge.params if seed is None else replace(judge.params, seed=seed)
    outputs = judge.backend.generate([m for m, _ in rendered], k, params)  # [N][k]
    rows, rewards, reasons, judgement_reasons, texts = [], [], [], [], []
    for (_, nonce), outs in zip(rendered, outputs, strict=True):
        parsed = [parse_verdict(t, rubric, nonce) if t is not None else failed(rubric, BACKEND_ERROR)
                  for t in outs]
        good = [p for p in parsed if p.ok]
        # NaN-aware mean over the parsed judgements; the reward averages each judgement's reward
        rows.append([sum(p.scores[a] for p in good) / len(good) if good else math.nan
                     for a in rubric.aspect_names])
        rewards.append(sum(p.reward for p in good) / len(good) if good else math.nan)
        judgement_reasons.append([p.reason for p in parsed])
        reasons.append(most_common_failure(judgement_reasons[-1]))
        texts.append([t if t is not None else "" for t in outs])
    return JudgeResult(
        rewards=torch.tensor(rewards, dtype=torch.float32),
        scores=torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(rubric.aspects)),
        reasons=reasons, judgement_reasons=judgement_reasons, texts=texts,
        nonces=[n for _, n in rendered], aspect_names=rubric.aspect_names,
        scale=(rubric.scale_min, rubric.scale_max))


def score_by_logprob(judge: Judge, prompts: Sequence[Prompt], candidates: Sequence[str],
                     seed: int | None = None) -> JudgeResult:
    rubric = judge.rubric
    rng = None if seed is None else random.Random(seed)
    rendered = render_judge_prompts(rubric, prompts, candidates, reasoning=False, rng=rng)
    nonces = [n for _, n in rendered]
    slots = judge.backend.verdict_distributions([m for m, _ in rendered], nonces, rubric, judge.params)
    values = torch.tensor([float(s) for s in rubric.scores])  # [S]
    scores = (slots.probs * values).sum(-1)  # [N, A] expected score per aspect
    rewards = [rubric.combine_scores(row) for row in scores.tolist()]
    return JudgeResult(
        rewards=torch.tensor(rewards, dtype=torch.float32), scores=scores.float(),
        reasons=list(slots.reasons), judgement_reasons=[[r] for r in slots.reasons],
        texts=[[t] for t in slots.texts], nonces=nonces, aspect_names=rubric.aspect_names,
        scale=(rubric.scale_min, rubric.scale_max), score_mass=slots.mass.float())


# Scoring modes by name (judge.mode, eval.judge_mode).
SCORING_MODES: dict[str, Callable[..., JudgeResult]] = {
    "generate": score_by_generation,
    "logprob": score_by_logprob,
}


def as_backend(obj) -> JudgeBackend:
    """A judge backend as is, or a :class:`Sampler` wrapped as one."""
    if hasattr(obj, "generate") and hasattr(obj, "verdict_distributions"):
        return obj
    if hasattr(obj, "sample"):
        return SamplerBackend(obj)
    raise TypeError(f"{type(obj).__name__} is neither a judge backend nor a Sampler")


class Judge:
    """Scores candidates against a rubric with one backend and one scoring mode."""

    def __init__(self, rubric: RubricLike, backend, mode: str = "generate", num_samples: int = 1,
                 params: SamplingParams | None = None) -> None:
        if mode not in SCORING_MODES:
            raise ValueError(f"unknown judge mode {mode!r}; valid: {', '.join(sorted(SCORING_MODES))}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 (got {num_samples})")
        self.rubric: Rubric = load_rubric(rubric)
        self.backend = as_backend(backend)
        self.mode = mode
        self.num_samples = num_samples
        self.params = params or SamplingParams(max_new_tokens=256, temperature=0.7)

    def score(self, prompts: Sequence[Prompt], candidates: Sequence[str], *,
              seed: int | None = None) -> JudgeResult:
        """Judge ``candidates[i]`` as the answer to ``prompts[i]`` (for rollouts:
        ``[prompts[j] for j in rollouts.prompt_index]`` and ``rollouts.texts``).

        ``seed`` makes the call reproducible (nonces and judge sampling); None draws nonces
        from the OS and samples from the global generator.
        """
        if len(prompts) != len(candidates):
            raise ValueError(f"{len(prompts)} prompts for {len(candidates)} candidates")
        if not candidates:
            return JudgeResult(torch.zeros(0), torch.zeros(0, len(self.rubric.aspects)), [], [], [], [],
                               self.rubric.aspect_names, (self.rubric.scale_min, self.rubric.scale_max))
        return SCORING_MODES[self.mode](self, prompts, candidates, seed)

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()
