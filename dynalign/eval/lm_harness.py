"""General capability through lm-evaluation-harness, run the way its own CLI runs it.

:func:`lm_eval_each` runs tasks by name on a consolidated model (never a ZeRO shard) through one
of lm-eval's backends (:data:`LM_EVAL_BACKENDS`, ``eval.lm_eval_backend``): ``hf`` wraps a
Hugging Face model in memory in lm-eval's ``HFLM`` (:func:`run_lm_eval`), ``vllm`` starts
lm-eval's own vLLM engine on the model's directory. Unset, the backend is ``vllm`` when the
run samples with vLLM on a GPU (``rollout=vllm``) and ``hf`` otherwise.

Requests are rendered as lm-eval's CLI renders them with ``--apply_chat_template``,
``--fewshot_as_multiturn`` and ``--system_instruction`` (:class:`PromptFormat`). The rule
(:func:`prompt_format`): ``eval.lm_eval_chat_template`` when set; unset, the chat template is
on for an instruct or chat model (``model.name_or_path`` says ``Instruct``, ``chat`` or ends
in ``-it``, :func:`is_chat_model`) whose tokenizer has a template, and off for base models
(the embedded tiny model and Gemma 3 270M base included, though dynalign gives both a
template for sampling). Few-shot examples become chat turns whenever the template is on,
unless ``eval.lm_eval_fewshot_as_multiturn`` says otherwise (lm-eval's CLI default). The
policy's ``model`` decides for the baseline too, so both sides see the same prompts.

Task YAMLs are looked up in the tasks shipped here
(``dynalign/eval/tasks``, e.g. ``ca_mini_mc``), in ``eval.lm_eval_include_path``, and only
if a task is found in neither, in lm-eval's built-in registry (mmlu, gsm8k, ...; indexing
it costs a few seconds). The include directories are staged into a work directory with
every relative ``dataset_kwargs.data_files`` entry made absolute (lm-eval resolves them
from the working directory, not from the YAML's folder), so a task directory can ship its
data beside its YAML. When every task is local, the Hugging Face hub is switched off
(``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``) for the run.

The runner calls it one task at a time (:func:`lm_eval_each`: a task's numbers then do not
depend on which tasks share its run, nor on which rank runs it: ranks run their shares of the
tasks at once, each as a process of its own), on one load of the model. Baseline results are
cached on disk by (model fingerprint, task, limit, few-shot, prompt format, backend), so an
evaluation every N iterations runs the baseline once.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from dynalign.config import ConfigError, EvalConfig, TrainConfig
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


# ------------------------------------------------------------------ prompt format

# An instruct or chat model by its name: Qwen/Qwen2.5-7B-Instruct, meta-llama/Llama-2-7b-chat-hf,
# google/gemma-3-270m-it. Base models (tiny, gemma3_270m, Qwen/Qwen2.5-7B) do not match.
CHAT_MODEL_NAME = re.compile(r"instruct|chat|[-_]it(?![a-z0-9])", re.IGNORECASE)


def is_chat_model(name_or_path: str) -> bool:
    """Whether the model's name marks an instruct or chat model (see :data:`CHAT_MODEL_NAME`)."""
    return bool(CHAT_MODEL_NAME.search(Path(str(name_or_path)).name))


@dataclass(frozen=True)
class PromptFormat:
    """How lm-eval renders each request; the arguments its CLI passes to ``simple_evaluate``."""

    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False  # few-shot examples as user/assistant turns (chat template only)
    system_instruction: str | None = None


def prompt_format(e: EvalConfig, model_name: str, has_chat_template: bool) -> PromptFormat:
    """The format of ``eval.lm_eval_*`` for the run's ``model_name`` and a tokenizer that has (or
    lacks) a chat template; a setting the tokenizer cannot honour is a :class:`ConfigError`."""
    chat = e.lm_eval_chat_template
    if chat is None:
        chat = is_chat_model(model_name) and has_chat_template
    elif chat and not has_chat_template:
        raise ConfigError("eval.lm_eval_chat_template", f"the tokenizer of {model_name} has no chat template")
    multiturn = chat if e.lm_eval_fewshot_as_multiturn is None else e.lm_eval_fewshot_as_multiturn
    if multiturn and not chat:
        raise ConfigError("eval.lm_eval_fewshot_as_multiturn", "few-shot turns need the chat template, which "
                          f"is off for {model_name} (a base model): set eval.lm_eval_chat_template=true")
    return PromptFormat(chat, multiturn, e.lm_eval_system_instruction)


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


def evaluate_lm(lm: Any, tasks: PreparedTasks, *, limit: int | None = None, num_fewshot: int | None = None,
                bootstrap_iters: int = 0, seed: int = 0,
                prompt: PromptFormat = PromptFormat()) -> dict[str, dict[str, float]]:
    """``lm_eval.simple_evaluate`` on an lm-eval model object; ``{task: {metric: value}}``.

    ``bootstrap_iters`` > 0 adds the ``*_stderr`` metrics (closed form for mean metrics).
    """
    import lm_eval

    with hub_offline(tasks.all_local), as_process_of_its_own():
        output = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks.names), task_manager=tasks.manager, limit=limit,
            num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters, log_samples=False, **asdict(prompt),
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    if output is None:  # lm-eval thought this process one rank of several
        raise RuntimeError("lm-eval returned no results: it took this process for a rank other than 0")
    return task_metrics(output["results"])


def run_lm_eval(model: Any, tokenizer: Any, tasks: PreparedTasks, *, limit: int | None = None,
                batch_size: int = 8, num_fewshot: int | None = None, bootstrap_iters: int = 0,
                seed: int = 0, prompt: PromptFormat = PromptFormat()) -> dict[str, dict[str, float]]:
    """Run the tasks on an in-memory Hugging Face model through lm-eval's ``HFLM``; the model is
    left in the mode it was in."""
    if not tasks.names:
        return {}
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    try:
        with as_process_of_its_own():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        return evaluate_lm(lm, tasks, limit=limit, num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters,
                           seed=seed, prompt=prompt)
    finally:
        model.train(was_training)  # HFLM leaves the model in eval mode


# ------------------------------------------------------------------ backends


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _settings(cfg: TrainConfig) -> dict[str, Any]:
    e = cfg.eval
    return {"limit": e.lm_eval_limit, "num_fewshot": e.lm_eval_num_fewshot,
            "bootstrap_iters": e.bootstrap_samples, "seed": cfg.seed}


RunTasks = Callable[[PreparedTasks], dict]  # runs tasks on a model a backend holds


@contextlib.contextmanager
def _hf_backend(cfg: TrainConfig, model_path: str, loaded: Any) -> Iterator[RunTasks]:
    """lm-eval's ``HFLM`` on ``loaded`` (a sampler: ``.model``, ``.tokenizer``), else on a fresh load."""
    if loaded is None:
        from dynalign.models import load_hf_sampler

        loaded = load_hf_sampler(cfg.model, path=model_path, batch_size=cfg.rollout.batch_size)
    prompt = prompt_format(cfg.eval, cfg.model.name_or_path, _has_chat_template(loaded.tokenizer))
    yield lambda tasks: run_lm_eval(loaded.model, loaded.tokenizer, tasks, prompt=prompt,
                                    batch_size=cfg.eval.lm_eval_batch_size, **_settings(cfg))


@contextlib.contextmanager
def _vllm_backend(cfg: TrainConfig, model_path: str, loaded: Any) -> Iterator[RunTasks]:
    """lm-eval's own vLLM engine on the model's directory (``loaded`` is not used), shut down after;
    sized by ``rollout.vllm`` (GPU share, tensor parallelism, context length, CPU KV cache)."""
    import torch

    from dynalign.rollout._vllm_compat import preserve_process_state, quiet_vllm_logging

    v = cfg.rollout.vllm
    if v.tensor_parallel_size == 1:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: no __main__ guard
    extra: dict[str, Any] = {}
    if not torch.cuda.is_available():  # vLLM's CPU build (the vLLM test lane): its KV cache size,
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(v.kv_cache_space_gib)))
        extra.update(enable_chunked_prefill=False, enforce_eager=True)  # whole prompts, no compile warm-up
    quiet_vllm_logging()
    with preserve_process_state():
        from lm_eval.models.vllm_causallms import VLLM

        with as_process_of_its_own():
            lm = VLLM(pretrained=str(model_path), dtype=cfg.model.dtype, seed=cfg.seed,
                      batch_size=cfg.eval.lm_eval_batch_size, trust_remote_code=cfg.model.trust_remote_code,
                      max_model_len=v.max_model_len, tensor_parallel_size=v.tensor_parallel_size,
                      gpu_memory_utilization=v.gpu_memory_utilization, **extra)
        try:
            prompt = prompt_format(cfg.eval, cfg.model.name_or_path, _has_chat_template(lm.tokenizer))
            yield lambda tasks: evaluate_lm(lm, tasks, prompt=prompt, **_settings(cfg))
        finally:
            shutdown = getattr(lm.model.llm_engine, "shutdown", None)
            if shutdown is not None:
                shutdown()  # its memory: the caller frees what is left


# eval.lm_eval_backend -> a context that loads the model at a path (or takes the one already
# loaded) and yields what runs tasks on it.
Backend = Callable[[TrainConfig, str, Any], contextlib.AbstractContextManager[RunTasks]]
LM_EVAL_BACKENDS: dict[str, Backend] = {
    "hf": _hf_backend,
    "vllm": _vllm_backend,
}


def lm_eval_backend(cfg: TrainConfig) -> str:
    """``eval.lm_eval_backend``; unset, ``vllm`` when the run samples with vLLM on a GPU, else ``hf``."""
    if cfg.eval.lm_eval_backend is not None:
        return cfg.eval.lm_eval_backend
    if cfg.rollout.backend != "vllm":
        return "hf"
    import torch

    return "vllm" if torch.cuda.is_available() else "hf"


def lm_eval_each(cfg: TrainConfig, tasks: PreparedTasks, model_path: str | Path,
                 loaded: Any = None) -> list[dict[str, dict[str, float]]]:
    """The results of each task, run on its own, on the model at ``model_path`` with the run's
    ``eval.lm_eval_*`` settings; the model is loaded once for them all.

    ``loaded`` is that model already in memory as a sampler (``.model``, ``.tokenizer``): the
    ``hf`` backend uses it instead of loading the model again; ``vllm`` always starts its own engine.
    """
    if not tasks.names:
        return []
    with LM_EVAL_BACKENDS[lm_eval_backend(cfg)](cfg, str(model_path), loaded) as run:
        return [run(replace(tasks, names=(task,))) for task in tasks.names]


def lm_eval_cache_key(model_path: str, tasks: Sequence[str], cfg: TrainConfig) -> str:
    """Baseline results are reused while the weights, tasks, limit, few-shot, prompt format and
    backend are the same."""
    e = cfg.eval
    prompt = {"chat_template": e.lm_eval_chat_template, "chat_model": is_chat_model(cfg.model.name_or_path),
              "fewshot_as_multiturn": e.lm_eval_fewshot_as_multiturn, "system": e.lm_eval_system_instruction}
    return cache_key("lm_eval", model=model_fingerprint(model_path), tasks=sorted(tasks),
                     limit=e.lm_eval_limit, num_fewshot=e.lm_eval_num_fewshot, prompt=prompt,
                     backend=lm_eval_backend(cfg))
