"""Samplers: one :class:`Sampler` protocol, picked by ``rollout.backend`` from :data:`SAMPLERS`.

``hf``   transformers ``generate`` on the policy module itself (any machine, no extra package).
``vllm`` a colocated vLLM engine synced after every optimizer step (``make install-vllm`` on
         CPU; the official ``vllm`` package on GPUs). vLLM is imported only when built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dynalign.config import ModelConfig, RolloutConfig
from dynalign.rollout.base import ModelInputs, Prompt, Rollouts, Sampler, SamplingParams
from dynalign.rollout.hf_sampler import GatherFactory, HFSampler, zero3_gather

__all__ = ["SAMPLERS", "HFSampler", "ModelInputs", "Prompt", "Rollouts", "Sampler", "SamplingParams",
           "build_sampler", "sampling_params", "zero3_gather"]


def _build_hf(cfg: RolloutConfig, *, tokenizer: Any, model: Any, model_path: str | None,
              max_prompt_length: int | None, max_completion_length: int, seed: int, dtype: str,
              gather: GatherFactory | None, shares_weights: bool,
              model_config: ModelConfig | None) -> Sampler:
    if model is None:
        if model_path is None:
            raise ValueError("rollout.backend=hf needs a model (or a model_path to load one)")
        from dynalign.models import load_causal_lm
        from dynalign.zero import hf_zero3_init

        with hf_zero3_init(None):  # a model of its own: whole, even beside a ZeRO-3 engine
            model = load_causal_lm(model_path, model_config or ModelConfig(dtype=dtype), for_training=False)
    return HFSampler(model, tokenizer, batch_size=cfg.batch_size, max_prompt_length=max_prompt_length,
                     gather=gather, shares_weights=shares_weights, stop=_stops(model_config))


def _build_vllm(cfg: RolloutConfig, *, tokenizer: Any, model: Any, model_path: str | None,
                max_prompt_length: int | None, max_completion_length: int, seed: int, dtype: str,
                  gather: GatherFactory | None, shares_weights: bool,
                model_config: ModelConfig | None) -> Sampler:
    if model_path is None:
        raise ValueError("rollout.backend=vllm needs model_path: the engine loads the model itself")
    from dynalign.rollout.vllm_sampler import VLLMSampler  # imports vllm

    max_model_len = cfg.vllm.max_model_len or _default_max_model_len(model_path, max_prompt_length,
                                                                      max_completion_length)
    return VLLMSampler(str(model_path), tokenizer, cfg.vllm, max_model_len=max_model_len, seed=seed,
                       dtype=dtype, max_prompt_length=max_prompt_length, stop=_stops(model_config))


def _stops(model_config: ModelConfig | None) -> tuple[str, ...]:
    return tuple(model_config.stop) if model_config is not None else ()


def _default_max_model_len(model_path: str, max_prompt_length: int | None, max_completion_length: int) -> int:
    """Prompt + completion when prompts are capped; else the model's context, which the self-judge's
    long rubric prompts need when they share the engine."""
    if max_prompt_length is not None:
        return max_prompt_length + max_completion_length
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_path).max_position_embeddings)


# rollout.backend -> builder; the valid values of rollout.backend.
SAMPLERS: dict[str, Callable[..., Sampler]] = {"hf": _build_hf, "vllm": _build_vllm}


def build_sampler(cfg: RolloutConfig, *, tokenizer: Any, model: Any = None, model_path: str | None = None,
                  max_prompt_length: int | None = None, max_completion_length: int = 256, seed: int = 0,
                  dtype: str = "float32", gather: GatherFactory | None = None,
                  shares_weights: bool = False, model_config: ModelConfig | None = None) -> Sampler:
    """The sampler ``cfg.backend`` names.

    ``hf`` samples from ``model`` (pass the training module with ``shares_weights=True`` and,
    under ZeRO-3, ``gather=zero3_gather(ds_engine)`` of the DeepSpeed engine that trains it),
    or loads ``model_path`` with ``model_config``'s settings (default: ``dtype``'s); ``vllm``
    starts an engine on ``model_path`` (``resolve_model_path(cfg.model)``) whose
    ``max_model_len`` defaults to ``max_prompt_length + max_completion_length``.
    """
    if cfg.backend not in SAMPLERS:
        valid = ", ".join(sorted(SAMPLERS))
        raise ValueError(f"rollout.backend: unknown value {cfg.backend!r}; valid: {valid}")
    return SAMPLERS[cfg.backend](cfg, tokenizer=tokenizer, model=model, model_path=model_path,
                                 max_prompt_length=max_prompt_length,
                                 max_completion_length=max_completion_length, seed=seed, dtype=dtype,
                                 gather=gather, shares_weights=shares_weights, model_config=model_config)


def sampling_params(cfg: RolloutConfig, max_new_tokens: int, **overrides: Any) -> SamplingParams:
    """The rollout's :class:`SamplingParams` from the config (temperature, top-p, top-k)."""
    values: dict[str, Any] = {"max_new_tokens": max_new_tokens, "temperature": cfg.temperature,
                              "top_p": cfg.top_p, "top_k": cfg.top_k}
    values.update(overrides)
    return SamplingParams(**values)
