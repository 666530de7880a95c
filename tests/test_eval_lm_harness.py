"""The lm-evaluation-harness bridge: task staging (relative data files made absolute), result
parsing, deltas, the baseline cache, and the shipped offline task run for real on the tiny model."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from dynalign.config import ConfigError
from dynalign.eval.cache import cache_key, model_fingerprint, read_cache, write_cache
from dynalign.eval.lm_harness import (
    SHIPPED_TASKS_DIR,
    hub_offline,
    lm_eval_cache_key,
    metric_deltas,
    stage_task_dirs,
    task_metrics,
)


def test_shipped_task_has_twenty_well_formed_rows():
    rows = [json.loads(line) for line in (SHIPPED_TASKS_DIR / "ca_mini_mc.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and len({r["id"] for r in rows}) == 20
    assert all(len(r["choices"]) == 4 and 0 <= r["answer"] < 4 for r in rows)
    assert len({r["answer"] for r in rows}) == 4  # the right answer is not always in the same slot


def test_staging_makes_relative_data_files_absolute(tmp_path):
    source = tmp_path / "my_tasks"
    (source / "sub").mkdir(parents=True)
    (source / "data.jsonl").write_text('{"q": 1}\n')
    (source / "sub" / "more.jsonl").write_text('{"q": 2}\n')
    (source / "a.yaml").write_text(yaml.safe_dump({"task": "a", "dataset_path": "json",
                                                   "dataset_kwargs": {"data_files": {"test": "data.jsonl"}}}))
    (source / "sub" / "b.yaml").write_text(yaml.safe_dump({
        "task": "b", "dataset_path": "json",
        "dataset_kwargs": {"data_files": ["more.jsonl", "https://example.org/x.jsonl", "absent.jsonl"]}}))
    (source / "c.yaml").write_text("task: c\nprocess_docs: !function utils.process\n")  # lm-eval tag
    (source / "utils.py").write_text("def process(docs):\n    return docs\n")
    [staged] = stage_task_dirs([source], tmp_path / "work")
    a = yaml.safe_load((staged / "a.yaml").read_text())
    assert a["dataset_kwargs"]["data_files"]["test"] == str((source / "data.jsonl").resolve())
    b = yaml.safe_load((staged / "sub" / "b.yaml").read_text())
    assert b["dataset_kwargs"]["data_files"] == [str((source / "sub" / "more.jsonl").resolve()),
                                                 "https://example.org/x.jsonl", "absent.jsonl"]
    assert (staged / "c.yaml").read_text() == (source / "c.yaml").read_text()  # copied as is
    assert (staged / "utils.py").exists() and (staged / "data.jsonl").exists()
    with pytest.raises(ConfigError) as err:
        stage_task_dirs([tmp_path / "nope"], tmp_path / "work")
    assert err.value.key == "eval.lm_eval_include_path"


def test_task_metrics_and_deltas_by_hand():
    results = {
        "ca_mini_mc": {"alias": "ca_mini_mc", "sample_len": 20, "acc,none": 0.25, "acc_stderr,none": 0.1,
                       "acc_norm,none": 0.3, "acc_norm_stderr,none": "N/A"},
        "gsm8k": {"exact_match,strict-match": 0.5, "exact_match,flexible-extract": 0.6, "alias": "gsm8k"},
    }
    metrics = task_metrics(results)
    assert metrics == {"ca_mini_mc": {"acc": 0.25, "acc_stderr": 0.1, "acc_norm": 0.3},  # no "N/A", no alias
                       "gsm8k": {"exact_match,strict-match": 0.5, "exact_match,flexible-extract": 0.6}}
    baseline = {"ca_mini_mc": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.2}}
    deltas = metric_deltas(metrics, baseline)
    assert deltas == {"ca_mini_mc": {"acc": pytest.approx(-0.25), "acc_norm": pytest.approx(0.1)}}


def test_baseline_cache_key_tracks_weights_tasks_and_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNALIGN_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    weights = model / "model.safetensors"
    weights.write_bytes(b"0" * 10)
    key = lm_eval_cache_key(str(model), ["b", "a"], 10, None)
    assert key == lm_eval_cache_key(str(model), ["a", "b"], 10, None)  # task order does not matter
    assert key != lm_eval_cache_key(str(model), ["a"], 10, None)
    assert key != lm_eval_cache_key(str(model), ["a", "b"], None, None)
    assert key != lm_eval_cache_key(str(model), ["a", "b"], 10, 5)
    weights.write_bytes(b"1" * 11)  # new weights, same path
    assert key != lm_eval_cache_key(str(model), ["a", "b"], 10, None)
    assert model_fingerprint("org/hub-model") == {"id": "org/hub-model"}
    assert read_cache("lm_eval", key) is None
    write_cache("lm_eval", key, {"t": {"acc": 0.5}})
    assert read_cache("lm_eval", key) == {"t": {"acc": 0.5}}
    assert cache_key("x", a=1) != cache_key("y", a=1)


def test_hub_offline_restores_the_environment(monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    import datasets.config

    before = datasets.config.HF_HUB_OFFLINE
    with hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
        assert datasets.config.HF_HUB_OFFLINE is True
    assert os.environ["HF_HUB_OFFLINE"] == "0" and "HF_DATASETS_OFFLINE" not in os.environ
    restored = datasets.config.HF_HUB_OFFLINE
    assert restored == before


@pytest.mark.slow  # indexes lm-eval's ~10k built-in task YAMLs: ~10-25 s on 2 busy cores
def test_unknown_task_names_the_key(tmp_path):
    from dynalign.eval.lm_harness import prepare_tasks

    assert prepare_tasks(["ca_mini_mc"], tmp_path).all_local
    with pytest.raises(ConfigError) as err:
        prepare_tasks(["ca_mini_mc", "no_such_task_xyz"], tmp_path)
    assert err.value.key == "eval.lm_eval_tasks" and "no_such_task_xyz" in str(err.value)


def test_shipped_task_runs_on_the_tiny_model(tmp_path, tiny_model_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dynalign.eval.lm_harness import prepare_tasks, run_lm_eval

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    model.train()
    tasks = prepare_tasks(["ca_mini_mc"], tmp_path)
    assert tasks.all_local  # found among the shipped tasks: the hub stays off
    policy = run_lm_eval(model, tokenizer, tasks, limit=8, batch_size=8, bootstrap_iters=10)
    assert model.training  # HFLM's eval() undone
    acc = policy["ca_mini_mc"]["acc"]
    assert 0.0 <= acc <= 1.0 and acc * 8 == pytest.approx(round(acc * 8))  # k right out of 8 rows
    assert {"acc", "acc_norm", "acc_stderr"} <= set(policy["ca_mini_mc"])
    with torch.no_grad():  # another "checkpoint": the same model with a perturbed head
        model.get_output_embeddings().weight.add_(torch.randn_like(model.get_output_embeddings().weight))
    baseline = run_lm_eval(model, tokenizer, tasks, limit=8, batch_size=8)
    delta = metric_deltas(policy, baseline)["ca_mini_mc"]
    assert delta["acc"] == pytest.approx(acc - baseline["ca_mini_mc"]["acc"])
    assert "acc_stderr" not in delta
