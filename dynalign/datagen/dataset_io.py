"""Prompt datasets in and out: the provenance schema, the split rule, loading any dataset.

Rows carry their provenance (see :data:`FEATURES`). The train/eval split is a pure
function of a row's id (:func:`split_of`), so a prompt stays in its split when a dataset
grows, is regenerated or is resumed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SPLITS = ("train", "eval")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def features():
    """Explicit column types, so shards and runs always concatenate (int64 everywhere)."""
    from datasets import Features, List, Value

    string, int64 = Value("string"), Value("int64")
    return Features({
        "id": string,  # sha256 of the normalised prompt, 16 hex chars (dedup.prompt_id)
        "prompt": string,
        "source": string,  # "generated" or "seed" (a top-up from the shipped seed prompts)
        "generator_model": string,  # the policy's name, a local path / hub id, or openai:<name>
        "template_id": string,  # meta-prompt template ("seed" for seed prompts)
        "domain": string,  # taxonomy cell ...
        "task_type": string,
        "aspects": List(string),  # ... and the Collective Agency aspects it targets
        "sampling_seed": int64,  # seed the backend sampled the completion with (-1: seed prompt)
        "call_index": int64,  # global index k of the meta-prompt call (-1: seed prompt)
        "shard": int64,  # shard file that holds the call and its raw completion (-1: seed prompt)
        "iteration": int64,  # Dynamic Alignment iteration (0 for python -m dynalign.generate)
        "timestamp": string,  # UTC, ISO 8601, when the shard was generated
        "meta_prompt": string,  # the exact text the generator read ("" for seed prompts)
    })


def split_of(row_id: str, eval_fraction: float) -> str:
    """``"eval"`` for a share ``eval_fraction`` of ids (uniform hash), else ``"train"``."""
    bucket = int(hashlib.sha256(f"split:{row_id}".encode()).hexdigest()[:8], 16) / 16**8
    return "eval" if bucket < eval_fraction else "train"


def to_dataset_dict(rows: Sequence[dict], eval_fraction: float):
    """A ``DatasetDict`` with splits train and eval (either may be empty)."""
    from datasets import Dataset, DatasetDict

    feats = features()
    by_split: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for row in rows:
        by_split[split_of(row["id"], eval_fraction)].append({k: row[k] for k in feats})
    return DatasetDict({
        name: Dataset.from_list(items, features=feats) if items else
        Dataset.from_dict({k: [] for k in feats}, features=feats)
        for name, items in by_split.items()
    })


def save_dataset_dict(data, path: str | Path) -> None:
    """``save_to_disk`` that an empty split survives.

    datasets 5.2.0 writes no arrow file for a split with 0 rows unless ``num_shards`` is
    given, and ``load_from_disk`` then fails (IndexError); one shard per 500 MB is the
    library's own default size.
    """
    shards = {name: max(1, math.ceil(split.data.nbytes / 500e6)) for name, split in data.items()}
    data.save_to_disk(str(path), num_shards=shards)


def _resolve_saved(path: Path) -> Path:
    """A generation output directory holds its DatasetDict in ``dataset/``."""
    if not (path / "dataset_dict.json").exists() and (path / "dataset" / "dataset_dict.json").exists():
        return path / "dataset"
    return path


def load_prompt_dataset(path_or_id: str | Path, prompt_column: str = "prompt",
                        split: str = "train") -> list[str]:
    """The prompts (column ``prompt_column``) of split ``split`` of any dataset.

    * a directory written by ``save_to_disk`` (a DatasetDict: ``split`` is picked; a single
      Dataset: used whole), or a generation ``output_dir`` (its ``dataset/`` is read);
    * another directory of data files, or a hub id: ``datasets.load_dataset(path, split=split)``;
    * a file ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` / ``.txt``: one split, read whole.

    A column of chat messages (``[{"role", "content"}, ...]``) yields the last user turn.
    Raises ``KeyError`` naming the available splits or columns when one is missing.
    """
    import datasets

    path = Path(str(path_or_id)).expanduser()
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{path}: unknown file type; use one of {sorted(FILE_BUILDERS)}")
        data: Any = datasets.load_dataset(builder, data_files=str(path), split="train")
    elif path.is_dir() and (_resolve_saved(path) / "dataset_dict.json").exists():
        saved = datasets.load_from_disk(str(_resolve_saved(path)))
        if split not in saved:
            raise KeyError(f"{path} has no split {split!r}; splits: {sorted(saved)}")
        data = saved[split]
    elif path.is_dir() and (path / "dataset_info.json").exists():
        data = datasets.load_from_disk(str(path))
    else:
        data = datasets.load_dataset(str(path_or_id), split=split)
    if prompt_column not in data.column_names:
        raise KeyError(f"{path_or_id} has no column {prompt_column!r} (generator.prompt_column); "
                       f"columns: {data.column_names}")
    return [_prompt_text(value) for value in data[prompt_column]]


def _prompt_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        users = [m.get("content", "") for m in value if m.get("role") == "user"]
        return str(users[-1] if users else value[-1].get("content", ""))
    return str(value)
