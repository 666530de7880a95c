"""The embedded tiny model builds deterministically, reloads and generates."""

from __future__ import annotations

import hashlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dynalign.config import ModelConfig, TinyModelConfig
from dynalign.models import resolve_model_path
from dynalign.tiny_model import build_tiny_model, ensure_tiny_model


def _digests(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_same_seed_builds_byte_identical_files(tmp_path):
    a = build_tiny_model(tmp_path / "a", TinyModelConfig(seed=3))
    b = build_tiny_model(tmp_path / "b", TinyModelConfig(seed=3))
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(_digests(a))
    assert _digests(a) == _digests(b)


def test_other_seed_other_weights_same_tokenizer(tmp_path):
    a = _digests(build_tiny_model(tmp_path / "a", TinyModelConfig(seed=0)))
    b = _digests(build_tiny_model(tmp_path / "b", TinyModelConfig(seed=1)))
    assert a["model.safetensors"] != b["model.safetensors"]
    assert a["tokenizer.json"] == b["tokenizer.json"]


def test_reloads_and_samples(tiny_model_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    cfg = model.config
    assert cfg.hidden_size // cfg.num_attention_heads == 64  # vLLM's CPU kernels need head_dim 64
    assert len(tok) == cfg.vocab_size == 1024
    assert 300_000 < sum(p.numel() for p in model.parameters()) < 1_000_000

    text = tok.apply_chat_template([{"role": "user", "content": "Plan a garden."}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nPlan a garden.<|im_end|>\n<|im_start|>assistant\n"
    inputs = tok([text, text], return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(**inputs, do_sample=True, max_new_tokens=12, temperature=1.0)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 12)  # random weights never emit EOS
    assert not torch.equal(out[0], out[1])  # sampling, not greedy
    assert tok.decode(out[0, inputs["input_ids"].shape[1]:])  # decodes to text


def test_ensure_builds_once_and_resolves(tmp_path):
    spec = TinyModelConfig(cache_dir=str(tmp_path))
    first = ensure_tiny_model(spec)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(spec) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    # the build lock stays beside the model; no temporary directory is left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, f"{first.name}.lock"]
    assert resolve_model_path(ModelConfig(tiny=spec)) == str(first)
    assert resolve_model_path(ModelConfig(name_or_path="org/model")) == "org/model"
