"""Parsing judge verdicts: a pure function from the judge's own text to scores and a reward.

Only the text the judge generated is parsed, never its prompt. Rules, in order:

1. Empty or whitespace-only output -> ``empty``.
2. Only blocks ``<verdict-NONCE>...</verdict-NONCE>`` with this call's nonce count (tag
   and nonce are matched case-insensitively). Verdict-shaped text with another nonce or
   none at all -- a quoted candidate, ``Score: 5``, ``[[8]]``, bare JSON -- is ignored:
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
   are ``non_numeric``. A block's problems are reported by priority:
   ``malformed`` (a line that is not ``name: value``), ``unknown_aspect``,
   ``duplicate_aspect``, ``non_numeric``, ``out_of_range``, ``missing_aspect``.

Any failure gives NaN for every aspect and the reward: never a silent default.
"""

from __future__ import annotations

import json
import math
import re
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

_ANY_VERDICT_TAG = re.compile(r"</?verdict(?:-[^>\s]*)?>", re.IGNORECASE)
_CLOSING_TAG = re.compile(r"</verdict(?:-[^>\s]*)?>", re.IGNORECASE)
_FENCE = re.compile(r"```[A-Za-z]*\s*(.*?)\s*```", re.DOTALL)
_FIELD = re.compile(r"([A-Za-z][A-Za-z0-9_ \-]*?)\s*[:=]\s*(.*)")
_BULLET = re.compile(r"^[-\u2022]\s+")
_INTEGER = re.compile(r"([+-]?[0-9]+)(?:\s*/\s*([0-9]+))?")  # [0-9]: ASCII only, unlike \d


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
    """The bodies of the blocks tagged with ``nonce``, or ``([], failure reason)``."""
    if not text or not text.strip():
        return [], "empty"
    tag = re.escape(nonce)
    block = re.compile(rf"<verdict-{tag}>(.*?)</verdict-{tag}>", re.IGNORECASE | re.DOTALL)
    bodies, end = [], 0
    for match in block.finditer(text):
        bodies.append(match.group(1))
        end = match.end()
    unclosed = re.compile(rf"<verdict-{tag}>", re.IGNORECASE).search(text, end)
    if unclosed:
        closed_otherwise = _CLOSING_TAG.search(text, unclosed.end())
        return [], "malformed" if closed_otherwise else "truncated"
    if bodies:
        return bodies, None
    return [], "wrong_nonce" if _ANY_VERDICT_TAG.search(text) else "no_verdict"


def verdict_fields(body: str) -> list[tuple[str, Any]] | None:
    """``(name, raw value)`` pairs of a verdict body, in order; None if it is not well formed."""
    body = body.strip()
    fenced = _FENCE.fullmatch(body)
    if fenced:
        body = fenced.group(1).strip()
    if body.startswith("{"):
        try:  # object_pairs_hook keeps duplicate keys visible
            pairs = json.loads(body, object_pairs_hook=list)
        except ValueError:
            return None
        if not isinstance(pairs, list):
            return None
        return [(normalize_name(str(k)), v) for k, v in pairs]
    fields = []
    for line in body.splitlines():
        line = _BULLET.sub("", line.replace("*", "").replace("`", "").strip())
        if not line:
            continue
        match = _FIELD.fullmatch(line)
        if not match:
            return None
        fields.append((normalize_name(match.group(1)), match.group(2).strip()))
    return fields


def normalize_name(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def _score(value: Any, rubric: Rubric) -> int | str:
    """The integer score in ``value`` or a failure reason."""
    if isinstance(value, bool):
        return "non_numeric"
    if isinstance(value, int):
        score = value
    elif isinstance(value, str):
        match = _INTEGER.fullmatch(value.strip())
        if not match or (match.group(2) is not None and int(match.group(2)) != rubric.scale_max):
            return "non_numeric"
        score = int(match.group(1))
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
