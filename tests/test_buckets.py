"""Buckets of whole layers (dynalign/buckets.py) and where each rank's vLLM engine runs
(dynalign/rollout/_vllm_compat.engine_layout): pure functions, hand-made inputs."""

from __future__ import annotations

import pytest

from dynalign.buckets import layer_buckets, layer_key
from dynalign.config import ConfigError, to_train_config
from dynalign.rollout._vllm_compat import engine_layout

NAMES = ["model.embed_tokens.weight", "model.layers.0.q.weight", "model.layers.0.k.weight",
         "model.layers.1.q.weight", "model.layers.1.k.weight", "model.layers.10.q.weight",
         "model.norm.weight", "lm_head.weight"]


def test_layer_keys():
    assert [layer_key(n) for n in NAMES] == ["model.embed_tokens", "model.layers.0", "model.layers.0",
                                             "model.layers.1", "model.layers.1", "model.layers.10",
                                             "model.norm", "lm_head"]


def test_buckets_close_at_the_first_new_layer_past_the_limit():
    named = [(n, 10) for n in NAMES]
    cut = [[n for n, _ in b] for b in layer_buckets(named, lambda size: size, limit=25)]
    # 10 + 10 + 10 = 30 >= 25 after layer 0's second weight: the bucket closes before layer 1
    assert cut == [NAMES[:3], NAMES[3:6], NAMES[6:]]
    assert [len(b) for b in layer_buckets(named, lambda size: size, limit=0)] == [1] * len(NAMES)
    assert [len(b) for b in layer_buckets(named, lambda size: size, limit=10**9)] == [len(NAMES)]
    # a layer larger than the limit stays whole
    assert [len(b) for b in layer_buckets([(NAMES[1], 99), (NAMES[2], 99)], lambda size: size, 10)] == [2]


def test_an_engine_per_rank_in_a_launched_world():
    alone = engine_layout(1, seed=7)
    assert (alone.executor, alone.group, alone.seed, alone.in_process) == (None, (0,), 7, True)
    workers = engine_layout(4, seed=7)  # alone with 4 GPUs: vLLM's own worker processes
    assert (workers.executor, workers.group, workers.in_process) == (None, (0, 1, 2, 3), False)
    ranks = [engine_layout(2, seed=7, rank=r, world_size=8, ranks_per_node=4) for r in range(8)]
    assert {r.executor for r in ranks} == {"external_launcher"} and all(r.in_process for r in ranks)
    assert [r.group for r in ranks] == [(0, 1), (0, 1), (2, 3), (2, 3), (4, 5), (4, 5), (6, 7), (6, 7)]
    assert [r.seed for r in ranks] == [7, 7, 8, 8, 9, 9, 10, 10]  # one per group: its ranks agree


def test_a_tensor_parallel_group_never_straddles_two_nodes():
    with pytest.raises(ValueError, match=r"^rollout\.vllm\.tensor_parallel_size=4 must divide the ranks of "
                                         r"each node \(2 of a world of 4\)"):
        engine_layout(4, seed=0, rank=0, world_size=4, ranks_per_node=2)


def test_the_config_refuses_a_group_size_that_does_not_divide_the_world(compose_cfg):
    cfg = compose_cfg(["rollout=vllm", "rollout.vllm.tensor_parallel_size=4", "grpo.prompts_per_step=24",
                       "grpo.micro_batch_size=1"])
    with pytest.raises(ConfigError, match=r"^rollout\.vllm\.tensor_parallel_size: must divide the world "
                                          r"size 6"):
        to_train_config(cfg, 6)
    assert to_train_config(cfg, 8).rollout.vllm.tensor_parallel_size == 4
    with pytest.raises(ConfigError, match=r"^rollout\.vllm\.sync_bucket_mib: must be > 0"):
        to_train_config(compose_cfg(["rollout=vllm", "rollout.vllm.sync_bucket_mib=0"]))
