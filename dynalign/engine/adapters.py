"""What the engine trains: every weight (:class:`FullFineTuning`) or LoRA adapters (:class:`LoraAdapters`).

The two differ in four places, each a method of :class:`Adaptation`: how the loaded model is
wrapped, where the KL reference lives (a second, frozen model vs. a frozen second adapter of
the same peft model), how the reference is scored, and how weights are exported (LoRA is
merged on the fly, ``W + scale * B @ A``, under plain Hugging Face names).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor

from dynalign.buckets import layer_buckets
from dynalign.config import LoraConfig
from dynalign.engine.ds_config import _reference_config
from dynalign.zero import copy_to, destroy_engine, full_bytes, gathered

REFERENCE_ADAPTER = "reference"  # LoRA: the frozen adapter that holds the KL reference
POLICY_ADAPTER = "default"  # LoRA: peft's name for the trained adapter

ExportItem = tuple[str, Tensor, Tensor]  # (HF name, full copy, source tensor)


class Adaptation(Protocol):
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to train, built from the loaded one."""
        ...

    def build_reference(self, load: Callable[[], torch.nn.Module], policy_config: dict[str, Any]) -> None:
        """Set up the frozen KL reference (``load`` loads another copy of the model)."""
        ...

    def reference_forward(self, policy: Any) -> contextlib.AbstractContextManager[Callable[..., Any]]:
        """The reference as a forward callable, inside the block; ``policy`` is the DeepSpeed engine."""
        ...

    def reference_pairs(self, module: torch.nn.Module) -> list[tuple[Tensor, Tensor]]:
        """(policy tensor, reference tensor) pairs that make the reference the current policy."""
        ...

    def reference_tensors(self, module: torch.nn.Module) -> list[tuple[str, Tensor]]:
        """The reference's own tensors by name (what a checkpoint saves of it)."""
        ...

    def export(self, module: torch.nn.Module, device: torch.device | None = None,
               bucket_bytes: int = 0) -> Iterator[ExportItem]:
        """Every entry of the plain model's ``state_dict()``, full, copied to ``device`` (None:
        CPU), gathered ``bucket_bytes`` at a time (:func:`~dynalign.buckets.layer_buckets`);
        collective."""
        ...

    def base_model(self, module: torch.nn.Module) -> torch.nn.Module:
        """The transformers model inside ``module`` (its config and generation config)."""
        ...

    def close(self) -> None:
        """Drop what :meth:`build_reference` built."""
        ...


class FullFineTuning:
    """Every weight trains; the reference (``beta > 0``) is a second, frozen copy of the model.

    Under ZeRO-3 that copy is partitioned like the policy (an optimizer-less
    ``deepspeed.initialize``); for stages 0-2 it is a plain replicated module.
    """

    def __init__(self) -> None:
        self.reference: Any = None

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def build_reference(self, load: Callable[[], torch.nn.Module], policy_config: dict[str, Any]) -> None:
        import deepspeed as ds

        reference = load()
        reference.requires_grad_(False)
        reference.eval()
        self.reference, _, _, _ = ds.initialize(model=reference, config=_reference_config(policy_config),
                                                dist_init_required=False)
        self.reference.eval()

    @contextlib.contextmanager
    def reference_forward(self, policy: Any) -> Iterator[Callable[..., Any]]:
        yield self.reference

    def reference_pairs(self, module: torch.nn.Module) -> list[tuple[Tensor, Tensor]]:
        params = dict(module.named_parameters())
        return [(params[name], param) for name, param in self.reference.module.named_parameters()]

    def reference_tensors(self, module: torch.nn.Module) -> list[tuple[str, Tensor]]:
        return list(self.reference.module.named_parameters())

    def export(self, module: torch.nn.Module, device: torch.device | None = None,
               bucket_bytes: int = 0) -> Iterator[ExportItem]:
        for bucket in layer_buckets(module.state_dict(keep_vars=True).items(), full_bytes, bucket_bytes):
            with gathered([tensor for _, tensor in bucket]):
                copies = [(name, copy_to(tensor, device), tensor) for name, tensor in bucket]
            yield from copies  # outside the gather: a consumer that stops early leaves no collective

    def base_model(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    def close(self) -> None:
        destroy_engine(self.reference)
        self.reference = None


class LoraAdapters:
    """Only LoRA adapters train; the reference (``beta > 0``) is a frozen second adapter.

    It starts with ``B = 0`` (so the reference *is* the base model) and moving it copies the
    trained adapter into it; adapters are never merged into the base weights.
    """

    def __init__(self, lora: LoraConfig, *, with_reference: bool) -> None:
        self.lora = lora
        self.with_reference = with_reference

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        lora = self.lora
        peft_config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                     target_modules=list(lora.target_modules), bias="none",
                                     task_type="CAUSAL_LM")
        model = get_peft_model(model, peft_config)
        if self.with_reference:
            model.add_adapter(REFERENCE_ADAPTER, peft_config)
            model.set_adapter(POLICY_ADAPTER)  # trainable; the reference adapter stays frozen
            with torch.no_grad():  # B = 0: the reference starts as the base model
                for name, param in model.named_parameters():
                    if f"lora_B.{REFERENCE_ADAPTER}." in name:
                        param.zero_()
        return model

    def build_reference(self, load: Callable[[], torch.nn.Module], policy_config: dict[str, Any]) -> None:
        """Nothing to build: :meth:`wrap` added the reference adapter."""

    @contextlib.contextmanager
    def reference_forward(self, policy: Any) -> Iterator[Callable[..., Any]]:
        policy.eval()
        policy.module.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
        try:
            yield policy
        finally:
            policy.module.set_adapter(POLICY_ADAPTER)

    def reference_pairs(self, module: torch.nn.Module) -> list[tuple[Tensor, Tensor]]:
        params = dict(module.named_parameters())
        return [(params[name.replace(f".{REFERENCE_ADAPTER}.", f".{POLICY_ADAPTER}.")], param)
                for name, param in params.items() if f".{REFERENCE_ADAPTER}." in name]

    def reference_tensors(self, module: torch.nn.Module) -> list[tuple[str, Tensor]]:
        marker = f".{REFERENCE_ADAPTER}."
        return [(name, p) for name, p in module.named_parameters() if marker in name]

    def export(self, module: torch.nn.Module, device: torch.device | None = None,
               bucket_bytes: int = 0) -> Iterator[ExportItem]:
        """Base weights with the policy adapter merged (on the weights' own device, then copied to
        ``device``: no second full copy on the host when it is the GPU); adapter tensors and peft
        prefixes left out."""
        from peft.tuners.lora import LoraLayer

        layers = {f"{name}.base_layer.weight": layer for name, layer in module.named_modules()
                  if isinstance(layer, LoraLayer)}
        base = [(name, tensor) for name, tensor in module.state_dict(keep_vars=True).items()
                if not any(part.startswith("lora_") for part in name.split("."))]
        for bucket in layer_buckets(base, full_bytes, bucket_bytes):
            merged = [layers[name] for name, _ in bucket if name in layers]
            adapters = [w for layer in merged for w in (layer.lora_A[POLICY_ADAPTER].weight,
                                                        layer.lora_B[POLICY_ADAPTER].weight)]
            with gathered([tensor for _, tensor in bucket] + adapters):
                copies = [(name.removeprefix("base_model.model.").replace(".base_layer.", "."),
                           _merged(tensor, layers.get(name), device), tensor) for name, tensor in bucket]
            yield from copies

    def base_model(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.get_base_model()  # type: ignore[operator]

    def close(self) -> None:
        """Nothing of its own to drop."""


def adaptation_for(lora: LoraConfig, beta: float) -> Adaptation:
    """LoRA adapters when ``lora.enabled``, else full fine-tuning."""
    return LoraAdapters(lora, with_reference=beta > 0) if lora.enabled else FullFineTuning()


def _merged(weight: Tensor, layer: Any, device: torch.device | None) -> Tensor:
    """A copy of ``weight`` on ``device``, with ``layer``'s policy adapter merged (``W + scale *
    B @ A``, computed where the weights are) when it is a LoRA layer's base weight."""
    if layer is None:
        return copy_to(weight, device)
    delta = layer.get_delta_weight(POLICY_ADAPTER)
    return copy_to((weight.detach().float() + delta.float()).to(weight.dtype), device)
