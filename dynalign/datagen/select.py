"""Which prompts an iteration of the training loop trains on.

In order of precedence:

1. ``generator.dataset`` is set: its ``generator.prompt_column``, split ``train`` (and
   ``eval`` when it has one). Any saved DatasetDict, generation output directory, data
   file or hub id (:func:`~dynalign.datagen.dataset_io.load_prompt_dataset`).
2. ``generator.regenerate_each_iteration``: the current policy writes a fresh set into
   ``<run_dir>/prompts/iter_<iii>/`` (:meth:`~dynalign.rundir.RunDir.generated_prompts`),
   deduplicated against the sets of earlier iterations.
   If too few survive the filters (the tiny model writes gibberish), the set is topped
   up with the shipped seed prompts (``generator.top_up_with_seeds``) and its summary says
   so; if the train split is still empty the iteration falls back to the seed prompts.
3. Otherwise: the 64 shipped seed prompts (the embedded default run).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynalign.datagen.dataset_io import load_prompt_dataset, split_of
from dynalign.datagen.pipeline import SamplerOrFactory, generate_prompts, sample_shards_for_rank0
from dynalign.datagen.taxonomy import seed_prompts
from dynalign.rundir import RunDir


@dataclass
class PromptSet:
    """The prompts of one iteration and where they came from."""

    train: list[str]
    eval: list[str]
    source: str  # "dataset" | "generated" | "seed" | "seed_fallback"
    path: Path | None = None  # the dataset or generation directory, when there is one
    summary: dict[str, Any] = field(default_factory=dict)  # the generation summary (generated only)


def seed_prompt_set(eval_fraction: float, source: str = "seed") -> PromptSet:
    """The shipped seed prompts, split by the same id-hash rule as generated sets."""
    from dynalign.datagen.dedup import prompt_id

    split: dict[str, list[str]] = {"train": [], "eval": []}
    for seed in seed_prompts():
        split[split_of(prompt_id(seed.prompt), eval_fraction)].append(seed.prompt)
    return PromptSet(train=split["train"], eval=split["eval"], source=source)


def _earlier_prompts(run_dir: str | Path, iteration: int) -> list[str]:
    prompts: list[str] = []
    for i in range(iteration):
        path = RunDir(Path(run_dir)).generated_prompts(i) / "prompts.jsonl"
        if path.exists():
            with path.open(encoding="utf-8") as handle:
                prompts += [json.loads(line)["prompt"] for line in handle if line.strip()]
    return prompts


def select_training_prompts(gen_cfg: Any, sampler: SamplerOrFactory = None, *, model_name: str = "policy",
                            iteration: int = 0, run_dir: str | Path = ".",
                            progress: bool = True) -> PromptSet:
    """The prompts iteration ``iteration`` trains on (see the module docstring for the rule).

    Call on rank 0 (generation writes files) while the other ranks call
    :func:`help_select_training_prompts` (they sample a share of a regenerated set); they can
    read the result back with ``load_prompt_dataset(PromptSet.path)`` after a barrier. A killed
    generation resumes when called again with the same arguments.
    """
    if gen_cfg.dataset:
        train = load_prompt_dataset(gen_cfg.dataset, gen_cfg.prompt_column, "train")
        held_out: list[str] = []
        if not Path(gen_cfg.dataset).is_file():  # a single file is one split, already read as train
            with contextlib.suppress(KeyError, ValueError):
                held_out = load_prompt_dataset(gen_cfg.dataset, gen_cfg.prompt_column, "eval")
        return PromptSet(train=train, eval=held_out, source="dataset", path=Path(gen_cfg.dataset))
    if not regenerates(gen_cfg):
        return seed_prompt_set(gen_cfg.eval_fraction)
    out = RunDir(Path(run_dir)).generated_prompts(iteration)
    data = generate_prompts(gen_cfg, sampler, model_name=model_name, iteration=iteration, output_dir=out,
                            seen_prompts=_earlier_prompts(run_dir, iteration), progress=progress)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    if len(data["train"]) == 0:
        warnings.warn(f"iteration {iteration}: no generated prompt survived (see {out / 'summary.json'}); "
                      "training on the shipped seed prompts instead", stacklevel=2)
        fallback = seed_prompt_set(gen_cfg.eval_fraction, source="seed_fallback")
        fallback.path, fallback.summary = out, summary
        return fallback
    return PromptSet(train=list(data["train"]["prompt"]), eval=list(data["eval"]["prompt"]),
                     source="generated", path=out, summary=summary)


def regenerates(gen_cfg: Any) -> bool:
    """Whether :func:`select_training_prompts` has the policy write the set (rule 2 above)."""
    return not gen_cfg.dataset and bool(gen_cfg.regenerate_each_iteration)


def help_select_training_prompts(gen_cfg: Any, sampler: SamplerOrFactory = None, *,
                                 model_name: str = "policy", iteration: int = 0) -> int:
    """Every rank but 0, while rank 0 runs :func:`select_training_prompts` with the same
    arguments: samples this rank's share of the shards of a regenerated set
    (:func:`~dynalign.datagen.pipeline.sample_shards_for_rank0`); nothing for the other rules.
    Returns how many shards this rank sampled."""
    if not regenerates(gen_cfg):
        return 0
    return sample_shards_for_rank0(gen_cfg, sampler, iteration=iteration, model_name=model_name)
