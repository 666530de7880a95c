"""``python -m dynalign.report.run RUN_DIR --out OUT_DIR``: the report of one training run.

It reads what the run left behind (``metrics.jsonl``, ``summary.json``, ``.hydra/config.yaml``;
see :class:`dynalign.rundir.RunDir`) and one evaluation of it: ``--eval EVAL_DIR`` (the output
directory of ``python -m dynalign.evaluate checkpoint=RUN_DIR``), else the run's own newest
``eval/iter_<k>/`` when it evaluated itself during training. It writes into ``OUT_DIR``:

    report.md         settings, reward per step (mean, std, each rubric aspect), phase timings,
                      the evaluation against the base model (CA score, pairwise win rate, lm-eval),
                      judge failure rates and a few base/policy answers to the same prompts
    report.json       the same numbers (missing values as null)
    plots/reward.png  mean reward per step; plots/aspects.png: one line per rubric aspect

Reading builds a :class:`RunReport` from the files; rendering and the JSON are pure functions of it.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from dynalign.eval.report import RESULTS_FILE, SAMPLES_FILE, jsonable
from dynalign.report.plots import plot_lines
from dynalign.report.records import (
    FAILURE_KEY,
    STEP_TIME_KEY,
    RunRecord,
    as_number,
    dig,
    fill_from_metrics,
    nan_median,
    read_jsonl,
    read_yaml,
    reward_key,
    run_status,
)
from dynalign.report.render import NA, fmt
from dynalign.rundir import RunDir

REWARD_STD_KEY = "judge/reward_std"
TIME_PREFIX = "time/"
DEFAULT_SAMPLES = 3
MAX_TABLE_ROWS = 50  # longer runs show every k-th step in report.md (report.json keeps them all)
MAX_ANSWER_CHARS = 600  # an answer cell in report.md is cut here (report.json keeps it whole)
PLOT_TITLES = {"reward": "mean reward per step", "aspects": "mean score of each aspect per step"}


# ------------------------------------------------------------------ the report, as data


@dataclass(frozen=True)
class RunSettings:
    """The run's key settings, read from ``.hydra/config.yaml`` (None: not in the config)."""

    model: str | None
    lora: str  # "off", or "r=16, alpha=32"
    judge_source: str | None  # self | frozen | external (with its backend:model)
    judge_mode: str | None
    rubric: str | None
    iterations: int | None
    steps_per_iteration: int | None
    prompts_per_step: int | None
    group_size: int | None
    lr: float | None
    loss_type: str | None
    kl_beta: float | None


@dataclass(frozen=True)
class StepRow:
    """One logged GRPO step (NaN: not logged, or no parsed reward)."""

    step: int
    iteration: int | None  # from 1: the steps of iteration k made iter_<k>/ (the loop logs k - 1)
    reward: float
    reward_std: float
    aspects: dict[str, float]  # aspect -> mean score over the step's answers
    judge_failure_rate: float


@dataclass(frozen=True)
class PhaseTiming:
    """Wall seconds of one timed phase (``time/<phase>``), over every step that logged it."""

    phase: str
    median_s: float
    total_s: float
    count: int


@dataclass(frozen=True)
class Interval:
    mean: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class LmEvalRow:
    task: str
    metric: str
    policy: float
    baseline: float
    delta: float


@dataclass(frozen=True)
class SamplePair:
    """The base model's and the policy's answer to one evaluation prompt."""

    prompt: str
    baseline_answer: str | None
    policy_answer: str
    baseline_score: float
    policy_score: float
    pairwise: str | None  # the policy's outcome: win | tie | loss | failed


@dataclass(frozen=True)
class Evaluation:
    """One ``eval_results.json`` (and its ``eval_samples.jsonl``), as the report shows it."""

    source: str  # the evaluation directory
    checkpoint: str
    baseline: str
    iteration: int | None
    judge: str  # backend:model (mode, rubric)
    prompts: int | None
    scale: tuple[float, float] | None
    ca: dict[str, dict[str, Interval]]  # side (policy | baseline) -> "overall" or aspect -> score
    ca_failure_rate: dict[str, float]  # side -> share of answers the external judge left unscored
    pairwise: dict[str, float]  # win_rate, ci_low, ci_high, wins, ties, losses, failed, failure_rate
    lm_eval: list[LmEvalRow]
    samples: list[SamplePair]
    warnings: list[str]


@dataclass(frozen=True)
class RunReport:
    title: str
    run_dir: str
    status: str  # done | preempted | incomplete (no summary) | failed (no metrics)
    settings: RunSettings
    aspects: list[str]
    steps: list[StepRow]
    final_reward: float
    judge_failure_rate: float  # training judge: mean over steps of judge/parse_failure_rate
    time_per_step_s: float  # median over steps of time/step
    timings: list[PhaseTiming]
    evaluation: Evaluation | None
    not_evaluated: str | None = None  # why there is no evaluation
    plots: dict[str, str] = field(default_factory=dict)  # name -> path relative to the report


# ------------------------------------------------------------------ pure builders


def run_settings(config: Mapping[str, Any]) -> RunSettings:
    """The settings a reader needs to place the run, from its composed config."""
    lora = dig(config, "model", "lora") or {}
    source = dig(config, "judge", "source")
    if source == "external":
        external = dig(config, "judge", "external") or {}
        source = f"external ({external.get('backend')}:{external.get('model')})"
    return RunSettings(
        model=dig(config, "model", "name_or_path"),
        lora=f"r={lora.get('r')}, alpha={lora.get('alpha')}" if lora.get("enabled") else "off",
        judge_source=source, judge_mode=dig(config, "judge", "mode"),
        rubric=dig(config, "judge", "rubric", "name"),
        iterations=dig(config, "iterations"), steps_per_iteration=dig(config, "steps_per_iteration"),
        prompts_per_step=dig(config, "grpo", "prompts_per_step"),
        group_size=dig(config, "grpo", "group_size"),
        lr=dig(config, "grpo", "lr"), loss_type=dig(config, "grpo", "loss_type"),
        kl_beta=dig(config, "grpo", "beta"))


def aspect_names(config: Mapping[str, Any], metrics: Sequence[Mapping[str, Any]]) -> list[str]:
    """The rubric's aspects that were logged (``judge/<aspect>_mean``), in the rubric's order.

    Without a rubric in the config, every ``judge/<name>_mean`` logged with a ``judge/<name>_std``
    beside it but the reward's own (``score_mass_mean`` has no std: it is not an aspect).
    """
    logged = {key[len("judge/"):-len("_mean")] for m in metrics for key in m
              if key.startswith("judge/") and key.endswith("_mean")}
    rubric = [a.get("name") for a in dig(config, "judge", "rubric", "aspects") or []
              if isinstance(a, Mapping)]
    if rubric:
        return [name for name in rubric if name in logged]
    with_std = {name for name in logged if any(f"judge/{name}_std" in m for m in metrics)}
    return sorted(with_std - {"reward"})


def _iteration(logged: Any) -> int | None:
    """The loop logs the iteration from 0; the report counts from 1, like ``iter_<k>/``."""
    number = as_number(logged)
    return None if math.isnan(number) else int(number) + 1


def step_rows(metrics: Sequence[Mapping[str, Any]], aspects: Sequence[str]) -> list[StepRow]:
    """One row per logged training step (the lines with a reward; evaluations log lines without)."""
    key = reward_key(metrics)
    if key is None:
        return []
    return [StepRow(step=int(m["step"]), iteration=_iteration(m.get("iteration")),
                    reward=as_number(m.get(key)), reward_std=as_number(m.get(REWARD_STD_KEY)),
                    aspects={a: as_number(m.get(f"judge/{a}_mean")) for a in aspects},
                    judge_failure_rate=as_number(m.get(FAILURE_KEY)))
            for m in metrics if "step" in m and key in m]


def phase_timings(metrics: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> list[PhaseTiming]:
    """Median and total of every ``time/<phase>`` over the steps that logged it, ``step`` first.

    Phases around the steps (prompts, export, checkpoint, eval) ride on the next step's line; the
    last iteration's are in ``summary.json``, so they are counted from there.
    """
    values: dict[str, list[float]] = {}
    for record in [*metrics, summary]:
        for key, value in record.items():
            number = as_number(value)
            if key.startswith(TIME_PREFIX) and not math.isnan(number):
                values.setdefault(key[len(TIME_PREFIX):], []).append(number)
    # the whole step first, then the phases as the loop first logged them
    order = sorted(values, key=lambda phase: phase != STEP_TIME_KEY[len(TIME_PREFIX):])
    return [PhaseTiming(p, nan_median(values[p]), math.fsum(values[p]), len(values[p])) for p in order]


def _interval(stat: Any) -> Interval:
    return Interval(*(as_number(dig(stat, key)) for key in ("mean", "ci_low", "ci_high")))


def _ca_scores(pointwise: Mapping[str, Any]) -> dict[str, dict[str, Interval]]:
    scores = {}
    for side in ("policy", "baseline"):
        summary = pointwise.get(side)
        if isinstance(summary, Mapping):
            aspects = summary.get("aspects") or {}
            scores[side] = {"overall": _interval(summary.get("overall")),
                            **{name: _interval(stat) for name, stat in aspects.items()}}
    return scores


def lm_eval_rows(lm_eval: Mapping[str, Any]) -> list[LmEvalRow]:
    """Every task metric of the policy (standard errors left out) beside the baseline's and the delta."""
    baseline, delta = lm_eval.get("baseline") or {}, lm_eval.get("delta") or {}
    return [LmEvalRow(task, metric, as_number(value), as_number(dig(baseline, task, metric)),
                      as_number(dig(delta, task, metric)))
            for task, metrics in (lm_eval.get("policy") or {}).items()
            for metric, value in metrics.items() if "_stderr" not in metric]


def sample_pairs(rows: Sequence[Mapping[str, Any]], n: int) -> list[SamplePair]:
    """The first ``n`` evaluation prompts, the base model's answer beside the policy's."""
    return [SamplePair(prompt=str(row.get("prompt", "")), baseline_answer=row.get("baseline_answer"),
                       policy_answer=str(row.get("policy_answer", "")),
                       baseline_score=as_number(row.get("baseline_external_score")),
                       policy_score=as_number(row.get("external_score")), pairwise=row.get("pairwise"))
            for row in rows[:max(n, 0)] if "policy_answer" in row]


def evaluation_summary(results: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], *, source: str,
                       samples: int = DEFAULT_SAMPLES) -> Evaluation:
    """What the report shows of one evaluation."""
    pointwise = results.get("pointwise") or {}
    judge = results.get("judge") or {}
    scale = dig(pointwise, "policy", "scale")
    pairwise = results.get("pairwise") or {}
    keys = ("win_rate", "ci_low", "ci_high", "wins", "ties", "losses", "failed", "failure_rate")
    return Evaluation(
        source=source, checkpoint=str(results.get("checkpoint", NA)),
        baseline=str(results.get("baseline", NA)), iteration=results.get("iteration"),
        judge=f"{judge.get('backend')}:{judge.get('model')} ({judge.get('mode')} mode, rubric "
              f"{judge.get('rubric')})" if judge else NA,
        prompts=dig(results, "prompts", "total"),
        scale=(float(scale[0]), float(scale[1])) if isinstance(scale, list) and len(scale) == 2 else None,
        ca=_ca_scores(pointwise),
        ca_failure_rate={side: as_number(dig(pointwise, side, "failure_rate"))
                         for side in ("policy", "baseline") if side in pointwise},
        pairwise={k: as_number(pairwise.get(k)) for k in keys} if pairwise else {},
        lm_eval=lm_eval_rows(results.get("lm_eval") or {}),
        samples=sample_pairs(rows, samples), warnings=[str(w) for w in results.get("warnings") or []])


# ------------------------------------------------------------------ reading


def find_evaluation(run_dir: Path, eval_dir: Path | None) -> Path | None:
    """``eval_dir`` when given (it must hold eval_results.json), else the run's newest own evaluation."""
    if eval_dir is not None:
        if not (eval_dir / RESULTS_FILE).is_file():
            raise FileNotFoundError(f"--eval {eval_dir} holds no {RESULTS_FILE} (give the output directory "
                                    "of python -m dynalign.evaluate)")
        return eval_dir
    found = RunDir(run_dir).evaluations(RESULTS_FILE)
    return found[-1][1] if found else None


def read_run_report(run_dir: Path, eval_dir: Path | None = None, *, samples: int = DEFAULT_SAMPLES,
                    title: str | None = None) -> RunReport:
    """A :class:`RunReport` from a run directory's files and one evaluation (see :func:`find_evaluation`)."""
    files = RunDir(run_dir)
    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file() and not files.metrics.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no .hydra/config.yaml, no metrics.jsonl)")
    config = read_yaml(config_file) or {}
    metrics = read_jsonl(files.metrics)
    summary = json.loads(files.summary.read_text(encoding="utf-8")) if files.summary.exists() else None
    headline = RunRecord(axis="", value="", run=str(run_dir))
    fill_from_metrics(headline, metrics, summary or {})  # final reward, failure rate, s / step
    aspects = aspect_names(config, metrics)
    found = find_evaluation(run_dir, eval_dir)
    evaluation = None
    if found is not None:
        results = json.loads((found / RESULTS_FILE).read_text(encoding="utf-8"))
        evaluation = evaluation_summary(results, read_jsonl(found / SAMPLES_FILE), source=str(found),
                                        samples=samples)
    not_evaluated = None if found else (
        f"not evaluated: {run_dir} has no eval/iter_<k>/{RESULTS_FILE}. Evaluate it with `python -m "
        f"dynalign.evaluate checkpoint={run_dir}`, then pass that output directory as `--eval`.")
    return RunReport(title=title or f"Run report: {run_dir.name}", run_dir=str(run_dir),
                     status=run_status(metrics, summary), settings=run_settings(config), aspects=aspects,
                     steps=step_rows(metrics, aspects), final_reward=headline.final_reward,
                     judge_failure_rate=headline.judge_failure_rate,
                     time_per_step_s=headline.time_per_step_s, timings=phase_timings(metrics, summary or {}),
                     evaluation=evaluation, not_evaluated=not_evaluated)


# ------------------------------------------------------------------ report.json


def report_json(report: RunReport) -> dict[str, Any]:
    """Every number of the report; NaN as null (JSON has no NaN)."""
    return jsonable(asdict(report))


# ------------------------------------------------------------------ report.md


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _cell(text: str | None, limit: int = MAX_ANSWER_CHARS) -> str:
    """Text made safe for one markdown table cell: escaped, newlines as <br>, cut at ``limit``."""
    if text is None:
        return NA
    if not text.strip():
        return f"*(whitespace only, {len(text)} characters)*"
    cut = text if len(text) <= limit else text[:limit] + " …"
    return html.escape(cut.strip(), quote=False).replace("|", "\\|").replace("\n", "<br>")


def _with_ci(value: Interval | None) -> str:
    if value is None:
        return NA
    return f"{fmt(value.mean)} [{fmt(value.ci_low)}, {fmt(value.ci_high)}]"


def _shown_steps(steps: Sequence[StepRow]) -> list[StepRow]:
    """Every step, or every k-th (and the last) when there are more than MAX_TABLE_ROWS."""
    stride = math.ceil(len(steps) / MAX_TABLE_ROWS) if steps else 1
    shown = list(steps[::stride])
    return shown if not steps or shown[-1] is steps[-1] else [*shown, steps[-1]]


def _general(value: Any) -> str:
    """A hyperparameter as written (1e-05, 0.04), not rounded to table digits."""
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else fmt(value)


def _settings_section(s: RunSettings) -> list[str]:
    answers = (s.prompts_per_step * s.group_size if isinstance(s.prompts_per_step, int)
               and isinstance(s.group_size, int) else None)
    rows = [("model", f"`{s.model}`" if s.model else NA), ("LoRA", s.lora),
            ("judge", f"{fmt(s.judge_source)}, {fmt(s.judge_mode)} mode"), ("rubric", fmt(s.rubric)),
            ("iterations × steps", f"{fmt(s.iterations)} × {fmt(s.steps_per_iteration)}"),
            ("prompts per step × group size", f"{fmt(s.prompts_per_step)} × {fmt(s.group_size)}"
             + (f" = {answers} answers" if answers is not None else "")),
            ("learning rate", _general(s.lr)), ("loss, KL β", f"{fmt(s.loss_type)}, {_general(s.kl_beta)}")]
    return ["## Settings", "", *_table(("setting", "value"), rows), ""]


def _reward_section(report: RunReport) -> list[str]:
    lines = ["## Reward per step", ""]
    if not report.steps:
        return lines + [f"{NA}: no step was logged (metrics.jsonl is missing or has no reward): the run "
                        "did not train.", ""]
    lines += [f"![{PLOT_TITLES.get(name, name)}]({path})" for name, path in report.plots.items()] + [""]
    shown = _shown_steps(report.steps)
    if len(shown) < len(report.steps):
        lines += [f"{len(shown)} of {len(report.steps)} steps, evenly spaced (all of them in report.json).",
                  ""]
    header = ("step", "iteration", "reward", "reward std", *report.aspects, "judge failure rate")
    rows = [(str(r.step), fmt(r.iteration), fmt(r.reward), fmt(r.reward_std),
             *(fmt(r.aspects.get(a, math.nan)) for a in report.aspects), fmt(r.judge_failure_rate))
            for r in shown]
    lines += _table(header, rows) + [""]
    if not report.aspects:
        lines += ["No per-aspect score was logged (no `judge/<aspect>_mean` metric).", ""]
    return lines + [f"Final reward {fmt(report.final_reward)} (judge scale; summary.json, else the last "
                    "step). Reward std: spread of the step's rewards over its answers.", ""]


def _timings_section(report: RunReport) -> list[str]:
    lines = ["## Phase timings", ""]
    if not report.timings:
        return lines + [f"{NA}: no `time/*` metric was logged.", ""]
    rows = [(f"`{t.phase}`", fmt(t.median_s, 3), fmt(t.total_s, 2), str(t.count)) for t in report.timings]
    return lines + [f"Median time per step: **{fmt(report.time_per_step_s, 2)} s**.", "",
                    *_table(("phase", "median s", "total s", "times measured"), rows),
                    "", "`step` is one whole GRPO step; the phases around the steps (prompts, export, "
                    "checkpoint, eval) are measured once per iteration.", ""]


def _ca_lines(e: Evaluation) -> list[str]:
    if "policy" not in e.ca:
        return [f"CA score: {NA} (no pointwise judgement in the results).", ""]
    scale = f"{e.scale[0]:g}-{e.scale[1]:g}, " if e.scale else ""
    sides = [s for s in ("policy", "baseline") if s in e.ca]
    rows = []
    for name in e.ca["policy"]:
        policy, baseline = e.ca["policy"][name], e.ca.get("baseline", {}).get(name)
        delta = policy.mean - baseline.mean if baseline is not None else math.nan
        label = f"**{name}**" if name == "overall" else name
        rows.append((label, *(_with_ci(e.ca[s].get(name)) for s in sides), fmt(delta)))
    return [f"### CA score (external judge, {scale}mean [95% CI])", "",
            *_table(("", *sides, "Δ (policy - baseline)"), rows), ""]


def _pairwise_lines(e: Evaluation) -> list[str]:
    p = e.pairwise
    if not p:
        return ["### Pairwise vs the base model", "", f"{NA}: not judged pairwise (eval.pairwise=false).", ""]
    counts = ", ".join(f"{fmt(p[k], 0)} {k}" for k in ("wins", "ties", "losses", "failed"))
    return ["### Pairwise vs the base model", "",
            f"Win rate **{fmt(p['win_rate'])}** [{fmt(p['ci_low'])}, {fmt(p['ci_high'])}] ({counts}; ties "
            "count half, failed pairs are left out; both orders judged, orders that disagree are a tie).", ""]


def _lm_eval_lines(e: Evaluation) -> list[str]:
    if not e.lm_eval:
        return ["### Capability (lm-eval)", "", f"{NA}: no lm-eval task was run.", ""]
    rows = [(r.task, f"`{r.metric}`", fmt(r.policy), fmt(r.baseline), fmt(r.delta)) for r in e.lm_eval]
    return ["### Capability (lm-eval)", "", *_table(("task", "metric", "policy", "baseline", "Δ"), rows), ""]


def _inside(path: str, directory: str) -> bool:
    """Whether ``path`` lies under ``directory`` (both resolved against the working directory)."""
    return Path(path).resolve().is_relative_to(Path(directory).resolve())


def _evaluation_section(report: RunReport) -> list[str]:
    lines = ["## Evaluation against the base model", ""]
    e = report.evaluation
    if e is None:
        return lines + [report.not_evaluated or "not evaluated.", ""]
    iteration = "" if e.iteration is None else f" (iteration {e.iteration})"
    lines += [f"- evaluation: `{e.source}`",
              f"- policy: `{e.checkpoint}`{iteration}; base model: `{e.baseline}`",
              f"- external judge: {e.judge}; {fmt(e.prompts)} prompts", ""]
    if not _inside(e.checkpoint, report.run_dir):
        lines += [f"Note: the evaluated policy is not a checkpoint of `{report.run_dir}`.", ""]
    lines += _ca_lines(e) + _pairwise_lines(e) + _lm_eval_lines(e)
    if e.warnings:
        lines += ["Warnings of the evaluation:", "", *(f"- {w}" for w in e.warnings), ""]
    return lines


def _failures_section(report: RunReport) -> list[str]:
    e = report.evaluation
    lines = ["## Judge failures", "",
             f"- training judge: {fmt(report.judge_failure_rate)} of the judgements had no parseable verdict "
             "(mean over steps)"]
    if e is None:
        return lines + ["- external judge: not evaluated", ""]
    for side, rate in e.ca_failure_rate.items():
        lines.append(f"- external judge, {side} answers: {fmt(rate)} left without a score")
    if e.pairwise:
        lines.append(f"- pairwise: {fmt(e.pairwise['failure_rate'])} of the pairs got no verdict in some "
                     "order")
    return lines + [""]


def _samples_section(report: RunReport) -> list[str]:
    e = report.evaluation
    if e is None:
        return []
    lines = ["## Sample answers: base model vs policy", ""]
    if not e.samples:
        return lines + [f"{NA}: the evaluation wrote no samples ({SAMPLES_FILE}).", ""]
    for i, s in enumerate(e.samples, 1):
        outcome = f"; pairwise: policy {s.pairwise}" if s.pairwise else ""
        quoted = "\n".join(f"> {line}" for line in html.escape(s.prompt, quote=False).splitlines() or [""])
        lines += [f"**Prompt {i}**{outcome}", "", quoted, "",
                  *_table((f"base model (CA {fmt(s.baseline_score)})", f"policy (CA {fmt(s.policy_score)})"),
                          [(_cell(s.baseline_answer), _cell(s.policy_answer))]), ""]
    return lines


def render_run_markdown(report: RunReport) -> str:
    """``report.md`` of one run."""
    lines = [f"# {report.title}", "",
             f"Run `{report.run_dir}` ({report.status}, {len(report.steps)} steps logged). Numbers as JSON: "
             "[report.json](report.json).", ""]
    lines += _settings_section(report.settings) + _reward_section(report) + _timings_section(report)
    lines += _evaluation_section(report) + _failures_section(report) + _samples_section(report)
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------ plots and files


def write_run_plots(report: RunReport, plots_dir: Path) -> dict[str, str]:
    """``reward.png`` and (with aspects logged) ``aspects.png``; {name: path relative to the report}."""
    if not report.steps:
        return {}
    plots_dir.mkdir(parents=True, exist_ok=True)
    steps = [r.step for r in report.steps]
    plot_lines([("mean reward", steps, [r.reward for r in report.steps])], plots_dir / "reward.png",
               title=f"{report.title}: reward per step", ylabel="mean judge reward")
    written = {"reward": f"{plots_dir.name}/reward.png"}
    if report.aspects:
        series = [(a, steps, [r.aspects[a] for r in report.steps]) for a in report.aspects]
        plot_lines(series, plots_dir / "aspects.png", title=f"{report.title}: aspects per step",
                   ylabel="mean aspect score", legend_title="aspect")
        written["aspects"] = f"{plots_dir.name}/aspects.png"
    return written


def build_run_report(run_dir: Path, out_dir: Path, *, eval_dir: Path | None = None,
                     samples: int = DEFAULT_SAMPLES, title: str | None = None) -> RunReport:
    """Read the run (and its evaluation), write ``report.md``, ``report.json`` and ``plots/``."""
    report = read_run_report(run_dir, eval_dir, samples=samples, title=title)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = replace(report, plots=write_run_plots(report, out_dir / "plots"))
    (out_dir / "report.json").write_text(json.dumps(report_json(report), indent=2) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(render_run_markdown(report), encoding="utf-8")
    return report


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dynalign.report.run",
                                     description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a training run's directory (metrics.jsonl, .hydra/, ...)")
    parser.add_argument("--eval", type=Path, default=None, dest="eval_dir",
                        help="an evaluation's output directory (python -m dynalign.evaluate checkpoint=RUN); "
                             "default: the run's newest eval/iter_<k>/")
    parser.add_argument("--out", type=Path, required=True, help="the report's directory")
    parser.add_argument("--title", default=None, help="the report's heading (default: the run's name)")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                        help=f"base/policy answer pairs shown (default {DEFAULT_SAMPLES})")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    try:
        report = build_run_report(args.run, args.out, eval_dir=args.eval_dir, samples=args.samples,
                                  title=args.title)
    except FileNotFoundError as err:
        print(f"dynalign.report.run: {err}", file=sys.stderr)
        return 1
    evaluated = report.evaluation.source if report.evaluation else "not evaluated"
    print(f"dynalign.report.run: {len(report.steps)} steps, final reward {fmt(report.final_reward)}, "
          f"evaluation: {evaluated} -> {args.out / 'report.md'}, report.json, plots/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
