"""The DeepSpeed JSON config, the optimizer and the learning-rate schedule of the policy."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from dynalign.config import ConfigError, DeepSpeedConfig, GRPOConfig


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``override``, recursing into dicts present in both (a new dict)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def gradient_accumulation_steps(grpo: GRPOConfig, world_size: int) -> int:
    """Micro-batches per rank per optimizer step: prompts_per_step * G / (micro_batch_size * W)."""
    per_rank = grpo.micro_batch_size * world_size
    if grpo.sequences_per_step % per_rank:
        raise ConfigError("grpo.micro_batch_size",
                          f"prompts_per_step * group_size = {grpo.sequences_per_step} sequences per step "
                          f"must split into micro-batches of {grpo.micro_batch_size} on {world_size} rank(s)")
    return grpo.sequences_per_step // per_rank


def deepspeed_config(ds: DeepSpeedConfig, grpo: GRPOConfig, dtype: str, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config (a dict) for the policy; ``ds.extra`` is merged last."""
    pin = torch.cuda.is_available()  # pinned host memory needs CUDA
    zero: dict[str, Any] = {"stage": ds.stage, "overlap_comm": ds.overlap_comm,
                            "contiguous_gradients": ds.contiguous_gradients,
                            "reduce_bucket_size": ds.reduce_bucket_size}
    if ds.stage == 3:
        zero["stage3_prefetch_bucket_size"] = ds.stage3_prefetch_bucket_size
        zero["stage3_param_persistence_threshold"] = ds.stage3_param_persistence_threshold
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": pin}
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param, "pin_memory": pin}
    config: dict[str, Any] = {
        "train_batch_size": grpo.sequences_per_step,
        "train_micro_batch_size_per_gpu": grpo.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(grpo, world_size),
        # Stage 0 in float32 clips in the client optimizer (_GuardedAdamW), which also skips.
        "gradient_clipping": 0.0 if _guarded_optimizer(ds, dtype) else grpo.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16", "loss_scale": 0, "initial_scale_power": 16},
        # The client optimizer is torch's AdamW (DeepSpeedCPUAdam under offload on CUDA):
        # no DeepSpeed-built Adam op, so no C++ build on CPU machines.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(config, ds.extra)


def _guarded_optimizer(ds: DeepSpeedConfig, dtype: str) -> bool:
    """Whether DeepSpeed steps the client optimizer bare (no ZeRO, no fp16/bf16 wrapper)."""
    return ds.stage == 0 and dtype == "float32"


def _reference_config(policy_config: dict[str, Any]) -> dict[str, Any]:
    """Optimizer-less config of the reference: ZeRO-3 inference, or stage 0 (replicated) otherwise."""
    config = {key: value for key, value in policy_config.items()
              if key not in ("optimizer", "scheduler", "gradient_clipping")}
    zero = dict(policy_config["zero_optimization"])
    zero.pop("offload_optimizer", None)
    config["zero_optimization"] = zero if zero.get("stage") == 3 else {"stage": 0}
    return config


def warmup_constant(warmup_steps: int) -> Callable[[int], float]:
    """LR factor after ``step`` applied optimizer steps: (step + 1) / warmup, then 1.

    The first step already trains (factor 1 / warmup, not 0); step ``warmup_steps - 1`` reaches
    the peak.
    """

    def factor(step: int) -> float:
        return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)

    return factor


class _GuardedAdamW(torch.optim.AdamW):
    """AdamW that clips by global norm itself and skips a step whose gradients are not finite.

    Used without ZeRO in float32 (stage 0), where DeepSpeed steps the client optimizer directly
    on the full, already averaged gradients (so every rank decides the same) and neither clips
    nor checks them. It exposes ``overflow`` and ``_global_grad_norm`` as DeepSpeed's own
    optimizers do, so the engine counts the skip and reports the norm.
    """

    def __init__(self, params: Any, *, max_grad_norm: float, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self.overflow = False
        self._global_grad_norm: float | None = None

    def step(self, closure: Any = None) -> Any:
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
        self._global_grad_norm = norm
        self.overflow = not math.isfinite(norm)
        if self.overflow:
            self.zero_grad(set_to_none=True)
            return None
        return super().step(closure)


def make_optimizer(model: torch.nn.Module, ds: DeepSpeedConfig, grpo: GRPOConfig,
                   dtype: str) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters of ``model``, in the form the DeepSpeed setup needs."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs: dict[str, Any] = {"lr": grpo.lr, "weight_decay": grpo.weight_decay}
    if ds.offload_optimizer != "none" and torch.cuda.is_available():
        # The optimizer runs on CPU: DeepSpeed's vectorised Adam is several times faster.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    # torch's fused kernel (CPU and CUDA) reads and writes each state once per step; the
    # per-operation path makes seven passes over the ZeRO partition (memory-bound: on Gemma
    # 270M it was half of the update's time on a 2-core CPU)
    kwargs["fused"] = True
    if _guarded_optimizer(ds, dtype):
        return _GuardedAdamW(params, max_grad_norm=grpo.max_grad_norm, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def warmup_scheduler(optimizer: torch.optim.Optimizer, grpo: GRPOConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``grpo.warmup_steps`` optimizer steps, then a constant learning rate."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_constant(grpo.warmup_steps))
