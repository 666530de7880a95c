"""The prompt-generation pipeline: plan -> sample -> parse -> filter -> dedup -> shard -> split -> save.

One *call* is one meta-prompt sent to a generator model, asking for
``generator.prompts_per_call`` prompts. Call ``k`` is fully determined by the config:
its taxonomy cell (:func:`~dynalign.datagen.taxonomy.cell_for_call`), template
(``k mod #templates``), few-shot examples and sampling seed
(``step_seed(generator.seed, iteration, k)``). ``generator.calls_per_shard`` consecutive
calls form a shard: they go to one generator model in one batch (model ``s mod #models``
for shard ``s``), and the shard file is written atomically with the calls, their raw
completions, the rows kept and the counts. Shards stop once ``num_prompts`` prompts are
kept or ``max_calls`` calls were made; the dataset is then assembled from the shards.

Several ranks (the training loop under torchrun): rank 0 runs :func:`generate_prompts` and
the other ranks :func:`sample_shards_for_rank0`. Shards are then sampled in rounds of one
shard per rank (rank ``r`` samples shard ``start + r``); rank 0 gathers the round's
completions and parses, filters, deduplicates and writes the shards in order, exactly as
one rank would, stopping at the same shard (the rest of that round is dropped unread). A
shard's completions depend only on its calls, so the files are those of a single rank.

Resuming: the same command finds the shards, re-indexes their prompts for deduplication
and continues at the next shard, so a killed run loses at most the shard in flight and
never writes a prompt twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple, Union

from dynalign.datagen import store as run_files
from dynalign.datagen.backends import PromptGenerator, build_generators
from dynalign.datagen.dataset_io import save_dataset_dict, split_of, to_dataset_dict
from dynalign.datagen.dedup import DuplicateIndex, prompt_id
from dynalign.datagen.filters import rejection_reason, word_ngrams
from dynalign.datagen.parse import parse_continuation, parse_prompts
from dynalign.datagen.settings import max_calls, parse_model_spec, validate_generator
from dynalign.datagen.summary import build_summary, format_summary
from dynalign.datagen.taxonomy import (
    Cell,
    SeedPrompt,
    Taxonomy,
    Template,
    cell_for_call,
    examples_for_call,
    load_taxonomy,
    load_templates,
    render_meta_prompt,
    seed_prompts,
    template_for_call,
)
from dynalign.distributed import broadcast_object, gather_object, get_rank
from dynalign.rollout.base import Prompt, Sampler, SamplingParams, inference_session
from dynalign.runtime import step_seed

SEED_SCHEDULE = "sampling seed of call k = dynalign.runtime.step_seed(generator.seed, iteration, k)"
SamplerOrFactory = Union[Sampler, Callable[[], Sampler], None]  # noqa: UP007 (a runtime alias)


@dataclass(frozen=True)
class CallPlan:
    """Everything about call ``call_index`` that is fixed before sampling."""

    call_index: int
    template_id: str
    cell: Cell
    seed: int
    meta_prompt: str


@dataclass(frozen=True)
class Planner:
    """The deterministic call schedule of one run (config + iteration)."""

    taxonomy: Taxonomy
    templates: tuple[Template, ...]
    examples: tuple[SeedPrompt, ...]
    seed: int
    iteration: int
    prompts_per_call: int

    @classmethod
    def from_config(cls, gen_cfg: Any, iteration: int) -> Planner:
        return cls(taxonomy=load_taxonomy(gen_cfg.taxonomy_file),
                   templates=load_templates(gen_cfg.templates_file,
                                            gen_cfg.template_ids),
                   examples=tuple(seed_prompts()), seed=gen_cfg.seed, iteration=iteration,
                   prompts_per_call=gen_cfg.prompts_per_call)

    def call(self, k: int) -> CallPlan:
        cell = cell_for_call(self.taxonomy.cells, k, seed=self.seed, iteration=self.iteration)
        template = template_for_call(self.templates, k)
        examples = examples_for_call(self.examples, k, seed=self.seed, iteration=self.iteration)
        meta = render_meta_prompt(template, cell, self.taxonomy, n=self.prompts_per_call, examples=examples)
        return CallPlan(k, template.id, cell, step_seed(self.seed, self.iteration, k), meta)


def sampling_params(gen_cfg: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=gen_cfg.max_new_tokens, temperature=gen_cfg.temperature,
                          top_p=gen_cfg.top_p)


def generator_name(spec: str, policy_name: str) -> str:
    """What rows record as ``generator_model`` for one ``generator.models`` entry."""
    kind, name = parse_model_spec(spec)
    return {"policy": policy_name, "openai": f"openai:{name}"}.get(kind, name)


def run_fingerprint(gen_cfg: Any, planner: Planner, policy_name: str) -> dict[str, Any]:
    """The settings a run directory must keep to be resumed (``num_prompts`` may change)."""
    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]

    keys = ("seed", "prompts_per_call", "calls_per_shard", "temperature", "top_p", "max_new_tokens",
            "min_chars", "max_chars", "min_prose_fraction", "min_ascii_fraction", "max_meta_overlap",
            "dedup_threshold")
    fingerprint: dict[str, Any] = {f"generator.{k}": getattr(gen_cfg, k) for k in keys}
    fingerprint["generator.models"] = [generator_name(m, policy_name) for m in gen_cfg.models]
    fingerprint["generator.taxonomy_file"] = digest(asdict(planner.taxonomy))
    fingerprint["generator.template_ids"] = [t.id for t in planner.templates]
    fingerprint["generator.templates_file"] = digest([t.fingerprint() for t in planner.templates])
    fingerprint["iteration"] = planner.iteration
    return fingerprint


# ------------------------------------------------------------------------ one shard


class SampledShard(NamedTuple):
    """The completions of one shard's calls, before anything is parsed."""

    texts: list[str]  # one completion per call, in call order
    seeds: list[int]  # the seed each was sampled with


def shard_calls(shard_index: int, planner: Planner, gen_cfg: Any) -> list[CallPlan]:
    per_shard = gen_cfg.calls_per_shard
    return [planner.call(k) for k in range(shard_index * per_shard, (shard_index + 1) * per_shard)]


def sample_shard(shard_index: int, planner: Planner, generator: PromptGenerator,
                 gen_cfg: Any) -> SampledShard:
    """The completions of one shard's calls: one batch per template sending mode (format and
    stop strings); a shard whose templates all send alike (the shipped sets) is one batch."""
    templates = {t.id: t for t in planner.templates}
    texts, seeds = _sample_calls(shard_calls(shard_index, planner, gen_cfg), templates, generator,
                                 sampling_params(gen_cfg))
    return SampledShard(texts, seeds)


def process_shard(shard_index: int, planner: Planner, generator_model: str, sampled: SampledShard,
                  index: DuplicateIndex, gen_cfg: Any) -> dict:
    """Parse, filter and deduplicate one sampled shard; ``index`` learns the kept prompts."""
    calls = shard_calls(shard_index, planner, gen_cfg)
    templates = {t.id: t for t in planner.templates}
    texts, used_seeds = sampled
    timestamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    stats: Counter[str] = Counter()
    rows, call_records = [], []
    for j, (call, text, used_seed) in enumerate(zip(calls, texts, used_seeds, strict=True)):
        template = templates[call.template_id]
        candidates = parse_completion(template, call.meta_prompt, text)
        stats["completions"] += 1
        stats["unparsed"] += not candidates
        meta_ngrams = word_ngrams(call.meta_prompt)
        for candidate in candidates:
            stats["candidates"] += 1
            reason = (rejection_reason(candidate, gen_cfg, meta_ngrams, template.endings)
                      or index.add(candidate))
            if reason:
                stats[reason] += 1
                continue
            stats["kept"] += 1
            rows.append(_row(candidate, call, generator_model, used_seed, shard_index, planner.iteration,
                             timestamp))
        call_records.append({"call_index": call.call_index, "template_id": call.template_id,
                             "domain": call.cell.domain, "task_type": call.cell.task_type,
                             "aspects": list(call.cell.aspects), "sampling_seed": used_seed,
                             "meta_prompt": call.meta_prompt, "completion": text,
                             "parsed": len(candidates), "batch_position": j})
    return {"shard": shard_index, "iteration": planner.iteration, "generator_model": generator_model,
            "timestamp": timestamp, "calls": call_records, "rows": rows, "stats": dict(stats)}


def build_request(template: Template, meta_prompt: str) -> Prompt:
    """What is sent for one call: the raw text (``format: raw``) or one user message."""
    if template.raw:
        return meta_prompt
    return [{"role": "user", "content": meta_prompt}]


def parse_completion(template: Template, meta_prompt: str, text: str) -> list[str]:
    """The candidate prompts of one completion: a raw template's completion continues the
    meta-prompt's last line (``"3."``), so that line is read with it."""
    if template.raw:
        return parse_continuation(text, meta_prompt.rsplit("\n", 1)[-1])
    return parse_prompts(text)


def _sample_calls(calls: Sequence[CallPlan], templates: dict[str, Template], generator: PromptGenerator,
                  params: SamplingParams) -> tuple[list[str], list[int]]:
    """Completions and the seed each was sampled with, in call order; one ``generate`` per
    group of calls whose templates send alike (a group samples with its first call's seed
    unless the generator seeds each request)."""
    groups: dict[tuple[bool, tuple[str, ...]], list[int]] = {}
    for j, call in enumerate(calls):
        template = templates[call.template_id]
        groups.setdefault((template.raw, template.stop), []).append(j)
    texts: list[str] = [""] * len(calls)
    seeds: list[int] = [0] * len(calls)
    for (_, stop), members in groups.items():
        group = [calls[j] for j in members]
        requests = [build_request(templates[c.template_id], c.meta_prompt) for c in group]
        outs = generator.generate(requests, [c.seed for c in group], params.with_stops(stop))
        for j, call, out in zip(members, group, outs, strict=True):
            texts[j] = out
            seeds[j] = call.seed if generator.seeds_per_request else group[0].seed
    return texts, seeds


def _row(prompt: str, call: CallPlan, model: str, seed: int, shard: int, iteration: int,
         timestamp: str) -> dict:
    return {"id": prompt_id(prompt), "prompt": prompt, "source": "generated", "generator_model": model,
            "template_id": call.template_id, "domain": call.cell.domain, "task_type": call.cell.task_type,
            "aspects": list(call.cell.aspects), "sampling_seed": seed, "call_index": call.call_index,
            "shard": shard, "iteration": iteration, "timestamp": timestamp, "meta_prompt": call.meta_prompt}


def seed_row(seed: SeedPrompt, iteration: int) -> dict:
    """A shipped seed prompt as a dataset row (provenance: source='seed', no call)."""
    return {"id": prompt_id(seed.prompt), "prompt": seed.prompt, "source": "seed", "generator_model": "seed",
            "template_id": "seed", "domain": seed.domain, "task_type": seed.task_type,
            "aspects": list(seed.aspects), "sampling_seed": -1, "call_index": -1, "shard": -1,
            "iteration": iteration, "timestamp": "", "meta_prompt": ""}


def top_up_rows(rows: Sequence[dict], needed: int, iteration: int, threshold: float) -> list[dict]:
    """Up to ``needed`` seed prompts, in file order, that duplicate none of ``rows`` (nor each other)."""
    index = DuplicateIndex(threshold)
    index.update(r["prompt"] for r in rows)
    extra: list[dict] = []
    for seed in seed_prompts():
        if len(extra) >= needed:
            break
        if index.add(seed.prompt) is None:
            extra.append(seed_row(seed, iteration))
    return extra


# ------------------------------------------------------------------------- the run


def _uses_policy(gen_cfg: Any) -> bool:
    return any(parse_model_spec(spec)[0] == "policy" for spec in gen_cfg.models)


def _resolve_sampler(sampler: SamplerOrFactory) -> Sampler | None:
    if sampler is not None and not hasattr(sampler, "sample") and callable(sampler):
        return sampler()  # a factory: the model is loaded only when a shard needs it
    return sampler  # type: ignore[return-value]


def _policy_session(gen_cfg: Any, sampler: SamplerOrFactory) -> contextlib.AbstractContextManager:
    """The policy sampler ready for the whole generation: a ZeRO-3 policy is gathered once on
    each rank (every rank enters this once), not at each call (ranks sample different shards)."""
    if _uses_policy(gen_cfg) and sampler is not None and hasattr(sampler, "sample"):
        return inference_session(sampler)  # type: ignore[arg-type]
    return contextlib.nullcontext()


class _ShardSource:
    """Samples shard ``s`` with the generator whose turn it is (``s mod #models``); the
    generators are built when the first shard needs them."""

    def __init__(self, gen_cfg: Any, planner: Planner, sampler: SamplerOrFactory, model_name: str,
                 batch_size: int, generators: Sequence[PromptGenerator] | None = None) -> None:
        self.gen_cfg, self.planner, self.sampler = gen_cfg, planner, sampler
        self.model_name, self.batch_size = model_name, batch_size
        self.built: list[PromptGenerator] | None = list(generators) if generators is not None else None

    def generator(self, s: int) -> PromptGenerator:
        if self.built is None:
            policy = _resolve_sampler(self.sampler) if _uses_policy(self.gen_cfg) else None
            self.built = build_generators(self.gen_cfg, policy=policy, policy_name=self.model_name,
                                          batch_size=self.batch_size)
        return self.built[s % len(self.built)]

    def sample(self, s: int) -> SampledShard:
        return sample_shard(s, self.planner, self.generator(s), self.gen_cfg)

    def close(self) -> None:
        _close(self.built or ())


class _Rounds:
    """Rank 0's sampled shards, in order: each round samples one shard per rank (rank ``r``:
    the round's first shard + ``r``), and a round starts when rank 0 needs a shard it has not
    got. Shards of a round that rank 0 never asks for (the target was met) are dropped."""

    def __init__(self, sample: Callable[[int], SampledShard]) -> None:
        self.sample = sample
        self.ready: dict[int, SampledShard] = {}

    def get(self, s: int) -> SampledShard:
        if s not in self.ready:
            broadcast_object(s)  # the round's first shard, to every rank
            gathered = gather_object(self.sample(s))
            assert gathered is not None  # rank 0
            self.ready = {s + r: got for r, got in enumerate(gathered) if got is not None}
        return self.ready.pop(s)

    def close(self) -> None:
        broadcast_object(None)  # no more rounds


def sample_shards_for_rank0(gen_cfg: Any, sampler: SamplerOrFactory = None, *, iteration: int = 0,
                            model_name: str = "policy", batch_size: int = 64) -> int:
    """Every rank but 0, while rank 0 runs :func:`generate_prompts` with the same ``gen_cfg``,
    ``iteration`` and models: samples this rank's shard of each round rank 0 starts, until it
    says the generation is over. Writes nothing; returns how many shards this rank sampled."""
    validate_generator(gen_cfg)  # a bad config fails on every rank alike
    planner = Planner.from_config(gen_cfg, iteration)
    max_shards = math.ceil(max_calls(gen_cfg) / gen_cfg.calls_per_shard)
    source = _ShardSource(gen_cfg, planner, sampler, model_name, batch_size)
    rank, sampled = get_rank(), 0
    try:
        with _policy_session(gen_cfg, sampler):
            while (start := broadcast_object(None)) is not None:
                s = start + rank
                gather_object(source.sample(s) if s < max_shards else None)
                sampled += s < max_shards
    finally:
        source.close()
    return sampled


def generate_prompts(gen_cfg: Any, sampler: SamplerOrFactory = None, *, model_name: str = "policy",
                     iteration: int = 0, output_dir: str | Path | None = None,
                     seen_prompts: Iterable[str] = (), progress: bool = True,
                     generators: Sequence[PromptGenerator] | None = None, batch_size: int = 64):
    """Generate (or resume generating) ``gen_cfg.num_prompts`` prompts; returns the DatasetDict.

    ``sampler`` (or a zero-argument factory of one) is the policy, used for the
    ``policy`` entries of ``generator.models``; ``model_name`` is what rows record as its
    ``generator_model``. Other entries are built from the config (local models with
    ``batch_size``, OpenAI-compatible endpoints), unless ``generators`` gives them all.
    ``seen_prompts`` (e.g. earlier iterations' prompts) count as already generated for
    deduplication. Writes ``output_dir`` (default ``gen_cfg.output_dir``) as described in
    :mod:`dynalign.datagen.store`. Call it on rank 0 only; with several ranks, the others call
    :func:`sample_shards_for_rank0` meanwhile and sample a share of the shards.
    """
    from tqdm.auto import tqdm

    validate_generator(gen_cfg)
    started = time.perf_counter()
    out = Path(output_dir if output_dir is not None else gen_cfg.output_dir)
    planner = Planner.from_config(gen_cfg, iteration)
    fingerprint = run_fingerprint(gen_cfg, planner, model_name)
    per_shard = gen_cfg.calls_per_shard
    files = run_files.RunStore(out)
    shards = files.open(fingerprint, per_shard)
    resumed_from = len(shards) or None
    index, totals = _resumed_state(shards, seen_prompts, gen_cfg.dedup_threshold)
    max_shards = math.ceil(max_calls(gen_cfg) / per_shard)
    bar = tqdm(total=gen_cfg.num_prompts, initial=min(totals["kept"], gen_cfg.num_prompts), unit="prompt",
               desc=f"datagen iter {iteration}", disable=not progress, dynamic_ncols=True)
    source = _ShardSource(gen_cfg, planner, sampler, model_name, batch_size, generators)
    rounds = _Rounds(source.sample)
    try:
        with _policy_session(gen_cfg, sampler):
            while totals["kept"] < gen_cfg.num_prompts and len(shards) < max_shards:
                s = len(shards)
                sampled = rounds.get(s)
                shard = process_shard(s, planner, source.generator(s).name, sampled, index, gen_cfg)
                files.write_shard(shard)
                kept = totals["kept"] + len(shard["rows"])
                files.write_state(fingerprint, next_shard=s + 1, calls_per_shard=per_shard,
                                  extra={"seed_schedule": SEED_SCHEDULE, "kept": kept})
                shards.append(shard)
                totals.update(shard["stats"])
                bar.update(max(0, min(totals["kept"], gen_cfg.num_prompts) - bar.n))
                filtered = totals["candidates"] - totals["kept"]
                bar.set_postfix(kept=totals["kept"], generated=totals["candidates"], filtered=filtered,
                                calls=(s + 1) * per_shard, refresh=False)
            rounds.close()
    finally:
        bar.close()
        source.close()
    return finalize(gen_cfg, shards, planner, out, resumed_from_shard=resumed_from,
                    elapsed_s=time.perf_counter() - started, progress=progress)


def _resumed_state(shards: Sequence[dict], seen_prompts: Iterable[str],
                   threshold: float) -> tuple[DuplicateIndex, Counter[str]]:
    """The dedup index (earlier prompts and every kept row) and the filter counts of the shards
    already written."""
    index = DuplicateIndex(threshold)
    index.update(seen_prompts)
    totals: Counter[str] = Counter()
    for shard in shards:
        index.update(r["prompt"] for r in shard["rows"])
        totals.update(shard["stats"])
    return index, totals


def _close(generators: Iterable[PromptGenerator]) -> None:
    for generator in generators:
        close = getattr(generator, "close", None)
        if close is not None:
            close()


def finalize(gen_cfg: Any, shards: Sequence[dict], planner: Planner, out: Path, *,
             resumed_from_shard: int | None, elapsed_s: float, progress: bool = True):
    """Assemble the shards (first ``num_prompts`` rows, seed top-up if short), split, save, summarise."""
    rows = [row for shard in shards for row in shard["rows"]][:gen_cfg.num_prompts]
    if len(rows) < gen_cfg.num_prompts and gen_cfg.top_up_with_seeds:
        rows += top_up_rows(rows, gen_cfg.num_prompts - len(rows), planner.iteration,
                            gen_cfg.dedup_threshold)
    for row in rows:
        row["split"] = split_of(row["id"], gen_cfg.eval_fraction)
    dataset = to_dataset_dict(rows, gen_cfg.eval_fraction)
    summary = build_summary(shards, rows, planner.taxonomy, target=gen_cfg.num_prompts,
                            max_calls=max_calls(gen_cfg), resumed_from_shard=resumed_from_shard)
    summary.update(iteration=planner.iteration, seed=planner.seed, seed_schedule=SEED_SCHEDULE,
                   output_dir=str(out), elapsed_s=round(elapsed_s, 2))
    run_files.replace_dir(out / "dataset", lambda tmp: save_dataset_dict(dataset, tmp))
    run_files.write_jsonl(out / "prompts.jsonl", rows)
    run_files.write_json(out / "summary.json", summary)
    if progress:
        print(format_summary(summary), flush=True)
    return dataset
