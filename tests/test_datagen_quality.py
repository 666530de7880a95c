"""Filters and deduplication on constructed cases, with hand-checked expectations."""

from __future__ import annotations

import pytest

from dynalign.config import GeneratorConfig
from dynalign.datagen.dedup import DuplicateIndex, deduplicate, normalize_text, prompt_id
from dynalign.datagen.filters import (
    ascii_fraction,
    is_refusal,
    meta_overlap,
    prose_fractions,
    rejection_reason,
    word_ngrams,
)
from dynalign.datagen.summary import distinct_n

GOOD = ("My sister and I inherited our parents' house, but she wants to sell it and I want to rent it "
        "out to keep it in the family. How can we decide together without ruining our relationship?")
META = ("You are helping to build a collection of realistic requests that people send to an AI assistant. "
        "Write 4 different requests in the area of personal finance. Make every request specific (a concrete "
        "situation, with details a real person would give), written in the first person, between one and "
        "five sentences long, and different from the others. Here is an example: I rent an old, drafty "
        "flat and my heating bills are huge. My landlord won't pay for insulation. What can I do myself?")


@pytest.fixture
def cfg():
    return GeneratorConfig()


def test_a_good_prompt_passes_every_filter(cfg):
    assert rejection_reason(GOOD, cfg, word_ngrams(META)) is None


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("   ", "empty"),
    ("Help me?", "too_short"),
    ("How do I " + "really " * 300 + "start?", "too_long"),
    ("def f(x): return x.__dict__['a'] + self._cache[0] ** 2 # noqa", "not_prose"),
    ("12345 67890 3.14159 2.71828 1.41421 42 1000000 99 7", "not_prose"),
    ("allyubxtrame ex]])) nonames__ ibde an =plays str[:] mean coibasrame object outlp],)..__[: >ur",
     "not_prose"),
    ("How do I talk to my landlord about the mould \ufffd in my flat before winter?", "not_prose"),
    ("How do I talk to my landlord about the mould\x11 in my flat before winter?", "not_prose"),
    ("\u79c1\u306e\u5bb6\u65cf\u306f\u5f15\u3063\u8d8a\u3057\u3092\u8003\u3048\u3066\u3044\u307e\u3059\u3002"
     "\u3069\u3046\u3059\u308c\u3070\u5b50\u4f9b\u305f\u3061\u3092\u52a9\u3051\u3089\u308c\u307e\u3059\u304b",
     "non_ascii"),
    ("As an AI language model, I cannot write prompts that encourage harmful behaviour.", "refusal"),
    ("I'm sorry, but I can't help with that request about the garden plan.", "refusal"),
    ("I cannot generate prompts on this topic because it involves personal data.", "refusal"),
    ("Sorry, I can't do that. Please ask me something else about your finances.", "refusal"),
    ("Make every request specific (a concrete situation, with details a real person would give)",
     "meta_copy"),
    ("I rent an old, drafty flat and my heating bills are huge. My landlord won't pay for insulation.",
     "meta_copy"),
])
def test_each_filter_rejects_its_case(cfg, text, reason):
    assert rejection_reason(text, cfg, word_ngrams(META)) == reason


@pytest.mark.parametrize("text", [
    "I can't help feeling guilty about moving my father into a care home. How do I make peace with it?",
    "I cannot decide whether to take the job in Berlin or stay near my kids. What should I weigh?",
    "My caf\u00e9 lost 30% of its customers after the road works. How do I win them back?",
    "\u201cIs it fair,\u201d my son asked, \u201cthat I pay rent to live at home?\u201d What do I say?",
    "Our startup's AI model keeps giving biased loan decisions. What should we audit first?",
])
def test_realistic_prompts_are_not_false_positives(cfg, text):
    assert rejection_reason(text, cfg, word_ngrams(META)) is None


def test_unspaced_scripts_pass_the_prose_check(cfg):
    cfg.min_ascii_fraction = 0.0
    japanese = ("\u79c1\u306e\u5bb6\u65cf\u306f\u5f15\u3063\u8d8a\u3057\u3092\u8003\u3048\u3066\u3044"
                "\u307e\u3059\u3002\u3069\u3046\u3059\u308c\u3070\u5b50\u4f9b\u305f\u3061\u3092\u52a9"
                "\u3051\u3089\u308c\u307e\u3059\u304b")
    assert rejection_reason(japanese, cfg) is None


def test_filters_read_their_thresholds_from_the_config(cfg):
    text = ("\u041a\u0430\u043a \u043f\u043e\u043c\u043e\u0447\u044c \u043c\u0430\u043c\u0435 "
            "\u0441\u043f\u043b\u0430\u043d\u0438\u0440\u043e\u0432\u0430\u0442\u044c "
            "\u0431\u044e\u0434\u0436\u0435\u0442 \u043f\u043e\u0441\u043b\u0435 "
            "\u0432\u044b\u0445\u043e\u0434\u0430 \u043d\u0430 \u043f\u0435\u043d\u0441\u0438\u044e?")
    cfg.min_ascii_fraction = 0.9
    assert rejection_reason(text, cfg) == "non_ascii"
    cfg.min_ascii_fraction = 0.0  # any script
    assert rejection_reason(text, cfg) is None
    cfg.min_chars = 500
    assert rejection_reason(GOOD, cfg) == "too_short"


def test_measures_by_hand():
    assert prose_fractions("ab cd") == (1.0, 1.0)
    assert prose_fractions("ab 12 ()") == (2 / 6, 2 / 3)  # letters a, b of 6 visible; words ab, 12 of 3
    assert prose_fractions("x.__dict__ is self._cache") == (pytest.approx(16 / 23), pytest.approx(1 / 3))
    assert ascii_fraction("ab\u00e9") == pytest.approx(2 / 3)
    assert word_ngrams("A b, C d!") == {("a", "b", "c"), ("b", "c", "d")}
    assert meta_overlap("a b c d", {("a", "b", "c")}) == 0.5
    assert is_refusal("As an AI, I do not have opinions.")
    assert not is_refusal("My aunt works as an aide in a hospital.")


# ------------------------------------------------------------------------- dedup


def test_normalisation_and_ids_ignore_case_punctuation_and_spacing():
    assert normalize_text("  How do I START?!  ") == "how do i start"
    assert prompt_id("How do I start?") == prompt_id("how do i start") == prompt_id("HOW do I   start ...")
    assert prompt_id("How do I start?") != prompt_id("How do I stop?")
    assert len(prompt_id("x")) == 16


def test_exact_case_and_punctuation_variants_are_dropped():
    variants = [GOOD, GOOD, GOOD.upper(), GOOD.replace(",", "").replace("?", "!"), "  " + GOOD.lower() + " "]
    assert deduplicate(variants, 0.7) == [None] + ["exact_duplicate"] * 4


def test_one_word_edits_are_near_duplicates():
    edits = [
        GOOD.replace("sister", "brother"),  # substitution
        GOOD.replace("keep it in", "keep it safely in"),  # insertion
        GOOD.replace(" together", ""),  # deletion
    ]
    assert deduplicate([GOOD, *edits], 0.7) == [None, "near_duplicate", "near_duplicate", "near_duplicate"]


def test_distinct_prompts_on_the_same_topic_are_kept():
    prompts = [
        GOOD,
        "Our house needs a new roof and my brother refuses to pay his half. What are my options?",
        "How should siblings split the cost of caring for a parent when their incomes are very different?",
        "I want to rent out my late father's flat. What do I need to know about being a landlord?",
        "My sister borrowed money for her house and stopped answering my calls. How do I bring it up?",
    ]
    assert deduplicate(prompts, 0.7) == [None] * len(prompts)


def test_seen_prompts_count_as_earlier():
    assert deduplicate([GOOD.lower(), "A completely different question about learning the cello at 60?"],
                       0.7, seen=[GOOD]) == ["exact_duplicate", None]


def test_threshold_controls_near_duplicates():
    edited = GOOD.replace("sister", "brother").replace("house", "flat").replace("rent", "lease")
    assert deduplicate([GOOD, edited], 0.95) == [None, None]
    assert deduplicate([GOOD, edited], 0.5) == [None, "near_duplicate"]


def test_duplicate_index_add_and_contains():
    index = DuplicateIndex(0.7)
    assert index.add(GOOD) is None
    assert GOOD.lower() in index and len(index) == 1
    assert index.check(GOOD.replace("sister", "cousin")) == "near_duplicate"
    assert len(index) == 1  # check does not insert
    with pytest.raises(ValueError):
        DuplicateIndex(0.0)


def test_distinct_n_by_hand():
    assert distinct_n(["a b a b"], 1) == 0.5  # 2 distinct of 4
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # (a b), (b a), (a b)
    assert distinct_n(["a b", "c d"], 2) == 1.0
    assert distinct_n([], 1) == 0.0
