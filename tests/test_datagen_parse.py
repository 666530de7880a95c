"""Parsing generator completions into prompts: every output shape a generator produces."""

from __future__ import annotations

import pytest

from dynalign.datagen.parse import clean_item, parse_prompts, strip_marker

A = "How can I help my neighbours plan a shared vegetable garden this spring?"
B = "What should I tell my team about the budget cuts without causing panic?"
C = "Can you explain how vaccines are tested to my grandmother, who is worried?"


@pytest.mark.parametrize("text", [
    f"1. {A}\n2. {B}\n3. {C}",
    f"1) {A}\n2) {B}\n3) {C}",
    f"(1) {A}\n(2) {B}\n(3) {C}",
    f"1: {A}\n2: {B}\n3: {C}",
    f"1 - {A}\n2 - {B}\n3 - {C}",
    f"- {A}\n- {B}\n- {C}",
    f"* {A}\n* {B}\n* {C}",
    f"\u2022 {A}\n\u2022 {B}\n\u2022 {C}",
    f"Prompt 1: {A}\nPrompt 2: {B}\nPrompt 3: {C}",
    f"**Prompt 1:** {A}\n**Prompt 2**: {B}\n**Request 3:** {C}",
    f"### Prompt 1\n{A}\n\n### Prompt 2\n{B}\n\n### Prompt 3\n{C}",
    f"Prompt 1:\n\n{A}\n\nPrompt 2:\n\n{B}\n\nPrompt 3:\n\n{C}",
    f'1. "{A}"\n2. "{B}"\n3. \u201c{C}\u201d',
    f"**1.** {A}\n**2.** {B}\n**3.** {C}",
    f"- **Prompt 1:** {A}\n- **Prompt 2:** {B}\n- **Prompt 3:** {C}",
    f'"{A}"\n"{B}"\n"{C}"',
    f'"{A}",\n"{B}",\n"{C}"',
], ids=["dot", "paren", "parens", "colon", "dash-number", "dash", "star", "bullet", "label", "bold-label",
        "heading", "label-blank-lines", "quoted-items", "bold-number", "bullet-label", "quoted-lines",
        "quoted-commas"])
def test_list_shapes(text):
    assert parse_prompts(text) == [A, B, C]


@pytest.mark.parametrize("text", [
    f'["{A}", "{B}", "{C}"]',
    f'```json\n["{A}", "{B}", "{C}"]\n```',
    f'Here you go:\n```\n["{A}",\n "{B}",\n "{C}"]\n```\nEnjoy!',
    f'{{"prompts": ["{A}", "{B}", "{C}"]}}',
    f'[{{"prompt": "{A}"}}, {{"prompt": "{B}"}}, {{"text": "{C}"}}]',
    f'{{"requests": [{{"request": "{A}", "aspect": "Power"}}, {{"request": "{B}"}}, {{"request": "{C}"}}]}}',
    f'{{"1": "{A}", "2": "{B}", "3": "{C}"}}',
    f'Sure! Here are the requests as JSON: ["{A}", "{B}", "{C}"] Let me know if you need more.',
], ids=["array", "fenced-array", "fenced-multiline", "object", "array-of-objects", "nested-objects",
        "keyed-object", "inline-array"])
def test_json_shapes(text):
    assert parse_prompts(text) == [A, B, C]


def test_json_array_cut_off_by_the_token_limit_keeps_complete_strings():
    assert parse_prompts(f'["{A}", "{B}", "{C[:20]}') == [A, B]


def test_json_escapes_are_decoded_and_whitespace_collapsed():
    assert parse_prompts('["She said \\"no\\" to the plan; what now?", "Line\\nbreak"]') == [
        'She said "no" to the plan; what now?', "Line break"]


def test_fenced_numbered_list_with_preamble_and_closing_remark():
    text = f"Here are three requests:\n\n```\n1. {A}\n2. {B}\n3. {C}\n```\n\nI hope these help!"
    assert parse_prompts(text) == [A, B, C]


def test_item_spanning_several_lines_is_joined():
    text = f"1. My mother lives alone two hours away.\n   {A}\n2. {B}"
    assert parse_prompts(text) == [f"My mother lives alone two hours away. {A}", B]


def test_preamble_and_afterword_outside_items_are_dropped():
    text = f"Sure, here are some prompts:\n\n1. {A}\n2. {B}\n\nThese cover the aspects you asked for."
    assert parse_prompts(text) == [A, B]


def test_mixed_markers_in_one_completion():
    text = f"1. {A}\n- {B}\nPrompt 3: {C}"
    assert parse_prompts(text) == [A, B, C]


def test_single_prompt_without_markers():
    assert parse_prompts(A) == [A]
    assert parse_prompts(f"  {A}\n") == [A]
    assert parse_prompts(f'"{A}"') == [A]


def test_single_prompt_after_an_introduction_line():
    assert parse_prompts(f"Here is a request a user might send:\n{A}") == [A]


def test_numbers_inside_text_are_not_markers():
    text = "3.5 million people live in our region. How do we plan transit for 10:30 shifts?"
    assert parse_prompts(text) == [text]
    assert strip_marker("2024 was a hard year for my shop")[0] is False


def test_empty_and_whitespace():
    assert parse_prompts("") == []
    assert parse_prompts("   \n\n ") == []
    assert parse_prompts("```\n```") == []


def test_clean_item_strips_wrapping_quotes_emphasis_and_commas():
    assert clean_item('  "**How do I start?**",  ') == "How do I start?"
    assert clean_item("\u201cIs this   fair?\u201d") == "Is this fair?"
    assert clean_item("'quoted'") == "quoted"
    assert clean_item('He said "hi" and left') == 'He said "hi" and left'
