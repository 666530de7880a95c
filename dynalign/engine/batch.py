"""The rollouts of one optimizer step, as the engine trains on them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor


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
    sampler_logprobs: Tensor | None = None  # [N, C] the sampler's own (vLLM's): mismatch, IS correction

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
        for name in ("old_logprobs", "ref_logprobs", "sampler_logprobs"):
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
        values: dict[str, Any] = {name: None if value is None else fn(value)
                                  for name, value in vars(self).items()}
        return TrainBatch(**values)

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
