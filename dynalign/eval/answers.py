"""Answers to the evaluation prompts, from the policy or the baseline.

Prompts are sent as a user turn through the model's chat template when its tokenizer has
one (raw text otherwise). Answers are greedy by default (``eval.temperature``), seeded when
sampled, so an evaluation is repeatable; the baseline's answers are cached by (model
fingerprint, prompts, sampling), so evaluating every N iterations answers with it once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from dynalign.eval.cache import cache_key, model_fingerprint, read_cache, write_cache
from dynalign.rollout.base import Prompt, Sampler, SamplingParams


@dataclass
class Answers:
    texts: list[str]
    lengths: list[int]  # completion tokens, in the answering model's tokenizer
    truncated: list[bool]  # hit max_new_tokens

    @property
    def chars(self) -> list[int]:
        return [len(t) for t in self.texts]


def as_chat(prompt: str, tokenizer: Any) -> Prompt:
    """A user turn for chat models, the raw text for models without a chat template."""
    return [{"role": "user", "content": prompt}] if getattr(tokenizer, "chat_template", None) else prompt


def generate_answers(sampler: Sampler, prompts: Sequence[str], params: SamplingParams, *, chunk: int = 32,
                     desc: str = "answers") -> Answers:
    """One answer per prompt, ``chunk`` prompts per sampler call, with a progress bar."""
    from tqdm.auto import tqdm

    texts: list[str] = []
    lengths: list[int] = []
    truncated: list[bool] = []
    for start in tqdm(range(0, len(prompts), chunk), desc=desc, unit="chunk", leave=False):
        batch = [as_chat(p, sampler.tokenizer) for p in prompts[start:start + chunk]]
        rollouts = sampler.sample(batch, 1, params)
        texts += rollouts.texts
        lengths += rollouts.completion_lengths.tolist()
        truncated += rollouts.truncated.tolist()
    return Answers(texts, lengths, truncated)


def answers_cache_key(model_path: str, prompts: Sequence[str], params: SamplingParams) -> str:
    return cache_key("answers", model=model_fingerprint(model_path), prompts=list(prompts),
                     max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                     top_p=params.top_p, seed=params.seed)


def cached_answers(key: str) -> Answers | None:
    value = read_cache("answers", key)
    try:
        return Answers(**value) if value is not None else None
    except TypeError:
        return None


def store_answers(key: str, answers: Answers) -> None:
    write_cache("answers", key, asdict(answers))
