"""Typed configuration: the one place where every hyperparameter is declared and documented.

The YAML files under ``conf/`` hold values only. Their structure and types come from the
dataclasses of :mod:`.schema` and :mod:`.generator`, registered in Hydra's ConfigStore as
``train_schema`` (:mod:`.store`), so a wrong type or an unknown key fails while Hydra composes
the config. Rules that relate values to each other (``group_size >= 2``, a known loss name, a
batch that splits over the ranks, every float finite) live in ``validate()`` methods, which read
nothing but the values; what the values point at on disk (models, the checkpoint to resume,
datasets, rubric files) is checked by :mod:`.preflight`. Both run before any model or data is
loaded; every failure is a :class:`ConfigError` naming the full key (:mod:`.checks`).
"""

from dynalign.config.checks import ConfigError
from dynalign.config.generator import GeneratorConfig, GeneratorEndpointConfig, parse_model_spec
from dynalign.config.schema import (
    ASPECT_NAME,
    DTYPES,
    EMBEDDED_MODEL_NAMES,
    AspectConfig,
    DeepSpeedConfig,
    DistributedConfig,
    EvalConfig,
    ExternalJudgeConfig,
    GRPOConfig,
    JudgeConfig,
    LoggerConfig,
    LoraConfig,
    ModelConfig,
    RolloutConfig,
    RubricConfig,
    TinyModelConfig,
    TrainConfig,
    VLLMConfig,
    aspect_levels,
)
from dynalign.config.store import (
    CONF_DIR,
    EXPERIMENTS_DIR,
    REPO_ROOT,
    register_configs,
    register_experiments,
    to_train_config,
)

__all__ = [
    "ASPECT_NAME", "CONF_DIR", "DTYPES", "EMBEDDED_MODEL_NAMES", "EXPERIMENTS_DIR", "REPO_ROOT",
    "AspectConfig", "ConfigError", "DeepSpeedConfig", "EvalConfig", "ExternalJudgeConfig", "GRPOConfig",
    "GeneratorConfig", "GeneratorEndpointConfig", "JudgeConfig", "LoggerConfig", "LoraConfig", "ModelConfig",
    "RolloutConfig", "RubricConfig", "TinyModelConfig", "TrainConfig", "VLLMConfig", "aspect_levels",
    "parse_model_spec", "register_configs", "register_experiments", "to_train_config",
    "DistributedConfig",
]
