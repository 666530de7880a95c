"""Quality filters for parsed prompts: pure functions, one reason name each.

:func:`rejection_reason` applies them in a fixed order and returns the first that fails
(the name is what the summary counts), or None for a prompt worth keeping:

``empty``        nothing left after cleaning
``too_short``    fewer than ``min_chars`` characters
``too_long``     more than ``max_chars`` characters
``not_prose``    the charset check: letters (any script, ``str.isalpha``) must make up at
                 least ``min_prose_fraction`` of the non-space characters, and words
                 (:func:`is_word`: mostly letters/digits, no ``_ [ ] { } < > = \\ | ^ ~ ` @ # $``)
                 the same share of the whitespace-separated tokens; control characters and the
                 replacement character U+FFFD (bytes that did not decode) are never allowed.
                 Drops code, markup, numbers and the token soup of an untrained model.
``non_ascii``    the language check: ASCII must make up at least ``min_ascii_fraction`` of
                 the non-space characters (0.9 keeps English with the odd "café" or curly
                 quote). Set 0 to keep prompts in any script.
``refusal``      an assistant refusal instead of a prompt ("As an AI...", "I cannot help...")
``meta_copy``    a near-copy of the meta-prompt: at least ``max_meta_overlap`` of the
                 prompt's word 3-grams also occur in the meta-prompt (echoed instructions,
                 copied few-shot examples).
``unfinished``   only for templates that set ``endings`` (the raw base-model templates): the
                 prompt ends with none of them (e.g. ``?`` ``.``): an item cut off by the
                 token limit, or a line that is no request.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Set as AbstractSet
from typing import Any

FILTERS = ("empty", "too_short", "too_long", "not_prose", "non_ascii", "refusal", "meta_copy", "unfinished")

_CODE_CHARS = frozenset("_[]{}<>=\\|^~`@#$")  # never inside a word of prose
_CANNOT = (r"\bi (?:cannot|can't|can not|won't|will not|am unable to|'m unable to"
           r"|am not able to|'m not able to)")
_REFUSAL = re.compile(
    r"\bas an ai\b|\bas an? (?:large )?language model\b"
    r"|\bi(?: am|'m) (?:sorry|afraid),? but\b|\bsorry,? (?:but )?i (?:can't|cannot)\b"
    + r"|" + _CANNOT + r" (?:help|assist)(?: you)? with (?:that|this|your|such|these|the request)\b"
    + r"|" + _CANNOT + r" (?:comply|fulfil|fulfill|provide|create|generate|write|produce|complete)"
    r" (?:that|this|such|these|those|any|content|a response|an answer|prompts?|requests?)\b",
    re.IGNORECASE,
)
REFUSAL_WINDOW = 200  # refusals open the text: only its first characters are searched


def _visible(text: str) -> str:
    return "".join(text.split())


def is_word(token: str) -> bool:
    """A token of prose in any script: mostly letters/digits, none of the characters of code."""
    alnum = sum(ch.isalnum() for ch in token)
    return alnum > 0 and 2 * alnum >= len(token) and not _CODE_CHARS.intersection(token)


def prose_fractions(text: str) -> tuple[float, float]:
    """(letters / non-space characters, word-shaped tokens / tokens); (0, 0) for blank text."""
    visible = _visible(text)
    tokens = text.split()
    if not visible:
        return 0.0, 0.0
    letters = sum(ch.isalpha() for ch in visible) / len(visible)
    words = sum(is_word(tok) for tok in tokens) / len(tokens)
    return letters, words


def has_garbage(text: str) -> bool:
    """Control characters (other than whitespace) or U+FFFD, the mark of undecodable bytes."""
    return any(ch == "\ufffd" or (unicodedata.category(ch) == "Cc" and not ch.isspace()) for ch in text)


def ascii_fraction(text: str) -> float:
    visible = _visible(text)
    return sum(ch.isascii() for ch in visible) / len(visible) if visible else 0.0


def is_refusal(text: str) -> bool:
    head = text[:REFUSAL_WINDOW].replace("\u2019", "'")
    return bool(_REFUSAL.search(head))


def word_ngrams(text: str, n: int = 3) -> set[tuple[str, ...]]:
    """Word n-grams of the casefolded, punctuation-free text (the whole text when shorter)."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    words = "".join(ch if ch.isalnum() else " " for ch in folded).split()
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def meta_overlap(text: str, meta_ngrams: AbstractSet[tuple[str, ...]]) -> float:
    """Share of ``text``'s word 3-grams that also occur in the meta-prompt."""
    grams = word_ngrams(text)
    return len(grams & meta_ngrams) / len(grams) if grams else 0.0


def rejection_reason(text: str, cfg: Any, meta_ngrams: AbstractSet[tuple[str, ...]] = frozenset(),
                     endings: tuple[str, ...] = ()) -> str | None:
    """The first filter ``text`` fails (a name from :data:`FILTERS`), or None to keep it.

    ``cfg`` is the generator config; ``meta_ngrams`` is ``word_ngrams(meta_prompt)``;
    ``endings`` is the template's (empty: any ending).
    """
    if not text.strip():
        return "empty"
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    if has_garbage(text) or min(prose_fractions(text)) < cfg.min_prose_fraction:
        return "not_prose"
    if ascii_fraction(text) < cfg.min_ascii_fraction:
        return "non_ascii"
    if is_refusal(text):
        return "refusal"
    if meta_ngrams and meta_overlap(text, meta_ngrams) >= cfg.max_meta_overlap:
        return "meta_copy"
    if endings and not text.rstrip().endswith(tuple(endings)):
        return "unfinished"
    return None
