"""The launch plan: ``python -m dynalign.plan`` and the check at the start of ``dynalign.train``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest
from conftest import REPO_ROOT

from dynalign.config import ConfigError, ModelConfig, to_train_config
from dynalign.memory import DEVICE, GiB
from dynalign.plan import (
    QUIET_HYDRA,
    changes,
    check_launch,
    make_plan,
    model_shape,
    quiet_argv,
    saved,
    size_launch,
)

# The 8B preset spelled out: other presets' values may change, these tests must not.
LLAMA = ["model=llama3_8b", "model.name_or_path=meta-llama/Meta-Llama-3-8B-Instruct", "model.dtype=bfloat16",
         "model.gradient_checkpointing=true", "model.lora.enabled=false", "rollout=hf", "deepspeed=zero3",
         "grpo.beta=0.0", "judge.source=self", "judge.mode=logprob", "plan.device_memory_gib=80",
         "plan.host_memory_gib=256", "grpo.prompts_per_step=4", "grpo.group_size=4",
         "grpo.micro_batch_size=4", "grpo.max_prompt_length=256", "grpo.max_completion_length=32",
         "judge.max_new_tokens=256", "rollout.vllm.enable_sleep_mode=false"]


def _run(module: str, *args: str, tmp_path) -> subprocess.CompletedProcess:
    """``python -m <module>`` from an empty directory, with an empty model cache and hub cache."""
    cwd, cache = tmp_path / "cwd", tmp_path / "cache"
    cwd.mkdir()
    cache.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DYNALIGN_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _plan(compose_cfg, overrides: list[str], world: int = 1):
    cfg = to_train_config(compose_cfg(overrides), world)
    sizing = size_launch(cfg)
    return make_plan(cfg, world, sizing), sizing


def test_plan_refuses_an_8b_full_fine_tune_on_one_80_gib_gpu(tmp_path):
    proc = _run("dynalign.plan", *LLAMA, "plan.world_size=1", tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "known architectures table" in proc.stdout  # a hub id, no hub, no cache
    assert "8.03 B parameters" in proc.stdout and "device peak" in proc.stdout
    assert "DOES NOT FIT" in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dynalign: launch plan does not fit: the device needs")
    assert "model.lora.enabled=true" in lines[0] and "deepspeed.offload_optimizer=cpu" in lines[0]
    assert "plan.enforce=false" in lines[0]
    saves = [float(value) for value in re.findall(r"\(-([\d.]+) GiB", lines[0])]
    assert len(saves) >= 3 and saves == sorted(saves, reverse=True)  # ranked by memory saved
    assert list((tmp_path / "cwd").iterdir()) == []  # no run directory, no log: a plan writes nothing


def test_plan_fits_the_same_model_with_lora(tmp_path):
    proc = _run("dynalign.plan", *LLAMA, "plan.world_size=1", "model.lora.enabled=true", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "LoRA r=16" in proc.stdout and "device peak" in proc.stdout and "DOES NOT FIT" not in proc.stdout
    assert proc.stderr == ""


def test_eight_ranks_of_zero3_fit_and_split_the_model_states(compose_cfg):
    one, _ = _plan(compose_cfg, LLAMA)
    eight, _ = _plan(compose_cfg, [*LLAMA, "grpo.prompts_per_step=8"], world=8)
    assert not one.fits and eight.fits
    params = one.shape.num_params
    moments = {plan.world_size: next(t.bytes for t in plan.terms if t.name.startswith("Adam"))
               for plan in (one, eight)}
    assert moments == {1: params * 8, 8: -(-params // 8) * 8}  # two fp32 moments, split 8 ways
    assert eight.check(DEVICE).need < one.check(DEVICE).need


def test_each_suggested_override_saves_what_it_says(compose_cfg):
    plan, sizing = _plan(compose_cfg, LLAMA)
    found = changes(plan, sizing)
    assert [c.saves for c in found] == sorted((c.saves for c in found), reverse=True)
    assert any(c.fits for c in found)
    for change in found:
        key, value = change.override.split(" ")[0].split("=")
        if key == "plan.world_size":  # the launcher's, given to the plan
            after = make_plan(plan.cfg, int(value), sizing)
        else:  # a real override: Hydra composes it
            after, _ = _plan(compose_cfg, [*LLAMA, f"{key}={value}"])
        assert saved(plan, after) == change.saves > 0, change
        assert after.fits == change.fits, change


def test_a_too_small_vllm_share_is_refused_with_its_keys(compose_cfg):
    overrides = [*LLAMA, "model.name_or_path=Qwen/Qwen2.5-7B-Instruct", "model.lora.enabled=true",
                 "rollout=vllm", "rollout.vllm.gpu_memory_utilization=0.2"]
    plan, sizing = _plan(compose_cfg, overrides)
    assert plan.check(DEVICE).fits and plan.vllm_shortfall > 0 and not plan.fits
    fixes = {c.override.split("=")[0]: c for c in changes(plan, sizing)}
    assert fixes["rollout.vllm.gpu_memory_utilization"].fits and fixes["rollout.vllm.max_model_len"].fits


def test_vllm_sleep_mode_frees_its_share_for_the_update(compose_cfg):
    base = [*LLAMA, "model.lora.enabled=true", "rollout=vllm", "rollout.vllm.gpu_memory_utilization=0.5"]
    awake, _ = _plan(compose_cfg, base)
    asleep, _ = _plan(compose_cfg, [*base, "rollout.vllm.enable_sleep_mode=true"])
    vllm = [t for t in asleep.terms if t.name.startswith("vLLM")]
    assert vllm and all(t.phases == ("rollout", "judge") for t in vllm)
    assert sum(t.bytes for t in vllm) == int(0.5 * 80 * GiB)
    assert asleep.check(DEVICE).need < awake.check(DEVICE).need
    assert asleep.check(DEVICE).phase != "update"


def test_train_refuses_a_plan_that_cannot_fit_before_loading_anything(tmp_path):
    proc = _run("dynalign.train", "plan.device_memory_gib=0.01", f"hydra.run.dir={tmp_path / 'run'}",
                "logger=none", tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "dynalign: launch plan does not fit: the device needs" in proc.stderr
    assert "term" in proc.stdout and "DOES NOT FIT" in proc.stdout  # the table, once
    assert list((tmp_path / "cache").iterdir()) == []  # the tiny model was not even built


def test_the_default_run_says_one_line(compose_cfg, capsys):
    plan = check_launch(to_train_config(compose_cfg([])))
    out = capsys.readouterr()
    assert plan is not None and plan.fits
    assert out.out.count("\n") == 1 and out.out.startswith("dynalign: launch plan fits:") and out.err == ""


def test_enforce_false_warns_and_goes_on(compose_cfg, capsys):
    cfg = to_train_config(compose_cfg(["plan.device_memory_gib=0.01", "plan.enforce=false"]))
    plan = check_launch(cfg)
    err = capsys.readouterr().err
    assert plan is not None and not plan.fits
    assert err.startswith("dynalign: warning: launch plan does not fit") and "going on" in err


def test_a_model_it_cannot_size(compose_cfg, capsys):
    with pytest.raises(ConfigError) as err:
        model_shape(ModelConfig(name_or_path="someorg/not-a-model-anyone-cached"))
    assert err.value.key == "model.name_or_path"
    cfg = to_train_config(compose_cfg(["model.name_or_path=someorg/not-a-model-anyone-cached"]))
    assert check_launch(cfg) is None  # training goes on, unchecked, and says so
    assert "launch plan skipped" in capsys.readouterr().out


def test_a_local_model_is_counted_from_its_weight_files(tiny_model_path):
    from transformers import AutoModelForCausalLM

    shape = model_shape(ModelConfig(name_or_path=str(tiny_model_path)))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert shape.num_params == model.num_parameters()
    assert shape.largest_layer_params == max(p.numel() for p in model.parameters())
    spec = model_shape(ModelConfig())  # model=tiny, from its spec, nothing built
    assert replace(spec, source="") == replace(shape, source="")


@pytest.mark.parametrize("leaf", [True, False])
def test_zero3_gathers_a_whole_decoder_layer_with_leaf_layers(compose_cfg, tiny_model_path, leaf):
    """The tiny model's decoder layer (147,712 parameters) outweighs its largest tensor (the
    embedding, 131,072): gathered whole with leaf layers, the embedding is the most without."""
    plan, _ = _plan(compose_cfg, [f"model.name_or_path={tiny_model_path}", "deepspeed=zero3",
                                  "model.lora.enabled=false", f"deepspeed.stage3_leaf_layers={leaf}"])
    assert (plan.shape.decoder_layer_params, plan.shape.largest_layer_params) == (147_712, 131_072)
    gathered = next(t for t in plan.terms if t.name == "ZeRO-3 gathered layer")
    assert gathered.bytes == (147_712 if leaf else 131_072) * 4 * 2  # float32 weight and gradient


def test_plan_values_are_validated(compose_cfg):
    for override, key in (("plan.margin=1.5", "plan.margin"), ("plan.world_size=0", "plan.world_size"),
                          ("plan.device_memory_gib=-1", "plan.device_memory_gib")):
        with pytest.raises(ConfigError) as err:
            to_train_config(compose_cfg([override]))
        assert err.value.key == key


def test_quiet_hydra_overrides_go_before_the_users():
    quiet = list(QUIET_HYDRA)
    assert quiet_argv(["plan"]) == ["plan", *quiet]
    assert quiet_argv(["plan", "a=1", "--cfg", "job"]) == ["plan", *quiet, "a=1", "--cfg", "job"]
    assert quiet_argv(["plan", "--cfg", "job", "a=1"]) == ["plan", "--cfg", "job", *quiet, "a=1"]
    assert quiet_argv(["plan", "--info"]) == ["plan", *quiet, "--info"]


def test_sampler_log_probs_from_generate_add_their_logits(compose_cfg):
    base = [*LLAMA, "model.lora.enabled=true", "rollout.temperature=1.0"]
    plain, _ = _plan(compose_cfg, base)
    corrected, _ = _plan(compose_cfg, [*base, "grpo.sampler_is_correction=true"])
    added = [t for t in corrected.terms if t not in plain.terms]
    cfg = corrected.cfg
    rows = min(cfg.rollout.batch_size, cfg.grpo.prompts_per_step * cfg.grpo.group_size)
    # every step's logits (bf16) and a float32 copy: rows x C x vocab x (2 + 4) bytes
    expected = rows * cfg.grpo.max_completion_length * corrected.shape.vocab_size * (2 + 4)
    assert [(t.bytes, t.phases) for t in added] == [(expected, ("rollout",))]
