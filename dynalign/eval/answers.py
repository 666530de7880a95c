"""Answers to the evaluation prompts, from the policy or the baseline.

Prompts are sent as a user turn through the model's chat template when its tokenizer has
one (raw text otherwise), ``chunk`` prompts per sampler call. Answers are greedy by default
(``eval.temperature``); sampled ones are seeded chunk by chunk, so an evaluation is
repeatable and an answer depends only on its chunk (the batch it was generated in) and that
chunk's seed. The baseline's answers are cached by (model fingerprint, prompts, sampling,
chunk), so evaluating every N iterations answers with it once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from dynalign.distributed import get_rank
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

    def share(self, items: range) -> Answers:
        """The answers to the prompts ``items``."""
        cut = slice(items.start, items.stop)
        return Answers(self.texts[cut], self.lengths[cut], self.truncated[cut])

    @classmethod
    def join(cls, parts: Sequence[Answers]) -> Answers:
        """Consecutive parts (the ranks' shares, in order) as one."""
        return cls([t for p in parts for t in p.texts], [n for p in parts for n in p.lengths],
                   [x for p in parts for x in p.truncated])


def as_chat(prompt: str, tokenizer: Any) -> Prompt:
    """A user turn for chat models, the raw text for models without a chat template."""
    return [{"role": "user", "content": prompt}] if getattr(tokenizer, "chat_template", None) else prompt


def generate_answers(sampler: Sampler, prompts: Sequence[str], params: SamplingParams, *, chunk: int = 32,
                     desc: str = "answers", seeds: Sequence[int] | None = None) -> Answers:
    """One answer per prompt, ``chunk`` prompts per sampler call, with a progress bar (rank 0).

    ``seeds``: the sampling seed of each chunk (default ``params.seed`` for all).
    """
    from tqdm.auto import tqdm

    texts: list[str] = []
    lengths: list[int] = []
    truncated: list[bool] = []
    starts = range(0, len(prompts), chunk)
    for j, start in enumerate(tqdm(starts, desc=desc, unit="chunk", leave=False, disable=get_rank() != 0)):
        batch = [as_chat(p, sampler.tokenizer) for p in prompts[start:start + chunk]]
        chunk_params = params if seeds is None else replace(params, seed=seeds[j])
        rollouts = sampler.sample(batch, 1, chunk_params)
        texts += rollouts.texts
        lengths += rollouts.completion_lengths.tolist()
        truncated += rollouts.truncated.tolist()
    return Answers(texts, lengths, truncated)


def answers_cache_key(model_path: str, prompts: Sequence[str], params: SamplingParams, chunk: int) -> str:
    """Answers sampled chunk by chunk (seeded per chunk) are reused for the same chunks only."""
    return cache_key("answers", model=model_fingerprint(model_path), prompts=list(prompts),
                     max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                     top_p=params.top_p, seed=params.seed, chunk=chunk, seeding="per chunk")


def cached_answers(key: str) -> Answers | None:
    value = read_cache("answers", key)
    try:
        return Answers(**value) if value is not None else None
    except TypeError:
        return None


def store_answers(key: str, answers: Answers) -> None:
    write_cache("answers", key, asdict(answers))
