"""External judges: a model that is not the policy, by ``backend`` name, for training and evaluation.

The same registry serves the training judge (``judge.source=external``, ``judge.external``)
and the evaluation's judge (``eval.judge``):

- ``hf``: a local model through transformers (a directory, a hub id or ``tiny``);
- ``vllm``: a local model through vLLM;
- ``openai``: an OpenAI-compatible endpoint (a hosted API, or ``vllm serve``).

A builder takes the backend's :class:`~dynalign.config.ExternalJudgeConfig` and an
:class:`ExternalContext` (what it needs from the rest of the run) and returns a
:class:`~dynalign.judge.backends.JudgeBackend`. The training loop hands local backends its own
sampler (``sampler``) or loader (``make_sampler``), so the judge's model is loaded its way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from dynalign.config import ConfigError, ExternalJudgeConfig, ModelConfig, RolloutConfig, VLLMConfig
from dynalign.judge.backends import JudgeBackend, OpenAIChatBackend, SamplerBackend
from dynalign.rollout.base import Sampler


@dataclass(frozen=True)
class ExternalContext:
    """What an external judge needs from the run besides its own config."""

    key: str = "judge.external"  # where its config sits, named in errors
    model: ModelConfig | None = None  # the run's model: dtype, trust_remote_code, what "tiny" is
    batch_size: int = 64  # hf: sequences per generate call
    seed: int = 0
    max_prompt_length: int | None = None  # vllm: room for the rubric, the prompt and the answer(s)
    max_new_tokens: int = 256  # vllm: room for the judge's reasoning and verdict
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    sampler: Sampler | None = None  # hf / vllm: a sampler of the judge's model, used as is
    make_sampler: Callable[[ExternalJudgeConfig], Sampler] | None = None  # hf / vllm: builds that sampler


def resolve_judge_model(judge: ExternalJudgeConfig, model: ModelConfig, key: str = "judge.external") -> str:
    """What a local judge (``hf``/``vllm``) loads: an embedded model (``tiny``, ``gemma3_270m``),
    the newest export of a run directory, a model directory, or a hub id."""
    from dynalign.models import EMBEDDED_MODELS, resolve_model_path
    from dynalign.rundir import resolve_model_dir

    if judge.model in EMBEDDED_MODELS:
        return resolve_model_path(replace(model, name_or_path=judge.model))
    path = Path(judge.model).expanduser()
    return str(resolve_model_dir(path, f"{key}.model")) if path.exists() else judge.model


def _given_sampler(cfg: ExternalJudgeConfig, ctx: ExternalContext) -> SamplerBackend | None:
    """A backend on the caller's sampler (theirs to close) or on one ``make_sampler`` builds (the judge's)."""
    if ctx.sampler is not None:
        return SamplerBackend(ctx.sampler)
    if ctx.make_sampler is not None:
        return SamplerBackend(ctx.make_sampler(cfg), owns_sampler=True)
    return None


def _need_model(cfg: ExternalJudgeConfig, ctx: ExternalContext) -> ModelConfig:
    if ctx.model is None:
        raise ConfigError(f"{ctx.key}.backend", f"backend={cfg.backend} needs the sampler of "
                          f"{ctx.key}.model={cfg.model!r}: pass external_sampler or make_sampler")
    return ctx.model


def _hf(cfg: ExternalJudgeConfig, ctx: ExternalContext) -> JudgeBackend:
    given = _given_sampler(cfg, ctx)
    if given is not None:
        return given
    from dynalign.models import load_hf_sampler

    model = _need_model(cfg, ctx)
    path = resolve_judge_model(cfg, model, ctx.key)
    return SamplerBackend(load_hf_sampler(model, path=path, batch_size=ctx.batch_size), owns_sampler=True)


def _vllm(cfg: ExternalJudgeConfig, ctx: ExternalContext) -> JudgeBackend:
    given = _given_sampler(cfg, ctx)
    if given is not None:
        return given
    from dynalign.models import load_tokenizer
    from dynalign.rollout import build_sampler

    model = _need_model(cfg, ctx)
    path = resolve_judge_model(cfg, model, ctx.key)
    tokenizer = load_tokenizer(path, model)
    return SamplerBackend(build_sampler(
        RolloutConfig(backend="vllm", vllm=ctx.vllm), tokenizer=tokenizer, model_path=path,
        max_prompt_length=ctx.max_prompt_length, max_completion_length=ctx.max_new_tokens, seed=ctx.seed,
        dtype=model.dtype), owns_sampler=True)


def _openai(cfg: ExternalJudgeConfig, ctx: ExternalContext) -> JudgeBackend:
    return OpenAIChatBackend.from_config(cfg, ctx.key)


# External judge backends by name (``judge.external.backend``, ``eval.judge.backend``).
EXTERNAL_JUDGES: dict[str, Callable[[ExternalJudgeConfig, ExternalContext], JudgeBackend]] = {
    "hf": _hf,
    "vllm": _vllm,
    "openai": _openai,
}


def build_external_backend(cfg: ExternalJudgeConfig, ctx: ExternalContext) -> JudgeBackend:
    """The backend ``cfg.backend`` names, built from ``cfg`` and ``ctx``."""
    cfg.validate(ctx.key)
    return EXTERNAL_JUDGES[cfg.backend](cfg, ctx)
