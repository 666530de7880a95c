"""What an evaluation leaves behind: ``eval_results.json``, ``eval_samples.jsonl``,
``eval_summary.md``, flat ``eval/...`` metrics for W&B, and a line of the history JSONL.

Everything here is a pure function of the results dictionary (plus file writes), so the
layout is documented once: see :func:`flat_metrics` for the metric names and
:func:`render_summary` for the markdown.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS_FILE = "eval_results.json"
SUMMARY_FILE = "eval_summary.md"
SAMPLES_FILE = "eval_samples.jsonl"
HISTORY_FILE = "eval_history.jsonl"
OUTPUT_FILES = (RESULTS_FILE, SAMPLES_FILE, SUMMARY_FILE)  # what write_outputs writes


def jsonable(value: Any) -> Any:
    """Nested values with NaN/inf as None (JSON has no NaN; null reads back as "missing")."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _flatten(prefix: str, node: Any, out: dict[str, float]) -> None:
    if isinstance(node, Mapping):
        for key, value in node.items():
            _flatten(f"{prefix}/{key}", value, out)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        out[prefix] = float(node)


def flat_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """Every number of the results under ``eval/<section>/...``, for the tracker.

    ``eval/ca/policy/overall/mean`` (and ``ci_low``, ``ci_high``, ``n``), ``eval/ca/policy/aspects/
    knowledge/mean``, ``eval/ca/policy/failure_rate``, the same under ``eval/ca/baseline``;
    ``eval/pairwise/win_rate`` (``ci_low``, ``ci_high``, ``wins``, ``ties``, ``losses``, ``failed``,
    ``order_agreement``, ``policy_length_tokens``...); ``eval/calibration/spearman`` (``mad``,
    ``bias``, ``aspects/<name>/...``); ``eval/lm_eval/policy/<task>/<metric>``, ``.../baseline/...``,
    ``.../delta/...``; ``eval/capability/verdict_code`` (1 preserved, 0 not shown, -1 degraded),
    ``eval/capability/margin``, ``eval/capability/tasks/<task>/delta`` (``ci_low``, ``ci_high``,
    ``stderr``, ``verdict_code``...); ``eval/time/<phase>``.
    """
    out: dict[str, float] = {}
    for section in ("pairwise", "calibration", "lm_eval", "capability", "timing"):
        if results.get(section):
            _flatten(f"eval/{'time' if section == 'timing' else section}", results[section], out)
    for side, summary in (results.get("pointwise") or {}).items():
        _flatten(f"eval/ca/{side}", summary, out)
    return out


SIDE_NAMES = {"a": "policy", "b": "baseline", "tie": "tie"}  # the policy is the pairs' side a
OUTCOME_COLUMNS = ("id", "source", "pairwise")  # the text cells of a row that are not free text


def _votes(votes: Sequence[str | None]) -> str:
    return ",".join(SIDE_NAMES[v] if v else "failed" for v in votes)


def per_prompt_rows(prompts: Sequence[Any], policy: Any, baseline: Any | None, external: Any,
                    external_baseline: Any | None, self_judged: Any | None,
                    pairs: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per prompt: the answers, every judge's scores and the pairwise outcome.

    Cells are scalars or strings only, so the rows are a W&B table as they are.
    """
    rows = []
    for i, item in enumerate(prompts):
        row: dict[str, Any] = {"table": "eval", "id": item.id, "source": item.source, "prompt": item.prompt,
                               "policy_answer": policy.texts[i], "policy_tokens": int(policy.lengths[i])}
        if baseline is not None:
            row["baseline_answer"] = baseline.texts[i]
            row["baseline_tokens"] = int(baseline.lengths[i])
        row["external_score"] = float(external.rewards[i])
        for name, value in zip(external.aspect_names, external.scores[i].tolist(), strict=True):
            row[f"external_{name}"] = float(value)
        row["external_reason"] = external.reasons[i]
        if external_baseline is not None:
            row["baseline_external_score"] = float(external_baseline.rewards[i])
        if self_judged is not None:
            row["self_score"] = float(self_judged.rewards[i])
            row["self_reason"] = self_judged.reasons[i]
        if pairs:
            row["pairwise"] = pairs[i].outcome or "failed"
            row["votes_policy_first"] = _votes(pairs[i].a_first)
            row["votes_baseline_first"] = _votes(pairs[i].b_first)
        rows.append(row)
    return rows


def prompt_outcomes(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows without their texts (prompt, answers, reasons): per prompt its id, every score and
    length, and the pairwise outcome; small enough for a run's W&B summary."""
    return [{k: v for k, v in row.items() if k in OUTCOME_COLUMNS or not isinstance(v, str)} for row in rows]


# ------------------------------------------------------------------ markdown


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _with_ci(stat: Mapping[str, Any]) -> str:
    return f"{_num(stat.get('mean'))} [{_num(stat.get('ci_low'))}, {_num(stat.get('ci_high'))}]"


def _ca_section(results: Mapping[str, Any]) -> list[str]:
    pointwise = results.get("pointwise") or {}
    policy = pointwise.get("policy")
    if not policy:
        return []
    sides = [s for s in ("policy", "baseline") if s in pointwise]
    low, high = policy.get("scale", [0, 5])
    lines = [f"## Collective Agency, external judge ({low}-{high}, mean [95% CI])", "",
             "| | " + " | ".join(sides) + " |", "|---|" + "---|" * len(sides)]
    lines.append("| **overall** | " + " | ".join(_with_ci(pointwise[s]["overall"]) for s in sides) + " |")
    for name in policy["aspects"]:
        cells = " | ".join(_with_ci(pointwise[s]["aspects"][name]) for s in sides)
        lines.append(f"| {name} | {cells} |")
    lines.append("| judge failures (answers without a score) | "
                 + " | ".join(_num(pointwise[s]["failure_rate"]) for s in sides) + " |")
    return lines + [""]


def _pairwise_section(p: Mapping[str, Any]) -> list[str]:
    if not p:
        return []
    return [
        "## Pairwise vs baseline (both orders; orders that disagree count as a tie)", "",
        f"- win rate **{_num(p['win_rate'])}** [{_num(p['ci_low'])}, {_num(p['ci_high'])}] over "
        f"{p['decided']} pairs: {p['wins']} wins, {p['ties']} ties, {p['losses']} losses; "
        f"{p['failed']} failed (failure rate {_num(p['failure_rate'])})",
        f"- order agreement {_num(p['order_agreement'])} (share of pairs whose two orders agreed)",
        f"- answer length, tokens: policy {_num(p['policy_length_tokens'], 1)} vs baseline "
        f"{_num(p['baseline_length_tokens'], 1)}; characters: {_num(p['policy_length_chars'], 1)} vs "
        f"{_num(p['baseline_length_chars'], 1)}; the longer answer won {_num(p['longer_answer_win_rate'])} "
        "of the pairs with a winner", ""]


def _calibration_section(calibration: Mapping[str, Any]) -> list[str]:
    if not calibration:
        return []
    return ["## Self-judge calibration (policy's own scores vs the external judge, same answers)", "",
            f"- Spearman {_num(calibration['spearman'])}, Pearson {_num(calibration['pearson'])}, "
            f"mean |self - external| {_num(calibration['mad'])}, bias (self - external) "
            f"{_num(calibration['bias'])}, n = {calibration['n']} ({calibration['scale']} scale)",
            f"- self-judge failure rate {_num(calibration['self_failure_rate'])}", ""]


def _lm_eval_section(lm_eval: Mapping[str, Any]) -> list[str]:
    if not lm_eval or not lm_eval.get("policy"):
        return []
    baseline, delta = lm_eval.get("baseline") or {}, lm_eval.get("delta") or {}
    lines = ["## General capability (lm-evaluation-harness)", "",
             "| task | metric | policy | baseline | delta |", "|---|---|---|---|---|"]
    for task, metrics in lm_eval["policy"].items():
        for metric, value in metrics.items():
            if "_stderr" in metric:
                continue
            lines.append(f"| {task} | {metric} | {_num(value)} | {_num(baseline.get(task, {}).get(metric))} "
                         f"| {_num(delta.get(task, {}).get(metric))} |")
    return lines + [""]


def _capability_section(capability: Mapping[str, Any]) -> list[str]:
    if not capability or not capability.get("tasks"):
        return []
    margin, level = capability["margin"], capability["level"]
    lines = [f"## Capability preserved? (non-inferiority margin {_num(margin)}, {level:.0%} intervals)", "",
             "| task | metric | policy | baseline | delta [CI] | verdict |", "|---|---|---|---|---|---|"]
    for task, t in capability["tasks"].items():
        direction = "" if t["higher_is_better"] else " (lower is better: sign flipped)"
        lines.append(f"| {task} | {t['metric']}{direction} | {_num(t['policy'])} | {_num(t['baseline'])} | "
                     f"{_num(t['delta'])} [{_num(t['ci_low'])}, {_num(t['ci_high'])}] | {t['verdict']} |")
    rule = (f"A task is preserved when the interval's low end is above -{_num(margin)}, degraded when its "
            "high end is below it, else not shown (also without a standard error, or with a zero one: every "
            "item scored alike); overall preserved only if every task is, degraded if some task is.")
    return lines + ["", f"Overall: **{capability['verdict']}**. Delta: policy - baseline, positive = better; "
                    f"interval from lm-eval's standard errors. {rule}", ""]


def render_summary(results: Mapping[str, Any]) -> str:
    """The markdown summary of one evaluation (``eval_summary.md``)."""
    prompts, judge = results["prompts"], results["judge"]
    iteration = "" if results.get("iteration") is None else f" (iteration {results['iteration']})"
    lines = [f"# Evaluation of `{results['checkpoint']}`{iteration}", "",
             f"- baseline: `{results['baseline']}`",
             f"- external judge: {judge['backend']}:{judge['model']} ({judge['mode']} mode, rubric "
             f"{judge['rubric']})",
             f"- prompts: {prompts['total']} ({prompts['curated']} curated, {prompts['held_out']} held-out); "
             f"answers of at most {results['settings']['max_new_tokens']} tokens", ""]
    lines += _ca_section(results)
    lines += _pairwise_section(results.get("pairwise") or {})
    lines += _calibration_section(results.get("calibration") or {})
    lines += _lm_eval_section(results.get("lm_eval") or {})
    lines += _capability_section(results.get("capability") or {})
    if results.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in results["warnings"]] + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------ files


def write_outputs(out_dir: Path, results: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                  summary: str) -> None:
    from dynalign.io import atomic_write, atomic_write_text

    atomic_write_text(out_dir / RESULTS_FILE, json.dumps(jsonable(results), indent=2) + "\n")
    atomic_write(out_dir / SAMPLES_FILE, lambda f: f.writelines(json.dumps(jsonable(r)) + "\n" for r in rows))
    atomic_write_text(out_dir / SUMMARY_FILE, summary + "\n")


def history_record(results: Mapping[str, Any]) -> dict[str, Any]:
    """The line appended to the history JSONL: where, when, and the headline numbers."""
    pointwise = results.get("pointwise") or {}
    record = {"iteration": results.get("iteration"), "step": results.get("step"),
              "checkpoint": results["checkpoint"], "timestamp": results.get("timestamp")}
    if "policy" in pointwise:
        record["ca_overall"] = pointwise["policy"]["overall"]["mean"]
        record["judge_failure_rate"] = pointwise["policy"]["failure_rate"]
    if results.get("pairwise"):
        record["win_rate"] = results["pairwise"]["win_rate"]
    if results.get("calibration"):
        keys = ("spearman", "pearson", "mad", "bias", "n")
        record["calibration"] = {k: results["calibration"][k] for k in keys}
    if (results.get("lm_eval") or {}).get("policy"):
        record["lm_eval"] = results["lm_eval"]["policy"]
    if (results.get("capability") or {}).get("tasks"):
        record["capability"] = results["capability"]["verdict"]
    return record


def append_history(path: Path, results: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(jsonable(history_record(results))) + "\n")
