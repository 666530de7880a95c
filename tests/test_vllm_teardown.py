"""Closing a vLLM sampler gives its engine's memory back, and the next job of a sweep starts an
engine of its own in the same process. A real engine (CPU build, in-process) on the tiny model.

Runs in ``.venv-vllm`` (``make test-vllm``); skipped where ``vllm`` is not installed.
"""

from __future__ import annotations

import psutil
import pytest

pytest.importorskip("vllm")

from dynalign.config import VLLMConfig  # noqa: E402
from dynalign.rollout import SamplingParams  # noqa: E402
from dynalign.rollout.vllm_sampler import VLLMSampler  # noqa: E402
from dynalign.teardown import release_memory  # noqa: E402

GIB = 2**30


@pytest.mark.slow  # two engine starts, ~15 s each on 2 cores
def test_a_closed_engine_frees_its_kv_cache_and_the_next_one_samples_alike(tiny_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    params = SamplingParams(max_new_tokens=4, temperature=1.0, seed=1)
    texts, freed, closed = [], [], []
    for _ in range(2):  # two jobs of a sweep
        sampler = VLLMSampler(str(tiny_model_path), tokenizer, VLLMConfig(kv_cache_space_gib=1.0),
                              max_model_len=256, seed=0, dtype="float32", enforce_eager=True)
        texts.append(sampler.sample(["def fibonacci(n):"], 2, params).texts)
        before = psutil.Process().memory_info().rss
        sampler.close()
        closed.append(sampler)  # still referenced (a failed job's frames, say): close alone must free
        release_memory()
        freed.append((before - psutil.Process().memory_info().rss) / GIB)
    assert texts[0] == texts[1]
    assert min(freed) > 0.75, freed  # the 1 GiB KV cache went with each engine
    assert all(sampler.llm is None for sampler in closed)
