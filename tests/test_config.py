"""Every shipped config composes into the schema; bad values fail naming their key."""

from __future__ import annotations

import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from dynalign.config import CONF_DIR, EXPERIMENTS_DIR, ConfigError, TrainConfig, to_train_config

GROUPS = ("model", "generator", "judge", "grpo", "rollout", "deepspeed", "logger", "eval")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _experiments() -> list[str]:
    return sorted(p.relative_to(EXPERIMENTS_DIR).with_suffix("").as_posix()
                  for p in EXPERIMENTS_DIR.rglob("*.yaml"))


def test_every_group_has_options():
    for group in GROUPS:
        assert _options(group), f"conf/{group}/ has no option"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(compose_cfg, group, option):
    cfg = to_train_config(compose_cfg([f"{group}={option}"]))
    assert isinstance(cfg, TrainConfig)
    assert getattr(cfg, group) is not None


@pytest.mark.parametrize("name", _experiments())
def test_every_experiment_composes(compose_cfg, name):
    assert isinstance(to_train_config(compose_cfg([f"+experiment={name}"])), TrainConfig)


def test_defaults_are_the_embedded_run(compose_cfg):
    cfg = to_train_config(compose_cfg())
    assert cfg.model.name_or_path == "tiny"
    assert cfg.rollout.backend == "hf"
    assert cfg.deepspeed.stage == 3
    # the tiny model's own values (conf/model/tiny.yaml): a short rubric, read by logprob, judged by
    # the policy as the iteration began, a learning rate its random weights move with
    assert (cfg.judge.rubric.name, cfg.judge.mode, cfg.judge.source) == ("ca_compact", "logprob", "frozen")
    assert [a.name for a in cfg.judge.rubric.aspects] == ["knowledge", "benevolence", "power", "vitality"]
    assert cfg.grpo.lr == 3e-2 and cfg.grpo.max_completion_length == 128
    assert (cfg.iterations, cfg.steps_per_iteration) == (1, 12)
    full = to_train_config(compose_cfg(["judge=ca_rubric"])).judge.rubric
    assert all(set(a.levels) == {str(i) for i in range(6)} for a in full.aspects)


def test_model_presets(compose_cfg):
    llama = to_train_config(compose_cfg(["model=llama3_8b"]))
    assert llama.model.name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert llama.model.dtype == "bfloat16"
    # a preset of its own (tests/test_model_presets.py), none of the tiny model's training values
    assert llama.grpo.lr != 3e-2 and llama.judge.source != "frozen"
    judge = llama.judge
    assert (judge.rubric.name, judge.mode, judge.source) == ("ca_rubric", "generate", "self")
    assert to_train_config(compose_cfg(["model=qwen2_5_7b"])).model.name_or_path.startswith("Qwen/")


def test_override_changes_value(compose_cfg):
    cfg = to_train_config(compose_cfg(["grpo.lr=3e-6", "grpo.group_size=8", "judge=hhh_rubric"]))
    assert cfg.grpo.lr == 3e-6 and cfg.grpo.group_size == 8
    assert cfg.judge.rubric.name == "hhh_rubric"


# (overrides, the key the error must name, a fragment of the message)
BAD_CONFIGS = [
    (["grpo.group_size=1"], "grpo.group_size", ">= 2"),
    (["grpo.lr=0"], "grpo.lr", "> 0"),
    (["grpo.lr=-1e-5"], "grpo.lr", "> 0"),
    (["grpo.clip_eps_low=1.0"], "grpo.clip_eps_low", "[0.0, 1.0)"),
    (["grpo.clip_eps_high=-0.1"], "grpo.clip_eps_high", "[0.0, 1.0)"),
    (["grpo.beta=-0.5"], "grpo.beta", ">= 0"),
    (["grpo.loss_type=ppo"], "grpo.loss_type", "dr_grpo"),
    (["grpo.kl_estimator=k4"], "grpo.kl_estimator", "k3"),
    (["grpo.scale_rewards=zscore"], "grpo.scale_rewards", "group"),
    (["grpo.num_iterations=0"], "grpo.num_iterations", ">= 1"),
    (["grpo.pack_max_tokens=0"], "grpo.pack_max_tokens", "> 0"),
    (["grpo.micro_batch_size=3"], "grpo.micro_batch_size", "split"),
    (["rollout.top_p=0"], "rollout.top_p", "(0, 1]"),
    (["judge.rubric.scale_max=0"], "judge.rubric.scale_max", "scale_min"),
    (["judge.source=external", "judge.external.backend=openai"], "judge.external.base_url", "openai"),
    (["model.dtype=float8"], "model.dtype", "bfloat16"),
    (["deepspeed.stage=4"], "deepspeed.stage", "valid"),
    (["deepspeed=zero2", "deepspeed.offload_param=cpu"], "deepspeed.offload_param", "stage 3"),
    (["logger.mode=maybe"], "logger.mode", "offline"),
    (["iterations=0"], "iterations", "> 0"),
    (["+grpo.learning_rate=1e-6"], "grpo.learning_rate", "learning_rate"),
]


@pytest.mark.parametrize("overrides,key,fragment", BAD_CONFIGS, ids=[b[1] for b in BAD_CONFIGS])
def test_bad_config_names_its_key(compose_cfg, overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        to_train_config(compose_cfg(overrides))
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}:")
    assert fragment in str(info.value)


# a name picked from a registry: the error names the key, the bad value and every valid name
UNKNOWN_NAMES = [
    (["rollout.backend=tgi"], "rollout.backend", "'tgi'; valid: hf, vllm"),
    (["judge.mode=vote"], "judge.mode", "'vote'; valid: generate, logprob"),
    (["eval.judge_mode=vote"], "eval.judge_mode", "'vote'; valid: generate, logprob"),
    (["judge.source=human"], "judge.source", "'human'; valid: external, frozen, self"),
    (["judge.source=external", "judge.external.backend=tgi"], "judge.external.backend",
     "'tgi'; valid: hf, openai, vllm"),
    (["eval.judge.backend=tgi"], "eval.judge.backend", "'tgi'; valid: hf, openai, vllm"),
    (["judge.rubric.combine=max"], "judge.rubric.combine", "'max'; valid: mean, min, weighted"),
    (["logger.backend=mlflow"], "logger.backend", "'mlflow'; valid: none, wandb"),
]


@pytest.mark.parametrize("overrides,key,listing", UNKNOWN_NAMES, ids=[u[1] for u in UNKNOWN_NAMES])
def test_unknown_name_lists_the_valid_ones(compose_cfg, overrides, key, listing):
    with pytest.raises(ConfigError) as info:
        to_train_config(compose_cfg(overrides))
    assert info.value.key == key
    assert str(info.value) == f"{key}: unknown value {listing}"


@pytest.mark.parametrize("override,key", [
    ("grpo.group_size=abc", "grpo.group_size"),
    ("grpo.learning_rate=1e-6", "grpo.learning_rate"),
    ("model.lora.r=big", "model.lora.r"),
])
def test_wrong_type_or_unknown_key_fails_at_compose(compose_cfg, override, key):
    with pytest.raises((HydraException, OmegaConfBaseException)) as info:
        compose_cfg([override])
    assert key in str(info.value) or key in str(info.value.__cause__)


def test_unknown_group_option_lists_the_valid_ones(compose_cfg):
    with pytest.raises(HydraException) as info:
        compose_cfg(["judge=vibes"])
    assert "ca_rubric" in str(info.value) and "hhh_rubric" in str(info.value)


def test_world_size_rule(compose_cfg):
    cfg = to_train_config(compose_cfg())  # 4 prompts x 4 answers in micro-batches of 4
    cfg.validate(world_size=2)
    with pytest.raises(ConfigError, match="grpo.prompts_per_step"):
        cfg.validate(world_size=3)  # 4 prompts do not split over 3 ranks
    cfg.grpo.micro_batch_size = 3
    with pytest.raises(ConfigError, match="grpo.micro_batch_size"):
        cfg.validate(world_size=2)  # 8 sequences per rank do not split into micro-batches of 3
