"""The report's plots: reward per step for each axis, CA score against capability."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from dynalign.report.records import RunRecord, by_axis, finite

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


Series = tuple[str, Sequence[int], Sequence[float]]  # (label, steps, values)


def plot_lines(series: Sequence[Series], path: Path, *, title: str, ylabel: str,
               legend_title: str | None = None) -> None:
    """One line per series against the global step, saved to ``path``."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (label, steps, values) in enumerate(series):
        # lines that share their first steps overlap exactly: shrinking markers and varied dashes keep
        # every line visible
        ax.plot(steps, values, marker=MARKERS[i % len(MARKERS)], markersize=max(9 - 1.5 * i, 3),
                linestyle=LINESTYLES[i % len(LINESTYLES)], label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel("global step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(title=legend_title, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reward_curves(axis: str, runs: Sequence[RunRecord], path: Path) -> None:
    """Mean reward per step, one line per value of the axis."""
    series = [(run.value if finite(run.rewards) else f"{run.value} (no finite reward)", run.steps,
               run.rewards) for run in runs]
    plot_lines(series, path, title=f"ablation {axis}: reward per step", ylabel="mean judge reward",
               legend_title=axis)


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
