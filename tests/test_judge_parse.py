"""Verdict parsing: a corpus of real-world, malformed and adversarial judge outputs."""

from __future__ import annotations

import math
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
