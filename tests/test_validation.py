"""Every value that can be checked without a model is checked before one loads.

Non-finite numbers and rubric rules in ``TrainConfig.validate``; paths, datasets and rubric
files in :mod:`dynalign.config.preflight`. The command-line cases run in real subprocesses and
prove that no model was built: the tiny model is made in ``DYNALIGN_CACHE`` on first use, and
that directory stays empty.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from dynalign.cli import entry_point, validated_config
from dynalign.config import (
    EMBEDDED_MODEL_NAMES,
    AspectConfig,
    ConfigError,
    RubricConfig,
    TrainConfig,
    to_train_config,
)
from dynalign.config.checks import finite, non_finite
from dynalign.config.preflight import (
    CHECKPOINT_LATEST,
    CHECKPOINT_STATE,
    ModelRef,
    check_model,
    check_resume,
    preflight,
)

DATA = Path(__file__).parent / "data"

# ------------------------------------------------------------------ data to point at


def empty_train_split(path: Path) -> Path:
    """A saved DatasetDict (as a generation writes it) whose train split has no row."""
    from datasets import Dataset, DatasetDict, Features, Value

    from dynalign.datagen.dataset_io import save_dataset_dict

    feats = Features({"prompt": Value("string")})
    splits = {"train": [], "eval": ["a held-out prompt"]}
    save_dataset_dict(DatasetDict({name: Dataset.from_dict({"prompt": rows}, features=feats)
                                   for name, rows in splits.items()}), path)
    return path


def prompts_file(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def bad_rubric(path: Path) -> Path:
    """The custom test rubric with one aspect name the judge's parser could never match."""
    path.write_text((DATA / "judge_custom_rubric.yaml").read_text()
                    .replace("name: points_to_sources", "name: Points To Sources"))
    return path


def checkpoint_root(path: Path, tag: str = "step_4") -> Path:
    (path / tag).mkdir(parents=True)
    (path / tag / CHECKPOINT_STATE).write_text("{}")
    (path / CHECKPOINT_LATEST).write_text(tag)
    return path


# ------------------------------------------------------- the command line, end to end


def _run(module: str, overrides: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path]:
    cache = tmp_path / "model-cache"
    cache.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DS_ACCELERATOR": "cpu", "DYNALIGN_CACHE": str(cache),
           "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}  # the datasets read leave nothing behind
    args = [sys.executable, "-m", module, *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc, cache


Overrides = Callable[[Path], list[str]]
EVAL_DUE = "eval.every_n_iterations=1"
CLI_CASES: list[tuple[str, str, Overrides, str]] = [
    # (id, module, overrides given a scratch directory, what the one line says)
    ("lr_inf", "dynalign.train", lambda d: ["grpo.lr=inf"], "grpo.lr: must be a finite number (got inf)"),
    ("weight_decay_inf", "dynalign.train", lambda d: ["grpo.weight_decay=inf"],
     "grpo.weight_decay: must be a finite number (got inf)"),
    ("temperature_nan", "dynalign.train", lambda d: ["rollout.temperature=nan"],
     "rollout.temperature: must be a finite number (got nan)"),
    ("aspect_name", "dynalign.train", lambda d: ["judge.rubric.aspects.1.name=Bad Name"],
     "judge.rubric.aspects.1.name: must be a lowercase identifier"),
    ("level_key", "dynalign.train", lambda d: ["+judge.rubric.aspects.0.levels.7=beyond the scale"],
     "judge.rubric.aspects.0.levels.7: level keys must be integer scores in [0, 5]"),
    ("eval_rubric_missing", "dynalign.train", lambda d: [EVAL_DUE, "eval.rubric=missing"],
     "eval.rubric: unknown rubric 'missing'"),
    ("eval_rubric_invalid", "dynalign.train", lambda d: [EVAL_DUE, f"eval.rubric={bad_rubric(d / 'r.yaml')}"],
     "r.yaml:rubric.aspects.1.name: must be a lowercase identifier"),
    ("evaluate_rubric", "dynalign.evaluate", lambda d: ["checkpoint=.", "eval.rubric=missing"],
     "eval.rubric: unknown rubric 'missing'"),
    ("empty_dataset", "dynalign.train", lambda d: [f"generator.dataset={prompts_file(d / 'p.jsonl', [])}"],
     "p.jsonl has no prompts in its train split"),
    ("empty_train_split", "dynalign.train", lambda d: [f"generator.dataset={empty_train_split(d / 'set')}"],
     "set has no prompts in its train split"),
    ("lm_eval_task_extras", "dynalign.train", lambda d: ["eval=full", EVAL_DUE],  # ifeval: lm_eval[ifeval]
     "eval.lm_eval_tasks: ifeval scores with immutabledict, langdetect, not installed in this Python"),
    ("resume_missing", "dynalign.train", lambda d: ["resume=/nonexistent/checkpoints"],
     "resume: /nonexistent/checkpoints does not exist"),
    ("model_missing", "dynalign.train", lambda d: ["model.name_or_path=/nonexistent/model"],
     "model.name_or_path: /nonexistent/model does not exist (a local model directory, a hub id like "
     "org/name, or one of: tiny, gemma3_270m)"),
    ("model_relative", "dynalign.train", lambda d: ["model.name_or_path=./relative-missing"],
     "model.name_or_path: ./relative-missing does not exist"),
]


FAST_CLI_CASES = ("lr_inf", "model_missing")  # one value rule, one path: the rest are slow (5-7 s each)


@pytest.mark.parametrize("module, overrides, fragment", [
    pytest.param(*case[1:], id=case[0], marks=() if case[0] in FAST_CLI_CASES else pytest.mark.slow)
    for case in CLI_CASES])
def test_cli_fails_in_one_line_before_any_model(tmp_path, module, overrides, fragment):
    proc, cache = _run(module, overrides(tmp_path), tmp_path)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("dynalign: invalid config: "), lines
    assert fragment in lines[0]
    assert list(cache.iterdir()) == []  # the tiny model was never built


# ------------------------------------------------------------------ finite numbers


def test_every_float_in_the_tree_must_be_finite(compose_cfg):
    cfg = to_train_config(compose_cfg())
    assert list(non_finite(cfg)) == []
    cfg.generator.endpoint.timeout_s = float("inf")  # nested two dataclasses deep
    cfg.judge.rubric.aspects[2].weight = float("nan")  # inside a list
    cfg.deepspeed.extra = {"optimizer": {"lr": float("-inf")}}  # a free-form dict
    assert [key for key, _ in non_finite(cfg)] == [
        "generator.endpoint.timeout_s", "judge.rubric.aspects.2.weight", "deepspeed.extra.optimizer.lr"]
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert str(info.value) == "generator.endpoint.timeout_s: must be a finite number (got inf)"


@pytest.mark.parametrize("override, key", [
    ("grpo.max_grad_norm=inf", "grpo.max_grad_norm"),
    ("grpo.dual_clip=inf", "grpo.dual_clip"),  # an Optional[float]
    ("generator.min_prose_fraction=nan", "generator.min_prose_fraction"),
    ("eval.judge.timeout_s=inf", "eval.judge.timeout_s"),
])
def test_non_finite_values_name_their_key(compose_cfg, override, key):
    with pytest.raises(ConfigError) as info:
        to_train_config(compose_cfg([override]))
    assert info.value.key == key and "finite" in info.value.message


def test_finite_accepts_ints_and_none():
    finite({"a": [1, 2.5, None, True]}, "x")
    with pytest.raises(ConfigError, match=r"^x\.a\.1: "):
        finite({"a": [1, float("nan")]}, "x")


# ------------------------------------------------------------------------ rubrics


def _rubric(**aspect) -> RubricConfig:
    """A rubric whose second aspect is ``aspect`` (a valid one, but for the given fields)."""
    fields = {"name": "clarity", "description": "Clear.", "levels": {"0": "Muddled.", "5": "Clear."}} | aspect
    aspects = [AspectConfig(name="depth", description="Deep."), AspectConfig(**fields)]
    return RubricConfig(name="r", aspects=aspects)


@pytest.mark.parametrize("aspect, key, fragment", [
    ({"name": "Clarity"}, "judge.rubric.aspects.1.name", "lowercase identifier"),
    ({"name": "clear-ness"}, "judge.rubric.aspects.1.name", "lowercase identifier"),
    ({"name": "2clear"}, "judge.rubric.aspects.1.name", "lowercase identifier"),
    ({"levels": {"7": "Off the scale."}}, "judge.rubric.aspects.1.levels.7", "[0, 5]"),
    ({"levels": {"-1": "Below it."}}, "judge.rubric.aspects.1.levels.-1", "[0, 5]"),
    ({"levels": {"high": "Not a score."}}, "judge.rubric.aspects.1.levels.high", "integer scores"),
    ({"levels": {"3": "Three.", " 3": "Three again."}}, "judge.rubric.aspects.1.levels. 3", "two levels"),
    ({"weight": float("inf")}, "judge.rubric.aspects.1.weight", "finite"),
])
def test_rubric_rules_are_shared_by_validation_and_the_judge(aspect, key, fragment):
    from dynalign.judge.rubric import Rubric

    rubric = _rubric(**aspect)
    with pytest.raises(ConfigError) as validated:
        rubric.validate("judge.rubric")
    with pytest.raises(ConfigError) as frozen:
        Rubric.from_config(rubric, "judge.rubric")
    assert validated.value.key == frozen.value.key == key
    assert fragment in validated.value.message


def test_a_valid_rubric_freezes_its_levels_in_order():
    from dynalign.judge.rubric import Rubric

    rubric = Rubric.from_config(_rubric(levels={"5": " Clear. ", "0": "Muddled."}))
    assert rubric.aspects[1].levels == ((0, "Muddled."), (5, "Clear."))


def test_weighted_rubric_without_weight_fails_validation():
    rubric = _rubric(weight=0.0)
    rubric.aspects[0].weight, rubric.combine = 0.0, "weighted"
    with pytest.raises(ConfigError, match="weight > 0"):
        rubric.validate("judge.rubric")


# ------------------------------------------------------------------------- models


def test_embedded_names_match_the_builders():
    from dynalign.models import EMBEDDED_MODELS

    assert set(EMBEDDED_MODEL_NAMES) == set(EMBEDDED_MODELS)


def test_model_references(tmp_path, monkeypatch):
    import huggingface_hub

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    for value in ("tiny", "gemma3_270m", str(model_dir)):
        check_model(ModelRef("model.name_or_path", value))
    cases = {
        str(tmp_path): "holds no config.json",  # a directory, but no model
        str(model_dir / "config.json"): "is a file",
        "~/no/such/model": "does not exist",
        "a/b/c": "does not exist",  # two slashes: a path, never a hub id
        "bad name": "is not a valid name",
        "org/not-cached": "not in the local hub cache",  # the tests run with HF_HUB_OFFLINE=1
    }
    for value, fragment in cases.items():
        with pytest.raises(ConfigError, match=fragment) as info:
            check_model(ModelRef("model.name_or_path", value))
        assert info.value.key == "model.name_or_path"
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: f"/hub/{repo}/{name}")
    check_model(ModelRef("model.name_or_path", "org/cached"))
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    check_model(ModelRef("model.name_or_path", "org/downloadable"))


def test_baseline_and_judge_may_be_run_directories(tmp_path):
    run = tmp_path / "run"
    (run / "iter_2").mkdir(parents=True)
    (run / "iter_2" / "config.json").write_text("{}")
    check_model(ModelRef("eval.baseline", str(run), embedded=("tiny",), run_dirs=True))
    with pytest.raises(ConfigError, match="neither a Hugging Face model directory") as info:
        check_model(ModelRef("eval.judge.model", str(tmp_path), embedded=("tiny",), run_dirs=True))
    assert info.value.key == "eval.judge.model"


@pytest.mark.parametrize("overrides, key", [
    (["judge.source=external", "judge.external.model=/no/judge"], "judge.external.model"),
    (["eval.baseline=./no-baseline"], "eval.baseline"),
    (["eval.judge.model=/no/judge"], "eval.judge.model"),
    (["generator.regenerate_each_iteration=true", "generator.models=[policy,/no/writer]"],
     "generator.models.1"),
])
def test_every_model_an_entry_loads_is_checked(compose_cfg, overrides, key):
    cfg = to_train_config(compose_cfg([EVAL_DUE, *overrides]))
    with pytest.raises(ConfigError) as info:
        preflight(cfg, "train")
    assert info.value.key == key


def test_served_judges_and_unused_models_are_not_checked(compose_cfg):
    served = ["judge.source=external", "judge.external.backend=openai", "judge.external.base_url=http://x/v1",
              "judge.external.model=my-served-judge"]
    preflight(to_train_config(compose_cfg(served)), "train")
    unused = to_train_config(compose_cfg(["eval.baseline=/no/baseline", "generator.models=[/no/writer]"]))
    preflight(unused, "train")  # no evaluation, no regeneration: neither is loaded
    with pytest.raises(ConfigError, match="eval.baseline"):
        preflight(unused, "evaluate")
    with pytest.raises(ConfigError, match="generator.models.0"):
        preflight(unused, "generate")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
@pytest.mark.parametrize("overrides, entry, key", [
    (["rollout=vllm"], "train", "rollout.backend"),
    (["judge.source=external", "judge.external.backend=vllm"], "judge_check", "judge.external.backend"),
    ([EVAL_DUE, "eval.judge.backend=vllm"], "train", "eval.judge.backend"),
    (["eval.judge.backend=vllm"], "evaluate", "eval.judge.backend"),
])
def test_a_vllm_backend_needs_vllm_installed(compose_cfg, overrides, entry, key):
    with pytest.raises(ConfigError, match="vllm is not installed.*make install-vllm") as info:
        preflight(to_train_config(compose_cfg(overrides)), entry)
    assert info.value.key == key
    preflight(to_train_config(compose_cfg(overrides[:-1])), entry)  # the same run on its default backend


# ------------------------------------------------------------------------- resume


def test_resume_accepts_a_checkpoint_root_or_one_checkpoint(tmp_path):
    root = checkpoint_root(tmp_path / "run" / "checkpoints")
    for value in ("never", "auto", str(root), str(root / "step_4")):
        check_resume(value)
    cases = {
        str(tmp_path / "missing"): "does not exist",
        str(tmp_path / "run"): "did you mean",  # the run directory, not its checkpoints/
        str(root / "step_4" / CHECKPOINT_STATE): "is not a checkpoint",
    }
    for value, fragment in cases.items():
        with pytest.raises(ConfigError, match=fragment) as info:
            check_resume(value)
        assert info.value.key == "resume"
    (root / CHECKPOINT_LATEST).write_text("step_9")  # names a checkpoint that is gone
    with pytest.raises(ConfigError, match="'step_9', which holds no dynalign_state.json"):
        check_resume(str(root))


def test_resume_refuses_a_checkpoint_whose_run_dropped_its_training_state(tmp_path):
    root = checkpoint_root(tmp_path / "run" / "checkpoints")
    (root / "step_4" / CHECKPOINT_STATE).write_text(json.dumps({"resumable": False, "global_step": 4}))
    for value in (str(root), str(root / "step_4")):
        with pytest.raises(ConfigError, match=r"step_4 keeps no optimizer or module state .*"
                                              r"checkpoint_optimizer_at_end=false") as info:
            check_resume(value)
        assert info.value.key == "resume"
    (root / "step_4" / CHECKPOINT_STATE).write_text(json.dumps({"resumable": True, "global_step": 4}))
    check_resume(str(root))


# ----------------------------------------------------------------------- datasets


def test_training_prompts(compose_cfg, tmp_path):
    good = prompts_file(tmp_path / "good.jsonl", ["What is a fair rota?"])
    preflight(to_train_config(compose_cfg([f"generator.dataset={good}"])), "train")
    cases = [
        (["generator.eval_fraction=0.999"], "generator.eval_fraction", "every shipped seed prompt"),
        ([f"generator.dataset={tmp_path / 'nowhere' / 'set'}"], "generator.dataset", "does not exist"),
        ([f"generator.dataset={good}", "generator.prompt_column=text"], "generator.dataset", "prompt_column"),
        ([f"generator.dataset={empty_train_split(tmp_path / 'set')}"], "generator.dataset", "train split"),
    ]
    for overrides, key, fragment in cases:
        with pytest.raises(ConfigError, match=fragment) as info:
            preflight(to_train_config(compose_cfg(overrides)), "train")
        assert info.value.key == key


def test_evaluation_files_are_checked_when_an_evaluation_runs(compose_cfg, tmp_path):
    single = prompts_file(tmp_path / "p.jsonl", ["What is a fair rota?"])
    cases = [
        ([f"eval.rubric={tmp_path / 'none.yaml'}"], "eval.rubric", "does not exist"),
        ([f"eval.prompts_file={tmp_path / 'none.yaml'}"], "eval.prompts_file", "cannot read"),
        ([f"generator.dataset={single}"], "eval.dataset", "unset, so the evaluation reads"),
        ([f"eval.dataset={single}"], "eval.dataset", "single data file"),
        ([f"eval.lm_eval_include_path={tmp_path / 'tasks'}"], "eval.lm_eval_include_path", "not a directory"),
    ]
    for overrides, key, fragment in cases:
        cfg = to_train_config(compose_cfg(overrides))
        preflight(cfg, "train")  # eval.every_n_iterations=0: training never reads them
        with pytest.raises(ConfigError, match=fragment) as info:
            preflight(cfg, "evaluate")
        assert info.value.key == key
        cfg.eval.every_n_iterations = 1
        with pytest.raises(ConfigError, match=fragment):
            preflight(cfg, "train")


# ------------------------------------------------------------------ the entry points


@pytest.mark.parametrize("entry", ["train", "evaluate", "generate", "judge_check", "unknown"])
def test_the_default_config_passes_every_entry(compose_cfg, entry):
    assert isinstance(validated_config(compose_cfg([EVAL_DUE]), entry=entry), TrainConfig)


def test_validated_config_exits_2_with_one_line(compose_cfg, capsys):
    with pytest.raises(SystemExit) as info:
        validated_config(compose_cfg(["resume=/nonexistent"]), entry="train")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("dynalign: invalid config: resume: /nonexistent does not exist")


def test_entry_point_outside_hydra_is_train():
    assert entry_point() == "train"
