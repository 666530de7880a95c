"""The sampling contract shared by the training loop, the judge and the prompt generator.

Every backend (transformers ``generate``, vLLM) implements :class:`Sampler`; callers
never see which one runs. A prompt is either raw text or a list of chat messages
(``[{"role": "user", "content": ...}]``), rendered with the tokenizer's chat template.

Conventions every backend follows (the shared code in :mod:`dynalign.rollout.encoding`
enforces them, so both backends agree token for token on what a completion is):

* Chat prompts are rendered with ``add_generation_prompt=True`` and tokenized without
  extra special tokens (the template writes them). Raw text gets the tokenizer's special
  tokens (e.g. BOS) unless it already starts with the BOS string. Prompts longer than
  ``max_prompt_length`` (the call's :class:`SamplingParams`, else the sampler's) keep their
  last tokens; a judge whose prompts are long passes a larger limit per call.
* A completion ends at the first EOS token (kept, and covered by ``completion_mask``) or
  at the token that completes a stop string (kept in the tokens and the mask: it is the
  token that ended the answer). The stop string is **removed from the text**, like
  vLLM's default (``include_stop_str_in_output=False``); text after it is dropped too.
  Both are finish reason ``"stop"``; an answer cut by ``max_new_tokens`` is ``"length"``.
* ``logprobs`` are the sampled tokens' log-probs under the unmodified model distribution
  (temperature 1, no top-k/top-p filtering: vLLM's ``raw_logprobs``), i.e. what a
  training forward pass computes for the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Protocol, runtime_checkable

import torch

Message = dict[str, str]
Prompt = str | Sequence[Message]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling knobs every backend honours."""

    max_new_tokens: int = 32
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    stop: tuple[str, ...] = ()  # stop strings: cut from the text, tokens after them masked out
    seed: int | None = None  # same seed -> same completions (per backend); None: global torch RNG
    logprobs: bool = False  # also return the sampled tokens' log-probs (Rollouts.logprobs)
    max_prompt_length: int | None = None  # left-truncate prompts; None: the sampler's own limit

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))  # accept lists, stay hashable
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature})")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, 0 disables it (got {self.top_k})")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1 (got {self.max_prompt_length})")
        if any(not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty (got {self.stop!r})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_stops(self, stops: Sequence[str]) -> SamplingParams:
        """These params with ``stops`` added (a sampler's model-wide stop strings)."""
        merged = tuple(dict.fromkeys((*self.stop, *stops)))
        return self if merged == self.stop else replace(self, stop=merged)


class ModelInputs(NamedTuple):
    """Rollouts as a causal-LM training batch (what ``engine.TrainBatch`` is built from)."""

    input_ids: torch.Tensor  # [N, P+C] left-padded prompt, then right-padded completion
    attention_mask: torch.Tensor  # [N, P+C] 1 on real prompt and completion tokens
    position_ids: torch.Tensor  # [N, P+C] 0 at each row's first real token (left padding skipped)
    completion_mask: torch.Tensor  # [N, C] 1 on completion tokens up to and including EOS


@dataclass
class Rollouts:
    """``len(prompts) * n`` completions, ordered prompt-major: the n answers of a prompt are adjacent.

    Token tensors are right-padded with ``pad_token_id``; ``prompt_ids`` are left-padded so
    that ``torch.cat([prompt_ids, completion_ids], 1)`` is a ready model input.
    """

    prompt_ids: torch.Tensor  # [N, P] left-padded prompt tokens (each prompt repeated n times)
    prompt_mask: torch.Tensor  # [N, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N, C] right-padded completion tokens (EOS included when emitted)
    completion_mask: torch.Tensor  # [N, C] 1 on completion tokens up to and including EOS
    texts: list[str]  # [N] decoded completions, special tokens and stop strings removed
    finish_reasons: list[str]  # [N] "stop" (EOS or a stop string) or "length" (hit max_new_tokens)
    prompt_index: torch.Tensor  # [N] index of the prompt each completion answers
    logprobs: torch.Tensor | None = None  # [N, C] float32 sampling log-probs, 0 where masked
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def truncated(self) -> torch.Tensor:
        """[N] True where the completion hit the length limit."""
        return torch.tensor([r == "length" for r in self.finish_reasons], dtype=torch.bool)

    @property
    def completion_lengths(self) -> torch.Tensor:
        """[N] number of completion tokens (EOS included)."""
        return self.completion_mask.sum(-1)

    def model_inputs(self) -> ModelInputs:
        """Prompt and completion side by side: the input of a teacher-forced forward pass.

        The completion is the last ``C`` columns, as ``grpo.completion_logprobs`` expects.
        Pass ``position_ids`` to the model too: without them a left-padded row's positions
        are shifted by its padding, and its log-probs no longer match the sampler's.
        """
        input_ids = torch.cat([self.prompt_ids, self.completion_ids], 1)  # [N, P+C]
        attention_mask = torch.cat([self.prompt_mask, self.completion_mask], 1).long()  # [N, P+C]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [N, P+C]
        return ModelInputs(input_ids, attention_mask, position_ids, self.completion_mask)


@runtime_checkable
class Sampler(Protocol):
    """What the loop, the judge and the generator need from a generation backend."""

    tokenizer: object
    needs_weight_sync: bool  # False when the sampler generates from the training module itself

    def sample(self, prompts: Sequence[Prompt], n: int, params: SamplingParams) -> Rollouts:
        """Sample ``n`` completions for each prompt (prompt-major order)."""
        ...

    def next_token_logprobs(self, texts: Sequence[str], token_ids: Sequence[int]) -> torch.Tensor:
        """[N, K] full-vocabulary log-probs (temperature 1) of each candidate token right after
        each raw text (no chat template applied); the judge's expected-score mode uses it."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new policy weights (full tensors, Hugging Face names) without restarting."""
        ...

    def sleep(self) -> None:
        """Free the backend's memory while the trainer runs (no-op where unsupported)."""
        ...

    def wake_up(self) -> None:
        """Undo :meth:`sleep` before the next :meth:`sample`."""
        ...

    def close(self) -> None:
        """Let go of the model and engine, so their memory can be freed; no sampling after."""
        ...


@contextmanager
def reusing_prefixes(sampler: Sampler, slots: int = 8) -> Iterator[int | None]:
    """A block in which ``sampler.next_token_logprobs`` (and ``sample``) reuse the work of shared
    text prefixes.

    Backends that read each text from scratch offer ``reuse_prefixes(slots)`` (the HF sampler:
    KV caches of the last ``slots`` texts; each ``sample`` call prefills the prefix its prompts
    share once); the block yields how many texts to ask about at a time. Backends that cache
    prefixes by themselves (vLLM's prefix caching) need nothing: the block yields None, and
    callers ask about all their texts at once.
    """
    reuse = getattr(sampler, "reuse_prefixes", None)
    if reuse is None:
        yield None
        return
    with reuse(slots) as group:
        yield group


@contextmanager
def inference_session(sampler: Sampler) -> Iterator[None]:
    """A block in which every call of ``sampler`` runs without a collective of its own.

    A sampler on a ZeRO-3 module gathers its parameters at each call (a collective: every rank
    must call it equally often); one that offers ``inference_session()`` (the HF sampler)
    gathers them once for the whole block instead. Other samplers (a whole model, vLLM per
    rank) need nothing. Every rank enters the block once.
    """
    session = getattr(sampler, "inference_session", None)
    if session is None:
        yield
        return
    with session():
        yield
