"""Memory of a launch, per rank, before anything loads: pure estimator functions.

Each term of a run's memory is one function here, and :func:`launch_terms` lists the rows
of a configured run (the one place that knows which terms a config has). A term is a number
of bytes on one rank, where it lives (the accelerator or host RAM) and when: ``always``
(model states, a frozen judge...), only while loading, or only in one phase of a step
(``rollout``, ``judge``, ``update``), whose transient memory is freed before the next phase
starts. :func:`peak` adds the always-terms to the heaviest phase.

Model states follow DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs``
and ``estimate_zero3_model_states_mem_needs``) term for term, in bytes per parameter:
16-bit weights (2), an fp32 gradient partition (4), fp32 master weights (4) and Adam's two
moments (8); stages 1-2 also keep a 16-bit gradient partition (2), stage 3 gathers the
largest layer's weight and gradient (2 + 2 per parameter of it), host-side states carry
DeepSpeed's ``additional_buffer_factor`` of 1.5, and loading and offloaded states never
coexist on the host (it holds the larger). Deliberate differences: the weights are in
``model.dtype`` (DeepSpeed assumes 16-bit) and a rank loads the model in it (DeepSpeed
assumes fp32): both are parameters the tests set to DeepSpeed's values. Stage 3 always loads
under ``zero.Init`` (DeepSpeed's ``zero_init=1``), but its loading peak (one layer per rank)
is counted even with offloaded states, which DeepSpeed leaves out. Host memory is per node
(DeepSpeed's ZeRO-2 offload row is the whole model's on every node). Stage 1 is counted as
stage 2, as DeepSpeed's one estimator for both does.

Activations are counted per token and layer of a Llama-style decoder (RMSNorm, rotary
attention with grouped KV heads, a gated MLP) from what autograd saves for backward; the
other terms are KV caches and logits sized from the batch geometry. Sizes are bytes;
``GiB = 2**30``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dynalign.config.schema import TrainConfig

GiB = 1 << 30
DEVICE, HOST = "device", "host"
LOAD, ROLLOUT, JUDGE, UPDATE = "load", "rollout", "judge", "update"
RUN_PHASES = (ROLLOUT, JUDGE, UPDATE)  # the phases of a step; loading comes before any of them
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4  # master weights, the gradient partition, Adam's moments (each)
ADAM_MOMENTS = 2  # exp_avg, exp_avg_sq
DEEPSPEED_BUFFER_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor on host-side model states
CUDA_CONTEXT = 1 * GiB  # CUDA context, cuBLAS workspaces and NCCL buffers of one process
# Host memory of one rank's process before any model: the interpreter, torch, transformers,
# DeepSpeed (the tiny model's whole step peaks at 0.64 GiB RSS, README "Benchmarks vs TRL").
PROCESS_HOST = GiB // 2
# English text runs ~4 characters a token in the 32k-256k vocabularies of current LMs: 3 errs
# on the safe side, for the judge prompt whose rubric is counted before any tokenizer loads.
CHARS_PER_TOKEN = 3.0
VLLM_PROFILE_TOKENS = 8192  # tokens of vLLM's start-up profiling forward (its max_num_batched_tokens)
VERDICT_TOKENS_PER_ASPECT = 8  # "name: s" lines and the verdict tag, in logprob mode
LOGIT_COPIES = 2  # the update holds the head's output and its gradient (grpo.token_logprobs copies neither)
SOFTCAP_LOGIT_COPIES = 1  # and, with final_logit_softcapping, the tanh output its backward keeps


def fmt_bytes(size: int) -> str:
    """Bytes in GiB (MiB, KiB below one)."""
    for unit, scale in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


@dataclass(frozen=True)
class Term:
    """One row of a plan: ``bytes`` on one rank, ``where`` it lives, in which ``phases``."""

    name: str
    bytes: int
    where: str = DEVICE
    phases: tuple[str, ...] = ()  # (): every phase of a step; (LOAD,): only while loading
    margin: bool = True  # the allocator margin applies (not to vLLM's own pool or the CUDA context)

    @property
    def when(self) -> str:
        return "+".join(self.phases) if self.phases else "always"


# ------------------------------------------------------------------ model shape


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a decoder-only transformer."""

    num_params: int
    largest_layer_params: int  # the biggest single module (ZeRO-3 gathers at least this much)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    source: str = ""  # where the figures come from, for the plan's header
    logit_softcapping: bool = False  # final_logit_softcapping (Gemma 2): one more copy of the logits

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def decoder_layer_params(self) -> int:
        """Parameters of one decoder layer: q, k, v, o, the gated MLP and two norms."""
        attention = 2 * self.hidden_size * self.q_size + 2 * self.hidden_size * self.kv_size
        return attention + 3 * self.hidden_size * self.intermediate_size + 2 * self.hidden_size


def dense_decoder_params(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                         head_dim: int, *, tied: bool, qkv_bias: bool = False) -> tuple[int, int]:
    """(parameters, largest module's parameters) of a Llama-style decoder.

    Per layer: q, k, v, o projections (k, v with ``kv_heads``), gate, up and down projections,
    two norm weights; an embedding, a final norm and, unless tied, an LM head of its size.
    """
    q, kv = heads * head_dim, kv_heads * head_dim
    attention = 2 * hidden * q + 2 * hidden * kv + (q + 2 * kv if qkv_bias else 0)
    layer = attention + 3 * hidden * intermediate + 2 * hidden
    embedding = vocab * hidden
    total = embedding * (1 if tied else 2) + layers * layer + hidden
    return total, max(embedding, hidden * intermediate, hidden * q)


def shape_from_config(config: Mapping[str, Any], source: str,
                      counted: tuple[int, int] | None = None) -> ModelShape:
    """The shape in a Hugging Face ``config.json`` (its ``text_config`` for multimodal ones).

    ``counted``: (parameters, largest tensor) read from the weight files, else computed by
    :func:`dense_decoder_params`. A missing key raises ``KeyError`` naming it.
    """
    text = config.get("text_config") or config
    hidden, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or hidden // heads)
    vocab, intermediate = int(text["vocab_size"]), int(text["intermediate_size"])
    layers = int(text["num_hidden_layers"])
    if counted is None:
        tied = bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
        qkv_bias = bool(text.get("attention_bias", False)) or text.get("model_type") == "qwen2"
        counted = dense_decoder_params(vocab, hidden, intermediate, layers, heads, kv_heads, head_dim,
                                       tied=tied, qkv_bias=qkv_bias)
    return ModelShape(num_params=counted[0], largest_layer_params=counted[1], vocab_size=vocab,
                      hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
                      num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=int(text.get("max_position_embeddings") or 4096), source=source,
                      logit_softcapping=bool(text.get("final_logit_softcapping")))


# Shapes of the presets' hub models (their config.json), so a plan needs neither the hub nor its
# cache; model_type "qwen2" adds q, k, v biases.
_LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "max_position_embeddings": 8192, "tie_word_embeddings": False}
_QWEN25_7B = {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
              "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
              "max_position_embeddings": 32768, "tie_word_embeddings": False}
_GEMMA3_270M = {"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640,
                "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
                "num_key_value_heads": 1, "head_dim": 256, "max_position_embeddings": 32768,
                "tie_word_embeddings": True}
KNOWN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "meta-llama/meta-llama-3-8b": _LLAMA3_8B,
    "meta-llama/meta-llama-3-8b-instruct": _LLAMA3_8B,
    "meta-llama/llama-3.1-8b": {**_LLAMA3_8B, "max_position_embeddings": 131072},
    "meta-llama/llama-3.1-8b-instruct": {**_LLAMA3_8B, "max_position_embeddings": 131072},
    "qwen/qwen2.5-7b": _QWEN25_7B,
    "qwen/qwen2.5-7b-instruct": _QWEN25_7B,
    "google/gemma-3-270m": _GEMMA3_270M,
    "gemma3_270m": _GEMMA3_270M,  # the embedded model before its first conversion
}


def known_architecture(name: str) -> ModelShape | None:
    """The shape of a hub id (any case) in :data:`KNOWN_ARCHITECTURES`, else None."""
    config = KNOWN_ARCHITECTURES.get(name.lower())
    return shape_from_config(config, "known architectures table") if config is not None else None


def lora_params(shape: ModelShape, r: int, target_modules: Sequence[str]) -> int:
    """Parameters of one LoRA adapter: ``r * (in + out)`` per targeted projection and layer.

    Names that are not a projection of a Llama-style layer count nothing (see :func:`lora_targets`).
    """
    sizes = lora_targets(shape)
    return shape.num_layers * sum(r * sum(sizes[name]) for name in set(target_modules) if name in sizes)


def lora_targets(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection LoRA may target in one layer."""
    h, q, kv, i = shape.hidden_size, shape.q_size, shape.kv_size, shape.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


# ------------------------------------------------------------------ model states


@dataclass(frozen=True)
class Zero:
    """How DeepSpeed lays out the model states over the ranks."""

    stage: int
    world_size: int = 1
    offload_optimizer: bool = False
    offload_param: bool = False

    def shard(self, at_stage: int) -> int:
        """Ranks a state is split over when ZeRO partitions it from ``at_stage`` on."""
        return self.world_size if self.stage >= at_stage else 1


def model_state_terms(total_params: int, trainable_params: int, largest_layer_params: int, param_bytes: int,
                      zero: Zero, *, load_bytes: int | None = None, gathered_params: int | None = None,
                      buffer_factor: float = DEEPSPEED_BUFFER_FACTOR) -> list[Term]:
    """Weights, gradients, fp32 master weights and Adam moments per rank, and the loading peak.

    ``trainable_params`` is all of them in full fine-tuning, the adapters' with LoRA (the base
    is frozen: weights only). Stage 0 keeps everything whole on every rank; stage 0 in float32
    steps torch's AdamW on the weights themselves (no master copy, no second gradient).
    ``load_bytes``: bytes per parameter while ``from_pretrained`` loads (default ``param_bytes``);
    under ZeRO-3 (``zero.Init``) a rank holds one layer of it at a time. ``gathered_params``: the
    most parameters ZeRO-3 gathers at once in training (default ``largest_layer_params``, one
    module; a whole decoder layer with ``deepspeed.stage3_leaf_layers``).
    """
    optimizer_at = HOST if zero.offload_optimizer else DEVICE
    per_rank = _div(trainable_params, zero.shard(1))  # trainable parameters whose states a rank keeps
    terms = [Term("weights", _div(total_params * param_bytes, zero.shard(3)),
                  HOST if zero.offload_param else DEVICE)]
    if zero.stage == 0:
        terms.append(Term("gradients", trainable_params * param_bytes))
    elif zero.stage < 3 and not zero.offload_optimizer:
        terms.append(Term("gradients (partition)", per_rank * param_bytes))
    if param_bytes < FP32 or zero.stage >= 1:  # ZeRO copies even float32 weights into its partition
        terms.append(Term("gradients (fp32 partition)", per_rank * FP32, optimizer_at))
        terms.append(Term("master weights (fp32)", per_rank * FP32, optimizer_at))
    terms.append(Term("Adam moments (fp32)", per_rank * FP32 * ADAM_MOMENTS, optimizer_at))
    if zero.stage == 3:  # the largest gathered weight, and its gradient when it trains
        trains = trainable_params == total_params
        gathered = largest_layer_params if gathered_params is None else gathered_params
        terms.append(Term("ZeRO-3 gathered layer", gathered * param_bytes * (2 if trains else 1),
                          phases=(UPDATE,)))
    host = sum(t.bytes for t in terms if t.where == HOST)
    if host:
        terms.append(Term("host buffers of offloaded states", round(host * (buffer_factor - 1)), HOST))
    loaded = largest_layer_params if zero.stage == 3 else total_params
    terms.append(Term("loading (from_pretrained)",
                      round(loaded * (param_bytes if load_bytes is None else load_bytes) * buffer_factor),
                      HOST, phases=(LOAD,)))
    return terms


def _div(value: int, parts: int) -> int:
    return -(-value // parts)  # a partition is rounded up, never down


def reference_term(total_params: int, adapter_params: int | None, param_bytes: int, zero: Zero) -> Term:
    """The frozen KL reference (``grpo.beta > 0``): a second model partitioned like the policy under
    ZeRO-3 and whole on every rank below it; with LoRA a second adapter (``adapter_params``)."""
    if adapter_params is not None:
        return Term("KL reference adapter", _div(adapter_params * param_bytes, zero.shard(3)))
    where = HOST if zero.stage == 3 and zero.offload_param else DEVICE
    return Term("KL reference model", _div(total_params * param_bytes, zero.shard(3)), where)


# ------------------------------------------------------------------ activations, caches, logits


def layer_activation_bytes(shape: ModelShape, dtype_bytes: int, *, seq_len: int,
                           attention: str = "sdpa") -> int:
    """Bytes one token of a ``seq_len``-token row leaves saved for backward in one decoder layer.

    In ``dtype_bytes``, four values per hidden, query and MLP feature: each RMSNorm's normalised
    input and weighted output (4 H); the rotated queries, the keys and values repeated to every
    head (transformers repeats them when a padding mask is passed) and o_proj's input (4 Q); the
    MLP's gate, up, activation and product (4 I). In float32, each RMSNorm's upcast input and its
    inverse norm (2 H + 2). Then the attention's own: SDPA keeps the padding mask's row
    (``seq_len``) and a float32 log-sum-exp per head; ``eager`` each head's softmax over the
    ``seq_len`` keys in float32 and in ``dtype_bytes`` instead.
    """
    h, q, i = shape.hidden_size, shape.q_size, shape.intermediate_size
    per_token = dtype_bytes * 4 * (h + q + i) + 2 * FP32 * (h + 1)
    if attention == "eager":
        return per_token + shape.num_heads * seq_len * (FP32 + dtype_bytes)
    return per_token + FP32 * shape.num_heads + dtype_bytes * seq_len


def training_activation_bytes(shape: ModelShape, dtype_bytes: int, rows: int, seq_len: int, *,
                              checkpointing: bool, attention: str = "sdpa") -> int:
    """Activations of one micro-batch's forward kept for its backward, the final norm's included.

    With gradient checkpointing each layer keeps only its input (H per token) and one layer's
    activations exist at a time, while the backward recomputes it.
    """
    tokens = rows * seq_len
    layer = tokens * layer_activation_bytes(shape, dtype_bytes, seq_len=seq_len, attention=attention)
    final_norm = tokens * (2 * dtype_bytes * shape.hidden_size + FP32 * (shape.hidden_size + 1))
    if checkpointing:
        return shape.num_layers * tokens * shape.hidden_size * dtype_bytes + layer + final_norm
    return shape.num_layers * layer + final_norm


def logits_bytes(shape: ModelShape, dtype_bytes: int, rows: int, completion_length: int) -> int:
    """The LM head's output in the update: it runs on the positions that predict an answer token
    only (:func:`dynalign.packing.logits_at`), at most C per row, and the update holds
    :data:`LOGIT_COPIES` copies of it (+ :data:`SOFTCAP_LOGIT_COPIES` with logit soft-capping; the
    float32 log-softmax runs chunked: no float32 copy)."""
    copies = LOGIT_COPIES + (SOFTCAP_LOGIT_COPIES if shape.logit_softcapping else 0)
    return copies * rows * completion_length * shape.vocab_size * dtype_bytes


def kv_cache_bytes(shape: ModelShape, dtype_bytes: int, tokens: int) -> int:
    """Keys and values of ``tokens`` tokens in every layer (every token kept, as in the prefix
    cache; a sliding window would keep fewer)."""
    return 2 * shape.num_layers * shape.kv_size * dtype_bytes * tokens


def inference_working_bytes(shape: ModelShape, dtype_bytes: int, tokens: int) -> int:
    """A no-grad forward over ``tokens`` tokens at once holds one layer's transients: the residual
    stream and its normed copy (2 H) and the MLP's gate, up and activation (3 I)."""
    return tokens * dtype_bytes * (2 * shape.hidden_size + 3 * shape.intermediate_size)


def sampling_logits_bytes(shape: ModelShape, dtype_bytes: int, rows: int, positions: int = 1) -> int:
    """Logits read at ``positions`` last positions per row, and their float32 copy."""
    return rows * positions * shape.vocab_size * (dtype_bytes + FP32)


def generation_terms(label: str, shape: ModelShape, dtype_bytes: int, rows: int, prompt_tokens: int,
                     new_tokens: int, phase: str) -> list[Term]:
    """``generate`` on ``rows`` sequences at once: the KV cache to the last token, the prefill
    forward over every prompt token, and the sampled position's logits."""
    return [
        Term(f"{label}: KV cache, {rows} x {prompt_tokens + new_tokens} tokens",
             kv_cache_bytes(shape, dtype_bytes, rows * (prompt_tokens + new_tokens)), phases=(phase,)),
        Term(f"{label}: prefill, {rows} x {prompt_tokens} tokens",
             inference_working_bytes(shape, dtype_bytes, rows * prompt_tokens)
             + sampling_logits_bytes(shape, dtype_bytes, rows), phases=(phase,)),
    ]


def logprob_judge_terms(label: str, shape: ModelShape, dtype_bytes: int, rows: int, judge_tokens: int,
                        shared_tokens: int) -> list[Term]:
    """Logprob mode on a prefix cache: ``rows`` judge prompts of ``judge_tokens`` tokens in one
    KV cache; the ``shared_tokens`` all of them start with (the rubric) are encoded once, the
    rest of each row in one batched forward, with logits at the last two positions."""
    new = max(judge_tokens - shared_tokens, 1)
    working = max(inference_working_bytes(shape, dtype_bytes, shared_tokens),
                  inference_working_bytes(shape, dtype_bytes, rows * new))
    return [
        Term(f"{label}: KV cache, {rows} x {judge_tokens} tokens",
             kv_cache_bytes(shape, dtype_bytes, rows * judge_tokens), phases=(JUDGE,)),
        Term(f"{label}: forward, {rows} x {new} new tokens",
             working + sampling_logits_bytes(shape, dtype_bytes, rows, positions=2), phases=(JUDGE,)),
    ]


# ------------------------------------------------------------------ vLLM


@dataclass(frozen=True)
class VLLMShare:
    """vLLM's share of one accelerator: its weights, its profiling peak and the KV cache it keeps."""

    pool: int  # gpu_memory_utilization x the device
    weights: int
    activations: int
    one_sequence: int  # KV cache of one max_model_len sequence, the least vLLM starts with

    @property
    def kv_cache(self) -> int:
        return self.pool - self.weights - self.activations

    @property
    def shortfall(self) -> int:
        """Bytes vLLM lacks to hold one max_model_len sequence (0: it starts)."""
        return max(0, self.one_sequence - self.kv_cache)


def vllm_share(shape: ModelShape, dtype_bytes: int, device_bytes: int, utilization: float,
               tensor_parallel: int, max_model_len: int) -> VLLMShare:
    """vLLM takes ``utilization`` of the whole device: weights (split over ``tensor_parallel``),
    a profiling forward of :data:`VLLM_PROFILE_TOKENS`, and what is left becomes KV cache."""
    tp = max(tensor_parallel, 1)
    return VLLMShare(pool=int(utilization * device_bytes),
                     weights=_div(shape.num_params * dtype_bytes, tp),
                     activations=_div(inference_working_bytes(shape, dtype_bytes, VLLM_PROFILE_TOKENS), tp),
                     one_sequence=_div(kv_cache_bytes(shape, dtype_bytes, max_model_len), tp))


# ------------------------------------------------------------------ a configured launch


@dataclass(frozen=True)
class Launch:
    """What the plan assumes of the machine a config runs on."""

    world_size: int
    device_bytes: int  # the accelerator's memory per rank (vLLM takes its share of it)
    accelerator: bool  # False: a CPU run, where "device" terms live in host RAM too
    judge_prompt_tokens: int  # the rendered judge prompt without the user prompt and the answer


def launch_terms(cfg: TrainConfig, shape: ModelShape, launch: Launch,
                 judge_shape: ModelShape | None = None) -> list[Term]:
    """Every term of a configured run on one rank, in the plan's order.

    ``judge_shape``: the model of a local external judge (``judge.source=external``, hf backend);
    None counts none.
    """
    b = DTYPE_BYTES[cfg.model.dtype]
    g, ds, lora = cfg.grpo, cfg.deepspeed, cfg.model.lora
    zero = Zero(ds.stage, launch.world_size, ds.offload_optimizer != "none", ds.offload_param != "none")
    adapter = lora_params(shape, lora.r, lora.target_modules) if lora.enabled else None
    total = shape.num_params + (adapter or 0)
    # a leaf decoder layer is gathered whole; the embedding (often larger) alone
    gathered = (max(shape.largest_layer_params, shape.decoder_layer_params) if ds.stage3_leaf_layers
                else shape.largest_layer_params)
    terms = model_state_terms(total, adapter if adapter is not None else total, shape.largest_layer_params,
                              b, zero, gathered_params=gathered)
    if g.beta > 0:
        terms.append(reference_term(shape.num_params, adapter, b, zero))
    seq_len = g.max_prompt_length + g.max_completion_length
    terms += [
        Term(f"activations: {g.micro_batch_size} x {seq_len} tokens"
             + (", checkpointed" if cfg.model.gradient_checkpointing else ""),
             training_activation_bytes(shape, b, g.micro_batch_size, seq_len,
                                       checkpointing=cfg.model.gradient_checkpointing,
                                       attention=cfg.model.attn_implementation), phases=(UPDATE,)),
        Term(f"logits: {g.micro_batch_size} x {g.max_completion_length} x {shape.vocab_size}",
             logits_bytes(shape, b, g.micro_batch_size, g.max_completion_length), phases=(UPDATE,)),
    ]
    terms += bucket_terms(cfg, total, b)
    terms += sampling_terms(cfg, shape, launch, b, zero, judge_shape)
    terms.append(Term("process (Python, torch, libraries)", PROCESS_HOST, HOST, margin=False))
    if launch.accelerator:
        terms.append(Term("CUDA context", CUDA_CONTEXT, margin=False))
    return terms + [allocator_margin(terms, cfg.plan.margin)]


@dataclass(frozen=True)
class Disk:
    """What a run writes to its directory, in bytes (shared storage: all ranks together)."""

    checkpoint: int  # one checkpoint, its KL reference moved
    kept: int  # checkpoints_to_keep of them
    export: int  # one iter_<k>/ Hugging Face directory
    exports: int  # every iteration's (export_each_iteration)


def disk_bytes(cfg: TrainConfig, shape: ModelShape) -> Disk:
    """Checkpoints and exports of ``cfg`` on disk, as DeepSpeed and dynalign write them.

    A checkpoint holds the optimizer shards (fp32 master weights unless stage 0 trains float32
    weights in place, and Adam's two moments, of the trainable parameters), below stage 3 the
    module in ``model.dtype`` (frozen weights included; stage 3 keeps its weights only in the
    shards), with LoRA at stage 3 the frozen base (DeepSpeed saves each rank's part of the
    frozen parameters), and the moved KL reference (the base model, or the
    reference adapter). An export is the model in ``model.dtype``, LoRA merged. RNG states,
    JSON and the tokenizer are left out (kilobytes to megabytes).
    """
    b, ds, lora = DTYPE_BYTES[cfg.model.dtype], cfg.deepspeed, cfg.model.lora
    adapter = lora_params(shape, lora.r, lora.target_modules) if lora.enabled else None
    trainable = adapter if adapter is not None else shape.num_params
    master = FP32 if b < FP32 or ds.stage >= 1 else 0
    checkpoint = trainable * (master + FP32 * ADAM_MOMENTS)
    if ds.stage < 3:
        checkpoint += (shape.num_params + (adapter or 0)) * b
    if ds.stage == 3 and adapter is not None:  # DeepSpeed's frozen_param_fragments: each rank's part
        checkpoint += shape.num_params * b
    if cfg.grpo.beta > 0 and cfg.update_reference_each_iteration:
        checkpoint += (adapter if adapter is not None else shape.num_params) * b
    export = shape.num_params * b
    return Disk(checkpoint, checkpoint * min(cfg.checkpoints_to_keep, cfg.iterations), export,
                export * cfg.iterations if cfg.export_each_iteration else 0)


def bucket_terms(cfg: TrainConfig, params: int, dtype_bytes: int) -> list[Term]:
    """DeepSpeed's gradient-reduction buckets (``reduce_bucket_size`` elements, allocated whole
    with contiguous gradients; stages 1-2 double them to overlap communication) and, at stage 3,
    the parameters it prefetches ahead of the layer that runs."""
    ds = cfg.deepspeed
    if ds.stage == 0:
        return []
    buffers = 2 if ds.stage < 3 and ds.overlap_comm else 1
    reduce = ds.reduce_bucket_size * dtype_bytes * buffers if ds.contiguous_gradients else 0
    prefetch = min(ds.stage3_prefetch_bucket_size, params) * dtype_bytes if ds.stage == 3 else 0
    return [Term("DeepSpeed buckets (reduce, prefetch)", reduce + prefetch, phases=(UPDATE,))]


def sampling_terms(cfg: TrainConfig, shape: ModelShape, launch: Launch, b: int, zero: Zero,
                   judge_shape: ModelShape | None = None) -> list[Term]:
    """Rollouts and the judge: vLLM's share, or ``generate`` on the (gathered) policy; a frozen or
    local external judge's whole model and its forwards."""
    g, judge = cfg.grpo, cfg.judge
    candidates = _div(g.prompts_per_step, launch.world_size) * g.group_size  # answers per rank and step
    rows = min(cfg.rollout.batch_size, candidates)
    terms: list[Term] = []
    on_vllm = cfg.rollout.backend == "vllm"
    if on_vllm:
        terms += vllm_terms(cfg, shape, launch, b)
    elif zero.stage == 3:  # generate gathers every parameter for the whole call
        phases = (ROLLOUT, JUDGE) if judge.source == "self" else (ROLLOUT,)
        terms.append(Term("weights gathered for generate", shape.num_params * b, phases=phases))
    if not on_vllm:
        terms += generation_terms("rollout", shape, b, rows, g.max_prompt_length, g.max_completion_length,
                                  ROLLOUT)
        if g.sampler_is_correction:  # generate keeps every step's raw logits for the log-probs
            terms.append(Term(f"rollout: logits of {g.max_completion_length} steps (sampler log-probs)",
                              sampling_logits_bytes(shape, b, rows, g.max_completion_length),
                              phases=(ROLLOUT,)))
    judge_model = {"self": None if on_vllm else shape, "frozen": shape,
                   "external": judge_shape if judge.external.backend == "hf" else None}[judge.source]
    if judge.source in ("frozen", "external") and judge_model is not None:
        terms.append(Term(f"{judge.source} judge model (whole)", judge_model.num_params * b))
    if judge_model is None:
        return terms
    judge_tokens = launch.judge_prompt_tokens + g.max_prompt_length + g.max_completion_length
    if judge.mode == "logprob":  # the verdict written up to the last aspect's slot: ~8 tokens an aspect
        verdict = VERDICT_TOKENS_PER_ASPECT * len(judge.rubric.aspects)
        return terms + logprob_judge_terms("judge", judge_model, b, rows, judge_tokens + verdict,
                                           launch.judge_prompt_tokens)
    judge_rows = min(cfg.rollout.batch_size, candidates * judge.num_samples)
    return terms + generation_terms("judge", judge_model, b, judge_rows, judge_tokens, judge.max_new_tokens,
                                    JUDGE)


def vllm_terms(cfg: TrainConfig, shape: ModelShape, launch: Launch, b: int) -> list[Term]:
    """vLLM's memory: on an accelerator its whole share (``gpu_memory_utilization``), freed during
    the update with sleep mode; on a CPU run its weights and ``kv_cache_space_gib``."""
    v = cfg.rollout.vllm
    if not launch.accelerator:
        return [Term("vLLM weights", shape.num_params * b, margin=False),
                Term("vLLM KV cache (kv_cache_space_gib)", int(v.kv_cache_space_gib * GiB), margin=False)]
    share = vllm_share(shape, b, launch.device_bytes, v.gpu_memory_utilization, v.tensor_parallel_size,
                       vllm_max_model_len(cfg, shape))
    phases = (ROLLOUT, JUDGE) if v.enable_sleep_mode else ()
    return [Term("vLLM weights", share.weights, phases=phases, margin=False),
            Term("vLLM profiling peak", share.activations, phases=phases, margin=False),
            Term("vLLM KV cache (rest of its share)", max(share.kv_cache, 0), phases=phases, margin=False)]


def vllm_max_model_len(cfg: TrainConfig, shape: ModelShape) -> int:
    """The engine's context: ``rollout.vllm.max_model_len``, else the model's (the self-judge's
    long prompts share the engine)."""
    return cfg.rollout.vllm.max_model_len or shape.max_position_embeddings


def allocator_margin(terms: Sequence[Term], fraction: float) -> Term:
    """``fraction`` of the device peak of the terms it applies to, for allocator fragmentation."""
    counted = [t for t in terms if t.margin]
    need, _ = peak(counted, (DEVICE,))
    return Term(f"allocator margin ({fraction:.0%})", math.ceil(need * fraction), margin=False)


def peak(terms: Sequence[Term], where: Sequence[str]) -> tuple[int, str]:
    """(bytes, phase) of the heaviest moment in ``where``: loading alone, or the always-terms plus
    the heaviest phase of a step."""
    mine = [t for t in terms if t.where in where]
    always = sum(t.bytes for t in mine if not t.phases)
    best = max((always + sum(t.bytes for t in mine if phase in t.phases), phase) for phase in RUN_PHASES)
    load = sum(t.bytes for t in mine if LOAD in t.phases)
    return max(best, (load, LOAD))
