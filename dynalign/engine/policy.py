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
  accumulation steps (GAS) and averages gradients over the W ranks. Each registered loss
  declares the count of *units* it normalises a micro-batch by (``PolicyLoss.units`` in
  :mod:`dynalign.grpo`). Micro-batch ``i`` is therefore back-propagated as
  ``loss_i * GAS * W * units_i / units_total`` (``units_total`` all-reduced over ranks), which
  makes the step's gradient the gradient of the loss of the whole optimizer batch under that
  aggregation -- independent of micro-batch size and world size. A loss without units is
  normalised by the whole batch's token count already (``total_tokens`` is all-reduced and
  passed in), so its factor is ``GAS * W``.
* **Non-finite steps are skipped.** A micro-batch whose loss is not finite is back-propagated
  multiplied by NaN, so its gradient is NaN everywhere it reaches; DeepSpeed's ZeRO optimizer
  then finds a non-finite global gradient norm (all-reduced, so every rank agrees), discards
  the gradients and leaves weights, optimizer and LR schedule untouched (stage 0 in float32
  uses a guarded AdamW for the same effect). The skip is counted in ``skipped_steps``.
* **Reference model.** Loaded only when ``grpo.beta > 0``; where it lives depends on what is
  trained (:mod:`dynalign.engine.adapters`: a frozen copy, or a frozen LoRA adapter).
* **Checkpoints** (:meth:`PolicyEngine.save`): see :mod:`dynalign.engine.checkpoint`.
* **Exports** use Hugging Face names (those of ``model.state_dict()`` of the plain model,
  ``lm_head.weight`` included for tied embeddings), gather one parameter at a time, and merge
  LoRA on the fly (``W + scale * B @ A``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dynalign import grpo as grpo_ops
from dynalign.config import DeepSpeedConfig, GRPOConfig, ModelConfig, TrainConfig
from dynalign.distributed import all_reduce, barrier, ensure_ds_accelerator, init_distributed
from dynalign.engine import checkpoint
from dynalign.engine.adapters import adaptation_for
from dynalign.engine.batch import TrainBatch
from dynalign.engine.ds_config import deepspeed_config, make_optimizer, warmup_scheduler
from dynalign.io import replace_dir
from dynalign.models import export_config, load_causal_lm, load_tokenizer, resolve_model_path
from dynalign.onednn import onednn_linears
from dynalign.packing import Packing, packing_for
from dynalign.runtime import seed_everything
from dynalign.zero import copy_into, destroy_engine, hf_zero3_init, leaf_layers, release_hf_config

ensure_ds_accelerator()  # DS_ACCELERATOR must be set before anything imports deepspeed


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
        self.reference_updated = False  # False: the reference is the base model
        self.loss = grpo_ops.get_policy_loss(grpo.loss_type)
        self.config = deepspeed_config(deepspeed, grpo, model.dtype, self.world_size)
        self.zero3 = self.config["zero_optimization"].get("stage") == 3
        self.adaptation = adaptation_for(model.lora, grpo.beta)
        if seed is not None:
            seed_everything(seed)

        self.model_path = resolve_model_path(model)
        self.tokenizer = load_tokenizer(self.model_path, model)
        with hf_zero3_init(self.config) as hf_config:
            self._hf_config = hf_config  # kept alive: transformers holds it by weak reference
            policy = self._load()
            if model.gradient_checkpointing:
                policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            policy = self.adaptation.wrap(policy)
            optimizer = make_optimizer(policy, deepspeed, grpo, model.dtype)
            self.ds_engine, _, _, _ = ds.initialize(model=policy, optimizer=optimizer,
                                                   lr_scheduler=warmup_scheduler(optimizer, grpo),
                                                   config=self.config, dist_init_required=False)
            if grpo.beta > 0:
                self.adaptation.build_reference(self._load, self.config)
        self.packing = self._packing()

    def _load(self) -> torch.nn.Module:
        """The model as it trains (policy) or scores (reference), its decoder layers one ZeRO-3
        unit each with ``deepspeed.stage3_leaf_layers``."""
        lm = load_causal_lm(self.model_path, self.model_config, for_training=True)
        if self.zero3 and self.ds_config.stage3_leaf_layers and leaf_layers(lm):
            # DeepSpeed's backward hooks of a leaf layer hang on its input, which must require
            # grad; with a frozen embedding (LoRA) the first layer's would not, and the step
            # fails in the backward (a released adapter weight)
            lm.enable_input_require_grads()
        return lm

    def _packing(self) -> Packing | None:
        """How training forwards pack each prompt's answers into one row; None: padded rows."""
        if not self.grpo.pack_groups:
            return None
        base = self.adaptation.base_model(self.module)
        packing = packing_for(base.config, base.dtype, self.grpo.pack_max_tokens)
        if packing is None and self.rank == 0:
            print(f"dynalign: grpo.pack_groups: this model's attention "
                  f"(model.attn_implementation={self.model_config.attn_implementation}) takes no block "
                  "mask; training forwards read one padded row per answer", flush=True)
        return packing

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> PolicyEngine:
        return cls(cfg.model, cfg.grpo, cfg.deepspeed, temperature=cfg.rollout.temperature, seed=cfg.seed)

    @property
    def module(self) -> torch.nn.Module:
        """The wrapped model (a peft model with LoRA); partitioned under ZeRO-3."""
        return self.ds_engine.module

    # ------------------------------------------------------------------ log-probs

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
        with onednn_linears(forward):
            for rows, real in self._micro_slices(batch.num_rows):
                micro = batch.select(rows).to(self.device)
                logp = grpo_ops.completion_logprobs(forward, micro.input_ids, micro.attention_mask,
                                                    batch.completion_length, temperature=self.temperature,
                                                    packing=self.packing)
                if real:
                    out[rows] = logp.float().cpu()
        return out.to(batch.input_ids.device)

    def policy_logprobs(self, batch: TrainBatch) -> Tensor:
        """Log-probs [N, C] of the completions under the current policy (eval mode, no grad)."""
        self.ds_engine.eval()
        return self._score(self.ds_engine, batch)

    def reference_logprobs(self, batch: TrainBatch) -> Tensor:
        """Log-probs [N, C] of the completions under the KL reference (needs ``grpo.beta > 0``)."""
        if self.grpo.beta <= 0:
            raise RuntimeError("no reference model: it is loaded only when grpo.beta > 0")
        with self.adaptation.reference_forward(self.ds_engine) as forward:
            return self._score(forward, batch)

    def reference_tensors(self) -> list[tuple[str, Tensor]]:
        """The reference's own tensors by name (partitioned under ZeRO-3)."""
        return self.adaptation.reference_tensors(self.module)

    def update_reference(self) -> None:
        """Move the KL reference to the current policy (no-op when ``grpo.beta == 0``).

        Full fine-tuning: copies every weight, one gathered parameter at a time under ZeRO-3.
        LoRA: copies the trained adapter into the reference adapter (base weights untouched).
        """
        if self.grpo.beta <= 0:
            return
        for source, target in self.adaptation.reference_pairs(self.module):
            copy_into(target, source, self.rank)
        self.reference_updated = True

    # ------------------------------------------------------------------ training

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on this rank's rows of the batch; returns batch-wide statistics.

        Keys: loss (of the whole batch), grad_norm (before clipping; inf when skipped), lr (of
        this step), clip_frac_low, clip_frac_high, ratio_mean, entropy, kl_mean (with
        ref_logprobs), dual_clip_frac (with grpo.dual_clip), the sampler mismatch (with
        sampler_logprobs: sampler_logp_abs_diff, sampler_ratio_max, sampler_is_weight_mean,
        sampler_is_clipped_frac), tokens (completion tokens of the whole batch) and skipped
        (1.0 when the step was discarded as non-finite). Token-level statistics are
        token-weighted means over the whole batch; ``*_max`` ones are maxima over it.
        """
        if self.grpo.beta > 0 and batch.ref_logprobs is None:
            raise ValueError("grpo.beta > 0: fill batch.ref_logprobs with engine.reference_logprobs(batch)")
        plan = self._micro_slices(batch.num_rows)
        shares, total_tokens = self._loss_shares(batch, plan)
        lr = float(self.ds_engine.get_lr()[0])
        self.ds_engine.train()
        sums: dict[str, float] = {}  # token-weighted sums of the statistics
        maxima: dict[str, float] = {}  # statistics that are maxima (``*_max``)
        tokens = loss = nonfinite = 0.0
        with onednn_linears(self.module):  # forward and backward, a checkpointed layer's recomputation too
            for index, (rows, real) in enumerate(plan):
                self.ds_engine.set_gradient_accumulation_boundary(index == len(plan) - 1)
                micro_loss, stats = self._micro_step(batch.select(rows).to(self.device), shares[index],
                                                     total_tokens)
                if real:
                    nonfinite += not math.isfinite(micro_loss)
                    loss += micro_loss * shares[index]
                    tokens += stats["tokens"]
                    for key, value in stats.items():
                        if key.endswith("_max"):
                            maxima[key] = max(maxima.get(key, -math.inf), value)
                        else:
                            sums[key] = sums.get(key, 0.0) + value * stats["tokens"]
        sums.pop("tokens")
        stats = self._finish_step(sums, tokens, loss, nonfinite, total_tokens, lr)
        return stats | self._max_over_ranks(maxima)

    @staticmethod
    def _max_over_ranks(maxima: dict[str, float]) -> dict[str, float]:
        """Each ``*_max`` statistic's largest value over the micro-batches of every rank."""
        if not maxima:  # the same keys on every rank: they follow from the config and batch fields
            return {}
        keys = sorted(maxima)
        reduced = all_reduce(torch.tensor([maxima[k] for k in keys], dtype=torch.float64), op="max")
        return dict(zip(keys, reduced.tolist(), strict=True))

    def _loss_shares(self, batch: TrainBatch, plan: list[tuple[slice, bool]]) -> tuple[list[float], float]:
        """Each micro-batch's share of the whole batch's loss normaliser, and the batch's tokens.

        ``share_i = units_i / units_total`` over all ranks (1 for a loss normalised by the whole
        batch's tokens, 0 for padding micro-batches); see the module docstring.
        """
        unit_fn = self.loss.units
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
            self.ds_engine, micro.input_ids, micro.attention_mask, micro.completion_length,
            temperature=self.temperature, with_entropy=True, packing=self.packing)  # [n, C], [n, C]
        mask = micro.completion_mask.to(logp.dtype)  # [n, C]
        old = logp.detach() if micro.old_logprobs is None else micro.old_logprobs  # [n, C]
        loss, stats = grpo_ops.policy_loss(
            g.loss_type, logp, old, micro.advantages, mask, clip_eps_low=g.clip_eps_low,
            clip_eps_high=g.clip_eps_high, ref_logp=micro.ref_logprobs, beta=g.beta,
            kl_estimator=g.kl_estimator, max_completion_length=g.max_completion_length,
            total_tokens=total_tokens if self.loss.uses_total_tokens else None, dual_clip=g.dual_clip,
            sampler_logp=micro.sampler_logprobs,
            is_cap=g.sampler_is_cap if g.sampler_is_correction else None)
        value = float(loss.detach())
        # DeepSpeed divides by GAS and averages over ranks; GAS * W * share undoes that. A
        # non-finite loss poisons the whole gradient (NaN * anything = NaN) instead, so that
        # DeepSpeed's non-finite grad-norm check discards the step on every rank.
        scale = self.ds_engine.gradient_accumulation_steps() * self.world_size * share
        self.ds_engine.backward(loss * (scale if math.isfinite(value) else math.nan))
        self.ds_engine.step()
        stats["entropy"] = float((entropy * mask).sum() / mask.sum().clamp(min=1))
        return value, stats

    def _finish_step(self, sums: dict[str, float], tokens: float, loss: float, nonfinite: float,
                     total_tokens: float, lr: float) -> dict[str, float]:
        """All-reduce the statistics, check the skip, count the step."""
        keys = sorted(sums)  # the same on every rank: they follow from the config and batch fields
        reduced = all_reduce(torch.tensor([sums[k] for k in keys] + [tokens, loss, nonfinite],
                                          dtype=torch.float64)).tolist()
        tokens, loss, nonfinite = reduced[-3:]
        applied = self.ds_engine.was_step_applied()
        if nonfinite and applied:
            raise RuntimeError("DeepSpeed applied an optimizer step with a non-finite loss; this "
                               "DeepSpeed version does not skip non-finite gradients")
        self.global_step += 1
        self.skipped_steps += not applied
        norm = self.ds_engine.get_global_grad_norm()
        stats = {key: value / max(tokens, 1.0) for key, value in zip(keys, reduced, strict=False)}
        stats.update(loss=math.nan if nonfinite else loss, lr=lr, tokens=total_tokens,
                     grad_norm=math.inf if not applied else math.nan if norm is None else float(norm),
                     skipped=float(not applied))
        return stats

    # ------------------------------------------------------------------ exports

    def export_weights(self, *, on_device: bool = False,
                       bucket_bytes: int = 0) -> Iterator[tuple[str, Tensor]]:
        """``(name, full tensor)`` for every entry of the plain HF model's ``state_dict()``.

        Collective: every rank must iterate it to the end. Gathers ``bucket_bytes`` of parameters
        at a time (whole layers; 0: one parameter) and yields detached copies made inside the
        gather (a consumer that stops early leaves no rank inside a collective): on the CPU, or
        with ``on_device`` on this rank's device, where a colocated sampler's weights live (the
        weight sync: device to device, no host round trip). LoRA is merged on the device;
        adapter tensors and peft prefixes are left out.
        """
        device = self.device if on_device else None
        for name, tensor, _ in self.adaptation.export(self.module, device, bucket_bytes):
            yield name, tensor

    def export_hf(self, directory: str | os.PathLike) -> Path:
        """Write a plain Hugging Face model directory (weights, config, tokenizer); collective.

        Weights are gathered from the shards one at a time and streamed into safetensors
        shards on rank 0 (LoRA merged; a tied head is left to ``tie_word_embeddings``). The
        directory is written under a temporary name and renamed into place.
        """
        out = Path(directory)
        seen: set[int] = set()

        def untied() -> Iterator[tuple[str, Tensor]]:
            for name, tensor, source in self.adaptation.export(self.module):
                if id(source) not in seen:
                    seen.add(id(source))
                    yield name, tensor

        def fill(tmp: Path) -> None:
            checkpoint.write_safetensors_shards(untied(), tmp)
            base = self.adaptation.base_model(self.module)
            export_config(base).save_pretrained(tmp)  # use_cache as loaded, not as trained
            if getattr(base, "generation_config", None) is not None:
                base.generation_config.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)

        if self.rank == 0:
            replace_dir(out, fill)
        elif self.zero3:
            for _ in untied():  # take part in the gathers
                pass
        barrier()
        return out

    # ------------------------------------------------------------------ checkpoints

    def save(self, directory: str | os.PathLike, client_state: dict[str, Any] | None = None, *,
             keep: int | None = None) -> Path:
        """Checkpoint into ``<directory>/step_<global_step>`` (layout: :mod:`~dynalign.engine.checkpoint`)
        with ``client_state`` (JSON); keeps the newest ``keep`` (None: all); collective."""
        return checkpoint.save(self, directory, client_state, keep)

    def load(self, directory: str | os.PathLike) -> dict[str, Any]:
        """Restore the checkpoint ``<directory>/latest`` names (or ``directory`` itself, a checkpoint
        directory), written with this world size; collective; returns the caller's ``client_state``.
        Safe on checkpoints from anyone; a missing, corrupt or refused file raises
        :class:`~dynalign.engine.checkpoint.CheckpointError` naming it."""
        return checkpoint.load(self, directory)

    def drop_training_state(self, directory: str | os.PathLike) -> int:
        """At a run's end: the checkpoints under ``directory`` drop the optimizer and module states
        they hold for resuming (:func:`~dynalign.engine.checkpoint.drop_training_state`); collective;
        returns the bytes freed."""
        return checkpoint.drop_training_state(self, directory)

    def close(self) -> None:
        """Drop the DeepSpeed engines (hooks included); the process group stays for other users."""
        destroy_engine(self.ds_engine)
        self.adaptation.close()
        self.ds_engine = None
        release_hf_config(self._hf_config)  # later from_pretrained calls build whole models again
        self._hf_config = None

    def __enter__(self) -> PolicyEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
