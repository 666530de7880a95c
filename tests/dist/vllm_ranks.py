"""One rank of a ``torchrun`` world with a colocated vLLM engine per rank; run by tests/test_vllm_ranks.py.

Usage: ``torchrun --nproc_per_node 2 tests/dist/vllm_ranks.py MODEL TP OUT_DIR``. Every rank
builds the policy (DeepSpeed ZeRO-3 over the world) and its own vLLM engine (external launcher,
``TP`` ranks per engine), then:

1. samples its own share of the prompts, shares of different sizes (rank 0 two prompts, rank 1
   one) with its own seeds, and scores a few texts with the engine (rank 1 none: a rank with
   nothing to ask still takes part in its group's pooled request);
2. takes a GRPO step on its own rollouts, syncs the engine from the ZeRO-3 shards in small
   buckets copied on the rank's device, and samples again.

Each rank writes ``OUT_DIR/rank<r>.json``: the engine's layout and vLLM's own groups, the
sampled tokens and scores, and the largest |vLLM - trainer| log-prob gap before and after the
sync.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from dynalign.config import DeepSpeedConfig, GRPOConfig, ModelConfig, VLLMConfig  # noqa: E402
from dynalign.distributed import init_distributed  # noqa: E402
from dynalign.engine import PolicyEngine, TrainBatch  # noqa: E402
from dynalign.rollout import Rollouts, SamplingParams  # noqa: E402

PROMPTS = ["def fibonacci(n):", "The quick brown fox", "Once upon a time"]
JUDGED = ["Score: ", "The answer is", "Knowledge:"]
BUCKET_BYTES = 64 * 1024  # the tiny model's 1.7 MB in many buckets


def batch(rollouts: Rollouts) -> TrainBatch:
    inputs = rollouts.model_inputs()
    advantages = torch.tensor([1.0, -1.0]).repeat(len(rollouts) // 2)  # [N]
    return TrainBatch(inputs.input_ids, inputs.attention_mask, inputs.completion_mask, advantages)


def gap(policy: PolicyEngine, rollouts: Rollouts) -> float:
    """Largest |trainer - vLLM| log-prob over the sampled tokens."""
    mask = rollouts.completion_mask.bool()
    return float((policy.policy_logprobs(batch(rollouts))[mask] - rollouts.logprobs[mask]).abs().max())


def main() -> None:
    model, tp, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    from dynalign.rollout.vllm_sampler import VLLMSampler  # imports vllm

    info = init_distributed(timedelta(minutes=5))
    rank, world = info.rank, info.world_size
    grpo = GRPOConfig(lr=1e-2, group_size=4, prompts_per_step=world, micro_batch_size=4)
    policy = PolicyEngine(ModelConfig(name_or_path=model), grpo, DeepSpeedConfig(stage=3), seed=0)
    sampler = VLLMSampler(model, policy.tokenizer, VLLMConfig(tensor_parallel_size=tp, kv_cache_space_gib=1,
                                                              enforce_eager=True),
                          max_model_len=256, seed=0, dtype="float32")
    from vllm.distributed.parallel_state import get_tp_group

    share = PROMPTS[:2] if rank == 0 else PROMPTS[2:]
    own = sampler.sample(share, 2, SamplingParams(max_new_tokens=8, seed=100 + rank, logprobs=True))
    judged = JUDGED if rank == 0 else []
    scores = sampler.next_token_logprobs(judged, [policy.tokenizer.encode(" 1")[-1]]).flatten().tolist()

    params = SamplingParams(max_new_tokens=8, seed=200 + rank, logprobs=True)
    before = sampler.sample(PROMPTS[rank:rank + 1], 4, params)
    gap_before = gap(policy, before)
    logp_before = policy.policy_logprobs(batch(before))
    policy.train_step(batch(before).with_logprobs(old=logp_before))
    moved = float((policy.policy_logprobs(batch(before)) - logp_before).abs().max())
    sampler.update_weights(policy.export_weights(on_device=True, bucket_bytes=BUCKET_BYTES))
    after = sampler.sample(PROMPTS[rank:rank + 1], 4, params)
    record = {"rank": rank, "world": world, "executor": sampler.engine.layout.executor,
              "group": list(sampler.engine.layout.group), "vllm_tp_group": list(get_tp_group().ranks),
              "engine_seed": sampler.engine.layout.seed, "tokens": own.completion_ids.tolist(),
              "texts": own.texts, "scores": scores, "gap_before": gap_before, "gap_after": gap(policy, after),
              "moved": moved, "weight_version": sampler.weight_version}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    sampler.close()
    policy.close()


if __name__ == "__main__":
    main()
