"""The judges of an evaluation: the external judge (pointwise and pairwise) and the self-judge.

The external judge is ``eval.judge``, built from the registry of :mod:`dynalign.judge.external`
(the training judge's too): a local model through transformers (``hf``) or vLLM (``vllm``), or
an OpenAI-compatible endpoint (``openai``: a hosted API, or a strong model served with
``vllm serve``). It scores with the CA rubric (``eval.rubric``) in ``generate`` or ``logprob``
mode, like the training judge, and compares the policy's answers with the baseline's with
:func:`dynalign.judge.pairwise.judge_pairs` (both orders; the policy is side ``a``).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from dynalign.config import TrainConfig
from dynalign.distributed import get_rank
from dynalign.eval.settings import ResolvedEval
from dynalign.eval.stats import mean_with_ci
from dynalign.judge import (
    OK,
    ExternalContext,
    Judge,
    JudgeResult,
    PairJudgement,
    build_external_backend,
    build_judge,
    judge_pairs,
    load_rubric,
    parse_failure_stats,
)
from dynalign.rollout.base import Prompt, Sampler, SamplingParams

RUBRIC_PROMPT_TOKENS = 2048  # vLLM judge: room for the rubric and the user prompt, besides two answers


# ------------------------------------------------------------------ building judges



def build_external_judge(cfg: TrainConfig, resolved: ResolvedEval) -> Judge:
    """The external judge ``eval.judge`` describes, scoring with ``eval.rubric``."""
    context = ExternalContext(
        key="eval.judge", model=cfg.model, batch_size=cfg.rollout.batch_size, seed=cfg.seed,
        max_prompt_length=RUBRIC_PROMPT_TOKENS + 2 * cfg.eval.max_new_tokens,
        max_new_tokens=resolved.judge_max_new_tokens, vllm=cfg.rollout.vllm)
    params = SamplingParams(max_new_tokens=resolved.judge_max_new_tokens, temperature=cfg.judge.temperature,
                            seed=cfg.seed)
    return Judge(load_rubric(cfg.eval.rubric), build_external_backend(cfg.eval.judge, context),
                 mode=resolved.judge_mode, num_samples=cfg.judge.num_samples, params=params)


def build_self_judge(cfg: TrainConfig, policy_sampler: Sampler) -> Judge:
    """The policy judging with the training rubric and scoring mode, as self-rewarding does."""
    return build_judge(replace(cfg.judge, source="self"), policy_sampler)


def free_memory() -> None:
    """Give the memory of dropped models back (an evaluation loads its models one at a time)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ pointwise


def concat_results(parts: Sequence[JudgeResult]) -> JudgeResult:
    """One :class:`JudgeResult` from the results of consecutive chunks (or ranks' shares); empty
    parts are left out, so their missing ``score_mass`` does not drop the others'."""
    parts = [p for p in parts if len(p)] or list(parts[:1])
    first = parts[0]
    masses = [p.score_mass for p in parts if p.score_mass is not None]
    return JudgeResult(
        rewards=torch.cat([p.rewards for p in parts]), scores=torch.cat([p.scores for p in parts]),
        reasons=[r for p in parts for r in p.reasons],
        judgement_reasons=[r for p in parts for r in p.judgement_reasons],
        texts=[t for p in parts for t in p.texts], nonces=[n for p in parts for n in p.nonces],
        aspect_names=first.aspect_names, scale=first.scale,
        score_mass=torch.cat(masses) if len(masses) == len(parts) else None)


def score_in_chunks(judge: Judge, prompts: Sequence[Prompt], answers: Sequence[str], *, chunk: int,
                    desc: str, seeds: Sequence[int] | None = None) -> JudgeResult:
    """``judge.score`` over chunks, with a progress bar (rank 0); ``seeds``: each chunk's seed
    (nonces and judge sampling), None for fresh nonces and the judge's own sampling seed."""
    from tqdm.auto import tqdm

    starts = range(0, len(answers), chunk)
    bar = tqdm(starts, desc=desc, unit="chunk", leave=False, disable=get_rank() != 0)
    parts = [judge.score(prompts[s:s + chunk], answers[s:s + chunk], seed=None if seeds is None else seeds[j])
             for j, s in enumerate(bar)]
    return concat_results(parts) if parts else judge.score([], [])


def pointwise_summary(result: JudgeResult, *, samples: int, seed: int) -> dict[str, Any]:
    """Mean and bootstrap 95% interval of the overall reward and of each aspect, and the failures.

    ``failure_rate``: share of answers left without a score (every judgement of it failed);
    ``judgement_failure_rate`` and ``failures``: over every single judgement.
    """
    judgements = [r for row in result.judgement_reasons for r in row]
    failures = parse_failure_stats(judgements)
    counts: dict[str, int] = {}
    for reason in judgements:
        if reason != OK:
            counts[reason] = counts.get(reason, 0) + 1
    return {
        "overall": mean_with_ci(result.rewards.numpy(), samples=samples, seed=seed),
        "aspects": {name: mean_with_ci(result.aspect(name).numpy(), samples=samples, seed=seed + 1 + a)
                    for a, name in enumerate(result.aspect_names)},
        "failure_rate": float(torch.isnan(result.rewards).float().mean()) if len(result) else math.nan,
        "judgement_failure_rate": failures["failure_rate"],
        "failures": counts,
        "scale": list(result.scale),
    }


# ------------------------------------------------------------------ pairwise


def judge_pairs_in_chunks(judge: Judge, prompts: Sequence[Prompt], policy: Sequence[str],
                          baseline: Sequence[str], *, chunk: int,
                          seeds: Sequence[int] | None = None) -> list[PairJudgement]:
    """:func:`~dynalign.judge.pairwise.judge_pairs` (the policy as side ``a``) with a progress bar
    (rank 0); ``seeds`` as for :func:`score_in_chunks`."""
    from tqdm.auto import tqdm

    pairs: list[PairJudgement] = []
    starts = range(0, len(prompts), chunk)
    for j, s in enumerate(tqdm(starts, desc="pairwise", unit="chunk", leave=False, disable=get_rank() != 0)):
        pairs += judge_pairs(judge, prompts[s:s + chunk], policy[s:s + chunk], baseline[s:s + chunk],
                             seed=None if seeds is None else seeds[j])
    return pairs
