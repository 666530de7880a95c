"""The generation pipeline end to end: schedule, resume, top-up, the tiny model, dataset loading."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest
from test_datagen_openai import fake_completion, loopback_server, openai_config

from dynalign.config import ConfigError, GeneratorConfig
from dynalign.datagen import (
    Planner,
    generate_prompts,
    load_prompt_dataset,
    load_taxonomy,
    load_templates,
    seed_prompts,
    select_training_prompts,
)
from dynalign.datagen.backends import SamplerGenerator
from dynalign.datagen.taxonomy import PLACEHOLDERS, DataFileError
from dynalign.runtime import step_seed

PROVENANCE = {"id", "prompt", "source", "generator_model", "template_id", "domain", "task_type", "aspects",
              "sampling_seed", "call_index", "shard", "iteration", "timestamp", "meta_prompt"}


class FakeSampler:
    """Sampler protocol stand-in: completion i of a batch seeded s is ``fake_completion(s + i)``."""

    tokenizer = None

    def __init__(self, fail_on_call: int | None = None, text=None) -> None:
        self.calls, self.fail_on_call, self.text = 0, fail_on_call, text

    def sample(self, prompts, n, params):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("killed")
        texts = [self.text or fake_completion(params.seed + i) for i in range(len(prompts))]
        return SimpleNamespace(texts=texts)

    def update_weights(self, named_tensors):
        pass


def config(out, **values) -> GeneratorConfig:
    cfg = GeneratorConfig(output_dir=str(out))
    cfg.calls_per_shard = 2
    for key, value in values.items():
        setattr(cfg, key, value)
    return cfg


def rows_of(data):
    return [r for split in ("train", "eval") for r in data[split]]


def without_time(rows):
    return sorted(json.dumps({k: v for k, v in r.items() if k != "timestamp"}, sort_keys=True)
                  for r in rows)


# ------------------------------------------------------------------- shipped data


def test_shipped_taxonomy_templates_and_seed_prompts_are_consistent():
    taxonomy = load_taxonomy()
    templates = load_templates()
    seeds = seed_prompts()
    assert set(taxonomy.aspects) == {"Knowledge", "Benevolence", "Power", "Vitality"}
    assert len(taxonomy.cells) == len(taxonomy.domains) * len(taxonomy.task_types) * len(taxonomy.aspect_sets)
    assert len(templates) >= 4 and len({t.id for t in templates}) == len(templates)
    assert len(seeds) >= 60 and len({s.id for s in seeds}) == len(seeds)
    assert {s.domain for s in seeds} == set(taxonomy.domains)
    assert {s.task_type for s in seeds} == set(taxonomy.task_types)
    assert {a for s in seeds for a in s.aspects} == set(taxonomy.aspects)
    assert min(Counter(a for s in seeds for a in s.aspects).values()) >= 15  # every aspect well covered


def test_templates_subset_and_bad_files(tmp_path):
    assert [t.id for t in load_templates(ids=["json_array", "few_shot"])] == ["json_array", "few_shot"]
    with pytest.raises(DataFileError, match="unknown template ids"):
        load_templates(ids=["nope"])
    bad = tmp_path / "t.yaml"
    bad.write_text("templates:\n  - id: x\n    text: 'Write {count} prompts'\n")
    with pytest.raises(DataFileError, match="unknown placeholders.*count"):
        load_templates(bad)
    assert "n" in PLACEHOLDERS


def test_call_schedule_is_deterministic_and_covers_cells_evenly():
    cfg = GeneratorConfig(seed=3)
    planner = Planner.from_config(cfg, iteration=0)
    n_cells = len(planner.taxonomy.cells)
    calls = [planner.call(k) for k in range(2 * n_cells)]
    assert calls[:5] == [Planner.from_config(cfg, 0).call(k) for k in range(5)]  # same config -> same calls
    first_pass = Counter(c.cell for c in calls[:n_cells])
    assert set(first_pass.values()) == {1}  # every cell once before any twice
    assert Counter(c.cell for c in calls).most_common(1)[0][1] == 2
    assert [c.template_id for c in calls[:5]] == [t.id for t in planner.templates]
    assert all(c.seed == step_seed(3, 0, c.call_index) for c in calls)
    other = Planner.from_config(cfg, iteration=1)
    assert [other.call(k).cell for k in range(10)] != [c.cell for c in calls[:10]]  # new order each iteration
    meta = calls[0].meta_prompt
    assert str(cfg.prompts_per_call) in meta and calls[0].cell.domain.replace("_", " ") in meta
    assert all(a in meta for a in calls[0].cell.aspects)


# --------------------------------------------------------------------- the run


def test_run_writes_shards_state_dataset_jsonl_and_summary(tmp_path):
    out = tmp_path / "out"
    data = generate_prompts(config(out, num_prompts=20), FakeSampler(), model_name="fake-policy",
                            progress=False)
    rows = rows_of(data)
    assert len(rows) == 20 and len({r["id"] for r in rows}) == 20
    assert set(data["train"].features) == PROVENANCE
    assert {r["generator_model"] for r in rows} == {"fake-policy"}
    for row in rows:  # a sampler gets one seed per batch: the seed of the shard's first call
        assert row["sampling_seed"] == step_seed(0, 0, row["shard"] * 2)
        assert row["call_index"] // 2 == row["shard"]
    state = json.loads((out / "state.json").read_text())
    shards = sorted((out / "shards").glob("shard_*.json"))
    assert state["next_shard"] == len(shards) and state["next_call"] == 2 * len(shards)
    assert state["fingerprint"]["generator.seed"] == 0
    shard0 = json.loads(shards[0].read_text())
    first_seed = step_seed(0, 0, 0)
    assert [c["completion"] for c in shard0["calls"]] == [fake_completion(first_seed + i) for i in (0, 1)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 20 and summary["shortfall"] == 0 and summary["stop_reason"] == "target reached"
    assert summary["splits"]["train"] + summary["splits"]["eval"] == 20
    assert 0 < summary["diversity"]["distinct_1"] <= 1 and 0 < summary["diversity"]["distinct_2"] <= 1
    assert len((out / "prompts.jsonl").read_text().splitlines()) == 20


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    reference = generate_prompts(config(tmp_path / "ref", num_prompts=24), FakeSampler(), progress=False)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="killed"):
        generate_prompts(config(out, num_prompts=24), FakeSampler(fail_on_call=3), progress=False)
    written = {p.name: p.read_bytes() for p in (out / "shards").glob("shard_*.json")}
    assert sorted(written) == ["shard_00000.json", "shard_00001.json"]
    assert not (out / "dataset").exists()
    resumed = generate_prompts(config(out, num_prompts=24), FakeSampler(), progress=False)
    assert without_time(rows_of(resumed)) == without_time(rows_of(reference))
    assert all((out / "shards" / name).read_bytes() == data for name, data in written.items())  # untouched
    assert json.loads((out / "summary.json").read_text())["resumed_from_shard"] == 2


def test_rerun_of_a_finished_run_samples_nothing_and_a_larger_target_extends_it(tmp_path):
    out = tmp_path / "out"
    first = generate_prompts(config(out, num_prompts=10), FakeSampler(), progress=False)
    again = generate_prompts(config(out, num_prompts=10), FakeSampler(fail_on_call=1), progress=False)
    assert without_time(rows_of(again)) == without_time(rows_of(first))
    more = generate_prompts(config(out, num_prompts=30), FakeSampler(), progress=False)
    ids = [r["id"] for r in rows_of(more)]
    assert len(ids) == len(set(ids)) == 30 and {r["id"] for r in rows_of(first)} <= set(ids)


def test_resuming_with_other_settings_is_refused_naming_the_key(tmp_path):
    out = tmp_path / "out"
    generate_prompts(config(out, num_prompts=4), FakeSampler(), progress=False)
    with pytest.raises(ConfigError, match="generator.seed"):
        generate_prompts(config(out, num_prompts=4, seed=1), FakeSampler(), progress=False)
    with pytest.raises(ConfigError, match="generator.models"):
        generate_prompts(config(out, num_prompts=4), FakeSampler(), model_name="other", progress=False)


def test_prompts_seen_in_earlier_iterations_are_duplicates(tmp_path):
    first = generate_prompts(config(tmp_path / "a", num_prompts=12), FakeSampler(), progress=False)
    earlier = [r["prompt"] for r in rows_of(first)]
    cfg = config(tmp_path / "b", num_prompts=12, max_calls=4)
    again = generate_prompts(cfg, FakeSampler(), seen_prompts=earlier, progress=False)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["duplicates"]["exact_duplicate"] >= 12
    assert not {r["prompt"] for r in rows_of(again) if r["source"] == "generated"} & set(earlier)


def test_gibberish_is_filtered_and_topped_up_with_seed_prompts(tmp_path):
    out = tmp_path / "out"
    soup = "1. ]]{x_=}\n2. \ufffd\ufffd\n3. As an AI language model, I cannot write prompts on that subject."
    data = generate_prompts(config(out, num_prompts=10, max_calls=4), FakeSampler(text=soup), progress=False)
    rows = rows_of(data)
    assert len(rows) == 10 and {r["source"] for r in rows} == {"seed"}
    assert {r["generator_model"] for r in rows} == {"seed"} and {r["call_index"] for r in rows} == {-1}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["topped_up_with_seed_prompts"] == 10 and summary["generated_rows"] == 0
    assert "seed prompts were added" in summary["note"]
    assert summary["calls"] == 4
    assert summary["filtered"]["refusal"] == 4 and summary["filtered"]["too_short"] == 8
    assert summary["stop_reason"].startswith("max_calls=4 reached")


def test_without_top_up_a_short_run_keeps_what_it_has_and_empty_splits_load(tmp_path):
    import datasets

    data = generate_prompts(config(tmp_path / "out", num_prompts=10, max_calls=2, top_up_with_seeds=False),
                            FakeSampler(text="1. ]]{x_=}"), progress=False)
    assert len(rows_of(data)) == 0
    loaded = datasets.load_from_disk(str(tmp_path / "out" / "dataset"))  # 0-row splits round-trip
    assert len(loaded["train"]) == len(loaded["eval"]) == 0 and set(loaded["eval"].features) == PROVENANCE


def test_several_models_take_turns_by_shard(tmp_path):
    with loopback_server() as (server, url):
        cfg = openai_config(url, tmp_path / "out", num_prompts=24, calls_per_shard=2)
        cfg.models = ["policy", "openai:loopback-model"]
        data = generate_prompts(cfg, FakeSampler(), model_name="the-policy", progress=False)
    by_shard = {r["shard"]: r["generator_model"] for r in rows_of(data)}
    assert {m for s, m in by_shard.items() if s % 2 == 0} == {"the-policy"}
    assert {m for s, m in by_shard.items() if s % 2 == 1} == {"openai:loopback-model"}


def test_real_run_with_the_tiny_model(tmp_path, tiny_model_path):
    """HFSampler (dynalign.rollout) over the tiny model: gibberish, filtered, topped up, on disk."""
    import datasets

    from dynalign.config import ModelConfig
    from dynalign.models import load_hf_sampler

    sampler = load_hf_sampler(ModelConfig(), path=str(tiny_model_path), batch_size=4)
    out = tmp_path / "out"
    cfg = config(out, num_prompts=6, max_calls=2, max_new_tokens=12, eval_fraction=0.5)
    generate_prompts(cfg, sampler, model_name="tiny", progress=False)
    loaded = datasets.load_from_disk(str(out / "dataset"))
    assert set(loaded) == {"train", "eval"} and set(loaded["train"].features) == PROVENANCE
    assert len(loaded["train"]) + len(loaded["eval"]) == 6
    shard = json.loads((out / "shards" / "shard_00000.json").read_text())
    assert shard["generator_model"] == "tiny" and len(shard["calls"]) == 2
    assert all(c["completion"] for c in shard["calls"])  # the model really wrote something
    summary = json.loads((out / "summary.json").read_text())
    assert summary["calls"] == 2 and summary["rows"] == 6
    assert summary["generated_rows"] + summary["topped_up_with_seed_prompts"] == 6


def test_sampler_generator_passes_one_seed_per_batch():
    seen = []

    class Recorder(FakeSampler):
        def sample(self, prompts, n, params):
            seen.append((len(prompts), n, params.seed, params.max_new_tokens))
            return super().sample(prompts, n, params)

    from dynalign.rollout.base import SamplingParams

    generator = SamplerGenerator(Recorder(), "x")
    texts = generator.generate([[{"role": "user", "content": "a"}]] * 3, [5, 6, 7],
                               SamplingParams(max_new_tokens=9))
    assert seen == [(3, 1, 5, 9)] and len(texts) == 3 and not generator.seeds_per_request


# ---------------------------------------------------------- loading and selection


def test_load_prompt_dataset_from_every_kind_of_path(tmp_path):
    import datasets

    generate_prompts(config(tmp_path / "gen", num_prompts=12, eval_fraction=0.3), FakeSampler(),
                     progress=False)
    saved = datasets.load_from_disk(str(tmp_path / "gen" / "dataset"))
    assert load_prompt_dataset(tmp_path / "gen") == saved["train"]["prompt"]  # the output dir itself
    assert load_prompt_dataset(tmp_path / "gen" / "dataset", split="eval") == saved["eval"]["prompt"]
    single = datasets.Dataset.from_dict({"question": ["q one is here", "q two is here"]})
    single.save_to_disk(str(tmp_path / "single"))
    assert load_prompt_dataset(tmp_path / "single", "question") == ["q one is here", "q two is here"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"text": "first"}\n{"text": "second"}\n')
    assert load_prompt_dataset(jsonl, "text") == ["first", "second"]
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,other\nalpha,1\nbeta,2\n")
    assert load_prompt_dataset(csv) == ["alpha", "beta"]
    single.to_parquet(str(tmp_path / "p.parquet"))
    assert load_prompt_dataset(tmp_path / "p.parquet", "question") == ["q one is here", "q two is here"]
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "system", "content": "s"},
                                             {"role": "user", "content": "hello there"}]}) + "\n")
    assert load_prompt_dataset(chat, "messages") == ["hello there"]
    with pytest.raises(KeyError, match="generator.prompt_column.*columns"):
        load_prompt_dataset(jsonl, "prompt")
    with pytest.raises(KeyError, match="no split 'test'"):
        load_prompt_dataset(tmp_path / "gen", split="test")


def test_select_default_is_the_seed_prompts():
    chosen = select_training_prompts(GeneratorConfig(), None, progress=False)
    assert chosen.source == "seed" and chosen.path is None
    assert sorted(chosen.train + chosen.eval) == sorted(s.prompt for s in seed_prompts())
    assert 0 < len(chosen.eval) < len(chosen.train)


def test_select_a_dataset_on_disk(tmp_path):
    generate_prompts(config(tmp_path / "gen", num_prompts=12, eval_fraction=0.3), FakeSampler(),
                     progress=False)
    cfg = GeneratorConfig(dataset=str(tmp_path / "gen"))
    chosen = select_training_prompts(cfg, None, progress=False)
    assert chosen.source == "dataset" and len(chosen.train) + len(chosen.eval) == 12 and chosen.eval
    file_cfg = GeneratorConfig(dataset=str(tmp_path / "gen" / "prompts.jsonl"))
    from_file = select_training_prompts(file_cfg, None, progress=False)
    assert len(from_file.train) == 12 and from_file.eval == []


def test_select_regenerates_each_iteration_without_repeating_prompts(tmp_path):
    cfg = config(tmp_path, num_prompts=10, regenerate_each_iteration=True)
    iter0 = select_training_prompts(cfg, FakeSampler(), iteration=0, run_dir=tmp_path, progress=False)
    iter1 = select_training_prompts(cfg, FakeSampler(), iteration=1, run_dir=tmp_path, progress=False)
    assert iter0.source == iter1.source == "generated"
    assert iter0.path == tmp_path / "prompts" / "iter_000" and iter1.path == tmp_path / "prompts" / "iter_001"
    assert len(iter0.train + iter0.eval) == 10 and len(iter1.train + iter1.eval) == 10
    assert not set(iter0.train + iter0.eval) & set(iter1.train + iter1.eval)
    assert iter1.summary["iteration"] == 1


def test_select_falls_back_to_seed_prompts_when_nothing_survives(tmp_path):
    cfg = config(tmp_path, num_prompts=4, max_calls=2, regenerate_each_iteration=True,
                 top_up_with_seeds=False)
    with pytest.warns(UserWarning, match="seed prompts instead"):
        chosen = select_training_prompts(cfg, FakeSampler(text="]]{x_=}"), run_dir=tmp_path, progress=False)
    assert chosen.source == "seed_fallback" and len(chosen.train) > 0
    assert chosen.summary["rows"] == 0
