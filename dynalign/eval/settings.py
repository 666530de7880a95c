"""What one evaluation needs from the run config, and where the models to compare live.

:func:`eval_settings` reads ``cfg.eval`` (:class:`dynalign.config.EvalConfig`) into one
frozen :class:`EvalSettings`, resolving the fields whose ``None`` means "as the training
run does" (the baseline, the judge mode and length, the held-out dataset).

Model locations: ``checkpoint=PATH`` and ``eval.baseline`` are a Hugging Face model
directory, or a dynalign run directory (its newest exported ``iter_<k>/`` is used), or,
for the baseline only, a hub id or ``tiny``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from dynalign.config import JUDGE_MODES, ConfigError, ExternalJudgeConfig, ModelConfig, TrainConfig

ITER_DIR = re.compile(r"iter_(\d+)")
CHECKPOINT_KEY = "checkpoint"

@dataclass(frozen=True)
class EvalSettings:
    """Everything one evaluation reads, resolved (no ``None`` meaning "see elsewhere" left)."""

    num_prompts: int
    max_new_tokens: int  # per answer
    temperature: float  # answer sampling; 0: greedy
    pairwise: bool
    bootstrap_samples: int
    seed: int
    prompts_file: str | None
    held_out_dataset: str | None
    prompt_column: str
    baseline: str  # a model directory or hub id
    judge: ExternalJudgeConfig
    rubric: str
    judge_mode: str
    judge_num_samples: int
    judge_temperature: float
    judge_max_new_tokens: int
    self_judge: bool
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_limit: int | None = None
    lm_eval_batch_size: int = 8
    lm_eval_num_fewshot: int | None = None
    lm_eval_include_path: str | None = None


def eval_settings(cfg: TrainConfig) -> EvalSettings:
    """The evaluation settings of a validated run config; a :class:`ConfigError` names a bad key."""
    e = cfg.eval
    judge_mode = e.judge_mode or cfg.judge.mode
    if judge_mode not in JUDGE_MODES:
        raise ConfigError("eval.judge_mode", f"unknown value {judge_mode!r}; valid: {', '.join(JUDGE_MODES)}")
    e.judge.validate("eval.judge")
    baseline = e.baseline
    return EvalSettings(
        num_prompts=e.num_prompts, max_new_tokens=e.max_new_tokens, temperature=float(e.temperature),
        pairwise=e.pairwise, bootstrap_samples=e.bootstrap_samples, seed=cfg.seed,
        prompts_file=e.prompts_file,
        held_out_dataset=e.dataset or cfg.generator.dataset,
        prompt_column=cfg.generator.prompt_column,
        baseline=resolve_baseline(baseline, cfg.model),
        judge=e.judge, rubric=str(e.rubric), judge_mode=judge_mode,
        judge_num_samples=cfg.judge.num_samples, judge_temperature=cfg.judge.temperature,
        judge_max_new_tokens=e.judge_max_new_tokens or cfg.judge.max_new_tokens,
        self_judge=bool(e.self_judge),
        lm_eval_tasks=tuple(e.lm_eval_tasks), lm_eval_limit=e.lm_eval_limit,
        lm_eval_batch_size=e.lm_eval_batch_size, lm_eval_num_fewshot=e.lm_eval_num_fewshot,
        lm_eval_include_path=e.lm_eval_include_path,
    )


# ------------------------------------------------------------------ model locations


def iteration_of(path: Path) -> int | None:
    """``k`` for a directory named ``iter_<k>``, else None."""
    match = ITER_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else None


def newest_export(run_dir: Path) -> Path | None:
    """The ``iter_<k>/`` Hugging Face directory of a run with the largest ``k``."""
    exports = [(iteration_of(d), d) for d in run_dir.iterdir()
               if d.is_dir() and iteration_of(d) is not None and (d / "config.json").exists()]
    return max(exports, key=lambda item: item[0])[1] if exports else None


def resolve_model_dir(value: str | Path, key: str) -> Path:
    """A Hugging Face model directory from a model directory or a dynalign run directory.

    Raises a :class:`ConfigError` naming ``key`` when the path is missing or holds neither.
    """
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(key, f"{path} does not exist")
    if not path.is_dir():
        raise ConfigError(key, f"{path} is a file; give a Hugging Face model directory or a run directory")
    if (path / "config.json").exists():
        return path
    export = newest_export(path)
    if export is not None:
        return export
    if (path / "latest").exists() or (path / "checkpoints").exists():
        raise ConfigError(key, f"{path} holds DeepSpeed checkpoints, not a model: evaluate an exported "
                               "iter_<k>/ directory (train with export_each_iteration=true)")
    raise ConfigError(key, f"{path} is neither a Hugging Face model directory (no config.json) nor a "
                           "dynalign run directory (no iter_<k>/ with a config.json)")


def resolve_baseline(baseline: str | None, model: ModelConfig) -> str:
    """The baseline to load: ``eval.baseline`` (``tiny``, a directory, a hub id) or the base model."""
    from dynalign.tiny_model import resolve_model_path

    if not baseline:
        return resolve_model_path(model)
    if baseline == "tiny":
        return resolve_model_path(replace(model, name_or_path="tiny"))
    if Path(baseline).expanduser().exists():
        return str(resolve_model_dir(baseline, "eval.baseline"))
    if baseline.startswith((".", "/", "~")):
        raise ConfigError("eval.baseline", f"{baseline} does not exist")
    return baseline  # a hub id


def resolve_judge_model(judge: ExternalJudgeConfig, model: ModelConfig) -> str:
    """What a local external judge (``hf``/``vllm``) loads; ``tiny`` is the embedded model."""
    from dynalign.tiny_model import resolve_model_path

    if judge.model == "tiny":
        return resolve_model_path(replace(model, name_or_path="tiny"))
    path = Path(judge.model).expanduser()
    return str(resolve_model_dir(path, "eval.judge.model")) if path.exists() else judge.model
