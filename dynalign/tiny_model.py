"""The embedded tiny model: a causal LM built locally, so nothing is downloaded.

A byte-level BPE tokenizer is trained on Python standard-library sources (present on
every machine with the same Python), wrapped as a ``PreTrainedTokenizerFast`` with a
ChatML chat template, and paired with a randomly initialised Llama-architecture model
(head_dim 64, which vLLM's CPU kernels support). Everything derives from the seed:
the same seed gives byte-identical files. ``model.name_or_path=tiny`` resolves here and
builds the model on first use into a cache directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import asdict
from pathlib import Path

from dynalign.config import TinyModelConfig
from dynalign.io import build_once

# Modules whose sources train the tokenizer: a fixed list so the corpus is the same
# wherever the same Python runs. Prose-heavy modules give the BPE English merges too.
CORPUS_MODULES = (
    "argparse.py", "textwrap.py", "difflib.py", "inspect.py", "pydoc.py", "statistics.py",
    "fractions.py", "calendar.py", "random.py", "heapq.py", "bisect.py", "functools.py",
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILD_VERSION = 1  # bump when the build recipe changes, so caches are rebuilt


def _corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [(stdlib / name).read_text(encoding="utf-8") for name in CORPUS_MODULES]


def build_tokenizer(vocab_size: int):
    """Train a byte-level BPE on the standard-library corpus; deterministic for a vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_model(spec: TinyModelConfig, tokenizer):
    """A randomly initialised Llama model whose weights depend only on ``spec.seed``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(  # type: ignore[call-arg]  # torch_dtype: kept so the built files stay byte-identical
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(spec.seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_tiny_model(out_dir: str | os.PathLike, spec: TinyModelConfig) -> Path:
    """Build tokenizer + model and ``save_pretrained`` both into ``out_dir``."""
    out = Path(out_dir)
    tokenizer = build_tokenizer(spec.vocab_size)
    model = build_model(spec, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "dynalign_tiny.json").write_text(json.dumps(_spec_record(spec), indent=2, sort_keys=True))
    return out


def _spec_record(spec: TinyModelConfig) -> dict:
    record = {k: v for k, v in asdict(spec).items() if k != "cache_dir"}
    record["build_version"] = BUILD_VERSION
    return record


def tiny_model_dir(spec: TinyModelConfig) -> Path:
    """Cache location for a spec: one directory per (spec, build version)."""
    root = spec.cache_dir or os.environ.get("DYNALIGN_CACHE") or Path.home() / ".cache" / "dynalign"
    digest = hashlib.sha256(json.dumps(_spec_record(spec), sort_keys=True).encode()).hexdigest()[:12]
    return Path(root).expanduser() / f"tiny-{digest}"


def ensure_tiny_model(spec: TinyModelConfig) -> Path:
    """Return the cached tiny model directory, building it first if needed (:func:`build_once`).

    Call it before ``torch.distributed`` is initialised: transformers then writes checkpoint
    files on global rank 0 only.
    """
    return build_once(tiny_model_dir(spec), lambda tmp: _build_into(tmp, spec))


def _build_into(tmp: Path, spec: TinyModelConfig) -> None:
    build_tiny_model(tmp, spec)
    if not (tmp / "config.json").exists():
        raise RuntimeError("the tiny model was built on a rank other than 0 of an initialised process "
                           "group, where transformers saves nothing: build it before joining the group")
