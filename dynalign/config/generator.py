"""The ``generator`` group: synthesis of the training prompts, and how its model entries read."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

from dynalign.config.checks import in_range, positive, require


@dataclass
class GeneratorEndpointConfig:
    """An OpenAI-compatible chat endpoint that writes prompts (``generator.models: [openai:NAME]``)."""

    base_url: Optional[str] = None  # e.g. http://localhost:8000/v1; required by any openai:NAME model
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the key; unset: "EMPTY" is sent
    timeout_s: float = 60.0  # per request
    max_retries: int = 3  # retries of a failed request; after them the shard fails and a rerun resumes
    concurrency: int = 8  # simultaneous requests


@dataclass
class GeneratorConfig:
    """Synthesis of the training prompts (``python -m dynalign.generate``)."""

    name: str = "ca_prompts"
    num_prompts: int = 64  # target number of prompts after filtering and deduplication
    output_dir: str = "data/prompts"  # where the datasets DatasetDict, JSONL and shards are written
    prompts_per_call: int = 4  # prompts asked for in one meta-prompt
    eval_fraction: float = 0.1  # share of prompts held out as the eval split
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    regenerate_each_iteration: bool = False  # train each iteration on prompts the current policy wrote
    dataset: Optional[str] = None  # train on this: saved dataset / generation dir, data file or hub id
    prompt_column: str = "prompt"  # column of ``dataset`` that holds the prompt text
    models: List[str] = field(default_factory=lambda: ["policy"])  # policy | openai:NAME | path or hub id
    endpoint: GeneratorEndpointConfig = field(default_factory=GeneratorEndpointConfig)  # for openai:NAME
    taxonomy_file: Optional[str] = None  # domains x task types x aspect sets; None: shipped CA taxonomy
    # meta-prompt templates (YAML); None: the shipped chat templates; a bare name that is no file
    # here is a shipped one (meta_prompts_base.yaml: raw few-shot lists for base models)
    templates_file: Optional[str] = None
    template_ids: List[str] = field(default_factory=list)  # templates to cycle through; empty: all
    calls_per_shard: int = 8  # meta-prompts sampled as one batch and saved as one shard (resume unit)
    max_calls: Optional[int] = None  # stop after this many meta-prompts; None: 4 x the calls needed
    min_chars: int = 24  # parsed prompts shorter than this are dropped
    max_chars: int = 1200  # parsed prompts longer than this are dropped
    min_prose_fraction: float = 0.7  # min share of letters (of visible chars) and of words (of tokens)
    min_ascii_fraction: float = 0.9  # min share of ASCII in visible chars (English); 0 keeps any script
    max_meta_overlap: float = 0.5  # drop prompts whose word 3-grams lie this much in the meta-prompt
    dedup_threshold: float = 0.7  # near duplicate: MinHash Jaccard of char 5-grams at least this
    top_up_with_seeds: bool = True  # too few prompts survive: add shipped seed prompts (source=seed)

    def validate(self, key: str) -> None:
        positive(self.num_prompts, f"{key}.num_prompts")
        positive(self.prompts_per_call, f"{key}.prompts_per_call")
        in_range(self.eval_fraction, 0.0, 1.0, f"{key}.eval_fraction", high_open=True)
        positive(self.temperature, f"{key}.temperature")
        require(0.0 < self.top_p <= 1.0, f"{key}.top_p", f"must be in (0, 1] (got {self.top_p})")
        positive(self.max_new_tokens, f"{key}.max_new_tokens")
        self._validate_models(key)
        positive(self.calls_per_shard, f"{key}.calls_per_shard")
        require(self.max_calls is None or self.max_calls > 0, f"{key}.max_calls",
                f"must be > 0 or null (got {self.max_calls})")
        require(self.min_chars >= 1, f"{key}.min_chars", f"must be >= 1 (got {self.min_chars})")
        require(self.max_chars > self.min_chars, f"{key}.max_chars",
                f"must be > min_chars={self.min_chars} (got {self.max_chars})")
        for name in ("min_prose_fraction", "min_ascii_fraction"):
            in_range(getattr(self, name), 0.0, 1.0, f"{key}.{name}")
        for name in ("max_meta_overlap", "dedup_threshold"):
            value = getattr(self, name)
            require(0.0 < value <= 1.0, f"{key}.{name}", f"must be in (0, 1] (got {value})")

    def _validate_models(self, key: str) -> None:
        require(len(self.models) > 0, f"{key}.models", "name at least one generator model (e.g. [policy])")
        for i, spec in enumerate(self.models):
            kind, name = parse_model_spec(spec)
            require(bool(name), f"{key}.models.{i}", f"empty model name in {spec!r}")
            if kind == "openai":
                require(bool(self.endpoint.base_url), f"{key}.endpoint.base_url",
                        f"required by models entry {spec!r}")
        endpoint = self.endpoint
        positive(endpoint.timeout_s, f"{key}.endpoint.timeout_s")
        require(endpoint.max_retries >= 0, f"{key}.endpoint.max_retries",
                f"must be >= 0 (got {endpoint.max_retries})")
        positive(endpoint.concurrency, f"{key}.endpoint.concurrency")

    @property
    def call_budget(self) -> int:
        """Meta-prompts to try before giving up: ``max_calls``, or 4x what the target needs."""
        if self.max_calls is not None:
            return int(self.max_calls)
        return 4 * math.ceil(self.num_prompts / self.prompts_per_call)


def parse_model_spec(spec: str) -> tuple[str, str]:
    """``(kind, name)`` of one ``generator.models`` entry.

    ``policy`` -> the configured ``model`` (the loop's own sampler); ``openai:NAME`` -> the
    served model NAME at ``generator.endpoint.base_url``; ``hf:PATH`` or any other string ->
    a local directory or hub id loaded with transformers (``tiny`` is the embedded model).
    """
    spec = str(spec).strip()
    if spec == "policy":
        return "policy", "policy"
    for kind in ("openai", "hf"):
        if spec.startswith(kind + ":"):
            return kind, spec[len(kind) + 1:].strip()
    return "hf", spec
