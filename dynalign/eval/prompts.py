"""The CA evaluation set: the shipped curated prompts first, then held-out generated prompts.

The curated set (``dynalign/data/ca_eval_prompts.yaml``) is fixed, so scores compare across
checkpoints and runs; the held-out part is the ``eval`` split of a generated dataset (never
trained on: the loop trains on ``train``), which follows the training distribution. Exact
repeats (after whitespace and case normalisation) are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from dynalign.datagen.taxonomy import DATA_DIR, DataFileError, load_taxonomy

CURATED_FILE = DATA_DIR / "ca_eval_prompts.yaml"


@dataclass(frozen=True)
class EvalPrompt:
    id: str
    prompt: str
    source: str  # "curated" | "held_out"
    aspects: tuple[str, ...] = ()  # aspects the prompt targets (curated only)
    domain: str = ""
    task_type: str = ""


def curated_prompts(path: str | Path | None = None) -> list[EvalPrompt]:
    """The curated prompts of ``path`` (None: the shipped file), checked against the taxonomy."""
    path = Path(path or CURATED_FILE)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise DataFileError(f"{path}: cannot read ({err})") from None
    entries = data.get("prompts") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataFileError(f"{path}: needs a non-empty list 'prompts' of {{id, prompt, aspects, ...}}")
    taxonomy = load_taxonomy()
    prompts, seen = [], set()
    for entry in entries:
        try:
            item = EvalPrompt(id=str(entry["id"]), prompt=" ".join(str(entry["prompt"]).split()),
                              source="curated", aspects=tuple(entry.get("aspects") or ()),
                              domain=str(entry.get("domain", "")), task_type=str(entry.get("task_type", "")))
        except (KeyError, TypeError) as err:
            raise DataFileError(f"{path}: every prompt needs an id and a prompt ({err!r})") from None
        unknown = set(item.aspects) - set(taxonomy.aspects)
        if item.id in seen or unknown or not item.prompt:
            raise DataFileError(f"{path}: prompt {item.id!r} is a duplicate id, is empty or names unknown "
                                f"aspects {sorted(unknown)} (known: {sorted(taxonomy.aspects)})")
        seen.add(item.id)
        prompts.append(item)
    return prompts


def held_out_prompts(dataset: str | Path, column: str = "prompt") -> list[EvalPrompt]:
    """The ``eval`` split of a saved dataset or generation directory (the loop trains on ``train``)."""
    from dynalign.datagen.dataset_io import load_prompt_dataset
    from dynalign.datagen.dedup import prompt_id

    if Path(dataset).is_file():
        raise DataFileError(f"{dataset}: a single data file has no held-out split; give a saved "
                            "dataset or a generation directory with an eval split")
    texts = load_prompt_dataset(dataset, column, "eval")
    return [EvalPrompt(id=prompt_id(t), prompt=t, source="held_out") for t in texts]


def eval_prompt_set(num_prompts: int, *, prompts_file: str | Path | None = None,
                    held_out: str | Path | None = None, column: str = "prompt") -> list[EvalPrompt]:
    """Up to ``num_prompts`` prompts: curated first, then held-out ones, exact repeats dropped."""
    from dynalign.datagen.dedup import normalize_text

    candidates = curated_prompts(prompts_file)
    if held_out:
        candidates += held_out_prompts(held_out, column)
    chosen, seen = [], set()
    for item in candidates:
        key = normalize_text(item.prompt)
        if key not in seen:
            seen.add(key)
            chosen.append(item)
    return chosen[:num_prompts]
