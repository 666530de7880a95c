"""The report's plots: reward per step for each axis (bands over seeds), CA score against capability."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dynalign.eval.stats import Interval, seed_prompt_interval, step_bands
from dynalign.report.compare import AxisSummary, ValueSummary
from dynalign.report.records import finite

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


Series = tuple[str, Sequence[int], Sequence[float]]  # (label, steps, values)
Band = tuple[str, Sequence[int], np.ndarray, np.ndarray, np.ndarray]  # (label, steps, mean, low, high)


def _finish(plt, fig, ax, path: Path, *, title: str, ylabel: str, legend_title: str | None, legend: bool,
            title_size: str | None = None) -> None:
    """Integer steps on x, the labels, a grid and the legend; saved to ``path`` and closed."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=title_size)
    ax.set_xlabel("global step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(title=legend_title, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lines(series: Sequence[Series], path: Path, *, title: str, ylabel: str,
               legend_title: str | None = None) -> None:
    """One line per series against the global step, saved to ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (label, steps, values) in enumerate(series):
        # lines that share their first steps overlap exactly: shrinking markers and varied dashes keep
        # every line visible
        ax.plot(steps, values, marker=MARKERS[i % len(MARKERS)], markersize=max(9 - 1.5 * i, 3),
                linestyle=LINESTYLES[i % len(LINESTYLES)], label=label)
    _finish(plt, fig, ax, path, title=title, ylabel=ylabel, legend_title=legend_title,
            legend=bool(series))


def plot_bands(series: Sequence[Band], path: Path, *, title: str, ylabel: str,
               legend_title: str | None = None) -> None:
    """One line per series (its mean) with a shaded band (its interval, where there is one)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (label, steps, mean, low, high) in enumerate(series):
        (line,) = ax.plot(steps, mean, marker=MARKERS[i % len(MARKERS)], markersize=max(9 - 1.5 * i, 3),
                          linestyle=LINESTYLES[i % len(LINESTYLES)], label=label)
        if np.isfinite(low).any():
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.18, linewidth=0)
    _finish(plt, fig, ax, path, title=title, ylabel=ylabel, legend_title=legend_title,
            legend=bool(series), title_size="medium")


def reward_bands(value: ValueSummary) -> Band:
    """A value's reward per step over its seeds: (label, steps, mean, low, high)."""
    steps = sorted({s for r in value.used for s in r.steps})
    curves = np.full((len(value.used), len(steps)), np.nan)  # [seeds, steps]
    column = {s: j for j, s in enumerate(steps)}
    for i, run in enumerate(value.used):
        for s, reward in zip(run.steps, run.rewards, strict=True):
            curves[i, column[s]] = reward
    mean, low, high = step_bands(curves)
    label = f"{value.value} ({value.seeds} seed{'s' * (value.seeds != 1)})"
    if not np.isfinite(mean).any():
        label += ", no finite reward"
    return label, steps, mean, low, high


def plot_reward_curves(axis: AxisSummary, path: Path) -> None:
    """Mean reward per step over seeds, one line and band (95% interval) per value of the axis."""
    seeds = axis.min_seeds
    band = "mean ± 95% interval over seeds" if seeds >= 2 else "one seed: no interval"
    plot_bands([reward_bands(v) for v in axis.values], path, title=f"ablation {axis.axis}: reward per step, "
               f"{band}", ylabel="mean judge reward", legend_title=axis.axis)


def plot_ca_vs_capability(axes: Sequence[AxisSummary], path: Path) -> bool:
    """Per value: CA score against the worst task's capability delta, each with its interval over
    seeds when there is one, a colour per axis; the dashed line is -margin (left of it: degraded)."""
    points = []
    for axis in axes:
        for v in axis.values:
            ca = v.metrics["ca_score"].estimate
            capability = seed_prompt_interval([r.capability_min_delta for r in v.used]) if v.used else None
            if capability is not None and not math.isnan(ca.mean) and not math.isnan(capability.mean):
                points.append((axis.axis, v.value, capability, ca))
    if not points:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    colours: dict[str, str] = {}
    for name, value, x, y in points:
        bars = ax.errorbar(x.mean, y.mean, xerr=_err(x), yerr=_err(y), fmt="o", capsize=3,
                           color=colours.get(name), label=None if name in colours else name)
        colours.setdefault(name, bars[0].get_color())
        ax.annotate(value, (x.mean, y.mean), fontsize=7, xytext=(3, 3), textcoords="offset points")
    margins = finite(r.capability_margin for axis in axes for v in axis.values for r in v.used)
    if margins:
        ax.axvline(-margins[0], color="grey", linewidth=0.8, linestyle="--")
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("worst task's capability Δ (lm-eval, policy - base; positive = better)")
    ax.set_ylabel("CA score (external judge)")
    ax.set_title("alignment vs capability (mean over seeds, 95% intervals)", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _err(interval: Interval) -> list[list[float]] | None:
    if math.isnan(interval.low):
        return None
    return [[interval.mean - interval.low], [interval.high - interval.mean]]


def write_plots(axes: Sequence[AxisSummary], plots_dir: Path) -> dict[str, str]:
    """Every plot; returns {axis or "ca_vs_capability": path relative to the report}."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for axis in axes:
        plot_reward_curves(axis, plots_dir / f"reward_{axis.axis}.png")
        written[axis.axis] = f"{plots_dir.name}/reward_{axis.axis}.png"
    if plot_ca_vs_capability(axes, plots_dir / "ca_vs_capability.png"):
        written["ca_vs_capability"] = f"{plots_dir.name}/ca_vs_capability.png"
    return written
