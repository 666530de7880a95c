"""The CA eval set (shipped curated prompts + held-out generated ones) and where models are found."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from dynalign.config import ConfigError, to_train_config
from dynalign.datagen.dedup import DuplicateIndex
from dynalign.datagen.taxonomy import DataFileError, load_taxonomy, seed_prompts
from dynalign.eval.prompts import curated_prompts, eval_prompt_set
from dynalign.eval.settings import resolve_eval
from dynalign.rundir import RunDir, iteration_of, resolve_model_dir


def test_shipped_curated_prompts_span_the_taxonomy_and_differ_from_the_seeds():
    prompts = curated_prompts()
    taxonomy = load_taxonomy()
    assert 45 <= len(prompts) <= 60
    assert len({p.id for p in prompts}) == len(prompts)
    assert {p.domain for p in prompts} == set(taxonomy.domains)
    assert {p.task_type for p in prompts} == set(taxonomy.task_types)
    aspects = Counter(a for p in prompts for a in p.aspects)
    assert set(aspects) == set(taxonomy.aspects) and min(aspects.values()) >= 10
    assert sum(len(p.aspects) == 4 for p in prompts) >= 3  # some put all four under pressure
    assert all(p.source == "curated" and len(p.prompt) > 40 for p in prompts)
    seeds = DuplicateIndex(threshold=0.5)
    seeds.update(s.prompt for s in seed_prompts())
    assert [p.id for p in prompts if p.prompt in seeds] == []  # no (near) copy of a training seed


def test_a_broken_curated_file_names_itself(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prompts:\n  - id: a\n    prompt: hello there\n    aspects: [Wisdom]\n")
    with pytest.raises(DataFileError, match="bad.yaml"):
        curated_prompts(bad)


def test_eval_set_is_curated_first_then_held_out(tmp_path):
    from datasets import Dataset, DatasetDict

    curated = tmp_path / "curated.yaml"
    curated.write_text("prompts:\n"
                       "  - {id: c1, prompt: 'How do I plan a garden?', aspects: [Power]}\n"
                       "  - {id: c2, prompt: 'Why is the sea salty?', aspects: [Knowledge]}\n")
    data = DatasetDict({
        "train": Dataset.from_dict({"prompt": ["a training prompt never evaluated"]}),
        "eval": Dataset.from_dict({"prompt": ["why is the sea SALTY?", "How can our street share tools?",
                                              "What makes a fair rota?"]}),
    })
    data.save_to_disk(str(tmp_path / "set"))
    chosen = eval_prompt_set(10, prompts_file=curated, held_out=tmp_path / "set")
    assert [p.source for p in chosen] == ["curated", "curated", "held_out", "held_out"]  # a repeat dropped
    assert chosen[2].prompt == "How can our street share tools?"
    three = eval_prompt_set(3, prompts_file=curated, held_out=tmp_path / "set")
    assert [p.id for p in three][:2] == ["c1", "c2"] and len(three) == 3
    assert len(eval_prompt_set(1, prompts_file=curated)) == 1


def _hf_dir(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_checkpoint_is_a_model_dir_or_the_newest_export_of_a_run(tmp_path):
    run = tmp_path / "run"
    for k in (1, 2, 10):
        _hf_dir(run / f"iter_{k}")
    (run / "iter_11").mkdir()  # an export still being written: no config.json yet
    assert resolve_model_dir(run, "checkpoint") == run / "iter_10"
    assert resolve_model_dir(run / "iter_2", "checkpoint") == run / "iter_2"
    assert iteration_of(run / "iter_10") == 10 and iteration_of(run) is None
    assert [k for k, _ in RunDir(run).exports()] == [1, 2, 10]  # by number, not by name
    assert RunDir(tmp_path).newest_export() is None


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "neither a Hugging Face model directory"),
    (lambda p: (p / "ckpt" / "latest").mkdir(parents=True) or p / "ckpt", "DeepSpeed checkpoints"),
])
def test_bad_checkpoints_name_the_key(tmp_path, make, message):
    with pytest.raises(ConfigError, match=message) as err:
        resolve_model_dir(make(tmp_path), "checkpoint")
    assert err.value.key == "checkpoint"


def test_unset_eval_values_follow_the_run_config(compose_cfg, tiny_model_path):
    cfg = to_train_config(compose_cfg(["judge.mode=logprob", "judge.max_new_tokens=99",
                                       "generator.dataset=some/set",
                                       f"model.tiny.cache_dir={tiny_model_path.parent}"]))
    resolved = resolve_eval(cfg)
    assert resolved.judge_mode == "logprob" and resolved.judge_max_new_tokens == 99  # as the judge group
    assert resolved.baseline == str(tiny_model_path)  # model.name_or_path=tiny, resolved
    assert resolved.held_out_dataset == "some/set"
    cfg.eval.judge_mode, cfg.eval.judge_max_new_tokens, cfg.eval.dataset = "generate", 7, "held/out"
    assert resolve_eval(cfg) == replace(resolved, judge_mode="generate", judge_max_new_tokens=7,
                                        held_out_dataset="held/out")
