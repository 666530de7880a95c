"""How an evaluation shares its work among the ranks, and how rank 0 puts it back together.

Prompts are cut into chunks of ``eval.batch_size`` (one sampler call, one judge call
each). Rank ``r``'s share is a contiguous run of whole chunks, the first ranks taking one
chunk more when they do not divide evenly (a rank may get none); lm-eval tasks are shared
the same way, one task a chunk. Chunk ``k`` is the same batch and is sampled with the same
seed (:meth:`Share.seeds`) whatever the number of ranks, so its answers and verdicts do not
depend on which rank computes them; rank 0 gathers the parts in rank order and joins them
(:func:`join`), which is the prompts' own order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from dynalign.runtime import step_seed

T = TypeVar("T")

# What each chunk's seed is drawn for: step_seed(seed, phase, chunk index).
SEED_PHASES = {"policy answers": 1, "baseline answers": 2, "self-judge": 3, "judge policy": 4,
               "judge baseline": 5, "pairwise": 6}


@dataclass(frozen=True)
class Share:
    """One rank's share of ``n`` items cut in chunks."""

    items: range  # indices of its items (contiguous; empty when the rank gets no chunk)
    chunks: range  # global indices of its chunks

    def of(self, values: Sequence[T]) -> list[T]:
        """This share of ``values`` (one value per item)."""
        return list(values[self.items.start:self.items.stop])

    def seeds(self, seed: int, phase: str) -> list[int]:
        """The sampling seed of each chunk of this share in ``phase`` (a key of SEED_PHASES)."""
        return [step_seed(seed, SEED_PHASES[phase], k) for k in self.chunks]


def share_of(n: int, chunk: int, rank: int, world_size: int) -> Share:
    """Rank ``rank``'s share of ``n`` items: whole chunks of ``chunk`` items (the last chunk may
    be short), ``C // W`` of the ``C`` chunks per rank and one more for the first ``C % W``."""
    if chunk < 1 or world_size < 1 or not 0 <= rank < world_size or n < 0:
        raise ValueError(f"no share for n={n}, chunk={chunk}, rank={rank}, world_size={world_size}")
    num_chunks = -(-n // chunk)
    per_rank, extra = divmod(num_chunks, world_size)
    first = rank * per_rank + min(rank, extra)
    chunks = range(first, first + per_rank + (rank < extra))
    return Share(items=range(min(n, chunks.start * chunk), min(n, chunks.stop * chunk)), chunks=chunks)


def join(parts: Iterable[Sequence[T]]) -> list[T]:
    """The ranks' parts (in rank order) as one list in the items' order."""
    return [value for part in parts for value in part]
