"""The lm-evaluation-harness bridge: task staging (relative data files made absolute), result
parsing, deltas, the baseline cache, the prompt format (chat template, few-shot turns, system
instruction) as the model really receives it, and the shipped offline task run for real on the
tiny model."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from dynalign.config import ConfigError, EvalConfig, TrainConfig, to_train_config
from dynalign.eval.cache import cache_key, model_fingerprint, read_cache, write_cache
from dynalign.eval.lm_harness import (
    SHIPPED_TASKS_DIR,
    PromptFormat,
    hub_offline,
    is_chat_model,
    lm_eval_backend,
    lm_eval_cache_key,
    metric_deltas,
    prompt_format,
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
    def cfg(**eval_values):
        config = TrainConfig()
        config.eval = EvalConfig(**{"lm_eval_limit": 10, **eval_values})
        return config

    key = lm_eval_cache_key(str(model), ["b", "a"], cfg())
    assert key == lm_eval_cache_key(str(model), ["a", "b"], cfg())  # task order does not matter
    assert key != lm_eval_cache_key(str(model), ["a"], cfg())
    assert key != lm_eval_cache_key(str(model), ["a", "b"], cfg(lm_eval_limit=None))
    assert key != lm_eval_cache_key(str(model), ["a", "b"], cfg(lm_eval_num_fewshot=5))
    # the prompt format and the backend: another format, other numbers
    assert key != lm_eval_cache_key(str(model), ["a", "b"], cfg(lm_eval_chat_template=True))
    assert key != lm_eval_cache_key(str(model), ["a", "b"], cfg(lm_eval_system_instruction="Be brief."))
    assert key != lm_eval_cache_key(str(model), ["a", "b"], cfg(lm_eval_backend="vllm"))
    instruct = cfg()
    instruct.model.name_or_path = "org/model-Instruct"
    assert key != lm_eval_cache_key(str(model), ["a", "b"], instruct)  # auto: the template goes on
    weights.write_bytes(b"1" * 11)  # new weights, same path
    assert key != lm_eval_cache_key(str(model), ["a", "b"], cfg())
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


# ------------------------------------------------------------------ prompt format


def test_chat_models_are_told_by_their_name():
    for name in ("Qwen/Qwen2.5-7B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct", "google/gemma-3-270m-it",
                 "meta-llama/Llama-2-7b-chat-hf", "/models/mistral_it", "HuggingFaceH4/zephyr-7b-chat"):
        assert is_chat_model(name), name
    for name in ("tiny", "gemma3_270m", "Qwen/Qwen2.5-7B", "google/gemma-3-270m", "/data/edit-model",
                 "org/iterative-lm", "/runs/instruct/iter_2"):  # the rule reads the name, not its folders
        assert not is_chat_model(name), name


def test_prompt_format_rule():
    auto = EvalConfig()
    # unset: on for an instruct/chat model whose tokenizer has a template, off for a base model
    assert prompt_format(auto, "Qwen/Qwen2.5-7B-Instruct", True) == PromptFormat(True, True, None)
    assert prompt_format(auto, "Qwen/Qwen2.5-7B-Instruct", False) == PromptFormat(False, False, None)
    assert prompt_format(auto, "tiny", True) == PromptFormat(False, False, None)
    assert prompt_format(auto, "gemma3_270m", True) == PromptFormat(False, False, None)
    # set: as set; few-shot turns follow the template unless set apart (lm-eval's CLI default)
    forced = EvalConfig(lm_eval_chat_template=True, lm_eval_system_instruction="Be brief.")
    assert prompt_format(forced, "tiny", True) == PromptFormat(True, True, "Be brief.")
    one_turn = EvalConfig(lm_eval_chat_template=True, lm_eval_fewshot_as_multiturn=False)
    assert prompt_format(one_turn, "tiny", True) == PromptFormat(True, False, None)
    plain = EvalConfig(lm_eval_chat_template=False, lm_eval_system_instruction="Be brief.")
    assert prompt_format(plain, "org/x-Instruct", True) == PromptFormat(False, False, "Be brief.")
    with pytest.raises(ConfigError) as err:
        prompt_format(forced, "org/base", has_chat_template=False)
    assert err.value.key == "eval.lm_eval_chat_template"
    with pytest.raises(ConfigError) as err:  # turns of a template that a base model does not get
        prompt_format(EvalConfig(lm_eval_fewshot_as_multiturn=True), "tiny", True)
    assert err.value.key == "eval.lm_eval_fewshot_as_multiturn"


def test_prompt_settings_fail_at_compose_and_preflight(compose_cfg):
    from dynalign.config.preflight import check_lm_eval_setup

    with pytest.raises(ConfigError) as err:
        to_train_config(compose_cfg(["eval.lm_eval_chat_template=false",
                                     "eval.lm_eval_fewshot_as_multiturn=true"]))
    assert err.value.key == "eval.lm_eval_fewshot_as_multiturn"
    with pytest.raises(ConfigError) as err:
        to_train_config(compose_cfg(["eval.lm_eval_backend=sglang"]))
    assert err.value.key == "eval.lm_eval_backend" and "hf, vllm" in str(err.value)
    base_model_turns = to_train_config(compose_cfg(["eval.lm_eval_fewshot_as_multiturn=true"]))  # model=tiny
    with pytest.raises(ConfigError) as err:  # known from the model's name alone: before anything loads
        check_lm_eval_setup(base_model_turns)
    assert err.value.key == "eval.lm_eval_fewshot_as_multiturn"
    check_lm_eval_setup(to_train_config(compose_cfg(["eval.lm_eval_chat_template=true"])))


def test_backend_rule(compose_cfg, monkeypatch):
    import importlib.util

    import torch

    from dynalign.config.preflight import check_lm_eval_setup

    assert lm_eval_backend(to_train_config(compose_cfg([]))) == "hf"
    vllm_rollout = to_train_config(compose_cfg(["rollout=vllm"]))
    assert lm_eval_backend(vllm_rollout) == "hf"  # on CPU lm-eval keeps Hugging Face
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU cannot exist on this machine
    assert lm_eval_backend(vllm_rollout) == "vllm"
    assert lm_eval_backend(to_train_config(compose_cfg([]))) == "hf"
    forced = to_train_config(compose_cfg(["rollout=vllm", "eval.lm_eval_backend=hf"]))
    assert lm_eval_backend(forced) == "hf"
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ConfigError) as err:
            check_lm_eval_setup(to_train_config(compose_cfg(["eval.lm_eval_backend=vllm"])))
        assert err.value.key == "eval.lm_eval_backend" and "not installed" in str(err.value)


def test_tasks_that_score_with_an_lm_eval_extra_need_its_modules(compose_cfg):
    import importlib.util

    from dynalign.config.preflight import LM_EVAL_EXTRAS, check_lm_eval_setup, missing_task_extras

    assert missing_task_extras(["arc_easy", "hellaswag"]) == {}  # scored by lm-eval's own code
    installed = {extra: all(importlib.util.find_spec(m) for m in modules)
                 for extra, modules in LM_EVAL_EXTRAS.items()}
    expected = {task: [e for e in extras if not installed[e]]
                for task, extras in {"ifeval": ["ifeval"], "leaderboard": ["ifeval", "math"]}.items()}
    missing = missing_task_extras(["ifeval", "arc_easy", "leaderboard"])
    assert missing == {task: extras for task, extras in expected.items() if extras}
    cfg = to_train_config(compose_cfg(["eval.lm_eval_tasks=[arc_easy,ifeval]"]))
    if installed["ifeval"]:
        check_lm_eval_setup(cfg)
        return
    with pytest.raises(ConfigError) as err:  # not installed by the pinned install (this machine, CI)
        check_lm_eval_setup(cfg)
    assert err.value.key == "eval.lm_eval_tasks"
    assert str(err.value).startswith("eval.lm_eval_tasks: ifeval scores with ")
    assert "pip install 'lm_eval[ifeval]', or leave it out" in str(err.value)


class Recorder:
    """The texts of every forward pass the model runs: what lm-eval really sends it."""

    def __init__(self, model, tokenizer):
        self.texts: list[str] = []
        def record(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)  # HFLM passes them positionally
            self.texts.extend(t.replace(tokenizer.pad_token, "") for t in tokenizer.batch_decode(ids))

        model.register_forward_pre_hook(record, with_kwargs=True)


def test_the_chat_template_reaches_the_model_only_when_on(tmp_path, tiny_model_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dynalign.eval.lm_harness import lm_eval_each, prepare_tasks
    from dynalign.rollout import HFSampler

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)  # its template is ChatML
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    sent = Recorder(model, tokenizer)
    tasks = prepare_tasks(["ca_mini_mc"], tmp_path)
    question = "Question: Which gas makes up most of the air"  # the task's first row

    def run(model_name: str, *overrides: tuple[str, object]) -> list[str]:
        cfg = TrainConfig()
        cfg.model.name_or_path = model_name  # the policy's base model decides the default
        cfg.eval = EvalConfig(lm_eval_limit=1, lm_eval_num_fewshot=1, bootstrap_samples=0, **dict(overrides))
        sent.texts.clear()
        (results,) = lm_eval_each(cfg, tasks, tiny_model_path, loaded=HFSampler(model, tokenizer))
        assert 0.0 <= results["ca_mini_mc"]["acc"] <= 1.0
        assert len(sent.texts) == 4 and all(question in t for t in sent.texts)  # one row, four choices
        return sent.texts

    for text in run("tiny"):  # a base model: plain text, the few-shot example before the question
        assert "<|im_start|>" not in text and text.startswith("Question: ") and text.count("Question:") == 2
    for text in run("org/tiny-Instruct", ("lm_eval_system_instruction", "Be brief.")):
        # a chat model: ChatML, the system instruction first, the few-shot example as its own turns
        assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQuestion: ")
        assert text.count("<|im_start|>user\n") == 2 and text.count("<|im_start|>assistant\n") == 2
        assert "atmosphere?\nAnswer:<|im_end|>\n<|im_start|>assistant\n" in text  # then the choice
    for text in run("tiny", ("lm_eval_chat_template", True), ("lm_eval_fewshot_as_multiturn", False)):
        # the template forced on a base model, the few-shot example inside the one user turn
        assert text.startswith("<|im_start|>user\nQuestion: ") and text.count("<|im_start|>user") == 1
        assert text.count("Question:") == 2 and "<|im_start|>system" not in text
