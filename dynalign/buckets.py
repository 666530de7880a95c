"""Weights moved in buckets of whole layers (the policy's weight sync, the "bytes" transport).

A bucket is gathered, copied or sent as one: fewer, larger collectives and transfers than one per
tensor, with a bounded amount of memory in flight. Buckets split only between decoder layers,
because an inference engine that fuses a layer's projections (q/k/v, gate/up) loads that layer
once all of its weights have arrived.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def layer_key(name: str) -> str:
    """The unit a bucket never splits: a whole decoder layer (``model.layers.3``), else the
    module that owns the tensor (``model.embed_tokens``)."""
    head, sep, tail = name.partition(".layers.")
    return head + sep + tail.split(".", 1)[0] if sep else name.rsplit(".", 1)[0]


def layer_buckets(named: Iterable[tuple[str, T]], size: Callable[[T], int],
                  limit: int) -> Iterator[list[tuple[str, T]]]:
    """``named`` in order, cut into lists of about ``limit`` bytes (``size`` of each item), each
    cut between two layers: a bucket closes at the first new layer once it holds ``limit`` bytes,
    so one may exceed ``limit`` by a layer. ``limit <= 0``: one item per bucket."""
    bucket: list[tuple[str, T]] = []
    total, key = 0, None
    for name, item in named:
        if bucket and (limit <= 0 or (total >= limit and layer_key(name) != key)):
            yield bucket
            bucket, total = [], 0
        bucket.append((name, item))
        total += size(item)
        key = layer_key(name)
    if bucket:
        yield bucket
