"""``python -m dynalign.report RUNS_DIR``: the ablation comparison, built from what the runs left behind.

Every training run writes its own records (``metrics.jsonl``, ``summary.json``, ``.hydra/``,
and ``eval/iter_<k>/eval_results.json`` when it was evaluated), so the report needs no server.
With ``--wandb ENTITY/PROJECT`` it also reads the runs of the ``ablation-*`` groups from the W&B
API (for runs that live on another machine; :mod:`dynalign.report.wandb_source` reads each into
the record its directory would give), or from the W&B API alone when no RUNS directory is given;
that is optional and never required.

One row per run::

    axis      the W&B group without its "ablation-" prefix (experiments/ablation_<axis>.yaml)
    value     the swept value(s): the keys of hydra.sweeper.params, read from the run's overrides
    final_reward        summary.json's final_reward (else the last logged step's mean reward)
    ca_score            external judge's CA score of the policy, newest evaluated iteration
    win_rate            pairwise win rate against the base model (ties count half)
    capability_delta    lm-eval policy - baseline, mean over tasks of each task's main metric
    judge_failure_rate  mean over steps of judge/parse_failure_rate (judgements with no verdict)
    time_per_step_s     median over steps of time/step (wall seconds of one GRPO step)

Outputs in ``--out`` (default ``reports/ablations/<RUNS_DIR name>``): ``report.md``,
``report.csv`` (missing values as ``n/a``) and ``plots/``: ``reward_<axis>.png`` (reward per
step, a line per value) and ``ca_vs_capability.png`` (when some run was evaluated).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from dynalign.report import wandb_source
from dynalign.report.plots import write_plots
from dynalign.report.records import (
    RunRecord,
    ablation_axes,
    axis_of,
    capability_delta,
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
from dynalign.report.render import markdown_table, render_markdown, write_csv

__all__ = [
    "RunRecord", "ablation_axes", "axis_of", "build_report", "capability_delta", "eval_numbers",
    "find_run_dirs", "latest_eval", "local_records", "main", "markdown_table", "merge_records",
    "parse_overrides", "read_local_run", "value_of", "wandb_records",
]


def build_report(roots: Sequence[Path], out_dir: Path, *, wandb_path: str | None = None,
                 title: str | None = None) -> list[RunRecord]:
    """Read the runs, write ``report.md``, ``report.csv`` and ``plots/`` into ``out_dir``."""
    records = local_records(roots)
    if wandb_path:
        records = merge_records(records, wandb_source.wandb_records(wandb_path))
    records = sort_records(records)
    if not records:
        where = ", ".join(map(str, roots)) + (f" nor in W&B {wandb_path}" if wandb_path else "")
        raise FileNotFoundError(f"no runs under {where} (a run directory has .hydra/overrides.yaml)")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(records, out_dir / "report.csv")
    plots = write_plots(records, out_dir / "plots")
    sources = [str(r) for r in roots] + ([f"wandb:{wandb_path}"] if wandb_path else [])
    title = title or f"Ablations: {roots[0].name if roots else wandb_path}"
    (out_dir / "report.md").write_text(render_markdown(records, plots, title=title, sources=sources) + "\n",
                                       encoding="utf-8")
    return records


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dynalign.report", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="directories holding run directories "
                        "(e.g. multirun/ablations/tiny); searched recursively; none: --wandb alone")
    parser.add_argument("--out", type=Path, default=None,
                        help="report directory (default: reports/ablations/<name of the first RUNS>)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", default=None,
                        help="also read the ablation-* groups of this W&B project (needs network and a key)")
    parser.add_argument("--title", default=None, help="the report's heading")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    if not args.runs and not args.wandb:
        print("dynalign.report: give RUNS directories, --wandb ENTITY/PROJECT, or both", file=sys.stderr)
        return 2
    name = args.runs[0].resolve().name if args.runs else args.wandb.rsplit("/", 1)[-1]
    out = args.out or Path("reports") / "ablations" / name
    try:
        records = build_report(args.runs, out, wandb_path=args.wandb, title=args.title)
    except FileNotFoundError as err:
        print(f"dynalign.report: {err}", file=sys.stderr)
        return 1
    print("\n".join(markdown_table(records)))
    done = sum(r.status == "done" for r in records)
    print(f"dynalign.report: {len(records)} runs ({done} done) -> {out / 'report.md'}, {out / 'report.csv'}, "
          f"{out / 'plots'}/")
    return 0
