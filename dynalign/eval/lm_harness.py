"""General capability through lm-evaluation-harness, on a model object already in memory.

``run_lm_eval`` wraps a consolidated Hugging Face model (never a ZeRO shard) in lm-eval's
``HFLM`` and runs tasks by name. Task YAMLs are looked up in the tasks shipped here
(``dynalign/eval/tasks``, e.g. ``ca_mini_mc``), in ``eval.lm_eval_include_path``, and only
if a task is found in neither, in lm-eval's built-in registry (mmlu, gsm8k, ...; indexing
it costs a few seconds). The include directories are staged into a work directory with
every relative ``dataset_kwargs.data_files`` entry made absolute (lm-eval resolves them
from the working directory, not from the YAML's folder), so a task directory can ship its
data beside its YAML. When every task is local, the Hugging Face hub is switched off
(``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``) for the run.

The runner calls it one task at a time (a task's numbers then do not depend on which tasks
share its run, nor on which rank runs it: ranks run their shares of the tasks at once, each
as a process of its own). Baseline results are cached on disk by (model fingerprint, task,
limit, few-shot), so an evaluation every N iterations runs the baseline once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dynalign.config import ConfigError
from dynalign.eval.cache import cache_key, model_fingerprint

SHIPPED_TASKS_DIR = Path(__file__).resolve().parent / "tasks"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


# ------------------------------------------------------------------ task directories


def _absolute_data_files(data_files: Any, folder: Path) -> Any:
    """``data_files`` (a path, a list or a split -> path(s) mapping) with relative local paths made
    absolute against ``folder``; URLs, globs and hub paths that do not exist there are kept."""
    if isinstance(data_files, str):
        candidate = folder / data_files
        return str(candidate.resolve()) if not Path(data_files).is_absolute() and candidate.exists() \
            else data_files
    if isinstance(data_files, list):
        return [_absolute_data_files(item, folder) for item in data_files]
    if isinstance(data_files, dict):
        return {split: _absolute_data_files(item, folder) for split, item in data_files.items()}
    return data_files


def _rewrite_task_yaml(source: Path, target: Path) -> None:
    """Copy a task YAML, its relative data files made absolute (files with custom tags as is)."""
    text = source.read_text(encoding="utf-8")
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError:  # lm-eval's !function tags: nothing of ours to rewrite there
        config = None
    files = (config.get("dataset_kwargs") or {}).get("data_files") if isinstance(config, dict) else None
    if files is not None:
        config["dataset_kwargs"]["data_files"] = _absolute_data_files(files, source.parent)
        text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    target.write_text(text, encoding="utf-8")


def stage_task_dirs(sources: Sequence[str | Path], work_dir: str | Path) -> list[Path]:
    """Copies of the task directories under ``work_dir``, ready for ``TaskManager(include_path=...)``."""
    staged = []
    root = Path(work_dir)
    shutil.rmtree(root, ignore_errors=True)
    for i, source in enumerate(Path(s).expanduser().resolve() for s in sources):
        if not source.is_dir():
            raise ConfigError("eval.lm_eval_include_path", f"{source} is not a directory of task YAMLs")
        target = root / f"{i}_{source.name}"
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.yaml", "*.yml", "__pycache__"))
        for path in list(source.rglob("*.yaml")) + list(source.rglob("*.yml")):
            out = target / path.relative_to(source)
            out.parent.mkdir(parents=True, exist_ok=True)
            _rewrite_task_yaml(path, out)
        staged.append(target)
    return staged


@dataclass(frozen=True)
class PreparedTasks:
    """lm-eval tasks checked and indexed once, before any model is loaded."""

    names: tuple[str, ...]
    manager: Any  # lm_eval.tasks.TaskManager
    all_local: bool  # every task found in the local directories: the hub is switched off


def prepare_tasks(tasks: Sequence[str], work_dir: str | Path,
                  include_path: str | None = None) -> PreparedTasks:
    """Stage the task directories and index them; an unknown task is a :class:`ConfigError`.

    The manager is built from the local directories alone when they hold every task, with
    lm-eval's built-in registry otherwise.
    """
    if not tasks:
        return PreparedTasks((), None, True)
    from lm_eval.tasks import TaskManager

    sources = [SHIPPED_TASKS_DIR] + ([Path(include_path)] if include_path else [])
    include_dirs = [str(d) for d in stage_task_dirs(sources, Path(work_dir) / "lm_eval_tasks")]
    manager = TaskManager(include_path=include_dirs, include_defaults=False)
    all_local = all(t in manager.all_tasks for t in tasks)
    if not all_local:
        manager = TaskManager(include_path=include_dirs, include_defaults=True)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise ConfigError("eval.lm_eval_tasks", f"unknown lm-eval tasks {unknown}: neither in "
                              f"{SHIPPED_TASKS_DIR}, eval.lm_eval_include_path nor lm-eval's built-in tasks")
    return PreparedTasks(tuple(tasks), manager, all_local)


@contextlib.contextmanager
def hub_offline(enabled: bool = True) -> Iterator[None]:
    """Switch the Hugging Face hub off for the block (the env variables and the flags that
    ``huggingface_hub`` and ``datasets`` read at import time), then restore everything."""
    if not enabled:
        yield
        return
    saved_env = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    flags = [(sys.modules.get("huggingface_hub.constants"), "HF_HUB_OFFLINE"),
             (sys.modules.get("datasets.config"), "HF_HUB_OFFLINE"),
             (sys.modules.get("datasets.config"), "HF_DATASETS_OFFLINE")]
    saved_flags = [(module, name, getattr(module, name)) for module, name in flags
                   if module is not None and hasattr(module, name)]
    try:
        for name in OFFLINE_VARIABLES:
            os.environ[name] = "1"
        for module, name, _ in saved_flags:
            setattr(module, name, True)
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for module, name, value in saved_flags:
            setattr(module, name, value)


@contextlib.contextmanager
def as_process_of_its_own() -> Iterator[None]:
    """``LOCAL_RANK=0`` for the block, then as before.

    lm-eval takes every ``torchrun`` rank for a part of one tensor-parallel model: only where
    ``LOCAL_RANK`` is 0 does ``simple_evaluate`` return results (and ifeval fetch its word
    lists). A rank that runs its own tasks on a whole model is a process of its own.
    """
    saved = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("LOCAL_RANK", None)
        else:
            os.environ["LOCAL_RANK"] = saved


# ------------------------------------------------------------------ results


def task_metrics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's ``results`` block.

    lm-eval keys are ``"<metric>,<filter>"``: the ``none`` filter is dropped (``acc``), another
    one is kept as lm-eval writes it (``exact_match,strict-match``). Non-numeric values (aliases,
    "N/A" stderrs) are left out.
    """
    out: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        metrics: dict[str, float] = {}
        for key, value in values.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            metrics[metric if filter_name == "none" else key] = float(value)
        out[task] = metrics
    return out


def metric_deltas(policy: Mapping[str, Mapping[str, float]],
                  baseline: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """policy - baseline for every (task, metric) both have; stderrs are not differenced."""
    return {task: {m: v - baseline[task][m] for m, v in metrics.items()
                   if m in baseline.get(task, {}) and "_stderr" not in m}
            for task, metrics in policy.items() if task in baseline}


def run_lm_eval(model: Any, tokenizer: Any, tasks: PreparedTasks, *, limit: int | None = None,
                batch_size: int = 8, num_fewshot: int | None = None, bootstrap_iters: int = 0,
                seed: int = 0) -> dict[str, dict[str, float]]:
    """Run the tasks on an in-memory model; ``{task: {metric: value}}`` (groups included).

    ``bootstrap_iters`` > 0 adds the ``*_stderr`` metrics (closed form for mean metrics).
    """
    if not tasks.names:
        return {}
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    try:
        with hub_offline(tasks.all_local), as_process_of_its_own():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            output = lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks.names), task_manager=tasks.manager, limit=limit,
                num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters, log_samples=False,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        model.train(was_training)  # HFLM leaves the model in eval mode
    if output is None:  # lm-eval thought this process one rank of several
        raise RuntimeError("lm-eval returned no results: it took this process for a rank other than 0")
    return task_metrics(output["results"])


def lm_eval_cache_key(model_path: str, tasks: Sequence[str], limit: int | None,
                      num_fewshot: int | None) -> str:
    """Baseline results are reused while the weights, tasks, limit and few-shot are the same."""
    return cache_key("lm_eval", model=model_fingerprint(model_path), tasks=sorted(tasks), limit=limit,
                     num_fewshot=num_fewshot)
