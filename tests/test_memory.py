"""The memory estimators: model states against DeepSpeed's own estimators, shapes and LoRA against
transformers and peft, activations and KV caches against what torch really keeps."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from dynalign.memory import (
    DEVICE,
    HOST,
    JUDGE,
    LOAD,
    ROLLOUT,
    UPDATE,
    ModelShape,
    Term,
    Zero,
    dense_decoder_params,
    known_architecture,
    kv_cache_bytes,
    layer_activation_bytes,
    logits_bytes,
    lora_params,
    model_state_terms,
    peak,
    shape_from_config,
    training_activation_bytes,
    vllm_share,
)

GB = 2**30  # DeepSpeed's printed "GB" are GiB

# (total parameters, largest layer's parameters, GPUs on the node): Llama-3-8B and Qwen2.5-7B
# (their embeddings are the largest layers) and a small odd count, where partitions round.
CASES = [(8_030_261_248, 525_336_576, 1), (8_030_261_248, 525_336_576, 8),
         (7_615_616_512, 544_997_376, 4), (1_000_003, 65_536, 2)]


def ours(params: int, largest: int, gpus: int, stage: int, offload_optimizer: bool,
         offload_param: bool = False) -> tuple[int, int]:
    """(host per node, device per rank) of the model states under DeepSpeed's assumptions:
    16-bit weights, a loader that reads fp32, all ranks on one node."""
    terms = model_state_terms(params, params, largest, 2, Zero(stage, gpus, offload_optimizer, offload_param),
                              load_bytes=4)
    device = sum(t.bytes for t in terms if t.where == DEVICE)  # every phase: DeepSpeed sums them
    host, _ = peak(terms, (HOST,))
    return gpus * host, device


# A partition is rounded up once per state (4 of them), DeepSpeed truncates the sum: bytes apart.
def close(a: int, b: int, gpus: int) -> bool:
    return abs(a - b) <= 64 * gpus


@pytest.mark.parametrize("params,largest,gpus", CASES)
@pytest.mark.parametrize("offload_optimizer,offload_param", [(False, False), (True, False), (True, True)])
def test_zero3_model_states_agree_with_deepspeed(params, largest, gpus, offload_optimizer, offload_param):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    # dynalign builds ZeRO-3 models under zero.Init (HfDeepSpeedConfig): DeepSpeed's zero_init=1
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        params, largest, num_gpus_per_node=gpus, num_nodes=1, cpu_offload=offload_optimizer,
        cpu_offload_params=offload_param, zero_init=True, additional_buffer_factor=1.5)
    host, device = ours(params, largest, gpus, 3, offload_optimizer, offload_param)
    assert close(device, gpu, gpus), (device, gpu)
    assert close(host, cpu, gpus), (host, cpu)


@pytest.mark.parametrize("params,largest,gpus", CASES)
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("offload_optimizer", [False, True])
def test_zero1_and_2_model_states_agree_with_deepspeed(params, largest, gpus, stage, offload_optimizer):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cpu, gpu = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=gpus, num_nodes=1,
                                                     cpu_offload=offload_optimizer,
                                                     additional_buffer_factor=1.5)
    host, device = ours(params, largest, gpus, stage, offload_optimizer)
    assert close(device, gpu, gpus), (device, gpu)
    assert close(host, cpu, gpus), (host, cpu)


def _printed(out: str) -> list[tuple[float, float, bool, bool, bool]]:
    """(GiB per CPU, GiB per GPU, offload_param, offload_optimizer, zero_init) of each printed row."""
    rows = []
    for line in out.splitlines():
        match = re.match(r"\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)$", line)
        if match:
            options = match.group(3)
            rows.append((float(match.group(1)), float(match.group(2)), "offload_param=none" not in options,
                         "offload_optimizer=none" not in options, "zero_init=0" not in options))
    return rows


def test_the_printed_all_cold_tables_match(capsys):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    params, largest, gpus = CASES[1]
    estimate_zero3_model_states_mem_needs_all_cold(params, largest, num_gpus_per_node=gpus)
    rows = [r for r in _printed(capsys.readouterr().out) if r[4]]  # zero_init=1: how dynalign loads
    assert len(rows) == 3
    for cpu, gpu, offload_param, offload_optimizer, _ in rows:
        host, device = ours(params, largest, gpus, 3, offload_optimizer, offload_param)
        assert (round(host / GB, 2), round(device / GB, 2)) == (cpu, gpu)
    estimate_zero2_model_states_mem_needs_all_cold(params, num_gpus_per_node=gpus)
    rows = _printed(capsys.readouterr().out)
    assert len(rows) == 2
    for cpu, gpu, _, offload_optimizer, _ in rows:
        host, device = ours(params, largest, gpus, 2, offload_optimizer)
        assert (round(host / GB, 2), round(device / GB, 2)) == (cpu, gpu)


def test_model_states_in_float32_and_with_lora():
    """Where dynalign departs from DeepSpeed's 16-bit assumption, by hand: 1000 parameters."""
    # float32, stage 0 (torch AdamW on the weights): weights 4 + gradients 4 + moments 8 bytes each
    terms = model_state_terms(1000, 1000, 100, 4, Zero(0, 2))
    assert sum(t.bytes for t in terms if t.where == DEVICE) == 16_000
    # float32, ZeRO-2 on 4 ranks: whole weights 4000; 250 each of gradient 4, fp32 copy of the
    # gradient 4, master 4, moments 8
    terms = model_state_terms(1000, 1000, 100, 4, Zero(2, 4))
    assert sum(t.bytes for t in terms if t.where == DEVICE) == 4000 + 250 * 20
    # LoRA: 1000 frozen bf16 weights and 10 adapter weights; ZeRO-3 on 2 ranks, optimizer on CPU:
    # device: 1010 * 2 / 2 = 1010 weights + the largest layer's weight alone (it has no gradient)
    terms = model_state_terms(1010, 10, 100, 2, Zero(3, 2, offload_optimizer=True))
    assert sum(t.bytes for t in terms if t.where == DEVICE) == 1010 + 200
    # host: 5 adapter parameters' fp32 gradient, master and moments (80 bytes), x 1.5
    assert sum(t.bytes for t in terms if t.where == HOST and not t.phases) == 120


def test_peak_adds_the_heaviest_phase_to_what_is_always_there():
    terms = [Term("states", 10), Term("kv", 5, phases=(ROLLOUT,)), Term("acts", 7, phases=(UPDATE,)),
             Term("gathered", 3, phases=(ROLLOUT, JUDGE)), Term("loading", 12, HOST, phases=(LOAD,)),
             Term("process", 1, HOST)]
    assert peak(terms, (DEVICE,)) == (18, ROLLOUT)  # 10 + 5 + 3 beats 10 + 7 and 10 + 3
    assert peak(terms, (HOST,)) == (12, LOAD)  # loading alone beats the 1 always there
    assert peak(terms, (DEVICE, HOST)) == (19, ROLLOUT)


# ------------------------------------------------------------------ shapes, against transformers


def _llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, head_dim=24, num_key_value_heads=1, tie_word_embeddings=True)
    return LlamaConfig(**{**values, **overrides})


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_matches_transformers(tied):
    from transformers import LlamaForCausalLM

    config = _llama_config(tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    shape = shape_from_config(config.to_dict(), "test")
    assert shape.num_params == model.num_parameters()
    assert shape.largest_layer_params == max(p.numel() for p in model.parameters())
    assert shape.decoder_layer_params == sum(p.numel() for p in model.model.layers[0].parameters())


@pytest.mark.parametrize("hub_id,architecture", [("meta-llama/Meta-Llama-3-8B-Instruct", "LlamaForCausalLM"),
                                                 ("Qwen/Qwen2.5-7B-Instruct", "Qwen2ForCausalLM")])
def test_known_architectures_match_transformers(hub_id, architecture):
    """The table's shapes built by transformers on the meta device (no memory, no hub)."""
    import transformers

    shape = known_architecture(hub_id.upper())  # hub ids are matched in any case
    assert shape is not None
    model_class = getattr(transformers, architecture)
    config_class = model_class.config_class
    config = config_class(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                          intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
                          num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
                          tie_word_embeddings=False)
    with torch.device("meta"):
        model = model_class(config)
    assert shape.num_params == model.num_parameters()
    assert shape.largest_layer_params == max(p.numel() for p in model.parameters())
    layer = dict(model.model.layers[0].named_parameters())
    # what a leaf layer gathers, less Qwen's q, k, v biases (a few thousand)
    weights = sum(p.numel() for name, p in layer.items() if not name.endswith("bias"))
    assert shape.decoder_layer_params == weights


def test_lora_params_match_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    config = _llama_config()
    targets = ["q_proj", "v_proj", "down_proj"]
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=targets))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_params(shape_from_config(config.to_dict(), "test"), 4, targets) == trainable


# ------------------------------------------------------------------ by hand, on a small config

# hidden 8, 2 heads of 4 (queries 8), 1 KV head (keys 4), MLP 16, 2 layers, vocabulary 32
SMALL = ModelShape(num_params=0, largest_layer_params=0, vocab_size=32, hidden_size=8, intermediate_size=16,
                   num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, max_position_embeddings=64)


def test_kv_cache_by_hand():
    # keys and values (2) x 2 layers x 1 head x 4 dims x 2 bytes (bf16) x 30 tokens
    assert kv_cache_bytes(SMALL, 2, 30) == 2 * 2 * 1 * 4 * 2 * 30 == 960


def test_activations_by_hand():
    # bf16 per token and layer: 2 bytes x 4 x (hidden 8 + queries 8 + MLP 16) = 256; two float32
    # RMSNorm inputs and inverse norms 2 x 4 x (8 + 1) = 72; SDPA: a log-sum-exp per head 4 x 2 = 8
    # and the mask's row, 2 bytes x 10 keys = 20
    assert layer_activation_bytes(SMALL, 2, seq_len=10) == 256 + 72 + 8 + 20 == 356
    # eager keeps each head's softmax over 10 keys in float32 and bf16 instead: 2 x 10 x (4 + 2)
    assert layer_activation_bytes(SMALL, 2, seq_len=10, attention="eager") == 256 + 72 + 120
    # 3 rows x 10 tokens: 2 layers x 30 x 356, and the final norm 30 x (2 x 2 x 8 + 4 x 9)
    final_norm = 30 * (32 + 36)
    assert training_activation_bytes(SMALL, 2, 3, 10, checkpointing=False) == 2 * 30 * 356 + final_norm
    # checkpointed: each layer keeps its input (30 x 8 x 2 bytes), one layer is recomputed at a time
    checkpointed = 2 * 30 * 16 + 30 * 356 + final_norm
    assert training_activation_bytes(SMALL, 2, 3, 10, checkpointing=True) == checkpointed


def test_logits_by_hand():
    # 3 rows x 5 completion tokens x 32 logits x 2 bytes: the head's output and its gradient
    assert logits_bytes(SMALL, 2, 3, 5) == 2 * (3 * 5 * 32 * 2) == 1920
    # soft-capped logits: and the tanh output its backward keeps
    assert logits_bytes(replace(SMALL, logit_softcapping=True), 2, 3, 5) == 3 * (3 * 5 * 32 * 2) == 2880


def test_vllm_share_by_hand():
    shape = replace(SMALL, num_params=1000)
    share = vllm_share(shape, 2, device_bytes=1_000_000, utilization=0.1, tensor_parallel=1, max_model_len=64)
    # 100 kB share: weights 2 kB; profiling 8192 tokens x 2 bytes x (2 x 8 + 3 x 16) = 1,048,576 > share
    assert (share.pool, share.weights, share.activations) == (100_000, 2000, 8192 * 2 * 64)
    assert share.shortfall == share.one_sequence - share.kv_cache == 64 * 32 + 2000 + 1_048_576 - 100_000
    big = vllm_share(shape, 2, device_bytes=100_000_000, utilization=0.5, tensor_parallel=2, max_model_len=64)
    assert big.shortfall == 0 and big.weights == 1000 and big.one_sequence == 64 * 32 // 2


# ------------------------------------------------------------------ against what torch keeps


def _saved_bytes(layers: int, dtype: torch.dtype, attention: str, rows: int, seq_len: int,
                 checkpointing: bool = False) -> int:
    """Bytes of the distinct storages autograd saves in a training forward of a tiny Llama
    (padded batch, logits of the last position only), the weights left out."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama_config(num_hidden_layers=layers)).to(dtype)
    model.config.use_cache = False
    model.set_attn_implementation(attention)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 256, (rows, seq_len))
    mask = torch.ones(rows, seq_len, dtype=torch.long)
    mask[0, :3] = 0  # left padding, as in a GRPO batch
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    return sum(saved.values())


@pytest.mark.parametrize("dtype,dtype_bytes", [(torch.bfloat16, 2), (torch.float32, 4)])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_layer_activations_bound_what_autograd_saves(dtype, dtype_bytes, attention):
    """Per layer (3 layers minus 1), never below what torch keeps, at most 15% above it."""
    rows, seq_len = 2, 40
    measured = (_saved_bytes(3, dtype, attention, rows, seq_len)
                - _saved_bytes(1, dtype, attention, rows, seq_len)) / 2
    shape = shape_from_config(_llama_config().to_dict(), "test")
    per_token = layer_activation_bytes(shape, dtype_bytes, seq_len=seq_len, attention=attention)
    estimate = rows * seq_len * per_token
    assert measured <= estimate <= 1.15 * measured, (measured, estimate)


def test_checkpointed_layers_keep_their_input_only():
    rows, seq_len = 2, 40
    measured = (_saved_bytes(3, torch.bfloat16, "sdpa", rows, seq_len, checkpointing=True)
                - _saved_bytes(1, torch.bfloat16, "sdpa", rows, seq_len, checkpointing=True)) / 2
    shape = shape_from_config(_llama_config().to_dict(), "test")
    one = training_activation_bytes(replace(shape, num_layers=1), 2, rows, seq_len, checkpointing=True)
    two = training_activation_bytes(replace(shape, num_layers=3), 2, rows, seq_len, checkpointing=True)
    assert measured == (two - one) / 2 == rows * seq_len * shape.hidden_size * 2


def test_kv_cache_matches_a_real_cache():
    from transformers import LlamaForCausalLM

    config = _llama_config(num_hidden_layers=3)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        out = model(input_ids=torch.randint(0, 256, (2, 17)), use_cache=True)
    cache = out.past_key_values
    stored = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert stored == kv_cache_bytes(shape_from_config(config.to_dict(), "test"), 2, 2 * 17)


def test_dense_decoder_params_counts_qkv_biases():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    total, _ = dense_decoder_params(256, 64, 160, 2, 4, 2, 16, tied=False, qkv_bias=True)
    assert total == Qwen2ForCausalLM(config).num_parameters()
    assert shape_from_config({**config.to_dict(), "model_type": "qwen2"}, "test").num_params == total


def _update_logits_bytes(model, rows: int, completion_length: int, packing=None) -> tuple[int, int]:
    """(bytes of the vocabulary-sized tensors autograd saves in an update's forward, bytes of the
    logits' gradient) for full-length answers: what the update holds of the logits at once."""
    from dynalign.grpo import completion_logprobs

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (rows, 6 + completion_length))
    ids[1::2, :6] = ids[0::2, :6]  # pairs of rows share a prompt: a packed row per pair
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if tensor.shape[-1:] == (vocab,) and storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    grads: list[int] = []
    model.get_output_embeddings().register_full_backward_hook(
        lambda module, grad_in, grad_out: grads.append(grad_out[0].untyped_storage().nbytes()))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logp = completion_logprobs(model, ids, torch.ones_like(ids), completion_length, packing=packing)
    logp.sum().backward()
    return sum(saved.values()), sum(grads)


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("packed", [False, True])
def test_logits_term_is_what_the_update_holds(softcap, packed):
    """The plan's logits term equals what a real update keeps of them: the head's output (saved
    by the log-prob function), its gradient, and with soft-capping the tanh output."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from dynalign.packing import packing_for

    config = Gemma2Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                          final_logit_softcapping=softcap, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).float()
    rows, completion_length = 4, 5
    packing = packing_for(model.config, model.dtype, 4096) if packed else None
    assert (packing is not None) == packed
    held, gradient = _update_logits_bytes(model, rows, completion_length, packing)
    shape = shape_from_config(config.to_dict(), "test")
    assert shape.logit_softcapping == (softcap is not None)
    # packed: a prompt's last position predicts the first token of both answers of its pair
    positions = rows * completion_length - (rows // 2 if packed else 0)
    one_copy = positions * config.vocab_size * 4
    assert gradient == one_copy
    assert held + gradient == one_copy * (3 if softcap else 2)
    copies = 3 if softcap else 2
    assert logits_bytes(shape, 4, rows, completion_length) == copies * rows * completion_length * 512 * 4
