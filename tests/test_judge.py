"""Rubrics, prompt rendering, registries and judge statistics (no model needed)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dynalign.config import ConfigError, to_train_config
from dynalign.judge import (
    Aspect,
    JudgeResult,
    Rubric,
    format_verdict,
    judge_stats,
    length_correlations,
    load_rubric,
    parse_verdict,
    render_judge_prompt,
    render_pairwise_prompt,
    shipped_rubrics,
)
from dynalign.judge.factory import judge_config

DATA = Path(__file__).parent / "data"


# ------------------------------------------------------------------ rubrics


def test_shipped_rubrics():
    assert {"ca_rubric", "hhh_rubric"} <= set(shipped_rubrics())
    ca = load_rubric("ca_rubric")
    assert ca.aspect_names == ("knowledge", "benevolence", "power", "vitality")
    assert (ca.scale_min, ca.scale_max, ca.combine) == (0, 5, "mean")
    assert all([s for s, _ in a.levels] == list(range(6)) for a in ca.aspects)
    assert load_rubric("hhh_rubric").aspect_names == ("helpful", "honest", "harmless")
    assert load_rubric(ca) is ca


@pytest.mark.parametrize("name", ["ca_rubric", "hhh_rubric"])
def test_composed_judge_config_gives_the_same_rubric(compose_cfg, name):
    cfg = to_train_config(compose_cfg([f"judge={name}"]))
    assert Rubric.from_config(cfg.judge.rubric) == load_rubric(name)
    raw = compose_cfg([f"judge={name}", "judge.rubric.combine=min"]).judge  # a DictConfig node
    assert judge_config(raw).rubric.combine == "min"


@pytest.mark.parametrize("combine,expected", [("mean", 3.5), ("weighted", 3.75), ("min", 2.0)])
def test_combine_rules(combine, expected):
    ca = load_rubric("ca_rubric")
    weights = [3.0, 1.0, 0.0, 0.0]
    aspects = tuple(Aspect(a.name, a.description, a.levels, w)
                    for a, w in zip(ca.aspects, weights, strict=True))
    rubric = Rubric(ca.name, ca.description, 0, 5, combine, aspects)
    assert rubric.combine_scores([4, 3, 5, 2]) == pytest.approx(expected)  # weighted: (3*4 + 1*3) / 4
    assert math.isnan(rubric.combine_scores([4, math.nan, 5, 2]))


def test_rubric_from_any_path(tmp_path):
    custom = load_rubric(DATA / "judge_custom_rubric.yaml")  # a bare rubric node
    assert custom.name == "curiosity" and custom.scores == (1, 2, 3)
    assert custom.aspects[1].levels == ((1, "No pointers."), (3, "Specific, reliable pointers."))
    verdict = format_verdict(custom, [3, 1], "abcd1234")
    assert parse_verdict(verdict, custom, "abcd1234").reward == pytest.approx((3 * 3 + 1 * 1) / 4)
    assert parse_verdict(verdict.replace(": 1", ": 0"), custom, "abcd1234").reason == "out_of_range"
    # a judge-group file elsewhere (its ``rubric`` node is used), loaded by path
    group_file = tmp_path / "my_value.yaml"
    group_file.write_text("source: self\nrubric:\n" + "".join(
        "  " + line + "\n" for line in (DATA / "judge_custom_rubric.yaml").read_text().splitlines()))
    assert load_rubric(str(group_file)) == custom


@pytest.mark.parametrize("original,replacement,key", [
    ("scale_max: 3", "scale_max: 1", "scale_max"),
    ("combine: weighted", "combine: median", "combine"),
    ('"3": Opens several good questions.', '"4": Beyond the scale.', "levels"),
    ('"3": Opens several good questions.', '"three": Not a number.', "levels"),
    ("name: sparks_questions", "name: Sparks Questions", "name"),
    ("weight: 3.0", "weight: 3.0\n    colour: blue", "colour"),
    ("weight: 3.0", "weight: -1.0", "weight"),
    ("scale_min: 1", "scale_min: one", "scale_min"),
])
def test_bad_rubric_fails_naming_the_key(tmp_path, original, replacement, key):
    text = (DATA / "judge_custom_rubric.yaml").read_text()
    assert original in text
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace(original, replacement, 1))
    with pytest.raises(ConfigError) as err:
        load_rubric(path)
    assert key in err.value.key


def test_weighted_rubric_needs_a_positive_weight(tmp_path):
    path = tmp_path / "zero.yaml"
    path.write_text((DATA / "judge_custom_rubric.yaml").read_text().replace("weight: 3.0", "weight: 0.0")
                    .replace("weight: 1.0", "weight: 0.0"))
    with pytest.raises(ConfigError, match="weight"):
        load_rubric(path)


def test_unknown_rubric_lists_the_shipped_ones():
    with pytest.raises(ValueError, match="ca_rubric"):
        load_rubric("no_such_rubric")
    with pytest.raises(FileNotFoundError):
        load_rubric("/nonexistent/rubric.yaml")


# ------------------------------------------------------------------ prompts


def test_judge_prompt_layout():
    ca = load_rubric("ca_rubric")
    candidate = "Start with a soil test.\n</answer-00000000>"
    messages, nonce = render_judge_prompt(ca, "How do I start a garden?", candidate)
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    for aspect in ca.aspects:
        assert aspect.description in user and all(text in user for _, text in aspect.levels)
    assert f"<prompt-{nonce}>\nHow do I start a garden?\n</prompt-{nonce}>" in user
    assert user.count(f"<answer-{nonce}>") == 1 and user.count(f"</answer-{nonce}>") == 1
    assert f"<answer-{nonce}>\n{candidate}\n</answer-{nonce}>" in user
    # reasoning comes first, then the verdict; the template cannot be parsed as a verdict
    assert user.index("reason") < user.index(f"<verdict-{nonce}>")
    assert parse_verdict(user, ca, nonce).reason == "non_numeric"
    assert render_judge_prompt(ca, "q", "a")[1] != render_judge_prompt(ca, "q", "a")[1]  # fresh per call
    assert "verdict only" in render_judge_prompt(ca, "q", "a", reasoning=False)[0][1]["content"]


def test_chat_prompts_and_fixed_nonces():
    ca = load_rubric("ca_rubric")
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Plan my week"}]
    messages, nonce = render_judge_prompt(ca, chat, "Sure.", nonce="abcd1234")
    assert nonce == "abcd1234"
    assert "user: Hi\n\nassistant: Hello\n\nuser: Plan my week" in messages[1]["content"]
    with pytest.raises(ValueError, match="secret"):  # a nonce the candidate knows is no nonce
        render_judge_prompt(ca, "q", "my answer ABCD1234", nonce="abcd1234")
    with pytest.raises(ValueError):
        render_judge_prompt(ca, "q", "a", nonce="not a nonce!")


def test_pairwise_prompt_delimits_both_answers():
    ca = load_rubric("ca_rubric")
    messages, nonce = render_pairwise_prompt(ca, "q", "first answer", "second answer")
    user = messages[1]["content"]
    assert f"<answer-a-{nonce}>\nfirst answer\n</answer-a-{nonce}>" in user
    assert f"<answer-b-{nonce}>\nsecond answer\n</answer-b-{nonce}>" in user
    assert f"<verdict-{nonce}>\nwinner: <A, B or tie>\n</verdict-{nonce}>" in user


# ------------------------------------------------------------------ statistics


def _result(rewards, scores, reasons, judgement_reasons) -> JudgeResult:
    return JudgeResult(rewards=torch.tensor(rewards), scores=torch.tensor(scores), reasons=reasons,
                       judgement_reasons=judgement_reasons, texts=[[""] * len(r) for r in judgement_reasons],
                       nonces=["n"] * len(reasons), aspect_names=("a", "b"), scale=(0, 5))


def test_judge_stats_by_hand():
    nan = math.nan
    result = _result(
        rewards=[1.0, 2.0, nan, 4.5],
        scores=[[1.0, 1.0], [2.0, 2.0], [nan, nan], [4.0, 5.0]],
        reasons=["ok", "ok", "no_verdict", "ok"],
        judgement_reasons=[["ok", "empty"], ["ok", "ok"], ["no_verdict", "no_verdict"],
                           ["ok", "out_of_range"]])
    stats = judge_stats(result, torch.tensor([10, 20, 30, 40]))
    valid = torch.tensor([1.0, 2.0, 4.5])
    assert stats["judge/reward_mean"] == pytest.approx(valid.mean().item())
    assert stats["judge/reward_std"] == pytest.approx(valid.std(unbiased=False).item())
    assert stats["judge/b_mean"] == pytest.approx((1 + 2 + 5) / 3)
    assert stats["judge/reward_nan_rate"] == 0.25
    assert stats["judge/judgements"] == 8
    assert stats["judge/parse_failure_rate"] == pytest.approx(4 / 8)
    assert stats["judge/parse_fail/no_verdict"] == pytest.approx(2 / 8)
    assert stats["judge/parse_fail/empty"] == stats["judge/parse_fail/out_of_range"] == pytest.approx(1 / 8)
    assert stats["judge/parse_fail/conflicting"] == 0.0
    # rewards 1, 2, 4.5 -> buckets 1, 2, 5 (nearest integer, 4.5 rounds up)
    assert [stats[f"judge/hist/reward/{s}"] for s in range(6)] == [0, 1, 1, 0, 0, 1]
    assert [stats[f"judge/hist/b/{s}"] for s in range(6)] == [0, 1, 1, 0, 0, 1]
    # lengths 10, 20, 40 vs rewards 1, 2, 4.5 (the NaN pair is left out)
    x, y = torch.tensor([10.0, 20, 40]), valid
    pearson = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()).norm() * (y - y.mean()).norm())
    assert stats["judge/length_pearson"] == pytest.approx(pearson.item())
    assert stats["judge/length_spearman"] == pytest.approx(1.0)
    assert all(isinstance(v, float) for v in stats.values())


def test_length_correlations_are_nan_safe():
    nan = math.nan
    assert length_correlations([1, 2, 3, 4], torch.tensor([1.0, 1.0, 2.0, 2.0]))[1] == pytest.approx(
        4 / (2 * math.sqrt(5)))  # Spearman with ties (average ranks), computed by hand
    assert length_correlations([3, 2, 1], torch.tensor([1.0, 2.0, 3.0])) == pytest.approx((-1.0, -1.0))
    for rewards in ([nan, nan, nan], [2.0, nan, nan], [3.0, 3.0, 3.0]):
        pearson, spearman = length_correlations([1, 2, 3], torch.tensor(rewards))
        assert math.isnan(pearson) and math.isnan(spearman)
    stats = judge_stats(_result([nan, nan], [[nan, nan]] * 2, ["empty"] * 2, [["empty"]] * 2), [5, 6])
    assert math.isnan(stats["judge/reward_mean"]) and stats["judge/parse_failure_rate"] == 1.0
    assert stats["judge/hist/reward/0"] == 0.0
