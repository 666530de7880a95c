"""The judges of an evaluation: the external judge (pointwise and pairwise) and the self-judge.

The external judge is picked by ``eval.judge.backend`` from :data:`JUDGE_BACKENDS`: a local
model through transformers (``hf``) or vLLM (``vllm``), or an OpenAI-compatible endpoint
(``openai``: a hosted API, or a strong model served with ``vllm serve``). It scores with the
CA rubric (``eval.rubric``) in ``generate`` or ``logprob`` mode, like the training judge.

Pairwise comparisons use the judge package's pairwise prompt (nonce-tagged, so an answer
cannot cast the verdict) in both orders. In ``logprob`` mode a sampler-backed judge reads
the probability of ``A`` / ``B`` / ``tie`` at the verdict slot instead of sampling; an HTTP
judge samples greedily instead (there is no slot to read without a verdict).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from dynalign.config import ModelConfig, RolloutConfig, TrainConfig
from dynalign.eval.settings import EvalSettings, resolve_judge_model
from dynalign.eval.stats import mean_with_ci, order_vote, pair_outcome
from dynalign.judge import (
    BACKEND_ERROR,
    OK,
    Judge,
    JudgeBackend,
    JudgeResult,
    OpenAIChatBackend,
    SamplerBackend,
    build_judge,
    load_rubric,
    parse_failure_stats,
    parse_pairwise_verdict,
    render_pairwise_prompt,
)
from dynalign.rollout.base import Prompt, Sampler, SamplingParams

RUBRIC_PROMPT_TOKENS = 2048  # vLLM judge: room for the rubric and the user prompt, besides two answers
PAIRWISE_CHOICES = ("A", "B", "tie")  # as the verdict writes them
ORDER_LABELS = ({"A": "policy", "B": "baseline", "tie": "tie"},  # policy's answer shown first
                {"A": "baseline", "B": "policy", "tie": "tie"})  # baseline's answer shown first


# ------------------------------------------------------------------ building judges


def load_local_sampler(path: str, model: ModelConfig, batch_size: int) -> Sampler:
    """An ``HFSampler`` on a model directory or hub id, with the run's dtype (GPU when present)."""
    from dynalign.models import load_hf_sampler

    return load_hf_sampler(model, path=path, batch_size=batch_size)


def _hf_backend(settings: EvalSettings, cfg: TrainConfig) -> JudgeBackend:
    path = resolve_judge_model(settings.judge, cfg.model)
    return SamplerBackend(load_local_sampler(path, cfg.model, cfg.rollout.batch_size))


def _vllm_backend(settings: EvalSettings, cfg: TrainConfig) -> JudgeBackend:
    from transformers import AutoTokenizer

    from dynalign.rollout import build_sampler

    path = resolve_judge_model(settings.judge, cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    rollout = RolloutConfig(backend="vllm", vllm=cfg.rollout.vllm)
    return SamplerBackend(build_sampler(
        rollout, tokenizer=tokenizer, model_path=path,
        max_prompt_length=RUBRIC_PROMPT_TOKENS + 2 * settings.max_new_tokens,
        max_completion_length=settings.judge_max_new_tokens, seed=settings.seed, dtype=cfg.model.dtype))


def _openai_backend(settings: EvalSettings, cfg: TrainConfig) -> JudgeBackend:
    return OpenAIChatBackend.from_config(settings.judge, "eval.judge")


# eval.judge.backend -> builder; keys match dynalign.config.EXTERNAL_BACKENDS.
JUDGE_BACKENDS: dict[str, Callable[[EvalSettings, TrainConfig], JudgeBackend]] = {
    "hf": _hf_backend,
    "vllm": _vllm_backend,
    "openai": _openai_backend,
}


def build_external_judge(settings: EvalSettings, cfg: TrainConfig) -> Judge:
    """The external judge ``eval.judge`` describes, scoring with ``eval.rubric``."""
    backend = JUDGE_BACKENDS[settings.judge.backend](settings, cfg)
    params = SamplingParams(max_new_tokens=settings.judge_max_new_tokens,
                            temperature=settings.judge_temperature, seed=settings.seed)
    return Judge(load_rubric(settings.rubric), backend, mode=settings.judge_mode,
                 num_samples=settings.judge_num_samples, params=params)


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
    """One :class:`JudgeResult` from the results of consecutive chunks."""
    first = parts[0]
    masses = [p.score_mass for p in parts]
    return JudgeResult(
        rewards=torch.cat([p.rewards for p in parts]), scores=torch.cat([p.scores for p in parts]),
        reasons=[r for p in parts for r in p.reasons],
        judgement_reasons=[r for p in parts for r in p.judgement_reasons],
        texts=[t for p in parts for t in p.texts], nonces=[n for p in parts for n in p.nonces],
        aspect_names=first.aspect_names, scale=first.scale,
        score_mass=torch.cat(masses) if all(m is not None for m in masses) else None)


def score_in_chunks(judge: Judge, prompts: Sequence[Prompt], answers: Sequence[str], *, chunk: int,
                    desc: str) -> JudgeResult:
    """``judge.score`` over chunks, with a progress bar."""
    from tqdm.auto import tqdm

    starts = range(0, len(answers), chunk)
    parts = [judge.score(prompts[s:s + chunk], answers[s:s + chunk])
             for s in tqdm(starts, desc=desc, unit="chunk", leave=False)]
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


@dataclass(frozen=True)
class PairJudgement:
    """One (policy, baseline) pair judged in both orders; votes are policy | baseline | tie."""

    policy_first: tuple[str | None, ...]  # votes with the policy's answer shown as A
    baseline_first: tuple[str | None, ...]  # votes with the baseline's answer shown as A
    reasons: tuple[str, ...]  # "ok" or the failure code of every judgement, policy-first order first
    texts: tuple[str, ...]  # the judge's outputs ("" in logprob mode)

    @property
    def outcome(self) -> str | None:
        """``win | tie | loss`` for the policy, or None (an order without a verdict)."""
        return pair_outcome(order_vote(self.policy_first), order_vote(self.baseline_first))


def choice_logprobs(sampler: Any, contexts: Sequence[str], choices: Sequence[str]) -> torch.Tensor:
    """[N, C] log P(choice | context), a choice's tokens summed (the contexts end alike, so the
    choices tokenize alike after each of them)."""
    tokenizer = sampler.tokenizer
    base = tokenizer.encode(contexts[0], add_special_tokens=False)
    continuations = []
    for choice in choices:
        full = tokenizer.encode(contexts[0] + choice, add_special_tokens=False)
        if full[:len(base)] != base or len(full) == len(base):
            raise ValueError(f"{choice!r} merges with the end of the verdict prefix in this tokenizer")
        continuations.append(full[len(base):])
    firsts = sorted({c[0] for c in continuations})
    first = sampler.next_token_logprobs(list(contexts), firsts).double()  # [N, F]
    out = torch.stack([first[:, firsts.index(c[0])] for c in continuations], 1)  # [N, C]
    for j, tokens in enumerate(continuations):
        for t in range(1, len(tokens)):  # later tokens of multi-token choices
            prefixed = [c + tokenizer.decode(tokens[:t]) for c in contexts]
            out[:, j] += sampler.next_token_logprobs(prefixed, [tokens[t]])[:, 0].double()
    return out


def _votes_by_logprob(backend: SamplerBackend, rendered: Sequence[tuple[list, str]]) -> list[list[str]]:
    contexts = [backend.render(messages) + f"<verdict-{nonce}>\nwinner:" for messages, nonce in rendered]
    logprobs = choice_logprobs(backend.sampler, contexts, [f" {c}" for c in PAIRWISE_CHOICES])  # [2N, 3]
    return [[PAIRWISE_CHOICES[i]] for i in logprobs.argmax(-1).tolist()]


def judge_pairs(judge: Judge, prompts: Sequence[Prompt], policy: Sequence[str],
                baseline: Sequence[str]) -> list[PairJudgement]:
    """Judge every (policy, baseline) pair in both orders with ``judge``'s backend and rubric."""
    rendered = []
    for prompt, a, b in zip(prompts, policy, baseline, strict=True):
        rendered.append(render_pairwise_prompt(judge.rubric, prompt, a, b))  # policy is A
        rendered.append(render_pairwise_prompt(judge.rubric, prompt, b, a))  # baseline is A
    if judge.mode == "logprob" and isinstance(judge.backend, SamplerBackend):
        letters = _votes_by_logprob(judge.backend, rendered)  # [2N][1]
        reasons, texts = [[OK] for _ in rendered], [[""] for _ in rendered]
    else:
        params = judge.params if judge.mode == "generate" else replace(judge.params, temperature=0.0)
        outputs = judge.backend.generate([m for m, _ in rendered], judge.num_samples, params)  # [2N][k]
        letters, reasons, texts = [], [], []
        for (_, nonce), outs in zip(rendered, outputs, strict=True):
            parsed = [(None, BACKEND_ERROR) if t is None else parse_pairwise_verdict(t, nonce) for t in outs]
            letters.append([w for w, _ in parsed])
            reasons.append([r for _, r in parsed])
            texts.append([t or "" for t in outs])
    pairs = []
    for i in range(len(prompts)):
        votes = [[None if w is None else ORDER_LABELS[o][w] for w in letters[2 * i + o]] for o in (0, 1)]
        pairs.append(PairJudgement(tuple(votes[0]), tuple(votes[1]),
                                   tuple(reasons[2 * i] + reasons[2 * i + 1]),
                                   tuple(texts[2 * i] + texts[2 * i + 1])))
    return pairs


def judge_pairs_in_chunks(judge: Judge, prompts: Sequence[Prompt], policy: Sequence[str],
                          baseline: Sequence[str], *, chunk: int) -> list[PairJudgement]:
    from tqdm.auto import tqdm

    pairs: list[PairJudgement] = []
    for s in tqdm(range(0, len(prompts), chunk), desc="pairwise", unit="chunk", leave=False):
        pairs += judge_pairs(judge, prompts[s:s + chunk], policy[s:s + chunk], baseline[s:s + chunk])
    return pairs
