"""The vLLM backend: a colocated engine, kept alive for the whole run and synced after each step.

The engine is started once (~15 s on CPU for the tiny model) and never restarted: after
every optimizer step the training engine's weight export (an iterator of Hugging Face
names and full tensors) is loaded into it in place (~ms for the tiny model). All
version-specific vLLM calls live in :mod:`dynalign.rollout._vllm_compat`.

Scripts that build this sampler need an ``if __name__ == "__main__":`` guard (vLLM may
spawn processes that re-import the main module).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from dynalign.config import VLLMConfig
from dynalign.rollout._vllm_compat import VLLMEngine
from dynalign.rollout.base import Prompt, Rollouts, SamplingParams
from dynalign.rollout.encoding import (
    build_rollouts,
    encode_text,
    eos_token_ids,
    finish_completion,
    prepare_request,
)


def _with_tied_head(named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Add ``lm_head.weight`` when only the tied input embedding was exported.

    ``named_parameters()`` lists a tied weight once; an engine that keeps its own copy of
    the head would silently keep the old one.
    """
    embedding, has_head = None, False
    for name, tensor in named:
        has_head = has_head or name == "lm_head.weight"
        if name == "model.embed_tokens.weight":
            embedding = tensor
        yield name, tensor
    if embedding is not None and not has_head:
        yield "lm_head.weight", embedding


class VLLMSampler:
    """:class:`~dynalign.rollout.base.Sampler` on a colocated ``vllm.LLM`` engine."""

    needs_weight_sync = True

    def __init__(self, model_path: str, tokenizer: Any, vllm_cfg: VLLMConfig, *, max_model_len: int,
                 seed: int = 0, dtype: str = "float32", max_prompt_length: int | None = None,
                 enforce_eager: bool = False, transport: str | None = None, stop: Sequence[str] = ()) -> None:
        from transformers import AutoConfig, GenerationConfig

        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_prompt_length = max_prompt_length
        self.stop = tuple(stop)  # the model's own stop strings (model.stop), added to every call
        try:
            generation_config = GenerationConfig.from_pretrained(model_path)
        except OSError:  # no generation_config.json: the tokenizer's EOS is the only one
            generation_config = None
        self.eos_ids = eos_token_ids(tokenizer, generation_config)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else min(self.eos_ids)
        self.tied_embeddings = bool(getattr(AutoConfig.from_pretrained(model_path), "tie_word_embeddings",
                                            False))
        self.engine = VLLMEngine(str(model_path), vllm_cfg, max_model_len=max_model_len, seed=seed,
                                 dtype=dtype, enforce_eager=enforce_eager, transport=transport)
        self.weight_version = 0  # number of update_weights calls so far
        self.last_sync_seconds = 0.0  # wall time of the last update_weights

    @property
    def llm(self) -> Any:
        """The ``vllm.LLM`` object; the same one for the sampler's whole life."""
        return self.engine.llm

    def sample(self, prompts: Sequence[Prompt], n: int, params: SamplingParams) -> Rollouts:
        params, prompt_ids = prepare_request(self.tokenizer, prompts, n, params, stop=self.stop,
                                             max_prompt_length=self.max_prompt_length)
        self._check_lengths(prompt_ids)
        rows = [ids for ids in prompt_ids for _ in range(n)]  # prompt-major
        # One request per completion, each with its own seed: distinct answers within a group,
        # reproducible for a given seed. Without a seed, one draw from the global torch RNG
        # stands in (reproducible under a seeded run, like the HF backend's sampling).
        base = params.seed if params.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        seeds = [base + k for k in range(len(rows))]
        raw = self.engine.generate(rows, params, seeds)
        completions = [finish_completion(self.tokenizer, r.token_ids, eos_ids=self.eos_ids,
                                         stops=params.stop, logprobs=r.logprobs) for r in raw]
        return build_rollouts(prompt_ids, completions, n, self.pad_id, backend="vllm")

    def next_token_logprobs(self, texts: Sequence[str], token_ids: Sequence[int]) -> torch.Tensor:
        """[N, K]: each candidate is appended to each text; vLLM scores it as a prompt token.

        N x K prefills; fine for a judge's handful of score tokens.
        """
        rows = [encode_text(self.tokenizer, t) for t in texts]
        self._check_lengths(rows, extra=1)
        candidates = [int(t) for t in token_ids]
        prompts = [ids + [c] for ids in rows for c in candidates]
        values = self.engine.last_token_logprobs(prompts)  # collective in a tensor-parallel group
        return torch.tensor(values, dtype=torch.float32).view(len(rows), len(candidates))  # [N, K]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the trainer's full weights into the running engine (all of them, every time:
        vLLM reloads layer by layer, and a layer given only part of its weights keeps stale parts).

        An engine asleep wakes in two stages: its weights' memory first, then, after the load,
        its KV cache's, so the cache is not resident while the trainer's weights are gathered.
        """
        start = time.perf_counter()
        engine = self.engine.llm
        named = _with_tied_head(named_tensors) if self.tied_embeddings else named_tensors
        self.engine.wake_up(weights_only=True)
        self.engine.reload_weights(named)
        self.engine.wake_up()
        assert self.engine.llm is engine, "the vLLM engine must be updated in place, not re-created"
        self.weight_version += 1
        self.last_sync_seconds = time.perf_counter() - start

    def sleep(self) -> None:
        """Free the weights and the KV cache (needs ``enable_sleep_mode`` on a GPU; else no-op).

        Level 2: the weights are dropped, not copied to CPU memory (level 1), because the training
        loop reloads every weight next (:meth:`update_weights`, which wakes the engine); a backup
        would only cost host memory and two copies. Give the sampler weights before sampling again.
        """
        self.engine.sleep(level=2)

    def wake_up(self) -> None:
        self.engine.wake_up()

    def close(self) -> None:
        """Shut the engine down and free its weights and KV cache (:meth:`VLLMEngine.close`)."""
        self.engine.close()

    def _check_lengths(self, rows: Sequence[Sequence[int]], extra: int = 0) -> None:
        for i, ids in enumerate(rows):
            if not ids:
                raise ValueError(f"prompt {i} is empty after tokenization")
            if len(ids) + extra >= self.max_model_len:
                raise ValueError(f"prompt {i} has {len(ids)} tokens; the engine's max_model_len is "
                                 f"{self.max_model_len} (rollout.vllm.max_model_len)")
