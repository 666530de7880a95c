"""Base-model prompt generation: raw few-shot templates, their requests, parsing and filters."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from dynalign.config import GeneratorConfig
from dynalign.datagen import generate_prompts, load_taxonomy, load_templates
from dynalign.datagen.backends import SamplerGenerator, as_messages
from dynalign.datagen.filters import rejection_reason
from dynalign.datagen.parse import parse_continuation
from dynalign.datagen.pipeline import Planner, build_request, parse_completion, sampling_params
from dynalign.datagen.taxonomy import DATA_DIR, Cell, DataFileError, SeedPrompt, render_meta_prompt

BASE = "meta_prompts_base.yaml"
Q1 = "My sister keeps borrowing money and never pays it back, and our parents take her side. How do I say no?"
Q2 = "Our neighbours burn garden waste every weekend and my son has asthma. What can I do to keep the peace?"


class ContinuingSampler:
    """A base model stand-in: continues every prompt with the same list items; records calls."""

    tokenizer = None

    def __init__(self, text: str) -> None:
        self.text, self.calls = text, []

    def sample(self, prompts, n, params):
        self.calls.append((list(prompts), params))
        return SimpleNamespace(texts=[self.text] * len(prompts))


def test_base_templates_load_raw_by_bare_name(tmp_path):
    templates = load_templates(BASE)
    assert len(templates) >= 2 and all(t.raw and t.format == "raw" for t in templates)
    assert all("\n\n" in t.stop and t.endings == ("?",) for t in templates)
    assert load_templates(DATA_DIR / BASE) == templates
    assert not any(t.raw for t in load_templates())  # the shipped instruction templates stay chat
    bad = tmp_path / "t.yaml"
    bad.write_text("templates:\n  - id: x\n    format: plain\n    text: 'go on'\n")
    with pytest.raises(DataFileError, match="format must be one of"):
        load_templates(bad)
    bad.write_text("templates:\n  - id: x\n    stops: ['\\n']\n    text: 'go on'\n")
    with pytest.raises(DataFileError, match="unknown keys.*stops"):
        load_templates(bad)


def test_base_template_renders_a_list_whose_next_item_is_open():
    template = next(t for t in load_templates(BASE) if t.id == "advice_column")
    cell = Cell("personal_relationships", "advice", ("Power",))
    examples = [SeedPrompt("a", Q1, "personal_relationships", "advice", ("Power",)),
                SeedPrompt("b", Q2, "community_civic", "advice", ("Benevolence",))]
    meta = render_meta_prompt(template, cell, load_taxonomy(), n=4, examples=examples)
    assert meta.startswith("Letters to an advice column about personal relationships (family, friendship, ")
    assert meta.endswith(f"ends with a question.\n\n1. {Q1}\n2. {Q2}\n3.")


def test_requests_are_raw_text_for_raw_templates_and_messages_for_chat():
    raw = load_templates(BASE)[0]
    chat = load_templates()[0]
    assert build_request(raw, "Letters...\n3.") == "Letters...\n3."
    assert build_request(chat, "Write 4 requests") == [{"role": "user", "content": "Write 4 requests"}]
    assert as_messages("Letters...\n3.") == [{"role": "user", "content": "Letters...\n3."}]
    assert as_messages([{"role": "user", "content": "x"}]) == [{"role": "user", "content": "x"}]
    sampler = ContinuingSampler(" x")
    SamplerGenerator(sampler, "m").generate(["Letters...\n3."], [5], sampling_params(GeneratorConfig()))
    assert sampler.calls[0][0] == ["Letters...\n3."] and sampler.calls[0][1].seed == 5


def test_continuation_is_read_from_the_open_item_to_the_end_of_the_list():
    text = f" {Q1}\n4. {Q2}\n\nAnswer: talk to her."
    assert parse_continuation(text, "3.") == [Q1, Q2]
    assert parse_continuation(f" {Q1}\nThe more we observed, the less we knew.\n5. {Q2}", "3.") == [Q1]
    assert parse_continuation("\n4. " + Q2, "3.") == [Q2]  # an empty open item is skipped
    raw = load_templates(BASE)[0]
    assert parse_completion(raw, "Letters...\n1. x\n3.", f" {Q1}\n4. {Q2}") == [Q1, Q2]


def test_unfinished_filter_applies_only_with_template_endings():
    cfg = GeneratorConfig()
    cut = "I moved to a new city for work and I still have no friends here, and I would like to"
    assert rejection_reason(cut, cfg, endings=("?",)) == "unfinished"
    assert rejection_reason(cut, cfg) is None
    assert rejection_reason(Q1, cfg, endings=("?",)) is None


def test_run_with_raw_templates_sends_text_with_their_stops_and_keeps_generated_rows(tmp_path):
    out = tmp_path / "out"
    cfg = GeneratorConfig(output_dir=str(out), num_prompts=4, calls_per_shard=2, templates_file=BASE,
                          max_calls=2)
    cut = " I would like to know whether I should"
    sampler = ContinuingSampler(f" {Q1}\n4. {Q2}\n5. My landlord wants to sell and{cut}")
    data = generate_prompts(cfg, sampler, model_name="base", progress=False)
    prompts, params = sampler.calls[0]
    assert all(isinstance(p, str) and p.endswith("\n3.") for p in prompts)
    assert "\n\n" in params.stop
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generated_rows"] == 2 and summary["filtered"]["unfinished"] == 2
    rows = [r for split in ("train", "eval") for r in data[split]]
    assert {r["prompt"] for r in rows if r["source"] == "generated"} == {Q1, Q2}


def test_mixed_template_set_sends_one_batch_per_format(tmp_path):
    chat = tmp_path / "mixed.yaml"
    chat.write_text("templates:\n"
                    "  - id: ask\n    text: 'Write {n} requests about {domain}.'\n"
                    "  - id: go_on\n    format: raw\n    stop: [\"\\n\\n\"]\n"
                    "    text: \"Questions about {domain}:\\n{numbered_examples}\\n{next_number}.\"\n")
    cfg = GeneratorConfig(output_dir=str(tmp_path / "o"), num_prompts=2, calls_per_shard=2,
                          templates_file=str(chat), top_up_with_seeds=False, max_calls=2)
    sampler = ContinuingSampler(f" {Q1}")
    generate_prompts(cfg, sampler, progress=False)
    (chat_prompts, chat_params), (raw_prompts, raw_params) = sampler.calls
    assert chat_prompts == [[{"role": "user", "content": Planner.from_config(cfg, 0).call(0).meta_prompt}]]
    assert raw_prompts == [Planner.from_config(cfg, 0).call(1).meta_prompt]
    assert "\n\n" not in chat_params.stop and "\n\n" in raw_params.stop
    assert chat_params.seed == Planner.from_config(cfg, 0).call(0).seed
    assert raw_params.seed == Planner.from_config(cfg, 0).call(1).seed


def test_generator_base_model_option_selects_the_raw_templates(compose_cfg):
    from dynalign.config import to_train_config

    gen = to_train_config(compose_cfg(["generator=base_model"])).generator
    gen.validate("generator")
    planner = Planner.from_config(gen, iteration=0)
    assert [t.id for t in planner.templates] == ["advice_column", "help_forum"]
    assert planner.call(0).meta_prompt.endswith("\n3.") and gen.temperature < 1.0
