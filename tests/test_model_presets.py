"""The GPU model presets (``model=llama3_8b``, ``qwen2_5_7b``, ``gemma3_270m``) compose into
consistent runs on 1 to 8 ranks, and every command the README shows composes and validates."""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import asdict

import pytest
from conftest import REPO_ROOT
from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from dynalign.cli import hydra_argv
from dynalign.config import CONF_DIR, TrainConfig, register_configs, to_train_config
from dynalign.judge import load_rubric
from dynalign.judge.prompt import format_verdict

PRESETS = ("llama3_8b", "qwen2_5_7b", "gemma3_270m")
WORLD_SIZES = (1, 2, 4, 8)
README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


@pytest.fixture(autouse=True, scope="module")
def _schema():
    register_configs()


def _compose(overrides: list[str], config_name: str = "train"):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


@functools.cache
def _preset(name: str, *overrides: str) -> TrainConfig:
    """``model=name`` and ``overrides``, validated for one rank (shared: do not modify it)."""
    return to_train_config(_compose([f"model={name}", *overrides]))


@pytest.mark.parametrize("name", PRESETS)
def test_preset_validates_on_1_2_4_and_8_ranks(name):
    cfg = copy.deepcopy(_preset(name))
    for world_size in WORLD_SIZES:
        cfg.validate(world_size)  # whole groups per rank, whole micro-batches per rank
        assert cfg.grpo.sequences_per_step % (world_size * cfg.grpo.micro_batch_size) == 0


@pytest.mark.parametrize("name", PRESETS)
def test_preset_is_a_run_on_gpus_not_the_tiny_models(name):
    cfg, tiny = _preset(name), _preset("tiny")
    assert cfg.rollout.backend == "vllm"
    assert cfg.eval.every_n_iterations > 0 and cfg.eval.judge.model not in ("tiny", cfg.model.name_or_path)
    assert "ca_mini_mc" in cfg.eval.lm_eval_tasks and len(cfg.eval.lm_eval_tasks) > 1
    # larger than the embedded run in every dimension that sizes it
    assert cfg.grpo.sequences_per_step > tiny.grpo.sequences_per_step
    assert cfg.grpo.max_completion_length > tiny.grpo.max_completion_length
    assert cfg.iterations * cfg.steps_per_iteration > tiny.iterations * tiny.steps_per_iteration
    # answers are evaluated at the length they were trained at
    assert cfg.eval.max_new_tokens >= cfg.grpo.max_completion_length
    # the policy writes each iteration's prompts, enough that no prompt repeats within one
    gen = cfg.generator
    assert gen.regenerate_each_iteration
    train_split = int(gen.num_prompts * (1 - gen.eval_fraction))
    assert train_split >= cfg.steps_per_iteration * cfg.grpo.prompts_per_step


@pytest.mark.parametrize(("name", "overrides", "ranks", "fits"), [
    ("llama3_8b", (), 8, True), ("llama3_8b", (), 4, True), ("llama3_8b", (), 2, False),
    ("llama3_8b", ("model.lora.enabled=true", "grpo.lr=2e-5"), 1, True),
    ("qwen2_5_7b", (), 4, True), ("qwen2_5_7b", (), 2, False), ("gemma3_270m", (), 1, True),
])
def test_launch_plan_on_80_gib_gpus(name, overrides, ranks, fits):
    """Full fine-tuning of a 7-8B preset needs 4 GPUs of 80 GB (its comments say so); LoRA one."""
    from dynalign.plan import make_plan, size_launch

    machine = ("plan.device_memory_gib=80", f"plan.ranks_per_node={ranks}", "plan.host_memory_gib=1000")
    cfg = _preset(name, *overrides, *machine)
    plan = make_plan(cfg, ranks, size_launch(cfg))
    assert plan.fits == fits, [(c.where, c.need / 2**30) for c in plan.checks]


def _verdict_chars(rubric_name: str) -> int:
    """Characters of a whole verdict block: at least as many as its tokens in any BPE vocabulary."""
    rubric = load_rubric(rubric_name)
    return len(format_verdict(rubric, [rubric.scale_max] * len(rubric.aspects), "0123abcd"))


@pytest.mark.parametrize("name", PRESETS)
def test_judges_have_room_for_their_reasoning_and_verdict(name):
    cfg = _preset(name)
    judges = [(cfg.judge.mode, cfg.judge.max_new_tokens, cfg.judge.rubric.name),
              (cfg.eval.judge_mode or cfg.judge.mode,
               cfg.eval.judge_max_new_tokens or cfg.judge.max_new_tokens, cfg.eval.rubric)]
    for mode, max_new_tokens, rubric in judges:
        if mode == "generate":  # asked to reason briefly per aspect, then the verdict: ~50 tokens an aspect
            aspects = len(load_rubric(rubric).aspects)
            assert max_new_tokens >= _verdict_chars(rubric) + 50 * aspects, (mode, max_new_tokens, rubric)


def test_gemma_judges_itself_by_logprob_and_is_evaluated_by_a_chat_model():
    cfg = _preset("gemma3_270m")
    assert cfg.judge.mode == "logprob" and cfg.judge.source == "self"  # a base model writes no verdict
    assert cfg.eval.judge_mode == "generate" and cfg.generator.name == "base_model"


def test_qwen_is_run_like_llama_but_its_model_and_judge():
    llama, qwen = asdict(_preset("llama3_8b")), asdict(_preset("qwen2_5_7b"))
    assert qwen["model"]["name_or_path"] == "Qwen/Qwen2.5-7B-Instruct"
    assert qwen["eval"]["judge"]["model"] == llama["model"]["name_or_path"]
    assert llama["eval"]["judge"]["model"] == qwen["model"]["name_or_path"]  # each judged by the other family
    for cfg in (llama, qwen):
        del cfg["model"]["name_or_path"], cfg["eval"]["judge"]["model"]
    assert llama == qwen


def test_the_command_line_still_picks_groups_and_values_over_a_preset():
    cfg = _preset("llama3_8b", "rollout=hf", "deepspeed=zero2", "iterations=1", "grpo.lr=3e-6")
    assert (cfg.rollout.backend, cfg.deepspeed.stage, cfg.iterations, cfg.grpo.lr) == ("hf", 2, 1, 3e-6)
    full = _preset("llama3_8b", "eval=full")
    assert full.eval.lm_eval_tasks == list(_compose(["eval=full"]).eval.lm_eval_tasks)  # the whole suite
    assert full.eval.judge.model == "Qwen/Qwen2.5-7B-Instruct"  # with the preset's judge


# ------------------------------------------------------------------ the README's commands

ENTRY = re.compile(r"(?:-m|--module)\s+dynalign\.(train|generate|evaluate|judge_check|plan)\b")
PLACEHOLDERS = ("N", "...", "…")  # "torchrun --nproc_per_node N -m dynalign.evaluate ...": a pattern


FENCED = re.compile(r"```\w*\n(.*?)```", flags=re.S)


def _shell_lines(text: str) -> list[str]:
    """Each line of the README's fenced blocks (continuations joined, comments and prompts cut)
    and each of its inline code spans."""
    lines = []
    for block in FENCED.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            lines.append(re.sub(r"\s+#.*$", "", line).removeprefix("$ "))
    lines += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", FENCED.sub("", text))]
    return lines


def _world_size(prefix: list[str]) -> int:
    """Ranks a launcher starts: --nproc_per_node x --nnodes (torchrun), --num_gpus x --num_nodes."""
    def value(*names: str) -> int:
        for i, word in enumerate(prefix[:-1]):
            if word in names:
                return int(prefix[i + 1])
        return 1
    return value("--nproc_per_node", "--num_gpus") * value("--nnodes", "--num_nodes")


def _is_pattern(words: list[str]) -> bool:
    return any(word in PLACEHOLDERS for word in words)


def readme_commands() -> list[tuple[str, str, list[str], int]]:
    """(line, entry point, its arguments, world size) of every dynalign command in the README
    but the ones shown failing (the next line is their error)."""
    commands, seen = [], set()
    for line in _shell_lines(README):
        match = ENTRY.search(line)
        if match is None or f"{line.strip()}\ndynalign: invalid config" in README.replace("$ ", ""):
            continue
        words = shlex.split(line)
        if _is_pattern(words):
            continue
        cut = next(i for i, w in enumerate(words)
                   if w in ("-m", "--module") and words[i + 1].startswith("dynalign."))
        command = (match.group(1), words[cut + 2:], _world_size(words[:cut]))
        if repr(command) not in seen:  # the same command shown twice is checked once
            seen.add(repr(command))
            commands.append((line.strip(), *command))
    return commands


def _sweep_points(overrides: list[str]) -> list[list[str]]:
    """Every job of a basic sweep over ``overrides`` (the cartesian product of its sweeps)."""
    points: list[list[str]] = [[]]
    for text, override in zip(overrides, OverridesParser.create().parse_overrides(overrides), strict=True):
        if override.is_sweep_override():
            key = override.get_key_element()
            choices = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            choices = [text]
        points = [point + [choice] for point in points for choice in choices]
    return points


def test_readme_commands_are_found():
    found = {(entry, world) for _, entry, _, world in readme_commands()}
    assert {("train", 1), ("train", 8), ("train", 16), ("generate", 1), ("evaluate", 1),
            ("judge_check", 1), ("plan", 1)} <= found


@pytest.mark.parametrize(("line", "entry", "args", "world_size"), readme_commands(),
                         ids=[c[0][:60] for c in readme_commands()])
def test_readme_command_composes_and_validates(line, entry, args, world_size):
    from dynalign.judge_check import KEY, check_options, register_schema

    parsed = get_args_parser().parse_args(hydra_argv(args))
    points = _sweep_points(parsed.overrides) if parsed.multirun else [parsed.overrides]
    if entry == "plan":  # it plans for plan.world_size ranks
        planned = [int(o.split("=")[1]) for o in parsed.overrides if o.startswith("plan.world_size=")]
        world_size = planned[-1] if planned else world_size
    for overrides in points:
        if entry == "judge_check":  # its own schema adds the judge_check node to the training one
            register_schema()
            try:
                values = OmegaConf.to_container(_compose(overrides, "judge_check"))
            finally:
                register_configs()
            check_options(values.pop(KEY))
            to_train_config(OmegaConf.create(values), world_size)
        else:
            to_train_config(_compose(overrides), world_size)


def test_readme_torchrun_example_validates_on_8_ranks():
    (args,) = [args for line, _, args, _ in readme_commands()
               if line.startswith("torchrun --nproc_per_node 8") and args == ["model=llama3_8b"]]
    cfg = to_train_config(_compose(args), world_size=8)
    assert cfg.model.name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct" and cfg.rollout.backend == "vllm"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_a_preset_without_vllm_installed_stops_before_loading(tmp_path):
    env = {**os.environ, "DYNALIGN_CACHE": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "dynalign.train", "model=gemma3_270m", "eval.every_n_iterations=0"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("dynalign: invalid config: rollout.backend: vllm is not installed")
    assert list(tmp_path.iterdir()) == []  # Gemma was not converted
