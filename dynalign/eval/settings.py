"""The evaluation's values that default to the training run's, resolved once.

Evaluation code reads ``cfg.eval`` (:class:`dynalign.config.EvalConfig`) directly; the few
fields whose ``None`` means "as the training run does" (the baseline, the judge's scoring
mode and length, the held-out dataset) are resolved here into :class:`ResolvedEval`.

``checkpoint=PATH`` and ``eval.baseline`` are a Hugging Face model directory or a dynalign
run directory (its newest exported ``iter_<k>/``, see :mod:`dynalign.rundir`), or, for the
baseline only, a hub id or ``tiny``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from dynalign.config import ConfigError, ModelConfig, TrainConfig
from dynalign.rundir import resolve_model_dir

CHECKPOINT_KEY = "checkpoint"


@dataclass(frozen=True)
class ResolvedEval:
    """``cfg.eval`` values with their training-run defaults filled in."""

    baseline: str  # a model directory or hub id: eval.baseline, else the base model
    judge_mode: str  # eval.judge_mode, else judge.mode
    judge_max_new_tokens: int  # eval.judge_max_new_tokens, else judge.max_new_tokens
    held_out_dataset: str | None  # eval.dataset, else generator.dataset


def resolve_eval(cfg: TrainConfig) -> ResolvedEval:
    """The resolved values of a validated run config; a :class:`ConfigError` names a bad baseline."""
    e = cfg.eval
    return ResolvedEval(baseline=resolve_baseline(e.baseline, cfg.model),
                        judge_mode=e.judge_mode or cfg.judge.mode,
                        judge_max_new_tokens=e.judge_max_new_tokens or cfg.judge.max_new_tokens,
                        held_out_dataset=e.dataset or cfg.generator.dataset)


def resolve_baseline(baseline: str | None, model: ModelConfig) -> str:
    """The baseline to load: ``eval.baseline`` (an embedded model, a directory, a hub id) or the
    base model."""
    from dynalign.models import EMBEDDED_MODELS, resolve_model_path

    if not baseline:
        return resolve_model_path(model)
    if baseline in EMBEDDED_MODELS:
        return resolve_model_path(replace(model, name_or_path=baseline))
    if Path(baseline).expanduser().exists():
        return str(resolve_model_dir(baseline, "eval.baseline"))
    if baseline.startswith((".", "/", "~")):
        raise ConfigError("eval.baseline", f"{baseline} does not exist")
    return baseline  # a hub id
