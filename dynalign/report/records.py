"""The report's records: one :class:`RunRecord` per run, read from its directory or from W&B."""

from __future__ import annotations

import json
import math
import os
import statistics
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dynalign.config import EXPERIMENTS_DIR, EvalConfig
from dynalign.eval.report import RESULTS_FILE, SAMPLES_FILE
from dynalign.eval.stats import NOT_SHOWN, OUTCOME_POINTS, VERDICT_CODES, capability_summary
from dynalign.rundir import RunDir

GROUP_PREFIX = "ablation-"
ABLATION_FILE_PREFIX = "ablation_"  # experiments/ablation_<axis>.yaml defines axis <axis>
REWARD_KEYS = ("reward/mean", "judge/reward_mean")  # first one present wins
FAILURE_KEY = "judge/parse_failure_rate"
STEP_TIME_KEY = "time/step"
SEED_KEY = "seed"  # the training seed: runs of one value with different seeds are its replicates
VERDICTS = {code: name for name, code in VERDICT_CODES.items()}


@dataclass
class RunRecord:
    """One run of an ablation, as the report sees it (NaN: not measured)."""

    axis: str
    value: str
    run: str  # the run directory (local) or W&B path
    source: str = "local"  # local | wandb
    status: str = "done"  # done | preempted | incomplete (no summary) | failed (no metrics)
    order: int = 0  # the job number in its sweep: rows of an axis keep the sweep's order
    seed: int | None = None  # the run's training seed (None: unknown)
    steps: list[int] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)  # [steps] mean reward per step
    final_reward: float = math.nan  # summary.json's (the last step's mean reward)
    ca_score: float = math.nan
    win_rate: float = math.nan
    # per eval prompt id: the external judge's CA score of the policy's answer, and the pairwise
    # outcome as points (win 1, tie 0.5, loss 0); empty when the samples file is not there
    ca_by_prompt: dict[str, float] = field(default_factory=dict)
    win_by_prompt: dict[str, float] = field(default_factory=dict)
    capability: str | None = None  # preserved | not shown | degraded (None: no lm-eval)
    capability_min_delta: float = math.nan  # the worst task's delta (positive = better)
    capability_margin: float = math.nan
    judge_failure_rate: float = math.nan
    time_per_step_s: float = math.nan
    eval_iteration: int | None = None
    keys: tuple[str, ...] = ()  # the config keys whose values make ``value`` (the swept ones)
    model: str = ""  # the policy's model.name_or_path

    def cell(self, column: str) -> Any:
        return len(self.steps) if column == "steps" else getattr(self, column)


# ------------------------------------------------------------------ small readers


def as_number(value: Any) -> float:
    """A float, or NaN for None / non-numbers (JSON writes NaN as null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def _mean(values: Iterable[float]) -> float:
    kept = finite(values)
    return statistics.fmean(kept) if kept else math.nan


def nan_median(values: Iterable[float]) -> float:
    kept = finite(values)
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


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else None


def dig(node: Any, *keys: str) -> Any:
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


def value_keys(overrides: Mapping[str, str], swept: Sequence[str]) -> list[str]:
    """The keys a run's value is made of: the swept ones it overrides, else (a run started by
    hand) its command-line overrides minus the experiment. Never the seed: runs that differ
    only in their seed are replicates of one value."""
    keys = [k for k in swept if k in overrides] or [k for k in overrides if k != "experiment"]
    return [k for k in keys if k != SEED_KEY]


def value_of(overrides: Mapping[str, str], swept: Sequence[str]) -> str:
    """The run's value on its axis: the swept keys' values (``k=v`` pairs when several)."""
    keys = value_keys(overrides, swept)
    if len(keys) == 1 and keys[0] in swept:
        return overrides[keys[0]]
    return ",".join(f"{k}={overrides[k]}" for k in keys) or "default"


# ------------------------------------------------------------------ evaluation results


def capability_of(results: Mapping[str, Any]) -> dict[str, Any]:
    """The capability test of one ``eval_results.json``: its own ``capability`` section, else
    (results written before it existed) the test of its lm-eval numbers at the default margin."""
    section = results.get("capability")
    if section:
        return dict(section)
    lm_eval = results.get("lm_eval") or {}
    if not lm_eval.get("policy") or not lm_eval.get("baseline"):
        return {}
    return capability_summary(lm_eval["policy"], lm_eval["baseline"], tasks=lm_eval.get("tasks"),
                              margin=EvalConfig().capability_margin)


def eval_numbers(results: Mapping[str, Any]) -> dict[str, Any]:
    """CA score, win rate and the capability test's verdict, worst delta and margin of one
    ``eval_results.json``."""
    capability = capability_of(results)
    deltas = [as_number(t.get("delta")) for t in (capability.get("tasks") or {}).values()]
    return {"ca_score": as_number(dig(results, "pointwise", "policy", "overall", "mean")),
            "win_rate": as_number(dig(results, "pairwise", "win_rate")),
            "capability": capability.get("verdict") if capability.get("tasks") else None,
            "capability_min_delta": min(finite(deltas), default=math.nan),
            "capability_margin": as_number(capability.get("margin"))}


def prompt_scores(samples: Sequence[Mapping[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    """Per prompt of ``eval_samples.jsonl``: the policy's external CA score and the pairwise
    outcome's points (a failed pair, or a judgement without a score, is NaN)."""
    ca, win = {}, {}
    for i, row in enumerate(samples):
        key = str(row.get("id", i))
        ca[key] = as_number(row.get("external_score"))
        if "pairwise" in row:
            win[key] = OUTCOME_POINTS.get(str(row["pairwise"]), math.nan)
    return ca, win


def latest_eval_dir(run_dir: Path) -> tuple[int, Path] | None:
    """``(k, eval/iter_<k>/)`` of the newest evaluation of a run that wrote its results, if any."""
    found = RunDir(run_dir).evaluations(RESULTS_FILE)
    return found[-1] if found else None


def latest_eval(run_dir: Path) -> tuple[int, dict[str, Any]] | None:
    """``(k, results)`` of the newest ``eval/iter_<k>/eval_results.json`` of a run, if any."""
    found = latest_eval_dir(run_dir)
    if found is None:
        return None
    k, path = found
    return k, json.loads((path / RESULTS_FILE).read_text(encoding="utf-8"))


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


def run_status(metrics: list[dict[str, Any]], summary: Mapping[str, Any] | None) -> str:
    if summary is not None:
        return "preempted" if summary.get("preempted") else "done"
    return "incomplete" if metrics else "failed"


def _job_number(run_dir: Path, hydra: Any) -> int:
    num = dig(hydra, "hydra", "job", "num")
    if isinstance(num, int):
        return num
    head = run_dir.name.split("_", 1)[0]
    return int(head) if head.isdigit() else 0


def read_local_run(run_dir: Path) -> RunRecord:
    """A :class:`RunRecord` from a run directory's own files."""
    config = read_yaml(run_dir / ".hydra" / "config.yaml") or {}
    hydra = read_yaml(run_dir / ".hydra" / "hydra.yaml")
    overrides = parse_overrides(read_yaml(run_dir / ".hydra" / "overrides.yaml") or [])
    swept = list(dig(hydra, "hydra", "sweeper", "params") or {})
    files = RunDir(run_dir)
    metrics = read_jsonl(files.metrics)
    summary = json.loads(files.summary.read_text(encoding="utf-8")) if files.summary.exists() else None
    record = RunRecord(axis=axis_of(dig(config, "logger", "group"), run_dir.parent),
                       value=value_of(overrides, swept), run=str(run_dir),
                       status=run_status(metrics, summary), order=_job_number(run_dir, hydra),
                       seed=_seed(config.get(SEED_KEY), overrides.get(SEED_KEY)),
                       keys=tuple(value_keys(overrides, swept)),
                       model=str(dig(config, "model", "name_or_path") or ""))
    fill_from_metrics(record, metrics, summary or {})
    evaluated = latest_eval_dir(run_dir)
    if evaluated is not None:
        k, path = evaluated
        record.eval_iteration = k
        results = json.loads((path / RESULTS_FILE).read_text(encoding="utf-8"))
        for name, value in eval_numbers(results).items():
            setattr(record, name, value)
        record.ca_by_prompt, record.win_by_prompt = prompt_scores(read_jsonl(path / SAMPLES_FILE))
    return record


def _seed(*candidates: Any) -> int | None:
    """The first candidate that is a whole number (the config's ``seed``, then the override)."""
    for value in candidates:
        try:
            return int(str(value))
        except ValueError:
            continue
    return None


def fill_from_metrics(record: RunRecord, metrics: Sequence[Mapping[str, Any]],
                      summary: Mapping[str, Any]) -> None:
    """Reward curve, final reward, judge failure rate and step time from per-step records."""
    key = reward_key(metrics)
    steps = [m for m in metrics if "step" in m and (key is None or key in m)]
    record.steps = [int(m["step"]) for m in steps]
    record.rewards = [as_number(m.get(key)) if key else math.nan for m in steps]
    final = as_number(summary.get("final_reward"))
    record.final_reward = final if not math.isnan(final) or not record.rewards else record.rewards[-1]
    record.judge_failure_rate = _mean(as_number(m.get(FAILURE_KEY)) for m in steps)
    record.time_per_step_s = nan_median(as_number(m.get(STEP_TIME_KEY)) for m in steps)


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
    config = dict(getattr(run, "config", None) or {})
    seed = _seed(config.get(SEED_KEY), overrides.pop(SEED_KEY, None))
    value = next(iter(overrides.values())) if len(overrides) == 1 else \
        ",".join(f"{k}={v}" for k, v in overrides.items()) or str(run.name)
    record = RunRecord(axis=axis_of(run.group), value=value, run="/".join(map(str, run.path)),
                       source="wandb", status=WANDB_STATES.get(run.state, run.state), seed=seed,
                       keys=tuple(overrides), model=str(dig(config, "model", "name_or_path") or ""))
    summary = dict(run.summary)
    # the tracker logs with step=global_step, so W&B's _step is the run's step
    history = [{**row, "step": row["_step"]} for row in run.scan_history() if "_step" in row]
    fill_from_metrics(record, history, summary)
    record.ca_score = as_number(summary.get("eval/ca/policy/overall/mean"))
    record.win_rate = as_number(summary.get("eval/pairwise/win_rate"))
    code = summary.get("eval/capability/verdict_code")
    record.capability = None
    if isinstance(code, (int, float)) and not isinstance(code, bool) and math.isfinite(code):
        record.capability = VERDICTS.get(int(code), NOT_SHOWN)
    deltas = [as_number(v) for k, v in summary.items()
              if str(k).startswith("eval/capability/tasks/") and str(k).endswith("/delta")]
    record.capability_min_delta = min(finite(deltas), default=math.nan)
    record.capability_margin = as_number(summary.get("eval/capability/margin"))
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
    """Local runs, plus the W&B runs whose (axis, value, seed) no local run has."""
    seen = {(r.axis, r.value, r.seed) for r in local}
    return list(local) + [r for r in remote if (r.axis, r.value, r.seed) not in seen]


def ablation_axes(experiments_dir: Path = EXPERIMENTS_DIR) -> list[str]:
    """The axes the suite defines, one per ``experiments/ablation_<axis>.yaml``, sorted."""
    return sorted(p.stem.removeprefix(ABLATION_FILE_PREFIX)
                  for p in experiments_dir.glob(f"{ABLATION_FILE_PREFIX}*.yaml"))


def sort_records(records: Iterable[RunRecord]) -> list[RunRecord]:
    """The suite's axes first (by name), then any other sweep; within an axis, the sweep's order."""
    axes = ablation_axes()

    def key(r: RunRecord) -> tuple[bool, str, int, str, int]:
        return r.axis not in axes, r.axis, r.order, r.value, -1 if r.seed is None else r.seed

    return sorted(records, key=key)


def by_axis(records: Iterable[RunRecord]) -> dict[str, list[RunRecord]]:
    axes: dict[str, list[RunRecord]] = {}
    for record in sort_records(records):
        axes.setdefault(record.axis, []).append(record)
    return axes


