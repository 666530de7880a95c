"""Prompt synthesis for Dynamic Alignment: templates, parsing, filters, dedup, dataset I/O.

What the training loop and ``python -m dynalign.generate`` call:

* :func:`generate_prompts` -- run (or resume) the generation pipeline, return a DatasetDict;
* :func:`select_training_prompts` -- the prompts of one iteration: a dataset on disk, a fresh
  generation by the current policy, or the shipped seed prompts;
* :func:`load_prompt_dataset` -- the prompt column of any saved or ``datasets``-loadable dataset;
* :func:`seed_prompts` -- the 64 hand-written Collective Agency seed prompts.

The pure parts (:mod:`.parse`, :mod:`.filters`, :mod:`.dedup`, :mod:`.taxonomy`) have no
state and no I/O beyond reading the shipped YAML files.
"""

from __future__ import annotations

from dynalign._lazy import lazy_exports

# Public name -> submodule. Imported on first use (PEP 562), so ``dynalign.datagen.settings``
# and the pure modules load without torch, and a bad config fails fast.
_EXPORTS = {
    "load_prompt_dataset": "dataset_io",
    "split_of": "dataset_io",
    "DuplicateIndex": "dedup",
    "deduplicate": "dedup",
    "normalize_text": "dedup",
    "prompt_id": "dedup",
    "FILTERS": "filters",
    "rejection_reason": "filters",
    "parse_prompts": "parse",
    "Planner": "pipeline",
    "generate_prompts": "pipeline",
    "PromptSet": "select",
    "select_training_prompts": "select",
    "SeedPrompt": "taxonomy",
    "load_taxonomy": "taxonomy",
    "load_templates": "taxonomy",
    "seed_prompts": "taxonomy",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
