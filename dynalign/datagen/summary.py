"""What a generation run produced, in numbers: filters, duplicates, diversity, coverage."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from dynalign.datagen.dedup import normalize_text
from dynalign.datagen.filters import FILTERS
from dynalign.datagen.taxonomy import Taxonomy

DUPLICATES = ("exact_duplicate", "near_duplicate")


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams / all word n-grams over ``texts`` (normalised words); 0 when none."""
    total, unique = 0, set()
    for text in texts:
        words = normalize_text(text).split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def _rate(numerator: int, denominator: int) -> float | None:
    return round(numerator / denominator, 4) if denominator else None


def _cell(record: dict) -> tuple:
    return record["domain"], record["task_type"], tuple(record["aspects"])


def build_summary(shards: Sequence[dict], rows: Sequence[dict], taxonomy: Taxonomy, *,
                  target: int, max_calls: int, resumed_from_shard: int | None) -> dict[str, Any]:
    """Counts summed over the shard files, measures of the final rows (after truncation/top-up)."""
    stats: Counter[str] = Counter()
    for shard in shards:
        stats.update(shard["stats"])
    calls = [call for shard in shards for call in shard["calls"]]
    generated = [r for r in rows if r["source"] == "generated"]
    topped_up = len(rows) - len(generated)
    filtered = {name: stats.get(name, 0) for name in FILTERS}
    duplicates = {name: stats.get(name, 0) for name in DUPLICATES}
    passed_filters = stats["candidates"] - sum(filtered.values())
    splits = Counter(r["split"] for r in rows)
    summary: dict[str, Any] = {
        "target": target,
        "rows": len(rows),
        "splits": {"train": splits.get("train", 0), "eval": splits.get("eval", 0)},
        "generated_rows": len(generated),
        "topped_up_with_seed_prompts": topped_up,
        "shortfall": max(0, target - len(rows)),
        "stop_reason": ("target reached" if stats["kept"] >= target
                        else f"max_calls={max_calls} reached with {stats['kept']} prompts kept"),
        "calls": len(calls),
        "shards": len(shards),
        "resumed_from_shard": resumed_from_shard,
        "completions_without_prompts": stats["unparsed"],
        "candidates": stats["candidates"],
        "filtered": filtered,
        "filtered_total": sum(filtered.values()),
        "duplicates": duplicates,
        "dedup_rate": _rate(sum(duplicates.values()), passed_filters),
        "kept": stats["kept"],
        "keep_rate": _rate(stats["kept"], stats["candidates"]),
        "diversity": {"distinct_1": round(distinct_n([r["prompt"] for r in rows], 1), 4),
                      "distinct_2": round(distinct_n([r["prompt"] for r in rows], 2), 4)},
        "coverage": {
            "cells_total": len(taxonomy.cells),
            "cells_called": len({_cell(c) for c in calls}),
            "cells_with_generated_prompts": len({_cell(r) for r in generated}),
            "domains": dict(Counter(r["domain"] for r in rows)),
            "task_types": dict(Counter(r["task_type"] for r in rows)),
            "aspects": dict(Counter(a for r in rows for a in r["aspects"])),
            "templates": dict(Counter(r["template_id"] for r in rows)),
            "generator_models": dict(Counter(r["generator_model"] for r in rows)),
        },
    }
    if topped_up:
        summary["note"] = (f"only {len(generated)} generated prompts survived the filters and "
                           f"deduplication (target {target}); {topped_up} shipped seed prompts were "
                           "added (rows with source='seed')")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A few readable lines for the terminal."""
    f = summary["filtered"]
    lines = [
        f"prompts: {summary['rows']} / target {summary['target']} "
        f"(train {summary['splits']['train']}, eval {summary['splits']['eval']}); "
        f"generated {summary['generated_rows']}, seed top-up {summary['topped_up_with_seed_prompts']}",
        f"calls: {summary['calls']} in {summary['shards']} shards; {summary['stop_reason']}",
        f"candidates: {summary['candidates']}; filtered {summary['filtered_total']} "
        f"({', '.join(f'{k} {v}' for k, v in f.items() if v) or 'none'}); "
        f"duplicates exact {summary['duplicates']['exact_duplicate']} near "
        f"{summary['duplicates']['near_duplicate']} (rate {summary['dedup_rate']})",
        f"diversity: distinct-1 {summary['diversity']['distinct_1']} distinct-2 "
        f"{summary['diversity']['distinct_2']}; coverage: "
        f"{summary['coverage']['cells_with_generated_prompts']} / {summary['coverage']['cells_total']} "
        "taxonomy cells",
    ]
    if "note" in summary:
        lines.append(f"note: {summary['note']}")
    return "\n".join(lines)
