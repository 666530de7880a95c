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
_MODULES = {
    "dataset_io": ("load_prompt_dataset", "split_of"),
    "dedup": ("DuplicateIndex", "deduplicate", "normalize_text", "prompt_id"),
    "filters": ("FILTERS", "rejection_reason"),
    "parse": ("parse_prompts",),
    "pipeline": ("Planner", "generate_prompts"),
    "select": ("PromptSet", "select_training_prompts"),
    "taxonomy": ("SeedPrompt", "load_taxonomy", "load_templates", "seed_prompts"),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
