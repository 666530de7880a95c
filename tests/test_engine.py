"""The DeepSpeed training core on CPU: real ZeRO stages, the tiny local model, no GPU.

In-process engines share one ``torch.distributed`` world of one (gloo) and are built once
per module where several tests can use them. Multi-process and resume runs start
``tests/dist/run_engine.py`` in subprocesses (``torchrun`` for two ranks) and are ``slow``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from test_onednn import counting_op, needs_onednn

from dynalign import grpo as grpo_ops
from dynalign.config import ConfigError, DeepSpeedConfig, GRPOConfig, LoraConfig, ModelConfig
from dynalign.distributed import LAUNCHER_VARIABLES, free_port, init_distributed
from dynalign.engine import (
    LATEST_FILE,
    PolicyEngine,
    TrainBatch,
    checkpoint,
    deepspeed_config,
    hf_zero3_init,
    warmup_constant,
)
from dynalign.onednn import OneDNNLinear
from dynalign.zero import gathered, gathered_clone

# DeepSpeed calls torch.distributed APIs that torch 2.13 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_ENGINE = REPO_ROOT / "tests" / "dist" / "run_engine.py"
PROMPT, COMPLETION = 6, 5
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# 1 process vs 2 ranks, 6 AdamW steps at lr 1e-3 with different micro-batch sizes: measured
# max |diff| 1.3e-6 (bnpo), 5e-7 (grpo); a wrong micro-batch scaling gives ~1e-2.
PROCESS_COUNT_ATOL = 2e-5
# Same batch, micro-batches of 4 vs 8 rows, one step at lr 1e-3: measured <= 2.4e-6. AdamW's
# first update is ~lr * g / (|g| + eps), so rounding in gradients near eps moves a weight by a
# small fraction of lr; a wrong micro-batch weighting changes directions (~lr) and grad_norm.
MICRO_BATCH_ATOL = 1e-5


# --------------------------------------------------------------------------- helpers


def make_batch(rows: int, *, seed: int = 0, vocab: int = 1000, empty_row: bool = True) -> TrainBatch:
    """Synthetic rollouts: left-padded prompts, completions of varied length, non-zero advantages."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, PROMPT + COMPLETION), generator=gen)  # [N, P+C]
    attention = torch.ones_like(ids)  # [N, P+C]
    completion = torch.ones(rows, COMPLETION, dtype=torch.long)  # [N, C]
    lengths = torch.randint(1, COMPLETION + 1, (rows,), generator=gen)  # [N]
    for row in range(rows):
        attention[row, : row % 3] = 0
        attention[row, PROMPT + int(lengths[row]):] = 0
        completion[row, int(lengths[row]):] = 0
    if empty_row:  # a completion with no token that counts (e.g. masked as truncated)
        completion[-1] = 0
    advantages = torch.randn(rows, generator=gen)  # [N]
    return TrainBatch(ids, attention, completion, advantages)


def with_reference(engine: PolicyEngine, batch: TrainBatch) -> TrainBatch:
    return batch.with_logprobs(ref=engine.reference_logprobs(batch)) if engine.grpo.beta > 0 else batch


def weights(engine: PolicyEngine) -> dict[str, torch.Tensor]:
    return dict(engine.export_weights())


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


def plain_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """state_dict of a whole (unpartitioned) HF model, even while a ZeRO-3 engine is alive."""
    from transformers import AutoModelForCausalLM

    with hf_zero3_init(None):
        return AutoModelForCausalLM.from_pretrained(path).state_dict()


def grpo_config(**overrides) -> GRPOConfig:
    values = {"lr": 1e-3, "group_size": 4, "prompts_per_step": 4, "micro_batch_size": 4} | overrides
    return GRPOConfig(**values)


ENGINES = {
    "zero3": lambda: (ModelConfig(), grpo_config(), DeepSpeedConfig(stage=3)),
    "zero2": lambda: (ModelConfig(), grpo_config(), DeepSpeedConfig(stage=2)),
    "zero3_offload": lambda: (ModelConfig(), grpo_config(),
                              DeepSpeedConfig(stage=3, offload_optimizer="cpu", offload_param="cpu")),
    "stage0": lambda: (ModelConfig(), grpo_config(), DeepSpeedConfig(stage=0)),
    "zero3_reference": lambda: (ModelConfig(), grpo_config(beta=0.1), DeepSpeedConfig(stage=3)),
    "zero3_lora": lambda: (ModelConfig(lora=LoraConfig(enabled=True, r=4, alpha=8),
                                       gradient_checkpointing=True),
                           grpo_config(lr=1e-2, beta=0.1), DeepSpeedConfig(stage=3)),
}


@pytest.fixture(scope="module")
def engine_factory(tiny_model_path):
    """``get(name)``: the engine of ``ENGINES[name]`` on the tiny model, built once per module."""
    built: dict[str, PolicyEngine] = {}

    def get(name: str) -> PolicyEngine:
        if name not in built:
            model, grpo, ds = ENGINES[name]()
            model.name_or_path = str(tiny_model_path)
            built[name] = PolicyEngine(model, grpo, ds, seed=0)
        return built[name]

    yield get
    for engine in built.values():
        engine.close()


@pytest.fixture(scope="module")
def zero3(engine_factory) -> PolicyEngine:
    return engine_factory("zero3")


def run_script(args: list[str], *, nproc: int = 1, timeout: int = 600) -> None:
    """Run tests/dist/run_engine.py as a plain process or under torchrun; fail with its output."""
    env = {k: v for k, v in os.environ.items() if k not in (*LAUNCHER_VARIABLES, "LOCAL_WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                     f"--master_port={free_port()}"]
    proc = subprocess.run([*launcher, str(RUN_ENGINE), *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


# ------------------------------------------------------------------- pure helpers


def test_deepspeed_config_geometry_precision_and_extra():
    grpo = grpo_config(micro_batch_size=2, max_grad_norm=0.5)
    ds = DeepSpeedConfig(stage=3, offload_optimizer="cpu", offload_param="cpu",
                         extra={"zero_optimization": {"stage3_max_live_parameters": 7}, "steps_per_print": 5})
    config = deepspeed_config(ds, grpo, "bfloat16", world_size=2)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (16, 2, 4)  # 16 = 2 * 4 * 2 ranks
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_max_live_parameters"] == 7 and zero["overlap_comm"]  # extra merged, not replacing
    assert config["steps_per_print"] == 5
    assert deepspeed_config(DeepSpeedConfig(stage=2), grpo, "float32", 1)["gradient_accumulation_steps"] == 8
    with pytest.raises(ConfigError, match="grpo.micro_batch_size"):
        deepspeed_config(DeepSpeedConfig(), grpo_config(micro_batch_size=3), "float32", 1)


def test_warmup_then_constant():
    factor = warmup_constant(4)
    assert [factor(step) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_constant(0)(0) == 1.0


def test_train_batch_checks_shapes_and_shards():
    batch = make_batch(8)
    assert batch.num_rows == 8 and batch.completion_length == COMPLETION
    shard = batch.shard(1, 2)
    assert torch.equal(shard.input_ids, batch.input_ids[4:]) and shard.old_logprobs is None
    with pytest.raises(ValueError, match="advantages"):
        TrainBatch(batch.input_ids, batch.attention_mask, batch.completion_mask, torch.zeros(7))
    with pytest.raises(ValueError, match="ref_logprobs"):
        batch.with_logprobs(ref=torch.zeros(8, COMPLETION + 1))


# ------------------------------------------------------------------ ZeRO-3 engine


def test_world_of_one_exports_no_launcher_variables(zero3):
    """A plain process must not hand MASTER_PORT/RANK to its children (they would reuse the port)."""
    assert (zero3.rank, zero3.world_size) == (0, 1)
    assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} & set(os.environ)


def test_export_yields_full_tensors_with_hf_names(zero3, tiny_model_path):
    reference = plain_state_dict(tiny_model_path)
    exported = weights(zero3)
    assert list(exported) == list(reference)  # same names, same order, lm_head.weight included
    assert "lm_head.weight" in exported
    for name, tensor in exported.items():
        assert tensor.shape == reference[name].shape and tensor.dtype == reference[name].dtype, name
        assert tensor.device.type == "cpu" and not tensor.requires_grad
    # The engine really is partitioned: its own parameters hold no full tensor.
    assert all(hasattr(p, "ds_id") and p.data.numel() == 0 for p in zero3.module.parameters())


@pytest.mark.parametrize("name", ["zero3", "zero3_lora"])
def test_the_weight_sync_export_gathers_whole_layers_per_bucket_onto_the_device(engine_factory, name,
                                                                                 monkeypatch):
    from dynalign.buckets import layer_key
    from dynalign.engine import adapters

    engine = engine_factory(name)
    plain = weights(engine)  # one parameter per gather, CPU copies
    calls: list[list[torch.Tensor]] = []
    gathered = adapters.gathered

    def spy(tensors):
        calls.append(list(tensors))
        return gathered(calls[-1])

    monkeypatch.setattr(adapters, "gathered", spy)
    synced = list(engine.export_weights(on_device=True, bucket_bytes=64 * 1024))
    assert [n for n, _ in synced] == list(plain)
    for exported, tensor in synced:
        assert tensor.device == engine.device and not tensor.requires_grad
        assert torch.equal(tensor, plain[exported]), exported  # LoRA merged alike
    # fewer, larger gathers (the tiny model's 1.7 MB in 64 KiB buckets), none splitting a layer
    entries = [(n, t) for n, t in engine.module.state_dict(keep_vars=True).items() if ".lora_" not in n]
    layers: list[set[str]] = []
    for call in calls:  # each gather takes the next entries of the state dict (and their adapters)
        ids, taken = {id(t) for t in call}, set()
        while entries and id(entries[0][1]) in ids:
            taken.add(layer_key(entries.pop(0)[0]))
        layers.append(taken)
    assert not entries and 1 < len(calls) < len(plain) / 2
    assert all(not (a & b) for i, a in enumerate(layers) for b in layers[i + 1:])


def test_one_step_changes_every_parameter(zero3):
    before = weights(zero3)
    step = zero3.global_step
    stats = zero3.train_step(make_batch(16))
    assert changed(before, weights(zero3)) == set(before)
    assert zero3.global_step == step + 1
    assert stats["skipped"] == 0.0 and 0 < stats["grad_norm"] < math.inf
    assert stats["lr"] == pytest.approx(1e-3)
    assert stats["tokens"] == float(make_batch(16).completion_mask.sum())
    for key in ("loss", "clip_frac_low", "clip_frac_high", "ratio_mean", "entropy"):
        assert torch.isfinite(torch.tensor(stats[key])), key
    assert stats["ratio_mean"] == pytest.approx(1.0)  # no old log-probs: ratio 1


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_zero3_hooks_each_decoder_layer_as_one_unit_and_steps_as_per_module_hooks(tiny_model_path, lora):
    """``deepspeed.stage3_leaf_layers`` (the default): DeepSpeed hooks each decoder layer, not the
    linears and norms inside it, and one step moves the weights as the per-module hooks do (LoRA
    without gradient checkpointing too: its frozen embedding feeds the first layer). The
    gradients reach ZeRO's flat buffers in another order, so the norm they are clipped by may
    differ by rounding."""
    from deepspeed.utils import get_z3_leaf_modules

    model = ModelConfig(name_or_path=str(tiny_model_path), lora=LoraConfig(enabled=lora, r=4, alpha=8))
    engines = {leaf: PolicyEngine(model, grpo_config(), DeepSpeedConfig(stage=3, stage3_leaf_layers=leaf),
                                  seed=0) for leaf in (True, False)}
    try:
        layers = {leaf: engine.adaptation.base_model(engine.module).model.layers
                  for leaf, engine in engines.items()}
        assert get_z3_leaf_modules(engines[True].module) == list(layers[True])
        assert get_z3_leaf_modules(engines[False].module) == []
        # DeepSpeed's fetch hooks: on the layer alone, or on every module inside it too
        for leaf in engines:
            layer = layers[leaf][0]
            assert bool(layer.self_attn.q_proj._forward_pre_hooks) is not leaf and layer._forward_pre_hooks
        before = weights(engines[True])
        batch = make_batch(16)
        stats = {leaf: engine.train_step(batch) for leaf, engine in engines.items()}
        after = {leaf: weights(engine) for leaf, engine in engines.items()}
    finally:
        for engine in engines.values():
            engine.close()
    adapted = {name for name in before if any(target in name for target in LORA_TARGETS)}
    assert changed(before, after[True]) == (adapted if lora else set(before))
    assert stats[True]["loss"] == stats[False]["loss"]  # the same forward
    assert stats[True]["grad_norm"] == pytest.approx(stats[False]["grad_norm"], rel=1e-6)
    # measured <= 4.3e-6 (AdamW's first step, see MICRO_BATCH_ATOL); a lost gradient moves ~lr
    for name, weight in after[True].items():
        torch.testing.assert_close(weight, after[False][name], rtol=0, atol=MICRO_BATCH_ATOL, msg=name)


def test_a_zero3_step_prints_no_deprecation_notice_of_deepspeeds_collectives(zero3):
    """DeepSpeed's ZeRO-3 gathers and reduce-scatters through collectives this torch deprecates;
    their FutureWarnings are nothing a user can act on, so a step must show none of them."""
    with warnings.catch_warnings(record=True) as caught:  # restores the filters afterwards
        warnings.resetwarnings()  # no filter of another library's (one ignores every FutureWarning)
        init_distributed()  # idempotent: the group exists; it installs dynalign's filter
        zero3.train_step(make_batch(16))
        with gathered(list(zero3.module.parameters())[:1]):  # an all-gather outside the step too
            pass
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


def test_a_zero3_step_starts_no_process(zero3):
    """DeepSpeed's CPU accelerator counts a node's ranks with a ``numactl`` subprocess at every
    ZeRO-3 gradient reduce-scatter unless ``LOCAL_SIZE`` names them; ``init_distributed`` does."""
    assert os.environ["LOCAL_SIZE"] == "1"
    started: list[object] = []
    recording = [True]
    sys.addaudithook(lambda event, args: started.append(args[0]) if event == "subprocess.Popen" and recording
                     else None)  # a hook stays for the process: it records only within this test
    try:
        zero3.train_step(make_batch(16))
    finally:
        recording.clear()
    assert not started, started


def test_nan_loss_skips_the_step_and_leaves_weights_bitwise(zero3):
    bad = make_batch(16, seed=1)
    bad.advantages[3] = float("nan")
    before, skipped = weights(zero3), zero3.skipped_steps
    stats = zero3.train_step(bad)
    assert stats["skipped"] == 1.0 and zero3.skipped_steps == skipped + 1
    assert not changed(before, weights(zero3))
    stats = zero3.train_step(make_batch(16, seed=2))  # the next normal step trains again
    assert stats["skipped"] == 0.0 and torch.isfinite(torch.tensor(stats["loss"]))
    assert changed(before, weights(zero3)) == set(before)


def test_old_logprobs_give_ratios_and_clipping(zero3):
    batch = make_batch(16, seed=3)
    batch = batch.with_logprobs(old=zero3.policy_logprobs(batch))
    first = zero3.train_step(batch)
    second = zero3.train_step(batch)  # a second pass over the same rollouts (num_iterations = 2)
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert second["ratio_mean"] != pytest.approx(1.0, abs=1e-4)


def test_crash_during_save_leaves_the_previous_checkpoint_loadable(zero3, tmp_path, monkeypatch):
    saved = zero3.save(tmp_path, {"iteration": 3, "data_position": 17})
    saved_weights, saved_step = weights(zero3), zero3.global_step
    zero3.train_step(make_batch(16, seed=4))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    # DeepSpeed has written its files for the new checkpoint; the crash comes after them.
    monkeypatch.setattr(checkpoint, "write_extras", crash)
    with pytest.raises(OSError, match="disk full"):
        zero3.save(tmp_path, {"iteration": 4})
    monkeypatch.undo()
    assert (tmp_path / LATEST_FILE).read_text() == saved.name
    assert not (tmp_path / f"step_{zero3.global_step}").exists()

    assert zero3.load(tmp_path) == {"iteration": 3, "data_position": 17}
    assert zero3.global_step == saved_step
    assert not changed(saved_weights, weights(zero3))
    state = json.loads((saved / "dynalign_state.json").read_text())
    assert state["global_step"] == saved_step and state["world_size"] == 1


def test_save_keeps_the_newest_k(zero3, tmp_path):
    names = []
    for seed in range(3):
        zero3.train_step(make_batch(16, seed=10 + seed))
        names.append(zero3.save(tmp_path, {"seed": seed}, keep=2).name)
    kept = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert kept == sorted(names[1:])
    assert (tmp_path / LATEST_FILE).read_text() == names[-1]
    assert zero3.load(tmp_path / names[1]) == {"seed": 1}  # a given checkpoint directory loads too


# ----------------------------------------------------------------- scaling, stages


@pytest.mark.parametrize("loss_type", sorted(grpo_ops.POLICY_LOSSES))
def test_micro_batch_size_does_not_change_the_step(loss_type, tiny_model_path):
    """12 rows (fewer than the configured 16) as 3 x 4 or 8 + 4 rows: one and the same step."""
    batch = make_batch(12, seed=5)
    shift = torch.tensor([0.3, -0.3]).repeat(6)[:, None]  # [12, 1] ratios 1.35 / 0.74: both clips
    old = None
    results = []
    for micro in (4, 8):
        grpo = grpo_config(micro_batch_size=micro, loss_type=loss_type)
        model = ModelConfig(name_or_path=str(tiny_model_path))
        with PolicyEngine(model, grpo, DeepSpeedConfig(stage=3)) as engine:
            old = engine.policy_logprobs(batch) - shift if old is None else old
            stats = engine.train_step(batch.with_logprobs(old=old))
            results.append((stats, weights(engine)))
    (stats_a, weights_a), (stats_b, weights_b) = results
    assert stats_a["loss"] == pytest.approx(stats_b["loss"], rel=1e-5, abs=1e-7)
    assert stats_a["grad_norm"] == pytest.approx(stats_b["grad_norm"], rel=1e-5)
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=0, atol=MICRO_BATCH_ATOL)


@pytest.mark.parametrize("micro", [6, 12])  # 6: a group cut across two micro-batches
def test_packed_rows_take_the_padded_rows_step(tiny_model_path, micro):
    """G = 4 answers per prompt, read as one packed row per prompt (the default) or as one padded
    row per answer: the same reference log-probs, loss, statistics and weights."""
    from test_packing import grouped_batch

    ids, attention = grouped_batch(1000, seed=3, prompt_lengths=(6, 3, 5), group=4, answer_width=COMPLETION)
    completion = attention[:, -COMPLETION:].clone()
    completion[5] = 0  # an answer that counts for nothing (masked as truncated)
    advantages = torch.randn(12, generator=torch.Generator().manual_seed(1))  # [N]
    batch = TrainBatch(ids, attention, completion, advantages)
    results = []
    for pack in (True, False):
        model = ModelConfig(name_or_path=str(tiny_model_path))
        grpo = grpo_config(prompts_per_step=3, micro_batch_size=micro, pack_groups=pack, beta=0.1)
        with PolicyEngine(model, grpo, DeepSpeedConfig(stage=3)) as engine:
            assert (engine.packing is not None) == pack
            before = weights(engine)
            ref = engine.reference_logprobs(batch)
            stats = engine.train_step(batch.with_logprobs(ref=ref, old=ref - 0.1))  # ratios 1.1: clipping
            results.append((ref, stats, weights(engine)))
    (ref_a, stats_a, weights_a), (ref_b, stats_b, weights_b) = results
    answers = attention[:, -COMPLETION:].bool()
    torch.testing.assert_close(ref_a[answers], ref_b[answers], rtol=0, atol=1e-5)
    assert stats_a.keys() == stats_b.keys()
    for key in ("loss", "grad_norm", "entropy", "kl_mean", "ratio_mean", "clip_frac_high"):
        assert stats_a[key] == pytest.approx(stats_b[key], rel=1e-5, abs=1e-7), key
    assert_same_first_adam_step(before, weights_a, weights_b, lr=grpo.lr)


def assert_same_first_adam_step(before: dict[str, torch.Tensor], after_a: dict[str, torch.Tensor],
                                after_b: dict[str, torch.Tensor], lr: float) -> None:
    """Two first AdamW steps from the same weights, whose gradients differ by float rounding only.

    The step moves a weight by lr * g / (|g| + eps), eps = 1e-8. Where |g| >= 9 eps (a move of at
    least 0.9 lr) rounding moves it by far less than MICRO_BATCH_ATOL, and the steps must agree to
    that. A gradient within ~eps of 0 is a sum that cancels to float32 noise, and rounding decides
    what fraction of lr its weight moves: there both moves must stay within lr, and such weights
    must be rare."""
    noisy = total = 0
    for name, start in before.items():
        move_a, move_b = after_a[name] - start, after_b[name] - start
        clear = torch.maximum(move_a.abs(), move_b.abs()) >= 0.9 * lr
        torch.testing.assert_close(move_a[clear], move_b[clear], rtol=0, atol=MICRO_BATCH_ATOL)
        assert move_a.abs().max() <= lr * 1.001 and move_b.abs().max() <= lr * 1.001, name
        noisy, total = noisy + int((~clear).sum()), total + start.numel()
    assert noisy <= total // 1000, f"{noisy} of {total} weights barely moved"


@pytest.mark.parametrize("name", ["zero2", "zero3_offload", "stage0"])
def test_other_stages_train_and_skip_non_finite_steps(engine_factory, name):
    engine = engine_factory(name)
    before = weights(engine)
    stats = engine.train_step(make_batch(16))
    assert stats["skipped"] == 0.0 and 0 < stats["grad_norm"] < math.inf
    after = weights(engine)
    assert changed(before, after) == set(before)
    bad = make_batch(16, seed=1)
    bad.advantages[0] = float("nan")
    assert engine.train_step(bad)["skipped"] == 1.0 and engine.skipped_steps == 1
    assert not changed(after, weights(engine))


# ------------------------------------------------------------------ oneDNN linears


def linear_calls(*modules: torch.nn.Module) -> list[int]:
    """A counter of the modules' ``nn.Linear`` calls, kept up to date by forward pre-hooks."""
    calls = [0]

    def count(*_args) -> None:
        calls[0] += 1

    for module in modules:
        for layer in module.modules():
            if type(layer) is torch.nn.Linear:
                layer.register_forward_pre_hook(count)
    return calls


def trained_weights(engine: PolicyEngine) -> dict[str, torch.Tensor]:
    """Full copies of the parameters the optimizer steps (a LoRA engine's adapters, not merged)."""
    return {name: gathered_clone(param) for name, param in engine.module.named_parameters()
            if param.requires_grad}


@needs_onednn
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-checkpointed"])
def test_a_zero3_step_computes_its_linears_through_onednn_and_takes_f_linears_step(tiny_model_path, lora):
    """The same first step from the same weights, with torch's linears and with dynalign's. Full
    fine-tuning: each layer call of the reference pass is one oneDNN product, each of the training
    forward one and its backward two more. LoRA with gradient checkpointing: the recomputed
    forwards go through oneDNN too, and frozen layers need no weight gradient."""
    batch = make_batch(16, seed=11)
    results = []
    for enabled in (False, True):
        model = ModelConfig(name_or_path=str(tiny_model_path), gradient_checkpointing=lora,
                            lora=LoraConfig(enabled=lora, r=4, alpha=8))
        with torch.backends.mkldnn.flags(enabled=enabled), counting_op() as op, \
                PolicyEngine(model, grpo_config(beta=0.1), DeepSpeedConfig(stage=3), seed=0) as engine:
            reference = engine.module if lora else engine.adaptation.reference.module
            calls = linear_calls(*{id(m): m for m in (engine.module, reference)}.values())
            before = trained_weights(engine)
            ref = engine.reference_logprobs(batch)
            results.append((op.call_count, calls[0]))  # the reference pass: no grad
            stats = engine.train_step(batch.with_logprobs(ref=ref, old=ref - 0.1))
            results.append((ref, stats, trained_weights(engine), op.call_count - results[-1][0],
                            calls[0] - results[-1][1]))
    (ref_ops_a, _), (ref_a, stats_a, weights_a, ops_a, _), (ref_ops_b, ref_calls), (ref_b, stats_b, weights_b,
                                                                                     ops_b, calls_b) = results
    assert ref_ops_a == ops_a == 0  # torch.backends.mkldnn off: every layer ran F.linear
    assert ref_ops_b == ref_calls > 0
    if lora:
        assert calls_b < ops_b < 3 * calls_b
    else:
        assert ops_b == 3 * calls_b > 0
    torch.testing.assert_close(ref_a, ref_b, rtol=0, atol=1e-5)
    for key in ("loss", "grad_norm", "entropy", "kl_mean"):
        assert stats_a[key] == pytest.approx(stats_b[key], rel=1e-4, abs=1e-6), key
    if lora:  # B starts at 0, so A's first gradient is 0: only B moves
        assert all(torch.equal(before[n], weights_a[n]) and torch.equal(before[n], weights_b[n])
                   for n in before if ".lora_A." in n)
        before = {n: w for n, w in before.items() if ".lora_B." in n}
    assert_same_first_adam_step(before, weights_a, weights_b, lr=1e-3)


@needs_onednn
def test_a_zero3_weight_partitioned_again_before_the_backward_is_gathered_for_it(zero3):
    """DeepSpeed's hooks gather a layer's weight again before its backward; one that is a partition
    by then is gathered for the product, and partitioned again afterwards."""
    weight = zero3.module.model.layers[0].mlp.down_proj.weight
    x = torch.randn(3, weight.ds_shape[1], requires_grad=True)
    upstream = torch.randn(3, weight.ds_shape[0])
    with gathered([weight]):
        full = weight.detach().clone()
        out = OneDNNLinear.apply(x, weight, None)
    assert weight.shape != weight.ds_shape  # a partition again
    (grad_x,) = torch.autograd.grad(out, x, upstream)
    torch.testing.assert_close(grad_x, upstream @ full, rtol=0, atol=1e-5)
    assert weight.shape != weight.ds_shape


# ------------------------------------------------------------ reference and LoRA


def test_reference_reports_kl_and_update_reference_moves_it(engine_factory):
    engine = engine_factory("zero3_reference")
    batch = make_batch(16, seed=6)
    start = engine.reference_logprobs(batch)
    assert torch.equal(start, engine.policy_logprobs(batch))  # the reference starts as the policy
    for _ in range(2):
        stats = engine.train_step(with_reference(engine, batch))
    assert stats["kl_mean"] > 0
    policy = engine.policy_logprobs(batch)
    assert torch.equal(engine.reference_logprobs(batch), start)  # frozen while the policy trains
    assert not torch.equal(policy, start)
    engine.update_reference()
    torch.testing.assert_close(engine.reference_logprobs(batch), policy, rtol=0, atol=0)


def test_lora_trains_only_adapters_and_exports_a_merged_hf_model(engine_factory, tiny_model_path, tmp_path):
    engine = engine_factory("zero3_lora")
    trainable = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    base = plain_state_dict(tiny_model_path)
    batch = make_batch(16, seed=7)
    assert torch.equal(engine.reference_logprobs(batch), engine.policy_logprobs(batch))  # B = 0 at start
    for _ in range(2):
        engine.train_step(with_reference(engine, batch))

    merged = weights(engine)
    assert list(merged) == list(base)  # HF names, no adapter tensors
    assert changed(base, merged) == {n for n in base if n.rsplit(".", 2)[-2] in LORA_TARGETS}

    out = engine.export_hf(tmp_path / "hf")
    loaded = plain_state_dict(out)
    assert set(loaded) == set(base)
    for name in base:
        assert torch.equal(loaded[name], merged[name]), name

    # The reference is a frozen adapter: the base model until update_reference(), then the policy.
    from transformers import AutoModelForCausalLM

    with hf_zero3_init(None):
        base_model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    with torch.no_grad():
        base_logp = grpo_ops.completion_logprobs(base_model, batch.input_ids, batch.attention_mask,
                                                 COMPLETION)
    answers = batch.attention_mask[:, -COMPLETION:].bool()  # positions past an answer mean nothing
    torch.testing.assert_close(engine.reference_logprobs(batch)[answers], base_logp[answers],
                               rtol=0, atol=1e-5)
    engine.update_reference()
    policy = engine.policy_logprobs(batch)
    torch.testing.assert_close(engine.reference_logprobs(batch), policy, rtol=0, atol=0)
    assert [n for n, p in engine.module.named_parameters() if p.requires_grad] == trainable


# ------------------------------------------------------------- multi-process, resume


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path, tiny_model_path):
    """ZeRO-3 on 2 ranks (micro-batches of 2) vs 1 process (micro-batches of 4), same global batches."""
    common = ["--model", str(tiny_model_path), "--loss-type", "bnpo", "--iterations", "3"]
    run_script([*common, "--micro-batch-size", "4", "--out", str(tmp_path / "one.pt")])
    run_script([*common, "--micro-batch-size", "2", "--out", str(tmp_path / "two.pt")], nproc=2)
    one = torch.load(tmp_path / "one.pt", weights_only=False)
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert len(one["history"]) == len(two["history"]) == 6
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a["tokens"] == b["tokens"] and a["lr"] == b["lr"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    start = plain_state_dict(tiny_model_path)
    for name, tensor in one["weights"].items():
        assert not torch.equal(tensor, start[name]), name
        torch.testing.assert_close(two["weights"][name], tensor, rtol=0, atol=PROCESS_COUNT_ATOL)


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path, tiny_model_path):
    """Save after iteration 2 (reference moved at iteration 1), resume in a fresh process, continue."""
    common = ["--model", str(tiny_model_path), "--iterations", "3", "--beta", "0.05",
              "--update-reference-every", "2", "--ckpt", str(tmp_path / "ckpt")]
    run_script([*common, "--save-at", "2", "--out", str(tmp_path / "full.pt")])
    run_script([*common, "--resume", str(tmp_path / "ckpt"), "--out", str(tmp_path / "resumed.pt")])
    full = torch.load(tmp_path / "full.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    assert resumed["start"] == 2 and resumed["global_step"] == full["global_step"] == 6
    assert resumed["history"] == [h for h in full["history"] if h["iteration"] >= 2]  # exact floats
    for name, tensor in full["weights"].items():
        assert torch.equal(resumed["weights"][name], tensor), name
