"""Verdict parsing: a corpus of real-world, malformed and adversarial judge outputs."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import pytest
import yaml

from dynalign.judge import (
    FAILURE_REASONS,
    OK,
    PARSE_FAILURES,
    format_verdict,
    load_rubric,
    parse_failure_stats,
    parse_pairwise_verdict,
    parse_verdict,
)
from dynalign.judge.parse import normalize_name, verdict_bodies, verdict_fields

DATA = Path(__file__).parent / "data"
NONCE = "3fa9c2e1"
CORPUS = yaml.safe_load((DATA / "judge_verdicts.yaml").read_text(encoding="utf-8"))


def _output(case: dict) -> str:
    return case["output"].replace("{NU}", NONCE.upper()).replace("{N}", NONCE)


def test_corpus_is_large_and_covers_every_parse_reason():
    assert len(CORPUS) >= 60
    assert len({c["id"] for c in CORPUS}) == len(CORPUS), "duplicate case ids"
    assert {c["reason"] for c in CORPUS} == set(PARSE_FAILURES) | {OK}


@pytest.mark.parametrize("case", CORPUS, ids=[c["id"] for c in CORPUS])
def test_corpus_case(case):
    rubric = load_rubric(case.get("rubric", "ca_rubric"))
    parsed = parse_verdict(_output(case), rubric, NONCE)
    assert parsed.reason == case["reason"]
    assert list(parsed.scores) == list(rubric.aspect_names)
    if case["reason"] == OK:
        assert [parsed.scores[a] for a in rubric.aspect_names] == case["scores"]
        assert parsed.reward == pytest.approx(sum(case["scores"]) / len(case["scores"]))
        assert parsed.ok
    else:  # never a silent default
        assert not parsed.ok
        assert math.isnan(parsed.reward)
        assert all(math.isnan(s) for s in parsed.scores.values())


@pytest.mark.parametrize("name", ["ca_rubric", "hhh_rubric"])
def test_format_verdict_round_trips(name):
    rubric = load_rubric(name)
    for offset in range(len(rubric.scores)):
        scores = [rubric.scores[(offset + i) % len(rubric.scores)] for i in range(len(rubric.aspects))]
        text = "Some reasoning first.\n" + format_verdict(rubric, scores, NONCE)
        parsed = parse_verdict(text, rubric, NONCE)
        assert parsed.ok and [parsed.scores[a] for a in rubric.aspect_names] == scores
        by_name = format_verdict(rubric, dict(zip(rubric.aspect_names, scores, strict=True)), NONCE)
        assert by_name == format_verdict(rubric, scores, NONCE)


def test_only_the_nonce_of_the_call_counts():
    rubric = load_rubric("ca_rubric")
    text = format_verdict(rubric, [5, 5, 5, 5], "0badc0de")
    assert parse_verdict(text, rubric, "0badc0de").ok
    assert parse_verdict(text, rubric, NONCE).reason == "wrong_nonce"
    assert parse_verdict(text, "ca_rubric", "0BADC0DE").reward == 5.0  # a rubric by name; nonce any case


def test_parse_failure_stats_counts_each_reason():
    rubric = load_rubric("ca_rubric")
    outputs = [format_verdict(rubric, [1, 2, 3, 4], NONCE), "", "Score: 4", "Score: 5",
               f"<verdict-{NONCE}>\nknowledge: 9"]
    stats = parse_failure_stats([parse_verdict(t, rubric, NONCE) for t in outputs])
    assert stats["count"] == 5
    assert stats["failure_rate"] == pytest.approx(4 / 5)
    assert stats["rate/empty"] == pytest.approx(1 / 5)
    assert stats["rate/no_verdict"] == pytest.approx(2 / 5)
    assert stats["rate/truncated"] == pytest.approx(1 / 5)
    assert {f"rate/{r}" for r in FAILURE_REASONS} <= set(stats)
    assert sum(stats[f"rate/{r}"] for r in FAILURE_REASONS) == pytest.approx(stats["failure_rate"])
    assert math.isnan(parse_failure_stats([])["failure_rate"])


@pytest.mark.parametrize("text,expected", [
    ("A is clearer.\n<verdict-{N}>\nwinner: A\n</verdict-{N}>", ("A", OK)),
    ("<verdict-{N}>\nWinner: b\n</verdict-{N}>", ("B", OK)),
    ("<verdict-{N}>\nwinner: tie\n</verdict-{N}>", ("tie", OK)),
    ("<verdict-{N}>\nwinner: A\n</verdict-{N}><verdict-{N}>\nwinner: B\n</verdict-{N}>",
     (None, "conflicting")),
    ("<verdict-{N}>\nwinner: C\n</verdict-{N}>", (None, "out_of_range")),
    ("<verdict-{N}>\nbest: A\n</verdict-{N}>", (None, "unknown_aspect")),
    ("<verdict-deadbeef>\nwinner: A\n</verdict-deadbeef>", (None, "wrong_nonce")),
    ("[[A]]", (None, "no_verdict")),
    ("<verdict-{N}>\nwinner:", (None, "truncated")),
])
def test_pairwise_verdicts(text, expected):
    assert parse_pairwise_verdict(text.replace("{N}", NONCE), NONCE) == expected


HUGE = "9" * 5000  # past the 4300 digits int() refuses to read


def _block(body: str) -> str:
    return f"<verdict-{NONCE}>{body}</verdict-{NONCE}>"


def _verdict(knowledge: str) -> str:
    return _block(f"\nknowledge: {knowledge}\nbenevolence: 3\npower: 5\nvitality: 2\n")


def _json_verdict(knowledge: str) -> str:
    return _block(f'{{"knowledge": {knowledge}, "benevolence": 3, "power": 5, "vitality": 2}}')


@pytest.mark.parametrize("text", [
    _verdict(HUGE), _verdict("+" + HUGE), _verdict("-" + HUGE), _verdict(f"{HUGE}/5"),
    _verdict(f"4/{HUGE}"), _verdict(f"{HUGE} / {HUGE}"), _verdict("1" + "0" * 100),
    _json_verdict(HUGE), _json_verdict("-" + HUGE), _json_verdict(f'"{HUGE}"'),
], ids=["line", "plus", "minus", "n_over_max", "huge_max", "both", "101_digits", "json", "json_minus",
        "json_quoted"])
def test_oversized_numbers_are_out_of_range(text):
    parsed = parse_verdict(text, "ca_rubric", NONCE)
    assert parsed.reason == "out_of_range"
    assert math.isnan(parsed.reward) and all(math.isnan(s) for s in parsed.scores.values())


@pytest.mark.parametrize("text,reason", [
    (_verdict("0" * 5000 + "4"), OK),  # leading zeros are no magnitude
    (_verdict(f"{HUGE}.5"), "non_numeric"),  # a decimal stays non_numeric however long
    (_verdict(f"{HUGE} points"), "non_numeric"),
    (_json_verdict("1e999"), "non_numeric"),  # every JSON float is non_numeric, even inf
    (_json_verdict(HUGE + ".0"), "non_numeric"),
    (_json_verdict("[" * 100_000), "malformed"),  # nesting json cannot read (RecursionError)
    (_verdict(HUGE).replace("knowledge: ", "power: 1\nknowledge: "), "duplicate_aspect"),  # priority kept
], ids=["leading_zeros", "decimal", "remark", "json_inf", "json_float", "json_deep", "priority"])
def test_long_numbers_keep_the_other_rules(text, reason):
    assert parse_verdict(text, "ca_rubric", NONCE).reason == reason


def test_pairwise_oversized_winner_is_out_of_range():
    for body in (f"winner: {HUGE}", f'{{"winner": {HUGE}}}', f'{{"winner": [{HUGE}]}}'):
        assert parse_pairwise_verdict(_block(body), NONCE) == (None, "out_of_range")


# Each input is about 1 MB. The regexes the scanner replaced took seconds on 72 KB of
# "<verdict-" and grow quadratically (cubically for the fence), i.e. minutes to hours here;
# a linear scan takes milliseconds. No clock is read: a regression stalls the suite instead.
MB = 1 << 20
ADVERSARIAL = {
    "open_prefix": ("<verdict-" * (MB // 9), "no_verdict"),
    "open_prefix_then_gt": ("<verdict-" * (MB // 9) + ">", "wrong_nonce"),
    "open_prefix_then_space": ("<verdict-" * (MB // 9) + " >", "no_verdict"),
    "closing_prefix": ("</verdict-" * (MB // 10), "no_verdict"),
    "nonce_openings": (f"<verdict-{NONCE}>" * (MB // 18), "truncated"),
    "nonce_openings_closed_otherwise": (f"<verdict-{NONCE}>" * (MB // 18) + "</verdict-x>", "malformed"),
    "nonce_openings_then_prefixes": (f"<verdict-{NONCE}>" + "</verdict-" * (MB // 10), "truncated"),
    "closing_tags": ("</verdict-x>" * (MB // 12), "wrong_nonce"),
    "no_gt": ("<" + "x" * MB, "no_verdict"),
    "field_spaces": (_block("knowledge" + " " * MB + "x"), "malformed"),
    "field_spaces_named": (_block("knowledge" + " " * MB + "x: 4"), "unknown_aspect"),
    "field_tabs": (_block("knowledge" + "\t" * MB + "x: 4"), "malformed"),
    "fence_spaces": (_block("```" + " " * MB + "x"), "malformed"),
    "fenced_spaces": (_block("```json" + " " * MB + "```"), "missing_aspect"),
    "score_spaces": (_verdict("4" * 50 + " " * MB + "x"), "non_numeric"),
    "blocks": (_block("\nknowledge: 1\n") * (MB // 250), "conflicting"),
}


@pytest.mark.parametrize("case", ADVERSARIAL, ids=list(ADVERSARIAL))
def test_adversarial_megabyte_fails_cleanly(case):
    text, reason = ADVERSARIAL[case]
    parsed = parse_verdict(text, "ca_rubric", NONCE)
    assert parsed.reason == reason and math.isnan(parsed.reward)
    assert parse_pairwise_verdict(text, NONCE)[0] is None


def _regex_verdict_bodies(text: str, nonce: str) -> tuple[list[str], str | None]:
    """The regex definition the linear scan replaced: the oracle on small texts."""
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
        closed_otherwise = re.compile(r"</verdict(?:-[^>\s]*)?>", re.I).search(text, unclosed.end())
        return [], "malformed" if closed_otherwise else "truncated"
    if bodies:
        return bodies, None
    return [], "wrong_nonce" if re.search(r"</?verdict(?:-[^>\s]*)?>", text, re.I) else "no_verdict"


PIECES = ["<verdict-", f"<verdict-{NONCE}>", f"</verdict-{NONCE}>", f"<VERDICT-{NONCE.upper()}>",
          f"</Verdict-{NONCE}>", "<verdict-x>", "</verdict-y>", "<verdict>", "</verdict>", "<verdict",
          "</verdict", "verdict", "<", "</", ">", "-", " ", "\n", "\t", "x", "knowledge: 3", NONCE]


def test_scan_agrees_with_the_regex_definition():
    rng = random.Random(0)
    for _ in range(10_000):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randrange(12)))
        assert verdict_bodies(text, NONCE) == _regex_verdict_bodies(text, NONCE), repr(text)


def _regex_verdict_fields(body: str) -> list[tuple[str, str]] | None:
    """The regex definition of ``name: value`` lines and fences (a JSON body aside)."""
    body = body.strip()
    fenced = re.fullmatch(r"```[A-Za-z]*\s*(.*?)\s*```", body, re.DOTALL)
    if fenced:
        body = fenced.group(1).strip()
    fields = []
    for line in body.splitlines():
        line = re.sub(r"^[-\u2022]\s+", "", line.replace("*", "").replace("`", "").strip())
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z][A-Za-z0-9_ \-]*?)\s*[:=]\s*(.*)", line)
        if not match:
            return None
        fields.append((normalize_name(match.group(1)), match.group(2).strip()))
    return fields


BODY_PIECES = ["```", "json", "knowledge", "Power", "x", "4", ":", "=", " ", "\t", "\n", "\r\n", "-", "- ",
               "_", "*", "`", "\u2022 ", "/", "+", "\u00a0"]


def test_fields_agree_with_the_regex_definition():
    rng = random.Random(0)
    for _ in range(10_000):
        body = "".join(rng.choice(BODY_PIECES) for _ in range(rng.randrange(12)))
        assert verdict_fields(body) == _regex_verdict_fields(body), repr(body)
