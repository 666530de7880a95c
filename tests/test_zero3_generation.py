"""ZeRO-3 generation without DeepSpeed's module hooks (:func:`dynalign.zero.unhooked`), CPU.

Real ZeRO-3 engines on the tiny local model. Each configuration runs as a pair built alike:
engine A samples through the DeepSpeed engine (gathered once, unhooked), engine B through the
module alone (gathered once, DeepSpeed's hooks still running at every module call: the path
before unhooking). Both then take the same optimizer steps. The two-rank test runs this file
as a script under ``torchrun`` (``--worker``) and is ``slow``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

from dynalign.config import DeepSpeedConfig, GRPOConfig, LoraConfig, ModelConfig  # noqa: E402
from dynalign.engine import PolicyEngine, TrainBatch  # noqa: E402
from dynalign.rollout import HFSampler, Rollouts, SamplingParams, zero3_gather  # noqa: E402
from dynalign.zero import detached_hooks, engine_hook_handles, zero3_hook_handles, zero3_offload  # noqa: E402

# DeepSpeed calls torch.distributed APIs that torch 2.13 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

PROMPTS = ["def fibonacci(n):", [{"role": "user", "content": "What is a good way to learn?"}],
           "The quick brown fox"]
HOOK_TABLES = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
# The collectives of DeepSpeed's communication backend (every deepspeed.comm call goes through it).
COLLECTIVES = ("all_reduce", "inference_all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "all_gather",
               "all_gather_into_tensor", "all_gather_base", "all_gather_coalesced", "all_gather_object",
               "all_to_all_single", "all_to_all", "send", "recv", "isend", "irecv", "gather", "scatter",
               "barrier", "monitored_barrier")
CONFIGS: dict[str, Callable[[], tuple[ModelConfig, GRPOConfig]]] = {
    "zero3": lambda: (ModelConfig(), GRPOConfig(lr=1e-3, group_size=2, prompts_per_step=4,
                                                micro_batch_size=2)),
    # LoRA with a KL reference adapter and gradient checkpointing, as a memory-lean run would be.
    "zero3_lora": lambda: (
        ModelConfig(lora=LoraConfig(enabled=True, r=4, alpha=8), gradient_checkpointing=True),
        GRPOConfig(lr=1e-2, beta=0.1, group_size=2, prompts_per_step=4, micro_batch_size=2)),
}
ROUNDS = 2  # sample -> train twice: the second samples from trained weights (LoRA no longer zero)


# --------------------------------------------------------------------------- helpers


def build_engine(name: str, model_path: str | Path) -> PolicyEngine:
    model, grpo = CONFIGS[name]()
    model.name_or_path = str(model_path)
    return PolicyEngine(model, grpo, DeepSpeedConfig(stage=3), seed=0)


def unhooked_sampler(engine: PolicyEngine, batch_size: int = 4) -> HFSampler:
    return HFSampler(engine.module, engine.tokenizer, batch_size=batch_size,
                     gather=zero3_gather(engine.ds_engine), shares_weights=True)


def hooked_sampler(engine: PolicyEngine) -> HFSampler:
    """The path before unhooking: gathered once per call, DeepSpeed's hooks left in place."""
    return HFSampler(engine.module, engine.tokenizer, batch_size=4, gather=zero3_gather(engine.module),
                     shares_weights=True)


def params(seed: int, max_new_tokens: int = 8) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed, logprobs=True)


def as_batch(rollouts: Rollouts, seed: int = 0) -> TrainBatch:
    """The rollouts as a training batch with fixed random advantages."""
    from dynalign.train import make_batch

    advantages = torch.randn(len(rollouts), generator=torch.Generator().manual_seed(seed))  # [N]
    return make_batch(rollouts, advantages, torch.ones(len(rollouts), dtype=torch.bool))


def train_on(engine: PolicyEngine, rollouts: Rollouts, seed: int) -> dict[str, float]:
    """One optimizer step on the rollouts (with reference log-probs when beta > 0)."""
    batch = as_batch(rollouts, seed)
    if engine.grpo.beta > 0:
        batch = batch.with_logprobs(ref=engine.reference_logprobs(batch))
    return engine.train_step(batch)


def hook_table(module: torch.nn.Module) -> list[tuple[str, str, int, Any]]:
    """Every module hook: (module name, table, handle id, hook object), in calling order."""
    return [(name, table, key, hook) for name, sub in module.named_modules()
            for table in HOOK_TABLES for key, hook in getattr(sub, table).items()]


def hooked_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules DeepSpeed hooks: all but those inside a ZeRO-3 leaf (a decoder layer)."""
    from deepspeed.utils import z3_leaf_module

    inside = {id(sub) for leaf in module.modules() if z3_leaf_module(leaf) for sub in leaf.modules()
              if sub is not leaf}
    return [sub for sub in module.modules() if id(sub) not in inside]


@contextmanager
def counting(owner: Any, names: tuple[str, ...]) -> Iterator[dict[str, int]]:
    """Count the calls of ``owner.<name>`` for each name inside the block."""
    counts = dict.fromkeys(names, 0)
    originals = {name: getattr(owner, name) for name in names}

    def wrap(name: str) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return originals[name](*args, **kwargs)
        return counted

    for name in names:
        setattr(owner, name, wrap(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(owner, name, original)


@contextmanager
def counting_fetches() -> Iterator[dict[str, int]]:
    """Calls of ZeRO-3's per-module parameter fetch and step reset (both run from its hooks)."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    with counting(PartitionedParameterCoordinator, ("fetch_sub_module", "reset_step")) as counts:
        yield counts


def counting_collectives() -> Any:
    """Calls of DeepSpeed's collectives (its backend class holds them; instances hold none)."""
    from deepspeed import comm

    backend = type(comm.comm.cdb)
    return counting(backend, tuple(name for name in COLLECTIVES if hasattr(backend, name)))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def runs(tiny_model_path) -> Iterator[Callable[[str], dict[str, Any]]]:
    """``get(name)``: the pair's samples, step statistics and final weights, ROUNDS rounds each."""
    done: dict[str, dict[str, Any]] = {}
    engines: list[PolicyEngine] = []

    def get(name: str) -> dict[str, Any]:
        if name not in done:
            a, b = build_engine(name, tiny_model_path), build_engine(name, tiny_model_path)
            engines.extend((a, b))
            done[name] = run_pair(a, b)
        return done[name]

    yield get
    for engine in engines:
        engine.close()


def run_pair(a: PolicyEngine, b: PolicyEngine) -> dict[str, Any]:
    new, old = unhooked_sampler(a), hooked_sampler(b)
    record: dict[str, Any] = {"engine": a, "new": [], "old": [], "stats_new": [], "stats_old": [],
                              "hooks_before": [], "hooks_after": []}
    for round_ in range(ROUNDS):
        record["hooks_before"].append(hook_table(a.ds_engine.module))
        record["new"].append(new.sample(PROMPTS, 2, params(seed=round_)))
        record["hooks_after"].append(hook_table(a.ds_engine.module))
        record["old"].append(old.sample(PROMPTS, 2, params(seed=round_)))
        record["stats_new"].append(train_on(a, record["new"][-1], seed=round_))
        record["stats_old"].append(train_on(b, record["new"][-1], seed=round_))
    record["weights_new"], record["weights_old"] = dict(a.export_weights()), dict(b.export_weights())
    return record


# --------------------------------------------------------------------------- hooks, no engine


def test_detached_hooks_come_back_as_they_were():
    layer = torch.nn.Linear(2, 2)
    calls: list[str] = []
    first = layer.register_forward_hook(lambda *_: calls.append("first"))
    ours = layer.register_forward_hook(lambda *_: calls.append("ours"))
    layer.register_forward_hook(lambda *_: calls.append("last"))
    before = list(layer._forward_hooks.items())
    with detached_hooks([ours]):
        layer(torch.zeros(1, 2))
        assert calls == ["first", "last"]
        added = layer.register_forward_hook(lambda *_: calls.append("added"))
        first.remove()
    # The same hook objects under the same ids, in their places; changes made meanwhile kept.
    assert list(layer._forward_hooks.items())[:2] == before[1:]
    assert list(layer._forward_hooks) == [ours.id, before[2][0], added.id]
    calls.clear()
    layer(torch.zeros(1, 2))
    assert calls == ["ours", "last", "added"]
    ours.remove()  # the handle still points at its hook
    added.remove()
    assert list(layer._forward_hooks.items()) == before[2:]


def test_detached_hooks_return_after_an_error():
    layer = torch.nn.Linear(2, 2)
    handle = layer.register_forward_pre_hook(lambda *_: None)
    before = list(layer._forward_pre_hooks.items())
    with pytest.raises(RuntimeError, match="boom"), detached_hooks([handle]):
        assert not layer._forward_pre_hooks
        raise RuntimeError("boom")
    assert list(layer._forward_pre_hooks.items()) == before


def test_a_plain_module_has_no_offload(tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert zero3_offload(model) is None and zero3_gather(model) is None


# --------------------------------------------------------------------------- ZeRO-3 engines


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_unhooked_samples_equal_the_hooked_path(runs, name):
    record = runs(name)
    for new, old in zip(record["new"], record["old"], strict=True):
        assert torch.equal(new.completion_ids, old.completion_ids)
        assert torch.equal(new.completion_mask, old.completion_mask)
        assert new.logprobs is not None and old.logprobs is not None
        assert torch.equal(new.logprobs, old.logprobs)  # bitwise, float32
        assert new.texts == old.texts and new.finish_reasons == old.finish_reasons
    assert not torch.equal(record["new"][0].completion_ids, record["new"][1].completion_ids)  # seeds differ


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hooks_return_and_training_after_equals_the_hooked_path(runs, name):
    record = runs(name)
    # The very same hook objects, under the same ids, in the same order, on every module.
    assert record["hooks_after"] == record["hooks_before"]
    assert len(record["hooks_before"][0]) >= 4 * len(hooked_modules(record["engine"].module))
    for new, old in zip(record["stats_new"], record["stats_old"], strict=True):
        assert new == old and new["skipped"] == 0.0  # loss, grad_norm, statistics: bitwise
    assert list(record["weights_new"]) == list(record["weights_old"])
    for key, tensor in record["weights_new"].items():
        assert torch.equal(tensor, record["weights_old"][key]), key


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_no_hook_runs_inside_the_block(runs, name):
    engine = runs(name)["engine"]
    offload = zero3_offload(engine.ds_engine)
    ours = {handle.id for handle in [*zero3_hook_handles(offload), *engine_hook_handles(engine.ds_engine)]}
    assert len(engine_hook_handles(engine.ds_engine)) == 2  # the engine's prologue and epilogue
    before = hook_table(engine.module)
    zero_linear = torch.nn.functional.linear
    assert zero_linear is not torch._C._nn.linear  # ZeRO-3's memory-efficient linear is in place
    gather = zero3_gather(engine.ds_engine)
    assert gather is not None
    with gather():
        inside = hook_table(engine.module)
        assert all(p.ds_status.name == "AVAILABLE" for p in engine.module.parameters())
        assert torch.nn.functional.linear is torch._C._nn.linear  # torch's own, no autograd function
    assert torch.nn.functional.linear is zero_linear
    assert not {key for _, _, key, _ in inside} & ours
    assert inside == [row for row in before if row[2] not in ours]  # others' hooks (peft's) stay
    assert all(p.data.numel() == 0 for p in engine.module.parameters())  # partitioned again


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_generation_fetches_nothing(runs, name):
    """Work, not time: no ZeRO-3 fetch while sampling unhooked, one per module call otherwise,
    and the hooks fetch again in the next forward."""
    engine = runs(name)["engine"]
    with counting_fetches() as unhooked_counts:
        rollouts = unhooked_sampler(engine).sample(PROMPTS, 2, params(seed=5))
    with counting_fetches() as hooked_counts:
        hooked_sampler(engine).sample(PROMPTS, 2, params(seed=5))
    with counting_fetches() as training_counts:
        engine.policy_logprobs(as_batch(rollouts))
    assert unhooked_counts == {"fetch_sub_module": 0, "reset_step": 0}
    assert hooked_counts["fetch_sub_module"] > 0
    assert training_counts["fetch_sub_module"] > 0 and training_counts["reset_step"] > 0


# --------------------------------------------------------------------------- two ranks


@pytest.mark.slow
def test_two_ranks_generate_different_lengths_then_train(tiny_model_path, tmp_path):
    """Ranks decode different numbers of tokens and generate calls without waiting for each
    other; the training steps after them match an engine pair member that never sampled."""
    from dynalign.distributed import LAUNCHER_VARIABLES, free_port

    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k not in (*LAUNCHER_VARIABLES, "LOCAL_WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", __file__, "--worker", "--model", str(tiny_model_path),
               "--out", str(out)]
    proc = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = json.loads(out.read_text())
    for tokens, collectives in zip(result["tokens"], result["collectives"], strict=True):
        assert tokens[0] != tokens[1]  # rank 0 decodes 3 tokens in 1 generate call, rank 1 9 in 2
        # The same collectives on both ranks (the gather and re-partitioning), none per token or call.
        assert collectives[0] == collectives[1] > 0
    assert result["losses_new"] == result["losses_old"]
    assert all(loss == loss for loss in result["losses_new"])  # finite: NaN != NaN
    assert result["weights_equal"]


def _worker(model_path: str, out: str) -> None:
    """Both ranks: engine A samples unhooked and trains on its rollouts; engine B trains on the
    same rows without sampling. Rank 0 writes what the test checks."""
    a, b = build_engine("zero3", model_path), build_engine("zero3", model_path)
    rank = a.rank
    sampler = unhooked_sampler(a, batch_size=2)
    prompts, n, tokens = ([PROMPTS[0]], 1, 3) if rank == 0 else (PROMPTS[1:], 2, 9)
    rounds: dict[str, list[Any]] = {"tokens": [], "collectives": [], "losses_new": [], "losses_old": []}
    for round_ in range(ROUNDS):
        with counting_collectives() as calls:
            rollouts = sampler.sample(prompts, n, params(seed=10 * round_ + rank, max_new_tokens=tokens))
        rounds["tokens"].append(gather_object(rollouts.completion_ids.numel()))
        rounds["collectives"].append(gather_object(sum(calls.values())))
        rounds["losses_new"].append(train_on(a, rollouts, seed=round_)["loss"])
        rounds["losses_old"].append(train_on(b, rollouts, seed=round_)["loss"])
    pairs = zip(a.export_weights(), b.export_weights(), strict=True)  # collective: every rank iterates
    same = all([torch.equal(x, y) for (_, x), (_, y) in pairs])
    if rank == 0:
        Path(out).write_text(json.dumps({**rounds, "weights_equal": same}))
    a.close()
    b.close()


def gather_object(value: Any) -> list[Any]:
    values: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    _worker(args.model, args.out)
