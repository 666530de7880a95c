"""Shared fixtures: CPU only, offline, a session-wide tiny model, Hydra composition."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("DYNALIGN_TEST_GPU") != "1":  # `make test-gpu` sets it: the gpu tests see the GPUs
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # every other test runs on the CPU, even on a GPU machine

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from dynalign.config import CONF_DIR, TinyModelConfig, register_configs  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests on machines without CUDA instead of failing them."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A per-session model cache, exported so subprocesses build into it too."""
    path = tmp_path_factory.mktemp("dynalign-cache")
    os.environ["DYNALIGN_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_path(cache_dir) -> Path:
    from dynalign.tiny_model import ensure_tiny_model

    return ensure_tiny_model(TinyModelConfig(cache_dir=str(cache_dir)))


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_path):
    """The tiny model loaded with transformers, in eval mode (one per test module)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()


@pytest.fixture
def compose_cfg():
    """Compose ``conf/train.yaml`` with overrides, as ``python -m dynalign.train`` would."""
    register_configs()

    def _compose(overrides: list[str] | None = None):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides or []))

    yield _compose
    GlobalHydra.instance().clear()
