"""The training core: a thin stateful object around a DeepSpeed engine (ZeRO-3 by default).

:class:`PolicyEngine` owns the policy (and, when ``grpo.beta > 0``, the KL reference), the
optimizer, the learning-rate schedule and the checkpoints. It holds no algorithm: log-probs
and losses come from :mod:`dynalign.grpo`, and the loop decides what to train on.

Contracts
---------
* **One process per rank.** Every public method is *collective* (all ranks call it, in the
  same order, with their own rows): ZeRO-3 gathers parameters on every forward, and the
  exports gather one parameter at a time. The loop gives each rank its own share of the rows
  (:meth:`TrainBatch.shard`).
* **One call to** :meth:`PolicyEngine.train_step` **is one optimizer step** over the rows it is
  given, whatever their number: they are cut into micro-batches of ``grpo.micro_batch_size``
  and the last one closes the accumulation (``set_gradient_accumulation_boundary``). Ranks
  with fewer micro-batches run zero-weight ones, so the collectives stay matched.
* **Gradient scaling.** DeepSpeed divides each micro-batch loss by the configured gradient
  accumulation steps (GAS) and averages gradients over the W ranks. Each loss type normalises
  by some count of *units* (``_LOSS_UNITS``): sequences with >= 1 token (grpo, gspo), tokens
  (bnpo), rows (dr_grpo). Micro-batch ``i`` is therefore back-propagated as
  ``loss_i * GAS * W * units_i / units_total`` (``units_total`` all-reduced over ranks), which
  makes the step's gradient the gradient of the loss of the whole optimizer batch under that
  aggregation -- independent of micro-batch size and world size. dapo is normalised by the
  whole batch's token count already (``total_tokens`` is all-reduced and passed in), so its
  factor is ``GAS * W``.
* **Non-finite steps are skipped.** A micro-batch whose loss is not finite is back-propagated
  multiplied by NaN, so its gradient is NaN everywhere it reaches; DeepSpeed's ZeRO optimizer
  then finds a non-finite global gradient norm (all-reduced, so every rank agrees), discards
  the gradients and leaves weights, optimizer and LR schedule untouched (stage 0 in float32 uses
  :class:`_GuardedAdamW` for the same effect). The skip is counted in ``skipped_steps``.
* **Reference model.** Loaded only when ``grpo.beta > 0``. Full fine-tuning: a second copy of
  the model, frozen, partitioned like the policy under ZeRO-3 (an optimizer-less
  ``deepspeed.initialize``; a plain replicated module for stages 0-2, as their parameters are
  replicated anyway). LoRA: no second copy -- a frozen second adapter named ``reference`` in
  the same peft model; it starts with ``B = 0`` (so the reference *is* the base model) and
  :meth:`PolicyEngine.update_reference` copies the trained adapter into it (so the reference
  becomes the current policy; adapters are never merged into the base weights).
* **Checkpoints** (:meth:`PolicyEngine.save`): ``<dir>/step_<global_step>/`` holds DeepSpeed's
  files (``*_model_states.pt``, one ``zero_pp_rank_<r>_*_optim_states.pt`` per rank: fp32
  master weights, AdamW moments, LR scheduler, DeepSpeed counters), ``rng_rank<r>.pt``
  (python, numpy, torch CPU and CUDA generators of each rank), ``dynalign_state.json`` (engine
  counters, world size and the caller's JSON ``client_state``: iteration, step, data
  position) and, once :meth:`PolicyEngine.update_reference` has moved it, ``reference/``
  (safetensors). It is written as ``<dir>/.tmp-step_<n>`` and renamed; ``<dir>/latest`` (the
  tag, DeepSpeed's convention) is replaced atomically last.
* **Exports** use Hugging Face names (those of ``model.state_dict()`` of the plain model,
  ``lm_head.weight`` included for tied embeddings), gather one parameter at a time, and merge
  LoRA on the fly (``W + scale * B @ A``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dynalign import grpo as grpo_ops
from dynalign.config import ConfigError, DeepSpeedConfig, GRPOConfig, ModelConfig, TrainConfig
from dynalign.distributed import all_reduce, barrier, ensure_ds_accelerator, init_distributed
from dynalign.tiny_model import resolve_model_path

ensure_ds_accelerator()  # DS_ACCELERATOR must be set before anything imports deepspeed

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REFERENCE_ADAPTER = "reference"  # LoRA: the frozen adapter that holds the KL reference
POLICY_ADAPTER = "default"  # LoRA: peft's name for the trained adapter
CHECKPOINT_PREFIX = "step_"  # checkpoint directories: <dir>/step_<global_step>
LATEST_FILE = "latest"  # names the newest complete checkpoint (DeepSpeed's convention too)
STATE_FILE = "dynalign_state.json"  # engine counters + the caller's client_state
REFERENCE_DIR = "reference"  # reference weights, saved once update_reference() has moved them
SHARD_BYTES = 4 << 30  # safetensors shard size of export_hf and the saved reference


# --------------------------------------------------------------------------- batch


@dataclass
class TrainBatch:
    """Rollouts for one optimizer step (on one rank: its share of the rows).

    ``N`` rows of a ``P``-token prompt followed by a ``C``-token completion.
    """

    input_ids: Tensor  # [N, P + C] left-padded prompts, then right-padded completions
    attention_mask: Tensor  # [N, P + C] 1 on real tokens
    completion_mask: Tensor  # [N, C] 1 on completion tokens that count in the loss
    advantages: Tensor  # [N]
    old_logprobs: Tensor | None = None  # [N, C] sampling policy; None -> current policy (ratio 1)
    ref_logprobs: Tensor | None = None  # [N, C] reference model; needed when grpo.beta > 0

    def __post_init__(self) -> None:
        n, length = self.input_ids.shape
        c = self.completion_mask.shape[-1]
        if self.attention_mask.shape != (n, length):
            raise ValueError(f"attention_mask {tuple(self.attention_mask.shape)} != input_ids {(n, length)}")
        if self.completion_mask.shape != (n, c) or not 0 < c < length:
            raise ValueError(f"completion_mask must be [N={n}, C] with 0 < C < {length}, "
                             f"got {tuple(self.completion_mask.shape)}")
        if self.advantages.shape != (n,):
            raise ValueError(f"advantages must be [N={n}], got {tuple(self.advantages.shape)}")
        for name in ("old_logprobs", "ref_logprobs"):
            value = getattr(self, name)
            if value is not None and value.shape != (n, c):
                raise ValueError(f"{name} must be [N={n}, C={c}], got {tuple(value.shape)}")

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def completion_length(self) -> int:
        return self.completion_mask.shape[1]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> TrainBatch:
        values = vars(self).items()
        return TrainBatch(**{name: None if value is None else fn(value) for name, value in values})

    def select(self, rows: slice) -> TrainBatch:
        """The rows ``rows`` of every tensor."""
        return self._map(lambda t: t[rows])

    def to(self, device: torch.device | str) -> TrainBatch:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def shard(self, rank: int, world_size: int) -> TrainBatch:
        """Rank ``rank``'s contiguous share of a global batch whose N splits evenly over the ranks."""
        if self.num_rows % world_size:
            raise ValueError(f"{self.num_rows} rows do not split over {world_size} ranks")
        size = self.num_rows // world_size
        return self.select(slice(rank * size, (rank + 1) * size))

    def with_logprobs(self, *, old: Tensor | None = None, ref: Tensor | None = None) -> TrainBatch:
        """A copy with ``old_logprobs`` / ``ref_logprobs`` filled in (None keeps the current value)."""
        return replace(self, old_logprobs=self.old_logprobs if old is None else old,
                       ref_logprobs=self.ref_logprobs if ref is None else ref)


# ------------------------------------------------------------- DeepSpeed JSON config


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


# ------------------------------------------------------------------ loss scaling


def _sequences_with_tokens(mask: Tensor) -> float:
    return float((mask.sum(-1) > 0).sum())


def _tokens(mask: Tensor) -> float:
    return float(mask.sum())


def _rows(mask: Tensor) -> float:
    return float(mask.shape[0])


# What each loss type divides its micro-batch sum by (see the module docstring). None: the loss
# is already normalised by the whole optimizer batch (dapo's total_tokens). Types missing here
# are treated as a mean over rows of the micro-batch (DeepSpeed's default averaging).
_LOSS_UNITS: dict[str, Callable[[Tensor], float] | None] = {
    "grpo": _sequences_with_tokens, "gspo": _sequences_with_tokens, "bnpo": _tokens,
    "dr_grpo": _rows, "dapo": None,
}


# ---------------------------------------------------------------------- helpers


def _is_zero3_param(tensor: Tensor) -> bool:
    return hasattr(tensor, "ds_id")


@contextlib.contextmanager
def _gathered(params: list[Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Full ``params`` inside the block under ZeRO-3 (no-op for ordinary tensors)."""
    zero_params = [p for p in params if _is_zero3_param(p)]
    if not zero_params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero_params, modifier_rank=modifier_rank):
        yield


def _cpu_clone(tensor: Tensor) -> Tensor:
    return tensor.detach().to("cpu", copy=True)


@contextlib.contextmanager
def hf_zero3_init(ds_config: dict[str, Any] | None) -> Iterator[Any]:
    """Make ``from_pretrained`` build partitioned (zero.Init) iff ``ds_config`` is ZeRO-3.

    ``hf_zero3_init(None)`` loads a plain, whole model while a ZeRO-3 engine is alive in the
    process (a judge, a rollout model, a test's comparison).

    Yields the ``HfDeepSpeedConfig`` (None below stage 3); the caller keeps it alive, since
    transformers holds it by weak reference (``generate`` under ZeRO-3 reads it for
    ``synced_gpus``). Another engine's setting in the same process is restored afterwards.
    """
    from transformers.integrations import deepspeed as hf_ds

    previous_ref = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    previous = previous_ref() if previous_ref is not None else None
    hf_config = None
    if ds_config is not None and ds_config["zero_optimization"].get("stage") == 3:
        hf_config = hf_ds.HfDeepSpeedConfig(ds_config)  # registers itself
    else:
        hf_ds.unset_hf_deepspeed_config()
    try:
        yield hf_config
    finally:
        if hf_config is None and previous is not None:
            hf_ds.set_hf_deepspeed_config(previous)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (fsynced)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    """Persist renames inside ``path`` (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checkpoint_step(path: Path) -> int | None:
    suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def write_safetensors_shards(tensors: Iterator[tuple[str, Tensor]], directory: Path,
                             max_shard_bytes: int = SHARD_BYTES) -> None:
    """Stream ``(name, tensor)`` into ``model.safetensors`` (or shards + index) in ``directory``.

    Holds at most one shard in memory. Names and layout follow ``save_pretrained``, so
    ``from_pretrained`` reads the directory.
    """
    from safetensors.torch import save_file

    shard: dict[str, Tensor] = {}
    shard_bytes = 0
    files: list[list[str]] = []  # names per shard, in order
    total = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        save_file(shard, str(directory / f".shard-{len(files):05d}"), metadata={"format": "pt"})
        files.append(list(shard))
        shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[name] = tensor.contiguous()
        shard_bytes += size
        total += size
    if shard or not files:
        flush()
    if len(files) == 1:
        os.replace(directory / ".shard-00000", directory / "model.safetensors")
        return
    weight_map = {}
    for index, names in enumerate(files):
        final = f"model-{index + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(directory / f".shard-{index:05d}", directory / final)
        weight_map.update(dict.fromkeys(names, final))
    index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))


def read_safetensors_dir(directory: Path) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` of a directory written by :func:`write_safetensors_shards`, lazily."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    for file in files:
        with safe_open(str(directory / file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, handle.get_tensor(name)


# ----------------------------------------------------------------------- engine


class PolicyEngine:
    """Policy (+ reference) on a DeepSpeed engine: log-probs, GRPO steps, exports, checkpoints.

    ``temperature`` is the sampling temperature of the rollouts: log-probs are computed from
    logits divided by it. ``seed`` (if not None) seeds python/numpy/torch before the model is
    built, so LoRA initialisation is the same on every rank and in every run.

    Counters: ``global_step`` counts optimizer steps taken (skipped ones included, as
    DeepSpeed's ``global_steps``); ``skipped_steps`` those discarded as non-finite.
    """

    def __init__(self, model: ModelConfig, grpo: GRPOConfig, deepspeed: DeepSpeedConfig, *,
                 temperature: float = 1.0, seed: int | None = 0) -> None:
        import deepspeed as ds

        dist_info = init_distributed()
        self.model_config, self.grpo, self.ds_config = model, grpo, deepspeed
        self.temperature = temperature
        self.rank, self.world_size, self.device = dist_info.rank, dist_info.world_size, dist_info.device
        self.global_step = 0
        self.skipped_steps = 0
        self._reference_updated = False  # False: the reference is the base model
        self.config = deepspeed_config(deepspeed, grpo, model.dtype, self.world_size)
        self._zero3 = self.config["zero_optimization"].get("stage") == 3
        if seed is not None:
            seed_everything(seed)

        self.model_path = resolve_model_path(model)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path,
                                                       trust_remote_code=model.trust_remote_code)
        with hf_zero3_init(self.config) as hf_config:
            self._hf_config = hf_config  # kept alive: transformers holds it by weak reference
            policy = self._load_model()
            if model.gradient_checkpointing:
                policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if model.lora.enabled:
                policy = self._add_lora(policy)
            optimizer = self._make_optimizer(policy)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_constant(grpo.warmup_steps))
            self._engine, _, _, _ = ds.initialize(model=policy, optimizer=optimizer, lr_scheduler=scheduler,
                                                  config=self.config, dist_init_required=False)
            self._reference: Any = None
            if grpo.beta > 0 and not model.lora.enabled:
                self._reference = self._load_reference()

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> PolicyEngine:
        return cls(cfg.model, cfg.grpo, cfg.deepspeed, temperature=cfg.rollout.temperature, seed=cfg.seed)

    # ------------------------------------------------------------------ building

    def _load_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=TORCH_DTYPES[self.model_config.dtype],
            trust_remote_code=self.model_config.trust_remote_code,
            attn_implementation=self.model_config.attn_implementation)
        self._use_cache = model.config.use_cache
        model.config.use_cache = False  # training and scoring never reuse a KV cache
        return model

    def _add_lora(self, model: torch.nn.Module) -> torch.nn.Module:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        lora = self.model_config.lora
        peft_config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                     target_modules=list(lora.target_modules), bias="none",
                                     task_type="CAUSAL_LM")
        model = get_peft_model(model, peft_config)
        if self.grpo.beta > 0:
            model.add_adapter(REFERENCE_ADAPTER, peft_config)
            model.set_adapter(POLICY_ADAPTER)  # trainable; the reference adapter stays frozen
            with torch.no_grad():  # B = 0: the reference starts as the base model
                for name, param in model.named_parameters():
                    if f"lora_B.{REFERENCE_ADAPTER}." in name:
                        param.zero_()
        return model

    def _make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        kwargs = {"lr": self.grpo.lr, "weight_decay": self.grpo.weight_decay}
        if self.ds_config.offload_optimizer != "none" and torch.cuda.is_available():
            # The optimizer runs on CPU: DeepSpeed's vectorised Adam is several times faster.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
        if _guarded_optimizer(self.ds_config, self.model_config.dtype):
            return _GuardedAdamW(params, max_grad_norm=self.grpo.max_grad_norm, **kwargs)
        return torch.optim.AdamW(params, **kwargs)

    def _load_reference(self) -> Any:
        import deepspeed as ds

        reference = self._load_model()
        reference.requires_grad_(False)
        reference.eval()
        engine, _, _, _ = ds.initialize(model=reference, config=_reference_config(self.config),
                                        dist_init_required=False)
        engine.eval()
        return engine

    # ------------------------------------------------------------------ log-probs

    @property
    def module(self) -> torch.nn.Module:
        """The wrapped model (a peft model with LoRA); partitioned under ZeRO-3."""
        return self._engine.module

    def _is_lora(self) -> bool:
        return self.model_config.lora.enabled

    def _micro_slices(self, num_rows: int) -> list[tuple[slice, bool]]:
        """``(rows, real)`` micro-batches; padded with zero-weight repeats to the ranks' maximum count."""
        if num_rows < 1:
            raise ValueError("every rank needs at least one row")
        size = self.grpo.micro_batch_size
        slices = [slice(start, min(start + size, num_rows)) for start in range(0, num_rows, size)]
        count = int(all_reduce(torch.tensor([len(slices)], dtype=torch.int64), op="max").item())
        return [(s, True) for s in slices] + [(slices[0], False)] * (count - len(slices))

    @torch.no_grad()
    def _score(self, forward: Callable[..., Any], batch: TrainBatch) -> Tensor:
        out = torch.empty(batch.num_rows, batch.completion_length, dtype=torch.float32)  # [N, C]
        for rows, real in self._micro_slices(batch.num_rows):
            micro = batch.select(rows).to(self.device)
            logp = grpo_ops.completion_logprobs(forward, micro.input_ids, micro.attention_mask,
                                                batch.completion_length, temperature=self.temperature)
            if real:
                out[rows] = logp.float().cpu()
        return out.to(batch.input_ids.device)

    def policy_logprobs(self, batch: TrainBatch) -> Tensor:
        """Log-probs [N, C] of the completions under the current policy (eval mode, no grad)."""
        self._engine.eval()
        return self._score(self._engine, batch)

    def reference_logprobs(self, batch: TrainBatch) -> Tensor:
        """Log-probs [N, C] of the completions under the KL reference (needs ``grpo.beta > 0``)."""
        if self.grpo.beta <= 0:
            raise RuntimeError("no reference model: it is loaded only when grpo.beta > 0")
        if self._is_lora():
            self._engine.eval()
            with self._reference_adapter():
                return self._score(self._engine, batch)
        return self._score(self._reference, batch)

    @contextlib.contextmanager
    def _reference_adapter(self) -> Iterator[None]:
        """Run the peft model with the frozen reference adapter active, then the policy's again."""
        self.module.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
        try:
            yield
        finally:
            self.module.set_adapter(POLICY_ADAPTER)

    def _reference_pairs(self) -> list[tuple[Tensor, Tensor]]:
        """(policy tensor, reference tensor) pairs that update_reference copies."""
        if self._is_lora():
            params = dict(self.module.named_parameters())
            return [(params[name.replace(f".{REFERENCE_ADAPTER}.", f".{POLICY_ADAPTER}.")], param)
                    for name, param in params.items() if f".{REFERENCE_ADAPTER}." in name]
        policy = dict(self.module.named_parameters())
        return [(policy[name], param) for name, param in self._reference.module.named_parameters()]

    def _reference_tensors(self) -> list[tuple[str, Tensor]]:
        if self._is_lora():
            marker = f".{REFERENCE_ADAPTER}."
            return [(name, p) for name, p in self.module.named_parameters() if marker in name]
        return list(self._reference.module.named_parameters())

    @torch.no_grad()
    def update_reference(self) -> None:
        """Move the KL reference to the current policy (no-op when ``grpo.beta == 0``).

        Full fine-tuning: copies every weight, one gathered parameter at a time under ZeRO-3.
        LoRA: copies the trained adapter into the reference adapter (base weights untouched).
        """
        if self.grpo.beta <= 0:
            return
        for source, target in self._reference_pairs():
            with _gathered([source, target], modifier_rank=0):
                if self.rank == 0 or not _is_zero3_param(target):
                    target.data.copy_(source.data)
        self._reference_updated = True

    # ------------------------------------------------------------------ training

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on this rank's rows of the batch; returns batch-wide statistics.

        Keys: loss (of the whole batch), grad_norm (before clipping; inf when skipped), lr (of
        this step), clip_frac_low, clip_frac_high, ratio_mean, entropy, kl_mean (with
        ref_logprobs), dual_clip_frac (with grpo.dual_clip), tokens (completion tokens of the
        whole batch) and skipped (1.0 when the step was discarded as non-finite). Token-level
        statistics are token-weighted means over the whole batch.
        """
        if self.grpo.beta > 0 and batch.ref_logprobs is None:
            raise ValueError("grpo.beta > 0: fill batch.ref_logprobs with engine.reference_logprobs(batch)")
        plan = self._micro_slices(batch.num_rows)
        shares, total_tokens = self._loss_shares(batch, plan)
        lr = float(self._engine.get_lr()[0])
        self._engine.train()
        sums: dict[str, float] = {}  # token-weighted sums of the statistics
        tokens = loss = nonfinite = 0.0
        for index, (rows, real) in enumerate(plan):
            self._engine.set_gradient_accumulation_boundary(index == len(plan) - 1)
            micro_loss, stats = self._micro_step(batch.select(rows).to(self.device), shares[index],
                                                 total_tokens)
            if real:
                nonfinite += not math.isfinite(micro_loss)
                loss += micro_loss * shares[index]
                tokens += stats["tokens"]
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value * stats["tokens"]
        sums.pop("tokens")
        return self._finish_step(sums, tokens, loss, nonfinite, total_tokens, lr)

    def _loss_shares(self, batch: TrainBatch, plan: list[tuple[slice, bool]]) -> tuple[list[float], float]:
        """Each micro-batch's share of the whole batch's loss normaliser, and the batch's tokens.

        ``share_i = units_i / units_total`` over all ranks (1 for dapo, 0 for padding
        micro-batches); see the module docstring.
        """
        unit_fn = _LOSS_UNITS.get(self.grpo.loss_type, _rows)
        units = [unit_fn(batch.completion_mask[rows]) if real and unit_fn else 0.0 for rows, real in plan]
        totals = all_reduce(torch.tensor([sum(units), float(batch.completion_mask.sum())],
                                         dtype=torch.float64))
        total_units, total_tokens = max(float(totals[0]), 1.0), float(totals[1])
        if unit_fn is None:  # normalised by the whole batch already
            return [1.0 if real else 0.0 for _, real in plan], total_tokens
        return [u / total_units for u in units], total_tokens

    def _micro_step(self, micro: TrainBatch, share: float,
                    total_tokens: float) -> tuple[float, dict[str, float]]:
        """Forward, loss and backward of one micro-batch; returns its loss and statistics."""
        g = self.grpo
        logp, entropy = grpo_ops.completion_logprobs(
            self._engine, micro.input_ids, micro.attention_mask, micro.completion_length,
            temperature=self.temperature, with_entropy=True)  # [n, C], [n, C]
        mask = micro.completion_mask.to(logp.dtype)  # [n, C]
        old = logp.detach() if micro.old_logprobs is None else micro.old_logprobs  # [n, C]
        loss, stats = grpo_ops.policy_loss(
            g.loss_type, logp, old, micro.advantages, mask, clip_eps_low=g.clip_eps_low,
            clip_eps_high=g.clip_eps_high, ref_logp=micro.ref_logprobs, beta=g.beta,
            kl_estimator=g.kl_estimator, max_completion_length=g.max_completion_length,
            total_tokens=total_tokens if g.loss_type == "dapo" else None, dual_clip=g.dual_clip)
        value = float(loss.detach())
        # DeepSpeed divides by GAS and averages over ranks; GAS * W * share undoes that. A
        # non-finite loss poisons the whole gradient (NaN * anything = NaN) instead, so that
        # DeepSpeed's non-finite grad-norm check discards the step on every rank.
        scale = self._engine.gradient_accumulation_steps() * self.world_size * share
        self._engine.backward(loss * (scale if math.isfinite(value) else math.nan))
        self._engine.step()
        stats["entropy"] = float((entropy * mask).sum() / mask.sum().clamp(min=1))
        return value, stats

    def _finish_step(self, sums: dict[str, float], tokens: float, loss: float, nonfinite: float,
                     total_tokens: float, lr: float) -> dict[str, float]:
        """All-reduce the statistics, check the skip, count the step."""
        keys = sorted(sums)  # the same on every rank: they follow from the config and batch fields
        reduced = all_reduce(torch.tensor([sums[k] for k in keys] + [tokens, loss, nonfinite],
                                          dtype=torch.float64)).tolist()
        tokens, loss, nonfinite = reduced[-3:]
        applied = self._engine.was_step_applied()
        if nonfinite and applied:
            raise RuntimeError("DeepSpeed applied an optimizer step with a non-finite loss; this "
                               "DeepSpeed version does not skip non-finite gradients")
        self.global_step += 1
        self.skipped_steps += not applied
        norm = self._engine.get_global_grad_norm()
        stats = {key: value / max(tokens, 1.0) for key, value in zip(keys, reduced, strict=False)}
        stats.update(loss=math.nan if nonfinite else loss, lr=lr, tokens=total_tokens,
                     grad_norm=math.inf if not applied else math.nan if norm is None else float(norm),
                     skipped=float(not applied))
        return stats

    # ------------------------------------------------------------------ exports

    def _export(self) -> Iterator[tuple[str, Tensor, Tensor]]:
        """``(hf_name, full CPU tensor, source tensor)``; LoRA merged, adapters left out.

        Each tensor is copied inside its gather and yielded after it, so a consumer that stops
        early never leaves a rank inside a collective.
        """
        module = self.module
        state = module.state_dict(keep_vars=True)
        if not self._is_lora():
            for name, tensor in state.items():
                yield name, _gathered_clone(tensor), tensor
            return
        from peft.tuners.lora import LoraLayer

        layers = {f"{name}.base_layer.weight": layer for name, layer in module.named_modules()
                  if isinstance(layer, LoraLayer)}
        prefix = "base_model.model."
        for name, tensor in state.items():
            if any(part.startswith("lora_") for part in name.split(".")):
                continue
            hf_name = name.removeprefix(prefix).replace(".base_layer.", ".")
            layer = layers.get(name)
            if layer is None:
                yield hf_name, _gathered_clone(tensor), tensor
                continue
            adapter = [layer.lora_A[POLICY_ADAPTER].weight, layer.lora_B[POLICY_ADAPTER].weight]
            with _gathered([tensor, *adapter]):
                delta = layer.get_delta_weight(POLICY_ADAPTER)  # scale * B @ A
                merged = (tensor.detach().float() + delta.float()).to(tensor.dtype).to("cpu", copy=True)
            yield hf_name, merged, tensor

    def export_weights(self) -> Iterator[tuple[str, Tensor]]:
        """``(name, full tensor)`` for every entry of the plain HF model's ``state_dict()``.

        Collective: every rank must iterate it to the end. Gathers one parameter at a time
        (peak extra memory: one parameter) and yields a detached CPU copy. LoRA is merged
        (``W + scale * B @ A``), adapter tensors are not yielded, names carry no peft prefix.
        """
        for name, tensor, _ in self._export():
            yield name, tensor

    def export_hf(self, directory: str | os.PathLike) -> Path:
        """Write a plain Hugging Face model directory (weights, config, tokenizer); collective.

        Weights are gathered from the shards one at a time and streamed into safetensors
        shards on rank 0 (LoRA merged; a tied head is left to ``tie_word_embeddings``). The
        directory is written under a temporary name and renamed into place.
        """
        out = Path(directory)
        tmp = out.with_name(f".{out.name}.tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        seen: set[int] = set()

        def untied() -> Iterator[tuple[str, Tensor]]:
            for name, tensor, source in self._export():
                if id(source) not in seen:
                    seen.add(id(source))
                    yield name, tensor

        if self.rank == 0:
            write_safetensors_shards(untied(), tmp)
            base = self.module.get_base_model() if self._is_lora() else self.module
            config = copy.deepcopy(base.config)
            config.use_cache = self._use_cache  # the engine turned the KV cache off for training
            config.save_pretrained(tmp)
            if getattr(base, "generation_config", None) is not None:
                base.generation_config.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        elif self._zero3:
            for _ in untied():  # take part in the gathers
                pass
        barrier()
        return out

    # ------------------------------------------------------------------ checkpoints

    def save(self, directory: str | os.PathLike, client_state: dict[str, Any] | None = None, *,
             keep: int | None = None) -> Path:
        """Checkpoint into ``<directory>/step_<global_step>``; collective; returns that path.

        Holds DeepSpeed's model/optimizer/scheduler states, every rank's RNG states, the engine
        counters, the moved reference (if any) and ``client_state`` (JSON). Written under a
        temporary name and renamed; ``<directory>/latest`` is replaced atomically last, so a
        crash leaves the previous checkpoint loadable. Keeps the newest ``keep`` (None: all).
        Needs a filesystem shared by all ranks. RNG states are left as they were.
        """
        client_json = json.dumps(client_state or {})  # fail before writing anything
        rng = _rng_state()
        root = Path(directory)
        tag = f"{CHECKPOINT_PREFIX}{self.global_step}"
        tmp_tag = f".tmp-{tag}"
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(root / tmp_tag, ignore_errors=True)  # left by a crashed save
        barrier()
        self._engine.save_checkpoint(str(root), tag=tmp_tag, client_state={}, save_latest=False)
        self._write_checkpoint_extras(root / tmp_tag, rng, json.loads(client_json))
        barrier()
        if self.rank == 0:
            self._commit_checkpoint(root, tmp_tag, tag, keep)
        barrier()
        _set_rng_state(rng)
        return root / tag

    def _write_checkpoint_extras(self, path: Path, rng: dict[str, Any], client_state: dict[str, Any]) -> None:
        torch.save(rng, path / f"rng_rank{self.rank}.pt")
        if self._reference_updated:
            tensors = ((name, _gathered_clone(t)) for name, t in self._reference_tensors())
            if self.rank == 0:
                (path / REFERENCE_DIR).mkdir()
                write_safetensors_shards(tensors, path / REFERENCE_DIR)
            elif self._zero3:
                for _ in tensors:  # take part in the gathers
                    pass
        if self.rank == 0:
            state = {"client_state": client_state, "global_step": self.global_step,
                     "skipped_steps": self.skipped_steps, "reference_updated": self._reference_updated,
                     "world_size": self.world_size}
            (path / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))

    @staticmethod
    def _commit_checkpoint(root: Path, tmp_tag: str, tag: str, keep: int | None) -> None:
        final, trash = root / tag, root / f".trash-{tag}"
        if final.exists():  # the same step saved again: keep the old one until the new is in
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
        os.replace(root / tmp_tag, final)
        _fsync_dir(root)
        _atomic_write_text(root / LATEST_FILE, tag)
        _fsync_dir(root)
        shutil.rmtree(trash, ignore_errors=True)
        if keep is not None:
            done = sorted((p for p in root.iterdir() if p.is_dir() and _checkpoint_step(p) is not None),
                          key=_checkpoint_step)
            for old in done[:-keep] if keep > 0 else done:
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def resolve_checkpoint(directory: str | os.PathLike) -> tuple[Path, str]:
        """``(root, tag)`` of a checkpoint root (via ``latest``) or of one checkpoint directory."""
        path = Path(directory)
        if (path / LATEST_FILE).is_file():
            return path, (path / LATEST_FILE).read_text().strip()
        if (path / STATE_FILE).is_file():
            return path.parent, path.name
        raise FileNotFoundError(f"no checkpoint at {path}: expected a '{LATEST_FILE}' file or {STATE_FILE}")

    def load(self, directory: str | os.PathLike) -> dict[str, Any]:
        """Restore a checkpoint saved by :meth:`save` (the newest one under ``directory``, or that
        checkpoint directory itself); collective; returns the caller's ``client_state``.

        The world size must be the one the checkpoint was written with (ZeRO shards).
        """
        root, tag = self.resolve_checkpoint(directory)
        path = root / tag
        state = json.loads((path / STATE_FILE).read_text())
        if state["world_size"] != self.world_size:
            raise ValueError(f"{path} was written by {state['world_size']} rank(s), this run has "
                             f"{self.world_size}: ZeRO checkpoints need the same world size")
        loaded, _ = self._engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
        if state["reference_updated"] and self.grpo.beta > 0:
            self._load_reference_weights(path / REFERENCE_DIR)
        elif self._reference_updated:
            raise RuntimeError("this engine's reference was moved; load a checkpoint whose reference "
                               "is the base model into a fresh engine")
        self.global_step, self.skipped_steps = state["global_step"], state["skipped_steps"]
        _set_rng_state(torch.load(path / f"rng_rank{self.rank}.pt", weights_only=False))
        barrier()
        return state["client_state"]

    @torch.no_grad()
    def _load_reference_weights(self, directory: Path) -> None:
        targets = dict(self._reference_tensors())
        saved = read_safetensors_dir(directory)
        for name, tensor in saved:
            target = targets.pop(name)
            with _gathered([target], modifier_rank=0):
                if self.rank == 0 or not _is_zero3_param(target):
                    target.data.copy_(tensor)
        if targets:
            raise RuntimeError(f"reference weights missing from {directory}: {sorted(targets)[:5]}")
        self._reference_updated = True

    def close(self) -> None:
        """Drop the DeepSpeed engines (hooks included); the process group stays for other users."""
        for engine in (self._engine, self._reference):
            destroy = getattr(engine, "destroy", None)
            if callable(destroy):
                destroy()
        self._engine = self._reference = None
        from transformers.integrations import deepspeed as hf_ds

        current = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
        if self._hf_config is not None and current is not None and current() is self._hf_config:
            hf_ds.unset_hf_deepspeed_config()  # later from_pretrained calls build whole models again
        self._hf_config = None

    def __enter__(self) -> PolicyEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _gathered_clone(tensor: Tensor) -> Tensor:
    with _gathered([tensor]):
        return _cpu_clone(tensor)
