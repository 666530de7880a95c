"""``python -m dynalign.report RUNS_DIR``: the ablation comparison, built from what the runs left behind.

Every training run writes its own records (``metrics.jsonl``, ``summary.json``, ``.hydra/``,
and ``eval/iter_<k>/eval_results.json`` + ``eval_samples.jsonl`` when it was evaluated), so the
report needs no server. With ``--wandb ENTITY/PROJECT`` it also reads the runs of the
``ablation-*`` groups from the W&B API (for runs that live on another machine;
:mod:`dynalign.report.wandb_source` reads each into the record its directory would give), or
from the W&B API alone when no RUNS directory is given; that is optional and never required.

Runs are grouped by axis (the W&B group without its "ablation-" prefix) and value (the swept
keys' values, read from the run's overrides; never the seed): the runs of one value with
different ``seed`` are its replicates. One row per value (:mod:`dynalign.report.compare`)::

    seeds               finished runs of the value, one per seed (unfinished runs are left out)
    reward              mean over seeds of each run's mean reward over its last --last-steps steps
    ca_score            external judge's CA score of the policy, newest evaluated iteration
    win_rate            pairwise win rate against the base model (ties count half)
    capability          lm-eval non-inferiority verdict, over the evaluated seeds
    judge_failure_rate  mean over steps and seeds of judge/parse_failure_rate
    time_per_step_s     median over runs of the median time/step

with the mean ± 95% interval over seeds (and prompts) of each metric, and the paired test of
each value against the axis's baseline value (the first in the sweep, or ``--baseline``); a
supported difference smaller than ``--min-effect`` is reported as negligible.

Outputs in ``--out`` (default ``reports/ablations/<RUNS_DIR name>``): ``report.md``,
``report.csv`` (the table, missing values as ``n/a``), ``runs.csv`` (one row per run) and
``plots/``: ``reward_<axis>.png`` (reward per step, a line and a 95% band over seeds per value)
and ``ca_vs_capability.png`` (when some run was evaluated).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from dynalign.report import wandb_source
from dynalign.report.compare import DEFAULT_LAST_STEPS, METRICS, MIN_EFFECTS, AxisSummary, summarize
from dynalign.report.plots import write_plots
from dynalign.report.records import (
    RunRecord,
    ablation_axes,
    axis_of,
    capability_of,
    eval_numbers,
    find_run_dirs,
    latest_eval,
    local_records,
    merge_records,
    parse_overrides,
    read_local_run,
    sort_records,
    value_of,
    wandb_records,
)
from dynalign.report.render import markdown_table, render_markdown, write_csvs

__all__ = [
    "AxisSummary", "RunRecord", "ablation_axes", "axis_of", "build_report", "capability_of", "eval_numbers",
    "find_run_dirs", "latest_eval", "local_records", "main", "markdown_table", "merge_records",
    "parse_overrides", "read_local_run", "summarize", "value_of", "wandb_records",
]


def build_report(roots: Sequence[Path], out_dir: Path, *, wandb_path: str | None = None,
                 title: str | None = None, last_steps: int = DEFAULT_LAST_STEPS,
                 baselines: Mapping[str, str] | None = None,
                 min_effects: Mapping[str, float] | None = None) -> list[AxisSummary]:
    """Read the runs, write ``report.md``, ``report.csv``, ``runs.csv`` and ``plots/`` into ``out_dir``."""
    records = local_records(roots)
    if wandb_path:
        records = merge_records(records, wandb_source.wandb_records(wandb_path))
    records = sort_records(records)
    if not records:
        where = ", ".join(map(str, roots)) + (f" nor in W&B {wandb_path}" if wandb_path else "")
        raise FileNotFoundError(f"no runs under {where} (a run directory has .hydra/overrides.yaml)")
    axes = summarize(records, last_steps=last_steps, baselines=baselines, min_effects=min_effects)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csvs(axes, records, out_dir, last_steps)
    plots = write_plots(axes, out_dir / "plots")
    sources = [str(r) for r in roots] + ([f"wandb:{wandb_path}"] if wandb_path else [])
    title = title or f"Ablations: {roots[0].name if roots else wandb_path}"
    text = render_markdown(axes, records, plots, title=title, sources=sources)
    (out_dir / "report.md").write_text(text + "\n", encoding="utf-8")
    return axes


def _baseline(text: str) -> tuple[str, str]:
    axis, sep, value = text.partition("=")
    if not sep or not axis or not value:
        raise argparse.ArgumentTypeError(f"expected AXIS=VALUE (got {text!r})")
    return axis, value


def _min_effect(text: str) -> tuple[str, float]:
    metric, sep, value = text.partition("=")
    try:
        size = float(value)
    except ValueError:
        size = math.nan
    if not sep or metric not in METRICS or not size >= 0:
        raise argparse.ArgumentTypeError(f"expected METRIC=SIZE with METRIC one of {', '.join(METRICS)} "
                                         f"and SIZE >= 0 (got {text!r})")
    return metric, size


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1 (got {text!r})")
    return int(text)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dynalign.report", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="directories holding run directories "
                        "(e.g. multirun/ablations/tiny); searched recursively; none: --wandb alone")
    parser.add_argument("--out", type=Path, default=None,
                        help="report directory (default: reports/ablations/<name of the first RUNS>)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", default=None,
                        help="also (without RUNS: only) read the ablation-* groups of this W&B project "
                        "(needs network and a key)")
    parser.add_argument("--title", default=None, help="the report's heading")
    parser.add_argument("--last-steps", type=_positive, default=DEFAULT_LAST_STEPS, metavar="K",
                        help="a run's reward: its mean over the last K logged steps "
                        f"(default {DEFAULT_LAST_STEPS})")
    parser.add_argument("--baseline", type=_baseline, action="append", default=[], metavar="AXIS=VALUE",
                        help="the value an axis's others are tested against (default: the sweep's first)")
    parser.add_argument("--min-effect", type=_min_effect, action="append", default=[], metavar="METRIC=SIZE",
                        help="the smallest difference of interest of a metric: a supported difference "
                        "below it is called negligible and not marked (default: "
                        + ", ".join(f"{m}={v:g}" for m, v in MIN_EFFECTS.items()) + "; 0 marks every one)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    if not args.runs and not args.wandb:
        print("dynalign.report: give RUNS directories, --wandb ENTITY/PROJECT, or both", file=sys.stderr)
        return 2
    name = args.runs[0].resolve().name if args.runs else args.wandb.rsplit("/", 1)[-1]
    out = args.out or Path("reports") / "ablations" / name
    try:
        axes = build_report(args.runs, out, wandb_path=args.wandb, title=args.title,
                            last_steps=args.last_steps, baselines=dict(args.baseline),
                            min_effects=dict(args.min_effect))
    except (FileNotFoundError, ValueError) as err:
        print(f"dynalign.report: {err}", file=sys.stderr)
        return 1
    print("\n".join(markdown_table(axes)))
    runs = [r for a in axes for v in a.values for r in v.runs]
    done = sum(r.status == "done" for r in runs)
    print(f"dynalign.report: {len(runs)} runs ({done} done) -> {out / 'report.md'}, {out / 'report.csv'}, "
          f"{out / 'runs.csv'}, {out / 'plots'}/")
    return 0
