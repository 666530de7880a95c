"""``python -m dynalign.judge_check``: the statistics by hand, the shipped sanity set, config
validation (exit 2 before any model loads) and the command end to end on the tiny model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from dynalign.config import CONF_DIR, ConfigError, register_configs
from dynalign.judge_check import (
    CORRECT,
    FAILED,
    TIE,
    WRONG,
    SanityItem,
    accuracy_summary,
    balanced_subset,
    check_options,
    length_outcomes,
    load_items,
    pairwise_check,
    pointwise_outcome,
    pointwise_outcomes,
    prepare,
    register_schema,
)

ASPECTS = ("knowledge", "benevolence", "power", "vitality")


def test_pointwise_outcomes_and_accuracy_by_hand():
    outcomes = pointwise_outcomes([3.0, 2.0, math.nan, 1.0], [1.0, 2.0, 2.0, 4.0])
    assert outcomes == [CORRECT, TIE, FAILED, WRONG]
    summary = accuracy_summary(outcomes, ["power", "power", "vitality", "vitality"], samples=200)
    assert summary["accuracy"] == pytest.approx((1 + 0.5) / 3)  # the failed item is left out
    assert summary["failure_rate"] == 0.25
    assert (summary["correct"], summary["ties"], summary["wrong"], summary["failed"]) == (1, 1, 1, 1)
    assert (summary["decided"], summary["total"]) == (3, 4)
    assert summary["aspects"] == {"power": {"accuracy": 0.75, "decided": 2, "total": 2},
                                  "vitality": {"accuracy": 0.0, "decided": 1, "total": 2}}
    assert 0.0 <= summary["ci_low"] <= summary["accuracy"] <= summary["ci_high"] <= 1.0
    assert summary == accuracy_summary(outcomes, ["power", "power", "vitality", "vitality"], samples=200)


def test_a_judge_without_verdicts_gets_no_accuracy():
    summary = accuracy_summary(pointwise_outcomes([math.nan, 1.0], [2.0, math.nan]), ["power"] * 2)
    assert summary["failed"] == 2 and summary["failure_rate"] == 1.0 and summary["decided"] == 0
    assert math.isnan(summary["accuracy"]) and math.isnan(summary["ci_low"])  # never a default score


def test_length_only_judge_prefers_the_longer_answer():
    assert length_outcomes(["aaa", "b", "cc"], ["a", "bb", "dd"]) == [CORRECT, WRONG, TIE]


def test_pairwise_accuracy_and_order_agreement_by_hand():
    # votes from better's side ("a" = better won) with better shown first, then worse shown first
    better_first = ["a", "a", "a", "b", None, "tie"]
    worse_first = ["a", "a", "b", "b", "a", "tie"]
    # pairs: 2 agreed wins (correct), a flip with the order (tie), an agreed loss (wrong), a failed
    # order, an agreed tie
    summary = pairwise_check(better_first, worse_first, ["power"] * 6, samples=100)
    assert (summary["correct"], summary["ties"], summary["wrong"], summary["failed"]) == (2, 2, 1, 1)
    assert summary["accuracy"] == pytest.approx((2 + 0.5 + 0 + 0.5) / 5)
    assert summary["failure_rate"] == pytest.approx(1 / 6)
    assert summary["agreement"] == pytest.approx(4 / 5)  # of the 5 pairs with both verdicts


def _item(k: int, aspect: str) -> SanityItem:
    return SanityItem(id=f"i{k}", aspect=aspect, domain="d", prompt="p", better="b", worse="w")


def test_a_limited_subset_takes_the_aspects_in_turn():
    items = [_item(0, "knowledge"), _item(1, "knowledge"), _item(2, "knowledge"), _item(3, "power"),
             _item(4, "power"), _item(5, "vitality")]
    assert [i.id for i in balanced_subset(items, 4)] == ["i0", "i3", "i5", "i1"]
    assert [i.id for i in balanced_subset(items, 100)] == ["i0", "i3", "i5", "i1", "i4", "i2"]
    assert balanced_subset(items, None) == items


@pytest.mark.parametrize("limit", [None, 24, 8])
def test_the_shipped_set_is_balanced_in_aspects_and_length(limit):
    items = load_items(limit=limit)
    n = limit or 48
    assert len(items) == n and len({i.id for i in items}) == n
    assert all(sum(i.aspect == a for i in items) == n // 4 for a in ASPECTS)
    outcomes = length_outcomes([i.better for i in items], [i.worse for i in items])
    assert accuracy_summary(outcomes, [i.aspect for i in items])["accuracy"] == 0.5  # length explains nothing


@pytest.mark.parametrize("values, key", [
    ({"limit": 0}, "judge_check.limit"),
    ({"limit": "many"}, "judge_check.limit"),
    ({"bootstrap_samples": 0}, "judge_check.bootstrap_samples"),
    ({"pairwse": False}, "judge_check.pairwse"),
])
def test_bad_options_name_their_key(values, key):
    with pytest.raises(ConfigError) as err:
        check_options(values)
    assert err.value.key == key


def test_a_missing_items_file_names_its_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_items(tmp_path / "none.yaml")
    assert err.value.key == "judge_check.items_file"


def test_the_command_composes_on_the_training_tree():
    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="judge_check",
                          overrides=["judge=hhh_rubric", "judge.mode=logprob", "judge_check.limit=5",
                                     "judge_check.pairwise=false"])
        config, options, items = prepare(cfg)
    finally:
        GlobalHydra.instance().clear()
        register_configs()  # the training schema again, for the tests that follow
    assert config.judge.mode == "logprob" and config.judge.rubric.name == "hhh_rubric"
    assert options.limit == 5 and options.pairwise is False and options.bootstrap_samples == 1000
    assert len(items) == 5


def _run(tmp_path, *overrides: str, cache) -> subprocess.CompletedProcess:
    env = {**os.environ, "DYNALIGN_CACHE": str(cache), "PYTHONPATH": str(REPO_ROOT), "DS_ACCELERATOR": "cpu",
           "WANDB_MODE": "disabled"}
    args = [sys.executable, "-m", "dynalign.judge_check", *overrides, f"hydra.run.dir={tmp_path / 'out'}"]
    return subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("override, key", [
    ("judge_check.limit=0", "judge_check.limit"),
    ("judge_check.items_file=/nonexistent/sanity.yaml", "judge_check.items_file"),
])
def test_a_bad_value_exits_2_before_any_model_loads(tmp_path, override, key):
    proc = _run(tmp_path, override, cache=tmp_path / "cache")
    assert proc.returncode == 2, proc.stderr
    assert f"invalid config: {key}" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "cache").exists()  # the tiny model was never built


@pytest.mark.slow  # a subprocess: the tiny self-judge scores 8 answers and 4 pairs, 25-55 s on 2 cores
def test_cli_measures_the_tiny_self_judge(tmp_path, cache_dir, tiny_model_path):
    proc = _run(tmp_path, "model=tiny", "judge=ca_rubric", "judge.source=self", "judge_check.limit=4",
                "judge_check.bootstrap_samples=50", cache=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "judge_check.json").read_text())
    assert results["header"] == "Judge check: model tiny, judge self, mode logprob, rubric ca_rubric, 4 items"
    assert results["options"]["limit"] == 4 and results["judge"]["mode"] == "logprob"
    rows = results["rows"]
    assert len(rows) == 4 and {r["aspect"] for r in rows} == set(ASPECTS)
    for name in ("pointwise", "pairwise"):
        s = results[name]
        outcomes = [r["outcome"] if name == "pointwise" else r["pairwise"]["outcome"] for r in rows]
        assert s["failed"] == outcomes.count(FAILED) and s["decided"] + s["failed"] == s["total"] == 4
        assert s["failure_rate"] == s["failed"] / 4
        assert s["correct"] + s["ties"] + s["wrong"] == s["decided"]
        if s["decided"]:
            assert 0.0 <= s["ci_low"] <= s["accuracy"] <= s["ci_high"] <= 1.0
    for row in rows:
        scored = [row["better_score"], row["worse_score"]]
        assert row["outcome"] == pointwise_outcome(*(math.nan if x is None else x for x in scored))
        assert all(0.0 <= x <= 5.0 for x in scored if x is not None)
        assert row["pairwise"]["better_shown_first"] in ("better", "worse", "tie", None)
    assert 0.0 <= results["pairwise"]["agreement"] <= 1.0
    longer_better = sum(r["better_chars"] > r["worse_chars"] for r in rows)
    assert results["pointwise"]["length_only_accuracy"] == longer_better / 4
    markdown = (tmp_path / "out" / "judge_check.md").read_text()
    assert markdown.splitlines()[0] == results["header"] and markdown in proc.stdout


@pytest.mark.slow  # a subprocess: the tiny model writes 8 four-token judgements, 17-20 s on 2 cores
def test_cli_counts_a_judge_without_verdicts_as_failed(tmp_path, cache_dir, tiny_model_path):
    proc = _run(tmp_path, "model=tiny", "judge.mode=generate", "judge.max_new_tokens=4",
                "judge_check.limit=2", "judge_check.bootstrap_samples=50", cache=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "judge_check.json").read_text())
    # random weights write no nonce-tagged verdict: every judgement fails, none gets a default score
    for name in ("pointwise", "pairwise"):
        s = results[name]
        assert s["failed"] == s["total"] == 2 and s["failure_rate"] == 1.0 and s["accuracy"] is None
    assert all(r["outcome"] == FAILED and r["better_score"] is None and r["better_reason"] != "ok"
               for r in results["rows"])
    assert all(r["pairwise"]["outcome"] == FAILED for r in results["rows"])
    assert "| pointwise | n/a | [n/a, n/a] | 0/2 | 100.0% |" in proc.stdout
