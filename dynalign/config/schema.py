"""The config groups but ``generator`` (:mod:`dynalign.config.generator`) and the run itself.

Each field is typed and documented here once; the YAML files hold values. Names that pick a
variant (a loss, a sampler, a judge source...) are checked against the registry that maps them
to code, imported inside ``validate()`` so this module loads without torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from dynalign.config.checks import ConfigError, choice, finite, in_range, positive, require
from dynalign.config.generator import GeneratorConfig

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION = ("sdpa", "eager", "flash_attention_2")
WANDB_MODES = ("auto", "online", "offline", "disabled")
ARTIFACT_MODES = ("reference", "upload", "none")
OFFLOAD_DEVICES = ("none", "cpu")
RESUME_MODES = ("never", "auto")
# ``model.name_or_path`` values dynalign builds on this machine instead of loading them; the
# builders live in dynalign.models.EMBEDDED_MODELS (torch), kept in step with this list by a test.
EMBEDDED_MODEL_NAMES = ("tiny", "gemma3_270m")


# --------------------------------------------------------------------------- model


@dataclass
class TinyModelConfig:
    """Shape of the embedded tiny model, built locally (no hub) when ``model.name_or_path=tiny``."""

    seed: int = 0  # same seed -> byte-identical weights and tokenizer files
    cache_dir: Optional[str] = None  # where it is built; None -> $DYNALIGN_CACHE or ~/.cache/dynalign
    vocab_size: int = 1024  # byte-level BPE vocabulary trained on Python's standard library sources
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 2  # head_dim = hidden_size / heads; vLLM's CPU kernels need 64
    num_key_value_heads: int = 1
    max_position_embeddings: int = 2048

    def validate(self, key: str) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            positive(getattr(self, name), f"{key}.{name}")
        require(self.vocab_size >= 300, f"{key}.vocab_size",
                 f"must be >= 300 (256 bytes + special tokens; got {self.vocab_size})")
        require(self.hidden_size % self.num_attention_heads == 0, f"{key}.num_attention_heads",
                 f"must divide hidden_size={self.hidden_size} (got {self.num_attention_heads})")
        require(self.num_attention_heads % self.num_key_value_heads == 0,
                 f"{key}.num_key_value_heads",
                 f"must divide num_attention_heads={self.num_attention_heads} "
                 f"(got {self.num_key_value_heads})")


@dataclass
class LoraConfig:
    """LoRA adapters through peft; off by default (full fine-tuning)."""

    enabled: bool = False
    r: int = 16  # adapter rank
    alpha: int = 32  # scaling numerator: updates are scaled by alpha / r
    dropout: float = 0.0
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj"])

    def validate(self, key: str) -> None:
        if not self.enabled:
            return
        positive(self.r, f"{key}.r")
        positive(self.alpha, f"{key}.alpha")
        in_range(self.dropout, 0.0, 1.0, f"{key}.dropout", high_open=True)
        require(len(self.target_modules) > 0, f"{key}.target_modules", "must name at least one module")


@dataclass
class ModelConfig:
    """The policy: any causal LM that ``transformers`` loads."""

    name_or_path: str = "tiny"  # hub id or local directory; "tiny" builds the embedded tiny model
    dtype: str = "float32"  # weights and compute dtype: float32 | bfloat16 | float16
    trust_remote_code: bool = False  # run code shipped with a hub model; off unless you trust it
    attn_implementation: str = "sdpa"  # passed to from_pretrained (sdpa | eager | flash_attention_2)
    gradient_checkpointing: bool = False  # trade compute for activation memory
    stop: List[str] = field(default_factory=list)  # end answers here too (a base model's next "Question:")
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self, key: str) -> None:
        require(bool(self.name_or_path.strip()), f"{key}.name_or_path", "must not be empty")
        choice(self.dtype, DTYPES, f"{key}.dtype")
        choice(self.attn_implementation, ATTENTION, f"{key}.attn_implementation")
        require(all(self.stop), f"{key}.stop", f"stop strings must be non-empty (got {self.stop})")
        if self.name_or_path == "tiny":
            self.tiny.validate(f"{key}.tiny")
        self.lora.validate(f"{key}.lora")



# --------------------------------------------------------------------------- judge


@dataclass
class AspectConfig:
    """One scored aspect of a rubric, with a descriptor for each score level."""

    name: str = "???"
    description: str = "???"
    levels: Dict[str, str] = field(default_factory=dict)  # score (as text) -> what that score means
    weight: float = 1.0  # used when the rubric combines aspects with "weighted"


# The judge writes aspect names in its verdict and the parser lower-cases them and turns spaces
# and hyphens into "_" (dynalign.judge.parse.normalize_name): a name not already in that form
# would never match, so every score of its aspect would be a parse failure.
ASPECT_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")


def aspect_levels(aspect: AspectConfig, scale_min: int, scale_max: int,
                  key: str) -> tuple[tuple[int, str], ...]:
    """The ``(score, descriptor)`` anchors of ``aspect``, ascending.

    The one rule for an aspect's name and levels: :meth:`RubricConfig.validate` checks a rubric
    with it and :class:`dynalign.judge.rubric.Rubric` freezes one with it. A
    :class:`ConfigError` names the key (``judge.rubric.aspects.0.levels.7``).
    """
    require(bool(ASPECT_NAME.match(aspect.name)), f"{key}.name",
            f"must be a lowercase identifier like 'knowledge': a-z, 0-9 and _ (got {aspect.name!r})")
    levels: dict[int, str] = {}
    for raw, text in aspect.levels.items():
        level = f"{key}.levels.{raw}"
        score = _score(raw)
        if score is None or not scale_min <= score <= scale_max:
            raise ConfigError(level, f"level keys must be integer scores in [{scale_min}, {scale_max}] "
                                     f"(got {raw!r})")
        require(score not in levels, level, f"score {score} has two levels")
        levels[score] = str(text).strip()
    return tuple(sorted(levels.items()))


def _score(raw: Any) -> Optional[int]:
    try:
        return int(str(raw).strip())
    except ValueError:
        return None


@dataclass
class RubricConfig:
    """A value written down as aspects to score; rubrics are data, add one with a YAML file."""

    name: str = "???"
    description: str = ""  # the value in a paragraph, shown to the judge
    scale_min: int = 0
    scale_max: int = 5
    combine: str = "mean"  # how aspect scores become one reward: mean | weighted | min
    aspects: List[AspectConfig] = field(default_factory=list)

    def validate(self, key: str) -> None:
        """Everything :class:`dynalign.judge.rubric.Rubric` needs, so a bad rubric fails here."""
        finite(self, key)  # also for a rubric loaded from a file, outside a TrainConfig
        require(self.scale_max > self.scale_min, f"{key}.scale_max",
                 f"must be > scale_min={self.scale_min} (got {self.scale_max})")
        from dynalign.judge.rubric import COMBINE_FUNCTIONS

        choice(self.combine, COMBINE_FUNCTIONS, f"{key}.combine")
        require(len(self.aspects) > 0, f"{key}.aspects", "a rubric needs at least one aspect")
        names = [a.name for a in self.aspects]
        require(len(set(names)) == len(names), f"{key}.aspects", f"duplicate aspect names {names}")
        for i, aspect in enumerate(self.aspects):
            aspect_levels(aspect, self.scale_min, self.scale_max, f"{key}.aspects.{i}")
            require(aspect.weight >= 0, f"{key}.aspects.{i}.weight",
                     f"must be >= 0 (got {aspect.weight})")
        require(self.combine != "weighted" or sum(a.weight for a in self.aspects) > 0, f"{key}.aspects",
                "combine=weighted needs at least one weight > 0")


@dataclass
class ExternalJudgeConfig:
    """A judge that is not the policy: a local model or an OpenAI-compatible endpoint."""

    backend: str = "hf"  # hf | vllm | openai
    model: str = "tiny"  # local path / hub id (hf, vllm) or served model name (openai)
    base_url: Optional[str] = None  # openai: e.g. http://localhost:8000/v1
    api_key_env: str = "OPENAI_API_KEY"  # openai: environment variable holding the key
    timeout_s: float = 60.0
    max_retries: int = 3
    concurrency: int = 16  # simultaneous requests to the endpoint

    def validate(self, key: str) -> None:
        from dynalign.judge.external import EXTERNAL_JUDGES

        choice(self.backend, EXTERNAL_JUDGES, f"{key}.backend")
        if self.backend == "openai":
            require(bool(self.base_url), f"{key}.base_url", "required when backend=openai")
        positive(self.timeout_s, f"{key}.timeout_s")
        require(self.max_retries >= 0, f"{key}.max_retries", f"must be >= 0 (got {self.max_retries})")
        positive(self.concurrency, f"{key}.concurrency")


@dataclass
class JudgeConfig:
    """Who scores the candidates, how, and against which rubric."""

    source: str = "self"  # self (current policy) | frozen (the policy as the iteration began) | external
    mode: str = "generate"  # generate: parse k sampled verdicts | logprob: expected score
    num_samples: int = 1  # generate mode: verdicts sampled per candidate, NaN-aware mean
    temperature: float = 0.7  # generate mode sampling temperature
    max_new_tokens: int = 256  # room for the judge's reasoning plus its verdict
    rubric: RubricConfig = field(default_factory=RubricConfig)
    external: ExternalJudgeConfig = field(default_factory=ExternalJudgeConfig)

    def validate(self, key: str) -> None:
        from dynalign.judge.factory import JUDGE_SOURCE_BUILDERS
        from dynalign.judge.scoring import SCORING_MODES

        choice(self.source, JUDGE_SOURCE_BUILDERS, f"{key}.source")
        choice(self.mode, SCORING_MODES, f"{key}.mode")
        positive(self.num_samples, f"{key}.num_samples")
        require(self.temperature >= 0, f"{key}.temperature", f"must be >= 0 (got {self.temperature})")
        positive(self.max_new_tokens, f"{key}.max_new_tokens")
        self.rubric.validate(f"{key}.rubric")
        if self.source == "external":
            self.external.validate(f"{key}.external")


# ---------------------------------------------------------------------------- grpo


@dataclass
class GRPOConfig:
    """Group Relative Policy Optimization: the update rule and its batch geometry."""

    lr: float = 1e-5  # peak learning rate of AdamW
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warmup, then constant
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables
    group_size: int = 4  # G: answers sampled per prompt; advantages are relative within a group
    prompts_per_step: int = 4  # prompts per optimizer step; the step sees prompts_per_step * G answers
    micro_batch_size: int = 4  # sequences per forward/backward on one rank (gradient accumulation)
    max_prompt_length: int = 256  # prompts are left-truncated to this many tokens
    max_completion_length: int = 32  # new tokens per answer; also dr_grpo's normaliser
    loss_type: str = "grpo"  # aggregation of the per-token loss; see dynalign.grpo.POLICY_LOSSES
    clip_eps_low: float = 0.2  # ratio clipped below at 1 - clip_eps_low
    clip_eps_high: float = 0.2  # ratio clipped above at 1 + clip_eps_high (DAPO: 0.28)
    dual_clip: Optional[float] = None  # c > 1 bounds the loss of negative advantages at c * |A|
    beta: float = 0.0  # weight of the KL penalty to the reference model; 0 loads no reference
    kl_estimator: str = "k3"  # k1 | k2 | k3 (Schulman's estimators)
    scale_rewards: str = "group"  # advantage scale: group std | batch std | none (Dr. GRPO)
    num_iterations: int = 1  # mu: optimizer passes over each batch of rollouts
    dynamic_sampling: bool = False  # drop groups whose rewards have zero spread (counted)
    mask_truncated: bool = False  # exclude answers that hit max_completion_length from the loss
    # Off-policy correction of the sampler's drift: weight each token's policy term by
    # min(exp(trainer logp - sampler logp), sampler_is_cap) (truncated importance sampling).
    # The sampler's log-probs are then requested with the rollouts; the mismatch
    # (train/sampler_logp_abs_diff, train/sampler_ratio_max, ...) is logged every step whenever
    # the sampler returns them (always with rollout=vllm).
    sampler_is_correction: bool = False
    sampler_is_cap: float = 2.0  # largest IS weight (>= 1); caps the variance a rare token adds
    # Training forwards read each prompt once: its answers share one packed row under a block
    # mask (dynalign.packing), not one padded row each. Same log-probs up to float rounding.
    # Models whose attention takes no custom mask (flash attention) read padded rows anyway.
    pack_groups: bool = True
    pack_max_tokens: int = 4096  # longest packed row (its attention is dense: cost ~ length^2)

    def validate(self, key: str) -> None:
        from dynalign import grpo  # the registries are the single source of valid names

        positive(self.lr, f"{key}.lr")
        require(self.weight_decay >= 0, f"{key}.weight_decay", f"must be >= 0 (got {self.weight_decay})")
        require(self.warmup_steps >= 0, f"{key}.warmup_steps", f"must be >= 0 (got {self.warmup_steps})")
        require(self.max_grad_norm >= 0, f"{key}.max_grad_norm",
                 f"must be >= 0 (got {self.max_grad_norm})")
        require(self.group_size >= 2, f"{key}.group_size",
                 f"must be >= 2: advantages compare answers within a group (got {self.group_size})")
        positive(self.prompts_per_step, f"{key}.prompts_per_step")
        positive(self.micro_batch_size, f"{key}.micro_batch_size")
        positive(self.max_prompt_length, f"{key}.max_prompt_length")
        positive(self.max_completion_length, f"{key}.max_completion_length")
        choice(self.loss_type, grpo.POLICY_LOSSES, f"{key}.loss_type")
        in_range(self.clip_eps_low, 0.0, 1.0, f"{key}.clip_eps_low", high_open=True)
        in_range(self.clip_eps_high, 0.0, 1.0, f"{key}.clip_eps_high", high_open=True)
        if self.dual_clip is not None:
            require(self.dual_clip > 1.0, f"{key}.dual_clip", f"must be > 1 (got {self.dual_clip})")
        require(self.beta >= 0, f"{key}.beta", f"must be >= 0 (got {self.beta})")
        choice(self.kl_estimator, grpo.KL_ESTIMATORS, f"{key}.kl_estimator")
        choice(self.scale_rewards, grpo.ADVANTAGE_SCALES, f"{key}.scale_rewards")
        require(self.num_iterations >= 1, f"{key}.num_iterations",
                 f"must be >= 1 (got {self.num_iterations})")
        require(self.sampler_is_cap >= 1.0, f"{key}.sampler_is_cap",
                 f"must be >= 1: a cap below 1 would shrink on-policy tokens (got {self.sampler_is_cap})")
        positive(self.pack_max_tokens, f"{key}.pack_max_tokens")

    @property
    def sequences_per_step(self) -> int:
        return self.prompts_per_step * self.group_size


# ------------------------------------------------------------------------- rollout


@dataclass
class VLLMConfig:
    """Options of the colocated vLLM engine (``rollout=vllm``)."""

    gpu_memory_utilization: float = 0.3  # share of GPU memory vLLM may take (weights + KV cache)
    # GPUs per engine. Under torchrun/srun every rank runs an engine on its own device
    # (external_launcher) and each group of this many consecutive ranks, within a node, shares one
    # tensor-parallel engine (their requests are pooled); alone, vLLM starts its own workers.
    tensor_parallel_size: int = 1
    enable_sleep_mode: bool = False  # free vLLM's memory from the reference pass to the weight sync
    sync_bucket_mib: int = 512  # weight sync: gathered weights copied into the engine per bucket
    enforce_eager: bool = False  # no CUDA graphs / torch.compile: starts faster, decodes slower
    enable_prefix_caching: bool = True  # the G answers of a prompt share its KV cache
    kv_cache_space_gib: float = 1.0  # CPU builds: KV cache size (VLLM_CPU_KVCACHE_SPACE)
    max_model_len: Optional[int] = None  # None -> max_prompt_length + max_completion_length

    def validate(self, key: str) -> None:
        require(0.0 < self.gpu_memory_utilization <= 1.0, f"{key}.gpu_memory_utilization",
                 f"must be in (0, 1] (got {self.gpu_memory_utilization})")
        positive(self.tensor_parallel_size, f"{key}.tensor_parallel_size")
        positive(self.sync_bucket_mib, f"{key}.sync_bucket_mib")
        positive(self.kv_cache_space_gib, f"{key}.kv_cache_space_gib")


@dataclass
class RolloutConfig:
    """How answers are sampled from the policy."""

    backend: str = "hf"  # hf: transformers generate (anywhere) | vllm: colocated vLLM engine
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    batch_size: int = 64  # hf: sequences per generate call
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    def validate(self, key: str) -> None:
        from dynalign.rollout import SAMPLERS

        choice(self.backend, SAMPLERS, f"{key}.backend")
        positive(self.temperature, f"{key}.temperature")
        require(0.0 < self.top_p <= 1.0, f"{key}.top_p", f"must be in (0, 1] (got {self.top_p})")
        require(self.top_k >= 0, f"{key}.top_k", f"must be >= 0 (got {self.top_k})")
        positive(self.batch_size, f"{key}.batch_size")
        if self.backend == "vllm":
            self.vllm.validate(f"{key}.vllm")


# ----------------------------------------------------------------------- deepspeed


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed ZeRO training core; options map onto DeepSpeed's JSON config."""

    stage: int = 3  # ZeRO stage: 0, 1, 2 or 3 (3 partitions parameters too)
    offload_optimizer: str = "none"  # none | cpu
    offload_param: str = "none"  # none | cpu (stage 3 only)
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    # ZeRO-3 fetches and releases each decoder layer's parameters together, with one pair of hooks
    # per layer instead of one per linear and norm (see dynalign.zero.leaf_layers)
    stage3_leaf_layers: bool = True
    extra: Dict[str, Any] = field(default_factory=dict)  # merged last into the DeepSpeed JSON config

    def validate(self, key: str) -> None:
        choice(self.stage, (0, 1, 2, 3), f"{key}.stage")
        choice(self.offload_optimizer, OFFLOAD_DEVICES, f"{key}.offload_optimizer")
        choice(self.offload_param, OFFLOAD_DEVICES, f"{key}.offload_param")
        require(self.offload_param == "none" or self.stage == 3, f"{key}.offload_param",
                 f"parameter offload needs stage 3 (stage is {self.stage})")
        positive(self.reduce_bucket_size, f"{key}.reduce_bucket_size")


# --------------------------------------------------------------------- distributed


@dataclass
class DistributedConfig:
    """The process group of a launch of several ranks (torchrun, the deepspeed launcher, srun).

    A collective waits for every rank, and while rank 0 works alone (evaluating, writing a prompt
    set, exporting) the others wait in one. A full evaluation of an 8B model (answers, pointwise
    and pairwise judging, lm-eval tasks) takes most of an hour on one GPU, hence two hours by
    default; DeepSpeed's own default (10 min) would end such a run.
    """

    timeout_minutes: float = 120.0  # a collective still waiting for a rank after this long fails the run

    def validate(self, key: str) -> None:
        positive(self.timeout_minutes, f"{key}.timeout_minutes")


# -------------------------------------------------------------------------- logger


@dataclass
class LoggerConfig:
    """Experiment tracking. A local JSONL mirror is always written besides."""

    backend: str = "wandb"  # wandb | none
    project: str = "dynalign"
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    # auto: online when W&B finds credentials (WANDB_API_KEY, `wandb login`, its settings) for its
    # host, offline without | online | offline | disabled
    mode: str = "auto"
    job_type: str = "train"
    group: Optional[str] = None  # None -> the Hydra sweep, so all runs of one -m sweep share a group
    init_timeout_s: float = 60.0  # give up on W&B after this long and train on (JSONL mirror only)
    log_samples_every: int = 1  # steps between appends to the run's samples table; 0 disables
    samples_per_log: int = 8  # rows appended per step
    # W&B artifacts of each iteration's prompts, export and evaluation: reference (file:// links to
    # the run directory, nothing uploaded) | upload (the files themselves) | none
    artifacts: str = "reference"

    def validate(self, key: str) -> None:
        from dynalign.tracking import TRACKERS

        choice(self.backend, TRACKERS, f"{key}.backend")
        choice(self.mode, WANDB_MODES, f"{key}.mode")
        choice(self.artifacts, ARTIFACT_MODES, f"{key}.artifacts")
        require(self.log_samples_every >= 0, f"{key}.log_samples_every",
                 f"must be >= 0 (got {self.log_samples_every})")
        require(self.samples_per_log >= 0, f"{key}.samples_per_log",
                 f"must be >= 0 (got {self.samples_per_log})")


# ---------------------------------------------------------------------------- eval


@dataclass
class EvalConfig:
    """Evaluation of alignment (external judge) and capability (lm-evaluation-harness)."""

    every_n_iterations: int = 0  # run evaluation during training every N iterations; 0: never
    num_prompts: int = 50  # CA prompts evaluated (curated set first, then held-out generated ones)
    max_new_tokens: int = 128
    batch_size: int = 8  # prompts per answer and judge call; ranks share whole batches, each seeded by index
    pairwise: bool = True  # also judge against the base model, both orders
    bootstrap_samples: int = 1000  # resamples for the 95% intervals
    lm_eval_tasks: List[str] = field(default_factory=list)  # lm-evaluation-harness task names
    lm_eval_limit: Optional[int] = None  # rows per task; None: all
    lm_eval_batch_size: int = 8
    lm_eval_num_fewshot: Optional[int] = None  # None: each task's own default
    lm_eval_include_path: Optional[str] = None  # extra directory of lm-eval task YAMLs
    # lm-eval prompts through the tokenizer's chat template; None: on for an instruct/chat `model`
    # (its name says Instruct, chat or -it) whose tokenizer has one, off for base models
    lm_eval_chat_template: Optional[bool] = None
    lm_eval_fewshot_as_multiturn: Optional[bool] = None  # few-shot examples as chat turns; None: as above
    lm_eval_system_instruction: Optional[str] = None  # put before every lm-eval prompt (chat: a system turn)
    lm_eval_backend: Optional[str] = None  # hf | vllm; None: vllm with rollout=vllm on a GPU, else hf
    # non-inferiority margin, in each task's main-metric units (0.02: two accuracy points): a task's
    # capability is "preserved" when the 95% interval of policy - baseline lies above -margin
    capability_margin: float = 0.02
    baseline: Optional[str] = None  # pairwise + lm-eval baseline: HF dir, run dir or hub id; None: base
    dataset: Optional[str] = None  # held-out prompts: eval split of this dataset; None: generator.dataset
    prompts_file: Optional[str] = None  # curated prompts YAML; None: dynalign/data/ca_eval_prompts.yaml
    rubric: str = "ca_rubric"  # external judge's rubric: shipped name (conf/judge/NAME.yaml) or YAML path
    judge_mode: Optional[str] = None  # external judge scoring: generate | logprob; None: judge.mode
    judge_max_new_tokens: Optional[int] = None  # external judge's room to reason; None: judge.max_new_tokens
    temperature: float = 0.0  # answer sampling; 0: greedy (repeatable)
    self_judge: bool = True  # calibration: the policy also scores its answers with judge.rubric
    judge: ExternalJudgeConfig = field(default_factory=ExternalJudgeConfig)

    def validate(self, key: str) -> None:
        require(self.every_n_iterations >= 0, f"{key}.every_n_iterations",
                 f"must be >= 0 (got {self.every_n_iterations})")
        positive(self.num_prompts, f"{key}.num_prompts")
        positive(self.max_new_tokens, f"{key}.max_new_tokens")
        positive(self.batch_size, f"{key}.batch_size")
        require(self.bootstrap_samples >= 0, f"{key}.bootstrap_samples",
                 f"must be >= 0 (got {self.bootstrap_samples})")
        if self.lm_eval_limit is not None:
            positive(self.lm_eval_limit, f"{key}.lm_eval_limit")
        positive(self.lm_eval_batch_size, f"{key}.lm_eval_batch_size")
        require(self.capability_margin >= 0, f"{key}.capability_margin",
                f"must be >= 0 (got {self.capability_margin})")
        if self.judge_mode is not None:
            from dynalign.judge.scoring import SCORING_MODES

            choice(self.judge_mode, SCORING_MODES, f"{key}.judge_mode")
        if self.judge_max_new_tokens is not None:
            positive(self.judge_max_new_tokens, f"{key}.judge_max_new_tokens")
        require(self.temperature >= 0, f"{key}.temperature", f"must be >= 0 (got {self.temperature})")
        if self.lm_eval_num_fewshot is not None:
            require(self.lm_eval_num_fewshot >= 0, f"{key}.lm_eval_num_fewshot",
                     f"must be >= 0 (got {self.lm_eval_num_fewshot})")
        require(not (self.lm_eval_fewshot_as_multiturn and self.lm_eval_chat_template is False),
                f"{key}.lm_eval_fewshot_as_multiturn", "few-shot turns need the chat template: "
                f"{key}.lm_eval_chat_template is false")
        if self.lm_eval_backend is not None:
            from dynalign.eval.lm_harness import LM_EVAL_BACKENDS

            choice(self.lm_eval_backend, LM_EVAL_BACKENDS, f"{key}.lm_eval_backend")
        self.judge.validate(f"{key}.judge")


# --------------------------------------------------------------------------- plan


@dataclass
class PlanConfig:
    """The launch plan: per-rank memory estimated before anything loads (dynalign.plan)."""

    enforce: bool = True  # refuse a launch whose plan does not fit; false: print it, warn and go on
    world_size: Optional[int] = None  # ranks to plan for; None: the launcher's (training always uses it)
    ranks_per_node: Optional[int] = None  # ranks sharing a host's RAM; None: LOCAL_WORLD_SIZE or world_size
    device_memory_gib: Optional[float] = None  # accelerator memory per rank; None: CUDA's, or host RAM on CPU
    host_memory_gib: Optional[float] = None  # RAM of one node; None: this machine's
    margin: float = 0.1  # share added to the device estimate for allocator fragmentation

    def validate(self, key: str) -> None:
        for name in ("world_size", "ranks_per_node", "device_memory_gib", "host_memory_gib"):
            value = getattr(self, name)
            if value is not None:
                positive(value, f"{key}.{name}")
        in_range(self.margin, 0.0, 1.0, f"{key}.margin", high_open=True)


# --------------------------------------------------------------------------- train


@dataclass
class TrainConfig:
    """One Dynamic Alignment run: ``iterations`` x ``steps_per_iteration`` GRPO steps."""

    model: ModelConfig = field(default_factory=ModelConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    iterations: int = 2  # Dynamic Alignment iterations
    steps_per_iteration: int = 2  # GRPO optimizer steps per iteration
    seed: int = 0
    resume: str = "never"  # never | auto (latest checkpoint of the run dir) | a checkpoint path
    overwrite: bool = False  # resume=never where an earlier run left files: delete them (true) or refuse
    checkpoints_to_keep: int = 2  # newest K checkpoints are kept
    # false: when the run ends, its checkpoints drop DeepSpeed's optimizer and module states (12
    # bytes a trainable parameter, more below ZeRO-3); the final weights are the last iter_<k>/
    # export, and the run can no longer be resumed (a new run starts from that export)
    checkpoint_optimizer_at_end: bool = True
    update_reference_each_iteration: bool = True  # move the KL reference to the policy per iteration
    export_each_iteration: bool = True  # write a Hugging Face directory iter_<k>/ after iteration k
    checkpoint: Optional[str] = None  # dynalign.evaluate: an HF model dir or a run dir (newest iter_<k>/)

    def validate(self, world_size: int = 1) -> TrainConfig:
        """Check every group, then the rules that depend on the launch (``world_size``).

        Values only: what needs the filesystem (paths, datasets, rubric files) is checked by
        :func:`dynalign.config.preflight.preflight`, so configs with made-up paths validate.
        """
        finite(self)  # first: a NaN would slip through the range checks below
        for name in ("model", "generator", "judge", "grpo", "rollout", "deepspeed", "distributed", "logger",
                     "eval", "plan"):
            getattr(self, name).validate(name)
        positive(self.iterations, "iterations")
        positive(self.steps_per_iteration, "steps_per_iteration")
        require(self.resume in RESUME_MODES or bool(self.resume.strip()), "resume",
                f"must be one of {RESUME_MODES} or a checkpoint path")
        positive(self.checkpoints_to_keep, "checkpoints_to_keep")
        require(self.checkpoint_optimizer_at_end or self.export_each_iteration, "export_each_iteration",
                "checkpoint_optimizer_at_end=false leaves the final weights in the last iter_<k>/ export "
                "only: set it true")
        require(self.eval.every_n_iterations == 0 or self.export_each_iteration, "export_each_iteration",
                "eval.every_n_iterations > 0 evaluates the exported iter_<k>/ directories: set it true")
        require(self.judge.source != "frozen" or self.iterations == 1 or self.export_each_iteration,
                "export_each_iteration", "judge.source=frozen judges iteration k with the policy exported "
                "when it began (iter_<k>/): set it true")
        require(not self.grpo.sampler_is_correction or self.rollout.temperature == 1.0, "rollout.temperature",
                "grpo.sampler_is_correction compares the sampler's log-probs, which every backend returns "
                f"at temperature 1, with the trainer's at the rollout temperature: set it to 1 "
                f"(got {self.rollout.temperature})")
        require(self.grpo.prompts_per_step % world_size == 0, "grpo.prompts_per_step",
                f"must be a multiple of the world size {world_size}: each rank judges whole groups "
                f"(got {self.grpo.prompts_per_step})")
        tp = self.rollout.vllm.tensor_parallel_size
        require(self.rollout.backend != "vllm" or world_size == 1 or world_size % tp == 0,
                "rollout.vllm.tensor_parallel_size", f"must divide the world size {world_size}: each group "
                f"of that many consecutive ranks shares one engine (got {tp})")
        per_rank = self.grpo.micro_batch_size * world_size
        require(self.grpo.sequences_per_step % per_rank == 0, "grpo.micro_batch_size",
                f"prompts_per_step * group_size = {self.grpo.sequences_per_step} sequences per "
                f"step must split into micro-batches of {self.grpo.micro_batch_size} on "
                f"{world_size} rank(s)")
        return self
