"""``python -m dynalign.report RUNS_DIR``: the ablation comparison, built from what the runs left behind.

Every training run writes its own records (``metrics.jsonl``, ``summary.json``, ``.hydra/``,
and ``eval/iter_<k>/eval_results.json`` when it was evaluated), so the report needs no server.
With ``--wandb ENTITY/PROJECT`` it also reads the runs of the ``ablation-*`` groups from the W&B
API (for runs that live on another machine); that is optional and never required.

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
import csv
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

GROUP_PREFIX = "ablation-"
# The axes of experiments/ablation_<axis>.yaml, in the order the report lists them.
AXIS_ORDER = ("judge", "rubric", "group_size", "kl_beta", "loss_type", "judge_mode", "regenerate",
              "iterations")
# Rewards are only comparable within one judge, rubric and scoring mode: say so where an axis changes one.
AXIS_NOTES = {
    "judge": "each run is rewarded by a different judge: compare the runs by CA score, not by reward",
    "rubric": "each run is rewarded on a different rubric: compare the runs by CA score, not by reward",
    "judge_mode": "generate and logprob scoring put rewards on different footings (parse failures give "
                  "NaN rewards): compare the runs by CA score and judge failure rate",
}
REWARD_KEYS = ("reward/mean", "reward/mean_all_ranks", "judge/reward_mean")  # first one present wins
FAILURE_KEY = "judge/parse_failure_rate"
STEP_TIME_KEY = "time/step"
# lm-eval metrics in order of preference for a task's one "capability" number.
MAIN_METRICS = ("acc_norm", "acc", "exact_match", "f1", "mc2", "mc1", "prompt_level_strict_acc")
COLUMNS = ("axis", "value", "status", "steps", "final_reward", "ca_score", "win_rate", "capability_delta",
           "judge_failure_rate", "time_per_step_s", "eval_iteration", "source", "run")
NA = "n/a"
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")


@dataclass
class RunRecord:
    """One run of an ablation, as the report sees it (NaN: not measured)."""

    axis: str
    value: str
    run: str  # the run directory (local) or W&B path
    source: str = "local"  # local | wandb
    status: str = "done"  # done | preempted | incomplete (no summary) | failed (no metrics)
    order: int = 0  # the job number in its sweep: rows of an axis keep the sweep's order
    steps: list[int] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)  # [steps] mean reward per step
    final_reward: float = math.nan
    ca_score: float = math.nan
    win_rate: float = math.nan
    capability_delta: float = math.nan
    judge_failure_rate: float = math.nan
    time_per_step_s: float = math.nan
    eval_iteration: int | None = None

    def cell(self, column: str) -> Any:
        return len(self.steps) if column == "steps" else getattr(self, column)


# ------------------------------------------------------------------ small readers


def _number(value: Any) -> float:
    """A float, or NaN for None / non-numbers (JSON writes NaN as null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def _mean(values: Iterable[float]) -> float:
    kept = _finite(values)
    return statistics.fmean(kept) if kept else math.nan


def _median(values: Iterable[float]) -> float:
    kept = _finite(values)
    return statistics.median(kept) if kept else math.nan


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file; a torn last line (a run killed mid-write) is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else None


def _dig(node: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def reward_key(metrics: Sequence[Mapping[str, Any]]) -> str | None:
    """The reward metric these records use (its name changed over the project's history)."""
    return next((k for k in REWARD_KEYS if any(k in m for m in metrics)), None)


# ------------------------------------------------------------------ axis and value


def parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    """``["grpo.beta=0.04", "+experiment=[a,b]"]`` -> ``{"grpo.beta": "0.04", "experiment": "[a,b]"}``."""
    parsed = {}
    for item in overrides:
        key, sep, value = str(item).partition("=")
        if sep:
            parsed[key.lstrip("+~")] = value
    return parsed


def axis_of(group: str | None, sweep_dir: Path | None = None) -> str:
    """``ablation-kl_beta`` -> ``kl_beta``; without a group, the sweep directory's name."""
    name = group or (sweep_dir.name if sweep_dir is not None else "") or "adhoc"
    return name.removeprefix(GROUP_PREFIX)


def value_of(overrides: Mapping[str, str], swept: Sequence[str]) -> str:
    """The run's value on its axis: the swept keys' values (``k=v`` pairs when several).

    Without sweep keys (a run started by hand), its command-line overrides minus the experiment.
    """
    keys = [k for k in swept if k in overrides] or [k for k in overrides if k != "experiment"]
    if len(keys) == 1 and keys[0] in swept:
        return overrides[keys[0]]
    return ",".join(f"{k}={overrides[k]}" for k in keys) or "default"


# ------------------------------------------------------------------ evaluation results


def capability_delta(delta: Mapping[str, Mapping[str, Any]] | None) -> float:
    """Mean over tasks of each task's main metric delta (policy - baseline; see MAIN_METRICS)."""
    per_task = []
    for metrics in (delta or {}).values():
        by_name = {str(name).split(",")[0]: _number(v) for name, v in metrics.items()
                   if "_stderr" not in str(name)}
        main = next((m for m in MAIN_METRICS if m in by_name), None) or next(iter(sorted(by_name)), None)
        if main is not None:
            per_task.append(by_name[main])
    return _mean(per_task)


def eval_numbers(results: Mapping[str, Any]) -> dict[str, float]:
    """CA score, win rate and capability delta of one ``eval_results.json``."""
    return {"ca_score": _number(_dig(results, "pointwise", "policy", "overall", "mean")),
            "win_rate": _number(_dig(results, "pairwise", "win_rate")),
            "capability_delta": capability_delta(_dig(results, "lm_eval", "delta"))}


def latest_eval(run_dir: Path) -> tuple[int, dict[str, Any]] | None:
    """``(k, results)`` of the newest ``eval/iter_<k>/eval_results.json`` of a run, if any."""
    found = []
    for path in (run_dir / "eval").glob("iter_*/eval_results.json"):
        suffix = path.parent.name.removeprefix("iter_")
        if suffix.isdigit():
            found.append((int(suffix), path))
    if not found:
        return None
    k, path = max(found)
    return k, json.loads(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------ local runs


def is_run_dir(path: Path) -> bool:
    return (path / ".hydra" / "overrides.yaml").is_file()


def find_run_dirs(root: Path) -> list[Path]:
    """Run directories under ``root`` (those with ``.hydra/overrides.yaml``), outermost only:
    an evaluation written inside a run (``<run>/eval/iter_<k>/.hydra``) is part of that run."""
    runs = []
    for current, dirs, _ in os.walk(root):
        here = Path(current)
        if is_run_dir(here):
            runs.append(here)
            dirs.clear()
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(runs)


def _status(metrics: list[dict[str, Any]], summary: Mapping[str, Any] | None) -> str:
    if summary is not None:
        return "preempted" if summary.get("preempted") else "done"
    return "incomplete" if metrics else "failed"


def _job_number(run_dir: Path, hydra: Any) -> int:
    num = _dig(hydra, "hydra", "job", "num")
    if isinstance(num, int):
        return num
    head = run_dir.name.split("_", 1)[0]
    return int(head) if head.isdigit() else 0


def read_local_run(run_dir: Path) -> RunRecord:
    """A :class:`RunRecord` from a run directory's own files."""
    config = _read_yaml(run_dir / ".hydra" / "config.yaml") or {}
    hydra = _read_yaml(run_dir / ".hydra" / "hydra.yaml")
    overrides = parse_overrides(_read_yaml(run_dir / ".hydra" / "overrides.yaml") or [])
    swept = list(_dig(hydra, "hydra", "sweeper", "params") or {})
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else None
    record = RunRecord(axis=axis_of(_dig(config, "logger", "group"), run_dir.parent),
                       value=value_of(overrides, swept), run=str(run_dir),
                       status=_status(metrics, summary), order=_job_number(run_dir, hydra))
    fill_from_metrics(record, metrics, summary or {})
    evaluated = latest_eval(run_dir)
    if evaluated is not None:
        record.eval_iteration = evaluated[0]
        for name, value in eval_numbers(evaluated[1]).items():
            setattr(record, name, value)
    return record


def fill_from_metrics(record: RunRecord, metrics: Sequence[Mapping[str, Any]],
                      summary: Mapping[str, Any]) -> None:
    """Reward curve, final reward, judge failure rate and step time from per-step records."""
    key = reward_key(metrics)
    steps = [m for m in metrics if "step" in m and (key is None or key in m)]
    record.steps = [int(m["step"]) for m in steps]
    record.rewards = [_number(m.get(key)) if key else math.nan for m in steps]
    final = _number(summary.get("final_reward"))
    record.final_reward = final if not math.isnan(final) or not record.rewards else record.rewards[-1]
    record.judge_failure_rate = _mean(_number(m.get(FAILURE_KEY)) for m in steps)
    record.time_per_step_s = _median(_number(m.get(STEP_TIME_KEY)) for m in steps)


def local_records(roots: Iterable[Path]) -> list[RunRecord]:
    return [read_local_run(run) for root in roots for run in find_run_dirs(root)]


# ------------------------------------------------------------------ W&B (optional)


WANDB_STATES = {"finished": "done", "crashed": "failed", "failed": "failed", "killed": "failed",
                "running": "incomplete"}


def wandb_record(run: Any) -> RunRecord:
    """A :class:`RunRecord` from a ``wandb.apis.public.Run`` (or anything shaped like one).

    The run's name is its Hydra ``override_dirname`` (``grpo.beta=0.04``), which carries the
    swept value; the history gives the curves, the summary the final and eval numbers.
    """
    overrides = parse_overrides(str(run.name).split(","))
    value = next(iter(overrides.values())) if len(overrides) == 1 else str(run.name)
    record = RunRecord(axis=axis_of(run.group), value=value, run="/".join(map(str, run.path)),
                       source="wandb", status=WANDB_STATES.get(run.state, run.state))
    summary = dict(run.summary)
    # the tracker logs with step=global_step, so W&B's _step is the run's step
    history = [{**row, "step": row["_step"]} for row in run.scan_history() if "_step" in row]
    fill_from_metrics(record, history, summary)
    delta: dict[str, dict[str, Any]] = {}
    for key, value in summary.items():
        parts = str(key).split("/")
        if parts[:3] == ["eval", "lm_eval", "delta"] and len(parts) == 5:
            delta.setdefault(parts[3], {})[parts[4]] = value
    record.ca_score = _number(summary.get("eval/ca/policy/overall/mean"))
    record.win_rate = _number(summary.get("eval/pairwise/win_rate"))
    record.capability_delta = capability_delta(delta)
    return record


def wandb_records(path: str, api: Any = None) -> list[RunRecord]:
    """The runs of ``ENTITY/PROJECT`` in ``ablation-*`` groups; [] with a warning when W&B is
    not installed or not reachable (the local records are the report's primary source)."""
    try:
        if api is None:
            import wandb

            api = wandb.Api(timeout=30)
        runs = api.runs(path, filters={"group": {"$regex": f"^{GROUP_PREFIX}"}})
        return [wandb_record(run) for run in runs]
    except Exception as err:  # noqa: BLE001 - the report must not depend on a server
        warnings.warn(f"W&B runs of {path} not read ({type(err).__name__}: {err}); "
                      "the report uses the local records only", stacklevel=2)
        return []


def merge_records(local: Sequence[RunRecord], remote: Sequence[RunRecord]) -> list[RunRecord]:
    """Local runs, plus the W&B runs whose (axis, value) no local run has."""
    seen = {(r.axis, r.value) for r in local}
    return list(local) + [r for r in remote if (r.axis, r.value) not in seen]


def sort_records(records: Iterable[RunRecord]) -> list[RunRecord]:
    def key(r: RunRecord) -> tuple[int, str, int, str]:
        rank = AXIS_ORDER.index(r.axis) if r.axis in AXIS_ORDER else len(AXIS_ORDER)
        return rank, r.axis, r.order, r.value

    return sorted(records, key=key)


def by_axis(records: Iterable[RunRecord]) -> dict[str, list[RunRecord]]:
    axes: dict[str, list[RunRecord]] = {}
    for record in sort_records(records):
        axes.setdefault(record.axis, []).append(record)
    return axes


# ------------------------------------------------------------------ outputs


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers rounded, missing values (None, NaN) as ``n/a``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NA
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_csv(records: Sequence[RunRecord], path: Path) -> None:
    """One row per run, full precision, ``n/a`` where a value is missing."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for record in records:
            writer.writerow([_csv_cell(record.cell(c)) for c in COLUMNS])


def _csv_cell(value: Any) -> str:
    if isinstance(value, float) and not math.isnan(value):
        return repr(value)  # full precision: the CSV is for further analysis
    return fmt(value)


def markdown_table(records: Sequence[RunRecord]) -> list[str]:
    header = ("axis", "value", "status", "steps", "final reward", "CA score", "win rate", "capability Δ",
              "judge failure rate", "s / step")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        cells = (r.axis, f"`{r.value}`", r.status, str(len(r.steps)), fmt(r.final_reward),
                 fmt(r.ca_score), fmt(r.win_rate), fmt(r.capability_delta), fmt(r.judge_failure_rate),
                 fmt(r.time_per_step_s, 2))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(records: Sequence[RunRecord], plots: Mapping[str, str], *, title: str,
                    sources: Sequence[str]) -> str:
    """``report.md``: the table, the definitions, one reward plot per axis, the CA/capability plot."""
    failed = [r for r in records if r.status in ("failed", "incomplete")]
    lines = [f"# {title}", "",
             f"{len(records)} runs from {', '.join(f'`{s}`' for s in sources)}; built "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}. Table as CSV: [report.csv](report.csv).", ""]
    if failed:
        lines += [f"**{len(failed)} run(s) did not finish**: "
                  + ", ".join(f"{r.axis} `{r.value}` ({r.status})" for r in failed)
                  + ". Their log is the sweep's output; a run with no metrics never trained.", ""]
    lines += markdown_table(records) + [""]
    lines += ["Final reward: the run's mean judge reward at its last step (judge scale). CA score: the "
              "external judge's mean Collective Agency score of the policy at its newest evaluated "
              "iteration; win rate: pairwise against the base model, ties count half; capability Δ: "
              "lm-eval policy - baseline, mean over tasks of each task's main metric (`n/a`: the run was "
              "not evaluated; `make ablations EVAL=1`). Judge failure rate: share of judgements without "
              "a parseable verdict, mean over steps. s / step: median wall time of one GRPO step.", ""]
    for axis in by_axis(records):
        lines += [f"## {axis}", ""]
        if axis in AXIS_NOTES:
            lines += [f"Note: {AXIS_NOTES[axis]}.", ""]
        if axis in plots:
            lines += [f"![reward per step, {axis}]({plots[axis]})", ""]
    lines += ["## CA score vs capability", ""]
    if "ca_vs_capability" in plots:
        lines += [f"![CA score vs capability delta]({plots['ca_vs_capability']})", ""]
    else:
        lines += [f"{NA}: no run has both a CA score and a capability delta "
                  "(run `make ablations EVAL=1`).", ""]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_reward_curves(axis: str, runs: Sequence[RunRecord], path: Path) -> None:
    """Mean reward per step, one line per value of the axis."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, run in enumerate(runs):
        label = run.value if _finite(run.rewards) else f"{run.value} (no finite reward)"
        # runs that share their first steps overlap exactly: shrinking markers and varied dashes keep
        # every line visible
        ax.plot(run.steps, run.rewards, marker=MARKERS[i % len(MARKERS)], markersize=max(9 - 1.5 * i, 3),
                linestyle=LINESTYLES[i % len(LINESTYLES)], label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"ablation {axis}: reward per step")
    ax.set_xlabel("global step")
    ax.set_ylabel("mean judge reward")
    ax.grid(alpha=0.3)
    if runs:
        ax.legend(title=axis, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ca_vs_capability(records: Sequence[RunRecord], path: Path) -> bool:
    """CA score against capability delta, one point per evaluated run, a colour per axis."""
    points = [r for r in records if not math.isnan(r.ca_score) and not math.isnan(r.capability_delta)]
    if not points:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for axis, runs in by_axis(points).items():
        xs, ys = [r.capability_delta for r in runs], [r.ca_score for r in runs]
        ax.scatter(xs, ys, label=axis)
        for r in runs:
            ax.annotate(r.value, (r.capability_delta, r.ca_score), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("capability Δ (lm-eval, policy - base)")
    ax.set_ylabel("CA score (external judge)")
    ax.set_title("alignment vs capability")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(records: Sequence[RunRecord], plots_dir: Path) -> dict[str, str]:
    """Every plot; returns {axis or "ca_vs_capability": path relative to the report}."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for axis, runs in by_axis(records).items():
        plot_reward_curves(axis, runs, plots_dir / f"reward_{axis}.png")
        written[axis] = f"{plots_dir.name}/reward_{axis}.png"
    if plot_ca_vs_capability(records, plots_dir / "ca_vs_capability.png"):
        written["ca_vs_capability"] = f"{plots_dir.name}/ca_vs_capability.png"
    return written


def build_report(roots: Sequence[Path], out_dir: Path, *, wandb_path: str | None = None,
                 title: str | None = None) -> list[RunRecord]:
    """Read the runs, write ``report.md``, ``report.csv`` and ``plots/`` into ``out_dir``."""
    records = local_records(roots)
    if wandb_path:
        records = merge_records(records, wandb_records(wandb_path))
    records = sort_records(records)
    if not records:
        where = ", ".join(map(str, roots)) + (f" nor in W&B {wandb_path}" if wandb_path else "")
        raise FileNotFoundError(f"no runs under {where} (a run directory has .hydra/overrides.yaml)")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(records, out_dir / "report.csv")
    plots = write_plots(records, out_dir / "plots")
    sources = [str(r) for r in roots] + ([f"wandb:{wandb_path}"] if wandb_path else [])
    title = title or f"Ablations: {roots[0].name}"
    (out_dir / "report.md").write_text(render_markdown(records, plots, title=title, sources=sources) + "\n",
                                       encoding="utf-8")
    return records


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dynalign.report", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="directories holding run directories "
                        "(e.g. multirun/ablations/tiny); searched recursively")
    parser.add_argument("--out", type=Path, default=None,
                        help="report directory (default: reports/ablations/<name of the first RUNS>)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", default=None,
                        help="also read the ablation-* groups of this W&B project (needs network and a key)")
    parser.add_argument("--title", default=None, help="the report's heading")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    out = args.out or Path("reports") / "ablations" / args.runs[0].resolve().name
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


if __name__ == "__main__":
    raise SystemExit(main())
