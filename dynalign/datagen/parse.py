"""Turn one generator completion into the prompts it contains.

Generators ignore format instructions in many ways, so :func:`parse_prompts` accepts them
all: JSON (an array of strings or of objects, ``{"prompts": [...]}``, a keyed object, an
array cut off by the token limit), code fences around anything, numbered items (``1.``
``1)`` ``(1)`` ``1:`` ``1 -``), bullets (``-`` ``*`` ``•`` ...), labels (``Prompt 1:``
``**Request 2**:`` ``### Prompt 3``), items that run over several lines, quoted lines,
and a completion that is just one prompt. Pure functions; no filtering happens here.

A base model does not follow instructions: it continues a document (a ``raw`` template
ending in ``3.``). :func:`parse_continuation` reads such a completion as the rest of that
list: one item per line, up to the first blank line or the first line that opens no item
(the model has left the list: a heading, an answer, prose).
"""

from __future__ import annotations

import json
import re
from typing import Any

_FENCE_LINE = re.compile(r"^\s*```[\w+.-]*\s*$")
_HEADING = re.compile(r"^#{1,6}\s*")
_EMPHASIS = re.compile(r"^(?:\*\*|__)\s*")
_NUMBER = re.compile(r"^(?:\(\s*\d{1,3}\s*\)|\[\s*\d{1,3}\s*\]"  # (1) [1]
                     r"|\d{1,3}\s*[.):\]](?!\d)"  # 1. 1) 1: 1] (not 3.5 or 10:30)
                     r"|\d{1,3}\s+[-\u2013\u2014]\s)\s*")  # "1 - "
_BULLET = re.compile(r"^[-*+\u2022\u00b7\u2023\u25aa\u25cf\u25e6\u2013\u2014]\s+")
_LABEL = re.compile(
    r"^(?:prompt|request|question|message|query|task|user\s+message)\s*#?\s*(?:\d{1,3})?\s*"
    r"(?:\([^)]{0,80}\))?\s*(?:\*\*|__)?\s*(?:[:.)\-\u2013\u2014]|$)\s*(?:\*\*|__)?\s*",
    re.IGNORECASE,
)
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb", "`": "`"}
_JSON_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"(?!\s*:)')
_TEXT_KEYS = ("prompt", "request", "message", "user_message", "text", "content", "question", "query")
_LIST_KEYS = ("prompts", "requests", "messages", "questions", "items", "data", "results")


def parse_prompts(text: str) -> list[str]:
    """All prompts in one completion, in order, cleaned of markers, quotes and emphasis."""
    body = "\n".join(line for line in (text or "").splitlines() if not _FENCE_LINE.match(line)).strip()
    if not body:
        return []
    from_json = _prompts_from_json(body)
    if from_json:
        return from_json
    return [p for p in (clean_item(i) for i in _split_items(body)) if p]


def parse_continuation(text: str, tail: str = "") -> list[str]:
    """The list items of ``tail + text``, where ``tail`` is the last line of the raw meta-prompt
    (e.g. ``"3."``): the first item is the one the prompt opened. One item per line; the list
    ends at the first blank line or line that is not an item."""
    found: list[str] = []
    for line in (tail + (text or "")).splitlines():
        if not line.strip():
            break
        is_item, rest = strip_marker(line)
        if not is_item:
            break
        item = clean_item(rest)
        if item:
            found.append(item)
    return found


def clean_item(item: str) -> str:
    """One prompt's text: whitespace collapsed, wrapping quotes / emphasis / trailing commas removed."""
    s = " ".join(item.split())
    while True:
        before = s
        s = s.rstrip(",").strip()
        for marker in ("**", "__"):
            if s.startswith(marker) and s.endswith(marker) and len(s) > 2 * len(marker):
                s = s[len(marker):-len(marker)].strip()
        if len(s) >= 2 and s[0] in _QUOTES and s[-1] == _QUOTES[s[0]]:
            s = s[1:-1].strip()
        if s == before:
            return s


# ------------------------------------------------------------------------------ JSON


def _prompts_from_json(body: str) -> list[str]:
    for candidate in _json_candidates(body):
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        found = [clean_item(s) for s in _strings_in(value)]
        found = [s for s in found if s]
        if found:
            return found
    if body.startswith("["):  # an array cut off by the token limit: keep its complete strings
        found = [clean_item(_unescape(m.group(1))) for m in _JSON_STRING.finditer(body)]
        return [s for s in found if s]
    return []


def _json_candidates(body: str) -> list[str]:
    out = [body]
    for open_, close in (("[", "]"), ("{", "}")):
        start, end = body.find(open_), body.rfind(close)
        if 0 <= start < end:
            out.append(body[start:end + 1])
    return out


def _strings_in(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in _strings_in(v)]
    if isinstance(value, dict):
        lowered = {str(k).lower(): v for k, v in value.items()}
        for key in _LIST_KEYS:
            if isinstance(lowered.get(key), list):
                return _strings_in(lowered[key])
        for key in _TEXT_KEYS:
            if isinstance(lowered.get(key), str):
                return [lowered[key]]
        if value and all(isinstance(v, str) for v in value.values()):  # {"1": "...", "2": "..."}
            return list(value.values())
    return []


def _unescape(s: str) -> str:
    try:
        return json.loads(f'"{s}"')
    except ValueError:
        return s


# ----------------------------------------------------------------------------- lines


def strip_marker(line: str) -> tuple[bool, str]:
    """``(True, rest)`` when the line opens a list item (number, bullet or label), else ``(False, line)``."""
    s = line.strip()
    is_item = False
    while True:
        before = s
        s = _EMPHASIS.sub("", _HEADING.sub("", s))
        for pattern in (_NUMBER, _BULLET, _LABEL):
            match = pattern.match(s)
            if match and (match.end() > 0):
                s, is_item = s[match.end():], True
                break
        if s == before:
            return is_item, s


def _split_items(body: str) -> list[str]:
    items: list[list[str]] = []
    loose: list[str] = []  # text outside every item: a preamble, a closing remark, or a lone prompt
    open_item: list[str] | None = None
    for line in body.splitlines():
        if not line.strip():
            if open_item:  # a blank line ends an item; an empty label ("Prompt 1:") stays open
                open_item = None
            continue
        is_item, rest = strip_marker(line)
        if is_item:
            open_item = [rest] if rest else []
            items.append(open_item)
        elif open_item is not None:
            open_item.append(line)
        else:
            loose.append(line)
    if any(any(part.strip() for part in item) for item in items):
        return [" ".join(item) for item in items]
    quoted = [line for line in loose if _is_quoted(line.strip())]
    if quoted:
        return quoted
    return [_drop_intro(loose)]


def _is_quoted(s: str) -> bool:
    s = s.rstrip(",").rstrip()
    return len(s) >= 2 and s[0] in _QUOTES and s[-1] == _QUOTES[s[0]]


def _drop_intro(lines: list[str]) -> str:
    """A single prompt, without an introduction line such as "Here is a prompt:"."""
    if len(lines) > 1 and lines[0].rstrip().endswith(":"):
        lines = lines[1:]
    return " ".join(lines)
