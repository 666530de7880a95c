"""Generator backends: whatever turns a batch of meta-prompts into completions.

:class:`PromptGenerator` is the one interface the pipeline sees. Two implementations:

* :class:`SamplerGenerator` wraps any :class:`~dynalign.rollout.base.Sampler` (the policy
  the loop is training, or another local model / hub id loaded into an ``HFSampler`` by
  :func:`dynalign.models.load_hf_sampler`).
  Samplers take one seed per ``sample`` call, so a batch is sampled with the seed of
  its first call (``seeds_per_request = False``).
* :class:`OpenAIChatGenerator` sends each meta-prompt to an OpenAI-compatible
  ``/v1/chat/completions`` endpoint (vLLM, TGI, llama.cpp server, a hosted API) with its
  own seed, ``concurrency`` requests at a time.

A request is chat messages (an instruction template, rendered by the model's chat
template) or a raw string (a ``format: raw`` template a base model continues). A sampler
takes either as is; a chat endpoint only takes messages, so it sends a raw string as one
user message (:func:`as_messages`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Protocol

from dynalign.config import ModelConfig
from dynalign.datagen.settings import parse_model_spec
from dynalign.rollout.base import Message, Prompt, Sampler, SamplingParams


class PromptGenerator(Protocol):
    name: str  # recorded in every row as generator_model
    seeds_per_request: bool  # True: request j is sampled with seeds[j]; False: all with seeds[0]

    def generate(self, requests: Sequence[Prompt], seeds: Sequence[int],
                 params: SamplingParams) -> list[str]:
        """One completion per request (chat messages or raw text), in order."""
        ...


def as_messages(request: Prompt) -> list[Message]:
    """A request as chat messages: raw text becomes one user message."""
    if isinstance(request, str):
        return [{"role": "user", "content": request}]
    return list(request)


class SamplerGenerator:
    """A :class:`Sampler` as a prompt generator: the whole batch in one ``sample`` call."""

    seeds_per_request = False

    def __init__(self, sampler: Sampler, name: str) -> None:
        self.sampler = sampler
        self.name = name

    def generate(self, requests: Sequence[Prompt], seeds: Sequence[int],
                 params: SamplingParams) -> list[str]:
        rollouts = self.sampler.sample(list(requests), 1, replace(params, seed=seeds[0]))
        return list(rollouts.texts)


class OpenAIChatGenerator:
    """An OpenAI-compatible chat endpoint, through the ``openai`` client (retries, timeouts).

    The key is read from the environment variable ``api_key_env``; local servers that need
    none get the placeholder ``"EMPTY"``. A request that still fails after ``max_retries``
    raises, so the shard in flight is not written and a rerun retries it.
    """

    seeds_per_request = True

    def __init__(self, model: str, *, base_url: str, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 60.0, max_retries: int = 3, concurrency: int = 8) -> None:
        from openai import OpenAI

        self.model = model
        self.name = f"openai:{model}"
        self.concurrency = concurrency
        self.client = OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "EMPTY",
                             timeout=timeout_s, max_retries=max_retries)

    def _one(self, messages: list[Message], seed: int, params: SamplingParams) -> str:
        extra: dict[str, Any] = {"stop": list(params.stop)} if params.stop else {}
        response = self.client.chat.completions.create(
            model=self.model, messages=messages,  # type: ignore[arg-type]  # chat messages as dicts
            temperature=params.temperature, top_p=params.top_p,
            max_tokens=params.max_new_tokens, seed=seed, n=1, **extra)
        return response.choices[0].message.content or ""

    def generate(self, requests: Sequence[Prompt], seeds: Sequence[int],
                 params: SamplingParams) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda r, s: self._one(as_messages(r), s, params), requests, seeds))

    def close(self) -> None:
        self.client.close()


def build_generators(gen_cfg: Any, *, policy: Sampler | None, policy_name: str,
                     batch_size: int = 64) -> list[PromptGenerator]:
    """One generator per ``generator.models`` entry (see :func:`parse_model_spec`)."""
    from dynalign.models import load_hf_sampler

    generators: list[PromptGenerator] = []
    endpoint = gen_cfg.endpoint
    for spec in gen_cfg.models:
        kind, name = parse_model_spec(spec)
        if kind == "policy":
            if policy is None:
                raise ValueError("generator.models names 'policy' but no policy sampler was given")
            generators.append(SamplerGenerator(policy, policy_name))
        elif kind == "openai":
            generators.append(OpenAIChatGenerator(
                name, base_url=endpoint.base_url, api_key_env=endpoint.api_key_env,
                timeout_s=endpoint.timeout_s, max_retries=endpoint.max_retries,
                concurrency=endpoint.concurrency))
        else:
            sampler = load_hf_sampler(ModelConfig(name_or_path=name), batch_size=batch_size)
            generators.append(SamplerGenerator(sampler, name))
    return generators
