"""Parsing judge verdicts: a pure function from the judge's own text to scores and a reward.

Only the text the judge generated is parsed, never its prompt. Rules, in order:

1. Empty or whitespace-only output -> ``empty``.
2. Only blocks ``<verdict-NONCE>...</verdict-NONCE>`` with this call's nonce count (tag
   and nonce are matched ASCII-case-insensitively). Verdict-shaped text with another nonce
   or none at all -- a quoted candidate, ``Score: 5``, ``[[8]]``, bare JSON -- is ignored:
   ``wrong_nonce`` if such tags exist but none has the nonce, else ``no_verdict``.
3. An opening tag with the nonce that is never closed -> ``truncated`` (``malformed`` if
   it is closed with a different tag).
4. Several blocks with the nonce must agree exactly, else ``conflicting``.
5. The block holds one ``aspect: score`` line per aspect (or a JSON object). Accepted
   variants: any case for the aspect names, spaces or hyphens for underscores, ``=`` for
   ``:``, extra whitespace, tabs, CRLF and blank lines, markdown ``*``/backticks, ``- ``
   bullets, aspects in any order, a leading ``+``, a ``N/MAX`` score whose MAX is the
   scale's top, a fenced block, JSON integers or quoted integers. Scores are ASCII
   integers only: decimals (even ``4.0``), words, unicode digits and trailing remarks
   are ``non_numeric``. A number of more than 100 significant digits (a score, a MAX, a
   JSON integer, signed or not) is ``out_of_range`` without being read (``int()`` refuses
   more than 4300 digits). A block's problems are reported by priority:
   ``malformed`` (a line that is not ``name: value``, JSON nested too deep to read),
   ``unknown_aspect``, ``duplicate_aspect``, ``non_numeric``, ``out_of_range``,
   ``missing_aspect``.

Any failure gives NaN for every aspect and the reward: never a silent default. Parsing
never raises and takes time linear in the text: tags, fences and ``name: value`` lines are
found by forward scans, not by regexes that backtrack (``<verdict-`` repeated 8000 times
took seconds that way).
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from dynalign.judge.rubric import Rubric, RubricLike, load_rubric

OK = "ok"
PARSE_FAILURES = ("empty", "no_verdict", "wrong_nonce", "truncated", "conflicting", "malformed",
                  "unknown_aspect", "duplicate_aspect", "non_numeric", "out_of_range", "missing_aspect")
BACKEND_ERROR = "backend_error"  # the judge call itself failed (after the backend's retries)
NO_SCORE_LOGPROBS = "no_score_logprobs"  # logprob mode over HTTP: no score token among the top logprobs
FAILURE_REASONS = PARSE_FAILURES + (BACKEND_ERROR, NO_SCORE_LOGPROBS)
_BODY_PRIORITY = ("malformed", "unknown_aspect", "duplicate_aspect", "non_numeric", "out_of_range",
                  "missing_aspect")

# Only ASCII letters change, so a folded text has the same length and indices as the original.
_ASCII_FOLD = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_TAG_END = re.compile(r"[>\s]")  # what ends ``-[^>\s]*`` in a tag like ``<verdict-x>``
_SEPARATOR = re.compile(r"[:=]")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_ \-]*")
_BULLET = re.compile(r"^[-\u2022]\s+")
_INTEGER = re.compile(r"([+-]?[0-9]+)(?:\s*/\s*([0-9]+))?")  # [0-9]: ASCII only, unlike \d
# Far beyond any scale and far below the 4300 digits Python's int() refuses to read.
_MAX_DIGITS = 100


class _Oversized:
    """A JSON integer of more than ``_MAX_DIGITS`` digits: never read, always out of range."""


_OVERSIZED = _Oversized()


@dataclass(frozen=True)
class ParsedVerdict:
    """Scores per aspect (all NaN on failure), the combined reward and ``"ok"`` or a failure code."""

    scores: dict[str, float]
    reward: float
    reason: str

    @property
    def ok(self) -> bool:
        return self.reason == OK


def failed(rubric: Rubric, reason: str) -> ParsedVerdict:
    return ParsedVerdict({name: math.nan for name in rubric.aspect_names}, math.nan, reason)


def verdict_bodies(text: str, nonce: str) -> tuple[list[str], str | None]:
    """The bodies of the blocks tagged with ``nonce``, or ``([], failure reason)``.

    One forward scan: each block is its opening tag and the first closing tag after it.
    """
    if not text or not text.strip():
        return [], "empty"
    folded = text.translate(_ASCII_FOLD)
    opening = f"<verdict-{nonce}>".translate(_ASCII_FOLD)
    closing = f"</verdict-{nonce}>".translate(_ASCII_FOLD)
    bodies = []
    start = folded.find(opening)
    while start >= 0:
        body_start = start + len(opening)
        end = folded.find(closing, body_start)
        if end < 0:  # never closed with the nonce (nor can any later opening tag be)
            closed_otherwise = _has_tag(folded, "</verdict", body_start)
            return [], "malformed" if closed_otherwise else "truncated"
        bodies.append(text[body_start:end])
        start = folded.find(opening, end + len(closing))
    if bodies:
        return bodies, None
    any_tag = _has_tag(folded, "<verdict") or _has_tag(folded, "</verdict")
    return [], "wrong_nonce" if any_tag else "no_verdict"


def _has_tag(folded: str, prefix: str, start: int = 0) -> bool:
    """Whether ``prefix(-[^>\\s]*)?>`` occurs in ``folded`` at or after ``start``.

    As a regex this backtracks quadratically on ``<verdict-`` repeated: every occurrence
    rescans the same run up to the next ``>`` or whitespace. Here a run that ends in
    whitespace holds no ``>``, so no occurrence inside it is a tag and the scan skips it.
    """
    at = folded.find(prefix, start)
    while at >= 0:
        after = at + len(prefix)
        if folded.startswith(">", after):
            return True
        if folded.startswith("-", after):
            stop = _TAG_END.search(folded, after + 1)
            if stop is None:  # no ">" left, so no tag either
                return False
            if folded[stop.start()] == ">":
                return True
            after = stop.start()
        at = folded.find(prefix, after)
    return False


def verdict_fields(body: str) -> list[tuple[str, Any]] | None:
    """``(name, raw value)`` pairs of a verdict body, in order; None if it is not well formed."""
    body = _unfenced(body.strip())
    if body.startswith("{"):
        try:  # object_pairs_hook keeps duplicate keys visible
            pairs = json.loads(body, object_pairs_hook=list, parse_int=_json_int)
        except (ValueError, RecursionError):
            return None
        if not isinstance(pairs, list):
            return None
        return [(normalize_name(str(k)), v) for k, v in pairs]
    fields = []
    for line in body.splitlines():
        line = _BULLET.sub("", line.replace("*", "").replace("`", "").strip())
        if not line:
            continue
        field = _field(line)
        if field is None:
            return None
        fields.append(field)
    return fields


def _unfenced(body: str) -> str:
    """The content of a body fenced by three backticks (and a language name), else the body.

    Sliced rather than matched: the regex it replaces (three backticks, ``[A-Za-z]*\\s*(.*?)\\s*``,
    three backticks) took cubic time on a long run of whitespace.
    """
    if len(body) < 6 or not (body.startswith("```") and body.endswith("```")):
        return body
    return body[3:-3].lstrip(string.ascii_letters).strip()


def _field(line: str) -> tuple[str, str] | None:
    """``(normalized name, value)`` of a ``name: value`` line, or None.

    The first ``:`` or ``=`` separates them (a name holds neither); found directly because
    a regex with a lazy name before ``\\s*[:=]`` backtracks quadratically on long spaces.
    """
    separator = _SEPARATOR.search(line)
    if separator is None or not _NAME.fullmatch(line[:separator.start()].rstrip()):
        return None
    return normalize_name(line[:separator.start()]), line[separator.end():].strip()


def normalize_name(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def _to_int(digits: str) -> int | None:
    """``int(digits)`` for ``[+-]?[0-9]+``, or None past ``_MAX_DIGITS`` significant digits."""
    sign = digits[0] if digits.startswith(("+", "-")) else ""
    magnitude = digits[len(sign):].lstrip("0") or "0"  # int() counts leading zeros too
    return int(sign + magnitude) if len(magnitude) <= _MAX_DIGITS else None


def _json_int(digits: str) -> int | _Oversized:
    """``json.loads``' reader of integers: json's own raises ValueError past 4300 digits."""
    number = _to_int(digits)
    return _OVERSIZED if number is None else number


def _score(value: Any, rubric: Rubric) -> int | str:
    """The integer score in ``value`` or a failure reason."""
    if isinstance(value, _Oversized):
        return "out_of_range"
    if isinstance(value, bool):
        return "non_numeric"
    if isinstance(value, int):
        score = value
    elif isinstance(value, str):
        match = _INTEGER.fullmatch(value.strip())
        if not match:
            return "non_numeric"
        number, top = _to_int(match.group(1)), _to_int(match.group(2) or str(rubric.scale_max))
        if number is None or top is None:  # too long to lie on any scale
            return "out_of_range"
        if top != rubric.scale_max:
            return "non_numeric"
        score = number
    else:  # JSON floats, lists, null
        return "non_numeric"
    return score if rubric.scale_min <= score <= rubric.scale_max else "out_of_range"


def _parse_body(body: str, rubric: Rubric) -> tuple[dict[str, int] | None, str]:
    fields = verdict_fields(body)
    if fields is None:
        return None, "malformed"
    problems: set[str] = set()
    scores: dict[str, int] = {}
    seen: set[str] = set()
    for name, value in fields:
        if name not in rubric.aspect_names:
            problems.add("unknown_aspect")
        elif name in seen:
            problems.add("duplicate_aspect")
        else:
            seen.add(name)
            score = _score(value, rubric)
            if isinstance(score, str):
                problems.add(score)
            else:
                scores[name] = score
    if seen != set(rubric.aspect_names):
        problems.add("missing_aspect")
    for reason in _BODY_PRIORITY:
        if reason in problems:
            return None, reason
    return scores, OK


def parse_verdict(text: str, rubric: RubricLike, nonce: str) -> ParsedVerdict:
    """Per-aspect scores and the combined reward from one judge output (see the module doc)."""
    rubric = load_rubric(rubric)
    bodies, reason = verdict_bodies(text, nonce)
    if reason is not None:
        return failed(rubric, reason)
    parsed = [_parse_body(body, rubric) for body in bodies]
    if len(parsed) > 1 and not all(r == OK and s == parsed[0][0] for s, r in parsed):
        return failed(rubric, "conflicting")
    scores, reason = parsed[0]
    if scores is None:
        return failed(rubric, reason)
    values = [float(scores[name]) for name in rubric.aspect_names]
    scores_by_name = dict(zip(rubric.aspect_names, values, strict=True))
    return ParsedVerdict(scores_by_name, rubric.combine_scores(values), OK)


def parse_pairwise_verdict(text: str, nonce: str) -> tuple[str | None, str]:
    """``("A" | "B" | "tie", "ok")`` from a pairwise judgement, or ``(None, failure reason)``."""
    bodies, reason = verdict_bodies(text, nonce)
    if reason is not None:
        return None, reason
    winners = []
    for body in bodies:
        fields = verdict_fields(body)
        if fields is None:
            return None, "malformed"
        names = [name for name, _ in fields]
        if any(name != "winner" for name in names):
            return None, "unknown_aspect"
        if len(names) != 1:
            return None, "missing_aspect" if not names else "duplicate_aspect"
        value = str(fields[0][1]).strip().strip(".").lower()
        if value not in ("a", "b", "tie"):
            return None, "out_of_range"
        winners.append("tie" if value == "tie" else value.upper())
    if len(set(winners)) > 1:
        return None, "conflicting"
    return winners[0], OK


def parse_failure_stats(results: Iterable[ParsedVerdict | str]) -> dict[str, float]:
    """Failure rate and rate per failure reason over parsed verdicts (or their reason codes).

    Every known reason is present (0.0 when absent) so logged curves stay continuous.
    """
    reasons = [r if isinstance(r, str) else r.reason for r in results]
    counts = Counter(reasons)
    total = len(reasons)
    rate = (lambda c: c / total) if total else (lambda c: math.nan)
    stats = {"count": float(total), "failure_rate": rate(total - counts[OK])}
    unknown = set(counts) - set(FAILURE_REASONS) - {OK}
    for reason in FAILURE_REASONS + tuple(sorted(unknown)):
        stats[f"rate/{reason}"] = rate(counts[reason])
    return stats


def most_common_failure(reasons: Sequence[str]) -> str:
    """The candidate-level reason: ``ok`` if any judgement parsed, else the most frequent failure."""
    if OK in reasons:
        return OK
    return Counter(reasons).most_common(1)[0][0] if reasons else "empty"
