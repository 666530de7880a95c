"""Exact and near-duplicate detection for prompts.

Exact duplicates are caught on a normalised form (Unicode NFKC, casefolded, punctuation
and symbols removed, whitespace collapsed), whose hash is also the prompt's stable id:
"How do I...?" and "how do i..." are one prompt with one id.

Near duplicates (a word changed, added or dropped) are caught with MinHash LSH
(datasketch) on character 5-grams of the normalised text, 128 permutations: a prompt is
a near duplicate when LSH proposes an indexed prompt whose estimated Jaccard similarity
is at least ``threshold`` (``generator.dedup_threshold``, 0.7 by default). One changed
word in a 15-word prompt keeps ~0.8 of the 5-grams, two unrelated prompts share < 0.2.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable, Sequence

NUM_PERM = 128  # MinHash permutations: error of a Jaccard estimate ~ sqrt(J(1-J)/128) < 0.045
NGRAM = 5  # character shingle size


def normalize_text(text: str) -> str:
    """The form duplicates are compared in: NFKC, casefold, punctuation/symbols -> space."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    kept = (" " if unicodedata.category(ch)[0] in "PSZC" else ch for ch in folded)
    return " ".join("".join(kept).split())


def prompt_id(text: str) -> str:
    """Stable id of a prompt: 16 hex characters of the SHA-256 of its normalised form."""
    return hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()[:16]


def char_shingles(normalized: str, n: int = NGRAM) -> set[bytes]:
    if len(normalized) <= n:
        return {normalized.encode("utf-8")}
    return {normalized[i:i + n].encode("utf-8") for i in range(len(normalized) - n + 1)}


class DuplicateIndex:
    """Every prompt seen so far; answers whether a new one duplicates any of them.

    A thin stateful wrapper (exact-id set + datasketch ``MinHashLSH``); the decisions are
    :func:`normalize_text`, :func:`prompt_id` and the Jaccard threshold.
    """

    def __init__(self, threshold: float, num_perm: int = NUM_PERM) -> None:
        from datasketch import MinHashLSH

        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1] (got {threshold})")
        self.threshold = threshold
        self.num_perm = num_perm
        self._ids: set[str] = set()
        self._minhashes: dict[str, object] = {}
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, text: str) -> bool:
        return prompt_id(text) in self._ids

    def _minhash(self, normalized: str):
        from datasketch import MinHash

        m = MinHash(num_perm=self.num_perm)
        m.update_batch(sorted(char_shingles(normalized)))
        return m

    def check(self, text: str) -> str | None:
        """``"exact_duplicate"``, ``"near_duplicate"`` or None (new)."""
        return self._check(text)[0]

    def _check(self, text: str):
        key = prompt_id(text)
        if key in self._ids:
            return "exact_duplicate", key, None
        m = self._minhash(normalize_text(text))
        for other in self._lsh.query(m):
            if m.jaccard(self._minhashes[other]) >= self.threshold:
                return "near_duplicate", key, m
        return None, key, m

    def add(self, text: str) -> str | None:
        """Index ``text`` unless it duplicates an indexed prompt; returns the duplicate kind or None."""
        reason, key, m = self._check(text)
        if reason is None:
            self._ids.add(key)
            self._minhashes[key] = m
            self._lsh.insert(key, m)
        return reason

    def update(self, texts: Iterable[str]) -> None:
        """Index prompts seen elsewhere (earlier shards or iterations), duplicates among them ignored."""
        for text in texts:
            self.add(text)


def deduplicate(texts: Sequence[str], threshold: float, seen: Iterable[str] = ()) -> list[str | None]:
    """Per text: None if kept (first of its kind), else why it was dropped. ``seen`` counts as earlier."""
    index = DuplicateIndex(threshold)
    index.update(seen)
    return [index.add(t) for t in texts]
