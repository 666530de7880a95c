"""``evaluate_policy``: one evaluation of a policy, from the CLI or from the training loop.

Every rank evaluates its share (:mod:`dynalign.eval.shards`: whole chunks of the prompts, and
of the lm-eval tasks); the phases, each timed, load one model at a time:

1. ``eval_policy``: the policy answers the CA prompts; the policy judges its own answers
   with the training rubric (the self-judge, for calibration); lm-eval tasks on the
   consolidated policy (its Hugging Face directory, never a ZeRO shard);
2. ``eval_baseline``: the baseline's answers and lm-eval results (both cached on disk);
3. ``eval_judge``: the external judge scores both sides pointwise and compares every pair
   in both orders;

then rank 0 gathers the shares (``gather``) and computes the statistics (pure functions of
:mod:`dynalign.eval.stats`), the files in ``out_dir``, the tracker's metrics and table, and a
line in the history JSONL, exactly as a single rank would.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from dynalign.config import ConfigError, TrainConfig
from dynalign.distributed import barrier, broadcast_object, gather_object, get_rank, get_world_size
from dynalign.eval import report
from dynalign.eval.answers import (
    Answers,
    answers_cache_key,
    cached_answers,
    generate_answers,
    store_answers,
)
from dynalign.eval.cache import read_cache, write_cache
from dynalign.eval.judging import (
    build_external_judge,
    build_self_judge,
    concat_results,
    free_memory,
    judge_pairs_in_chunks,
    pointwise_summary,
    score_in_chunks,
)
from dynalign.eval.lm_harness import (
    PreparedTasks,
    lm_eval_backend,
    lm_eval_cache_key,
    lm_eval_each,
    metric_deltas,
    prepare_tasks,
)
from dynalign.eval.prompts import EvalPrompt, eval_prompt_set
from dynalign.eval.settings import ResolvedEval, resolve_eval
from dynalign.eval.shards import Share, join, share_of
from dynalign.eval.stats import (
    calibration_stats,
    capability_summary,
    longer_answer_win_rate,
    nan_mean,
    pairwise_summary,
    to_unit_scale,
)
from dynalign.judge import Judge, JudgeResult, PairJudgement
from dynalign.judge.pairwise import order_vote
from dynalign.models import load_hf_sampler
from dynalign.rollout.base import Sampler, SamplingParams, inference_session
from dynalign.rundir import RunDir
from dynalign.runtime import PhaseTimer
from dynalign.tracking import PROMPTS_KEY, SUMMARY_KEY, Tracker


def evaluate_policy(cfg: TrainConfig, policy_path: str | Path | None, *, out_dir: str | Path,
                    iteration: int | None = None, tracker: Tracker | None = None,
                    policy_sampler: Sampler | None = None, self_judge: Judge | None = None,
                    step: int | None = None, history_path: str | Path | None = None) -> dict[str, Any]:
    """Evaluate the policy at ``policy_path`` (a Hugging Face directory); returns the results.

    Called on every rank (the training loop goes through :func:`evaluate_iteration`): each
    rank answers and judges its share of the prompts and runs its share of the lm-eval tasks;
    rank 0 gathers them, writes the files and returns the results, the other ranks return
    ``{}`` once the files are written. ``policy_sampler`` answers and ``self_judge`` (around
    it) judges for calibration on every rank; a ZeRO-3 sampler is gathered once per rank for
    its whole share (:func:`~dynalign.rollout.base.inference_session`). Without them each rank
    that has work loads the policy whole from ``policy_path``. Metrics go to ``tracker`` at
    ``step`` (default ``iteration * steps_per_iteration``, the loop's global step at the end of
    iteration ``iteration``); ``history_path`` (default ``<out_dir>/../eval_history.jsonl``)
    gets one line per evaluation.
    """
    if policy_path is None and (policy_sampler is None or cfg.eval.lm_eval_tasks):
        raise ValueError("evaluate_policy needs policy_path, the policy's Hugging Face directory (lm-eval "
                         "runs on it; answers come from policy_sampler when one is given)")
    e, out, timer = cfg.eval, Path(out_dir), PhaseTimer()
    with _task_dir(out) as work:
        tasks = prepare_tasks(e.lm_eval_tasks, work, e.lm_eval_include_path)  # fail before loading
        held_out = resolve_eval(cfg).held_out_dataset
        prompts = eval_prompt_set(e.num_prompts, prompts_file=e.prompts_file, held_out=held_out,
                                  column=cfg.generator.prompt_column)
        cached = _BaselineCache.lookup(cfg, prompts)  # rank 0's, on every rank
        part = _evaluate_share(cfg, policy_path, policy_sampler, self_judge, prompts, tasks, cached, timer)
    with timer("gather"):
        parts = gather_object(part)
    results: dict[str, Any] = {}
    if parts is not None:  # rank 0
        results = _write_results(cfg, policy_path, out, iteration, tracker, step, history_path, prompts,
                                 tasks.names, parts, cached, timer)
    barrier()
    return results


def evaluate_iteration(cfg: TrainConfig, run_dir: str | Path, iteration: int, *,
                       tracker: Tracker | None = None, policy_sampler: Sampler | None = None,
                       self_judge: Judge | None = None) -> dict[str, Any]:
    """The training loop's hook, called on every rank after iteration ``iteration`` is exported
    and checkpointed: evaluates ``<run_dir>/iter_<k>`` into ``<run_dir>/eval/iter_<k>`` when due
    (every ``eval.every_n_iterations`` iterations, and after the last one), else returns ``{}``.
    """
    if not evaluation_due(cfg, iteration):
        return {}
    every = cfg.eval.every_n_iterations
    run = RunDir(Path(run_dir))
    policy_path = run.export(iteration)
    if not (policy_path / "config.json").exists():
        raise ConfigError("export_each_iteration", f"eval.every_n_iterations={every} evaluates the exported "
                          f"policy, but {policy_path} was not written: set export_each_iteration=true")
    return evaluate_policy(cfg, policy_path, out_dir=run.eval_dir(iteration),
                           iteration=iteration, tracker=tracker, policy_sampler=policy_sampler,
                           self_judge=self_judge)


def evaluation_due(cfg: TrainConfig, iteration: int) -> bool:
    """Whether training evaluates after iteration ``iteration`` (1-based): every
    ``eval.every_n_iterations`` iterations, and after the last one; never when that is 0."""
    every = cfg.eval.every_n_iterations
    return every > 0 and (iteration % every == 0 or iteration == cfg.iterations)


@contextlib.contextmanager
def _task_dir(out: Path) -> Iterator[Path]:
    """Where lm-eval's task directories are staged: ``out`` on rank 0 (kept with the results),
    a temporary directory on the other ranks (they share ``out``)."""
    if get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        yield out
        return
    with tempfile.TemporaryDirectory(prefix="dynalign-eval-") as tmp:
        yield Path(tmp)


class _Part(NamedTuple):
    """One rank's share of an evaluation, as rank 0 gathers it (prompt fields are None when the
    rank got no prompt)."""

    policy: Answers | None
    self_judged: JudgeResult | None  # None also with eval.self_judge off
    baseline: Answers | None  # None also when rank 0 found them in the cache, or pairwise is off
    external: JudgeResult | None
    external_baseline: JudgeResult | None
    pairs: list[PairJudgement]
    lm_policy: list[dict]  # per lm-eval task of this rank, in order
    lm_baseline: list[dict]
    lm_cached: list[bool]  # per task: the baseline's results came from the cache


class _BaselineCache(NamedTuple):
    """The baseline's answers in the cache, as rank 0 found them before the evaluation began."""

    key: str
    answers: Answers | None  # None: not cached (or pairwise off)

    @classmethod
    def lookup(cls, cfg: TrainConfig, prompts: list[EvalPrompt]) -> _BaselineCache:
        """Rank 0 reads the cache and tells every rank (collective), so all agree on what to answer."""
        key = answers_cache_key(resolve_eval(cfg).baseline, [p.prompt for p in prompts], _answer_params(cfg),
                                _chunk(cfg))
        found = cached_answers(key) if get_rank() == 0 and cfg.eval.pairwise else None
        return cls(key, broadcast_object(found))


def _answer_params(cfg: TrainConfig) -> SamplingParams:
    e = cfg.eval
    return SamplingParams(max_new_tokens=e.max_new_tokens, temperature=float(e.temperature), seed=cfg.seed)


def _chunk(cfg: TrainConfig) -> int:
    """Prompts per sampler and judge call: a chunk, the unit shared among the ranks."""
    return cfg.eval.batch_size


def _evaluate_share(cfg: TrainConfig, policy_path: str | Path | None, policy_sampler: Sampler | None,
                    self_judge: Judge | None, prompts: list[EvalPrompt], tasks: PreparedTasks,
                    cached: _BaselineCache, timer: PhaseTimer) -> _Part:
    """This rank's answers, verdicts and lm-eval results; collective where the policy sampler is."""
    resolved, params, chunk = resolve_eval(cfg), _answer_params(cfg), _chunk(cfg)
    rank, world = get_rank(), get_world_size()
    share = share_of(len(prompts), chunk, rank, world)
    texts = share.of([p.prompt for p in prompts])
    my_tasks = replace(tasks, names=tuple(share_of(len(tasks.names), 1, rank, world).of(tasks.names)))

    with timer("policy"):
        policy, self_judged, lm_policy = _policy_phase(cfg, policy_path, policy_sampler, self_judge, texts,
                                                       share, params, my_tasks, chunk)
    with timer("baseline"):
        baseline, lm_baseline, lm_cached = _baseline_phase(cfg, resolved.baseline, texts, share, params,
                                                           my_tasks, chunk, cached.answers is not None)
    judged_baseline = baseline
    if cached.answers is not None:
        judged_baseline = cached.answers.share(share.items)
    with timer("judge"):
        judged = _judge_phase(cfg, resolved, texts, share, policy, judged_baseline, chunk)
    return _Part(policy if texts else None, self_judged if texts else None, baseline, judged.policy,
                 judged.baseline, judged.pairs, lm_policy, lm_baseline, lm_cached)


class _Joined(NamedTuple):
    """The ranks' parts joined in the prompts' (and tasks') order: what one rank would have."""

    policy: Answers
    self_judged: JudgeResult | None
    external: JudgeResult
    external_baseline: JudgeResult | None
    pairs: list[PairJudgement]
    lm_policy: dict
    lm_baseline: dict
    lm_cached: bool


def _join_parts(parts: Sequence[_Part]) -> _Joined:
    answered = [p for p in parts if p.policy is not None and p.external is not None]  # rank 0's first
    return _Joined(
        policy=Answers.join([p.policy for p in answered if p.policy is not None]),
        self_judged=_joined_results([p.self_judged for p in answered]),
        external=concat_results([p.external for p in answered if p.external is not None]),
        external_baseline=_joined_results([p.external_baseline for p in answered]),
        pairs=join(p.pairs for p in answered),
        lm_policy=_merged(join(p.lm_policy for p in parts)),
        lm_baseline=_merged(join(p.lm_baseline for p in parts)),
        lm_cached=all(join(p.lm_cached for p in parts)))


def _write_results(cfg: TrainConfig, policy_path: str | Path | None, out: Path, iteration: int | None,
                   tracker: Tracker | None, step: int | None, history_path: str | Path | None,
                   prompts: list[EvalPrompt], task_names: Sequence[str], parts: list[_Part],
                   cached: _BaselineCache, timer: PhaseTimer) -> dict[str, Any]:
    """Rank 0: the ranks' parts joined, then the statistics, files and logs."""
    e, resolved, joined = cfg.eval, resolve_eval(cfg), _join_parts(parts)
    policy, baseline, sides = joined.policy, cached.answers, {"policy": joined.external,
                                                              "baseline": joined.external_baseline}
    if e.pairwise and baseline is None:  # the ranks answered with the baseline just now
        baseline = Answers.join([p.baseline for p in parts if p.baseline is not None])
        store_answers(cached.key, baseline)
    lm_policy, lm_baseline = joined.lm_policy, joined.lm_baseline

    results: dict[str, Any] = {
        "checkpoint": str(policy_path) if policy_path is not None else "<in-memory policy>",
        "baseline": resolved.baseline, "iteration": iteration,
        "step": step if step is not None else (iteration or 0) * cfg.steps_per_iteration,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "prompts": _prompt_counts(prompts),
        "judge": {"backend": e.judge.backend, "model": e.judge.model, "mode": resolved.judge_mode,
                  "rubric": str(e.rubric)},
        "settings": {"max_new_tokens": e.max_new_tokens, "temperature": float(e.temperature),
                     "bootstrap_samples": e.bootstrap_samples, "seed": cfg.seed,
                     "lm_eval_limit": e.lm_eval_limit},
        "pointwise": {side: pointwise_summary(result, samples=e.bootstrap_samples, seed=cfg.seed)
                      for side, result in sides.items() if result is not None},
        "pairwise": _pairwise(joined.pairs, policy, baseline, cfg) if baseline is not None else {},
        "calibration": calibration(joined.self_judged, joined.external) if joined.self_judged is not None
        else {},
        "lm_eval": {"tasks": list(task_names), "policy": lm_policy, "baseline": lm_baseline,
                    "delta": metric_deltas(lm_policy, lm_baseline), "baseline_cached": joined.lm_cached}
        if task_names else {},
        "capability": capability_summary(lm_policy, lm_baseline, margin=e.capability_margin,
                                         tasks=task_names) if task_names else {},
    }
    results["warnings"] = _warnings(results, policy, cfg)
    results["timing"] = {k.removeprefix("time/"): v for k, v in timer.pop().items()}
    results["metrics"] = report.flat_metrics(results)

    rows = report.per_prompt_rows(prompts, policy, baseline, joined.external, joined.external_baseline,
                                  joined.self_judged, joined.pairs)
    report.write_outputs(out, results, rows, report.render_summary(results))
    report.append_history(Path(history_path) if history_path else out.parent / report.HISTORY_FILE, results)
    if tracker is not None:
        tracker.log(results["metrics"], results["step"])
        tracker.log_samples(rows, results["step"])
        tracker.log_summary({SUMMARY_KEY: {k: v for k, v in results.items() if k != "metrics"},
                             PROMPTS_KEY: report.prompt_outcomes(rows)})
        tracker.log_artifact("eval", [out / name for name in report.OUTPUT_FILES], iteration)
    return results


def _joined_results(parts: Sequence[JudgeResult | None]) -> JudgeResult | None:
    present = [p for p in parts if p is not None]
    return concat_results(present) if present else None


def _merged(per_task: Sequence[dict]) -> dict:
    """lm-eval results of single tasks (a group task brings its subtasks) as one mapping."""
    return {name: metrics for results in per_task for name, metrics in results.items()}


# ------------------------------------------------------------------ phases


def _load_sampler(cfg: TrainConfig, path: str | Path | None) -> Sampler:
    """A whole model of ``path`` as an ``HFSampler``, with the run's dtype and settings."""
    return load_hf_sampler(cfg.model, path=str(path), batch_size=cfg.rollout.batch_size)


def _policy_phase(cfg: TrainConfig, policy_path: str | Path | None, policy_sampler: Sampler | None,
                  self_judge: Judge | None, texts: list[str], share: Share, params: SamplingParams,
                  tasks: PreparedTasks, chunk: int) -> tuple[Answers, JudgeResult | None, list[dict]]:
    """The policy's answers to ``texts`` (this rank's share) and its verdicts on them, and this
    rank's lm-eval tasks. Every rank enters the given sampler's session once, prompts or not."""
    owned = policy_sampler is None
    if owned and not texts and not tasks.names:
        return Answers([], [], []), None, []  # nothing to load a model for
    sampler = policy_sampler or _load_sampler(cfg, policy_path)
    try:
        with inference_session(sampler):  # a ZeRO-3 sampler: one gather on every rank
            answers = generate_answers(sampler, texts, params, chunk=chunk, desc="policy answers",
                                       seeds=share.seeds(cfg.seed, "policy answers"))
            self_judged = None
            if cfg.eval.self_judge:
                self_judge = self_judge or build_self_judge(cfg, sampler)
                self_judged = score_in_chunks(self_judge, texts, answers.texts, chunk=chunk,
                                              desc="self-judge", seeds=share.seeds(cfg.seed, "self-judge"))
        lm_results: list[dict] = []
        if tasks.names:
            # the loop's sampler may hold ZeRO shards (and must stay in train mode): lm-eval always
            # runs on the consolidated export, loaded again from policy_path
            lm_results = lm_eval_each(cfg, tasks, str(policy_path), loaded=sampler if owned else None)
    finally:
        del sampler, policy_sampler, self_judge
        free_memory()
    return answers, self_judged, lm_results


def _baseline_phase(cfg: TrainConfig, baseline: str, texts: list[str], share: Share, params: SamplingParams,
                    tasks: PreparedTasks, chunk: int,
                    answers_cached: bool) -> tuple[Answers | None, list[dict], list[bool]]:
    """The baseline's answers to ``texts`` (with pairwise on, unless rank 0 found them all in the
    cache) and this rank's lm-eval tasks, each from the cache when there (the model is loaded only
    for what is missing)."""
    e = cfg.eval
    lm_keys = [lm_eval_cache_key(baseline, [task], cfg) for task in tasks.names]
    lm_results: list[dict | None] = [read_cache("lm_eval", key) for key in lm_keys]
    lm_cached = [r is not None for r in lm_results]
    need_answers = e.pairwise and not answers_cached and bool(texts)
    answers = None
    if need_answers or not all(lm_cached):
        # lm-eval's vLLM backend starts its own engine: then the model is loaded for the answers only
        hf = need_answers or lm_eval_backend(cfg) == "hf"
        sampler: Any = _load_sampler(cfg, baseline) if hf else None
        try:
            if need_answers:
                answers = generate_answers(sampler, texts, params, chunk=chunk, desc="baseline answers",
                                           seeds=share.seeds(cfg.seed, "baseline answers"))
            missing = [i for i, cached in enumerate(lm_cached) if not cached]
            to_run = replace(tasks, names=tuple(tasks.names[i] for i in missing))
            for i, results in zip(missing, lm_eval_each(cfg, to_run, baseline, loaded=sampler), strict=True):
                lm_results[i] = results
                write_cache("lm_eval", lm_keys[i], results)
        finally:
            del sampler
            free_memory()
    return answers, [r or {} for r in lm_results], lm_cached


class _Judged(NamedTuple):
    policy: JudgeResult | None  # the external judge on the policy's answers (None: no prompt here)
    baseline: JudgeResult | None  # ... on the baseline's (with pairwise on)
    pairs: list[PairJudgement]  # every pair, both orders ([] with pairwise off)


def _judge_phase(cfg: TrainConfig, resolved: ResolvedEval, texts: list[str], share: Share,
                 policy: Answers, baseline: Answers | None, chunk: int) -> _Judged:
    if not texts:
        return _Judged(None, None, [])  # no judge to load
    judge = build_external_judge(cfg, resolved)
    try:
        external = score_in_chunks(judge, texts, policy.texts, chunk=chunk, desc="judge policy",
                                   seeds=share.seeds(cfg.seed, "judge policy"))
        if baseline is None:
            return _Judged(external, None, [])
        external_baseline = score_in_chunks(judge, texts, baseline.texts, chunk=chunk, desc="judge baseline",
                                            seeds=share.seeds(cfg.seed, "judge baseline"))
        pairs = judge_pairs_in_chunks(judge, texts, policy.texts, baseline.texts, chunk=chunk,
                                      seeds=share.seeds(cfg.seed, "pairwise"))
        return _Judged(external, external_baseline, pairs)
    finally:
        judge.close()  # an HTTP judge's connection pool
        del judge
        free_memory()


# ------------------------------------------------------------------ statistics


def _prompt_counts(prompts: list[EvalPrompt]) -> dict[str, int]:
    return {"total": len(prompts), "curated": sum(p.source == "curated" for p in prompts),
            "held_out": sum(p.source == "held_out" for p in prompts)}


def _pairwise(pairs: list[PairJudgement], policy: Answers, baseline: Answers,
              cfg: TrainConfig) -> dict[str, Any]:
    summary = pairwise_summary([order_vote(p.a_first) for p in pairs], [order_vote(p.b_first) for p in pairs],
                               samples=cfg.eval.bootstrap_samples, seed=cfg.seed)
    judgements = [r for p in pairs for r in p.reasons]
    summary.update({
        "judgement_failure_rate": (sum(r != "ok" for r in judgements) / len(judgements)
                                   if judgements else float("nan")),
        "policy_length_tokens": nan_mean(policy.lengths),
        "baseline_length_tokens": nan_mean(baseline.lengths),
        "policy_length_chars": nan_mean(policy.chars),
        "baseline_length_chars": nan_mean(baseline.chars),
        "longer_answer_win_rate": longer_answer_win_rate([p.outcome for p in pairs], policy.chars,
                                                         baseline.chars),
    })
    return summary


def calibration(self_judged: JudgeResult, external: JudgeResult) -> dict[str, Any]:
    """Self-judge vs external judge on the same answers: overall and per shared aspect.

    Both on their raw scale when the rubrics share it, else mapped to [0, 1] first.
    """
    same_scale = tuple(self_judged.scale) == tuple(external.scale)

    def scaled(values, scale):
        return values.numpy() if same_scale else to_unit_scale(values.numpy(), *scale)

    out: dict[str, Any] = calibration_stats(scaled(self_judged.rewards, self_judged.scale),
                                            scaled(external.rewards, external.scale))
    out["scale"] = "raw" if same_scale else "unit"
    out["self_failure_rate"] = float(self_judged.rewards.isnan().float().mean()) if len(self_judged) else \
        float("nan")
    shared = [name for name in self_judged.aspect_names if name in external.aspect_names]
    out["aspects"] = {name: calibration_stats(scaled(self_judged.aspect(name), self_judged.scale),
                                              scaled(external.aspect(name), external.scale))
                      for name in shared}
    return out


def _warnings(results: dict[str, Any], policy: Answers, cfg: TrainConfig) -> list[str]:
    warnings = []
    if cfg.eval.judge.model == "tiny" and cfg.model.name_or_path != "tiny":
        warnings.append("the external judge is the embedded tiny model (random weights): its scores are "
                        "noise; set eval.judge.backend / eval.judge.model to a strong judge")
    failure = results["pointwise"]["policy"]["failure_rate"]
    if failure == failure and failure > 0.2:
        warnings.append(f"the external judge left {failure:.0%} of the policy's answers without a score")
    truncated = sum(policy.truncated) / max(1, len(policy.truncated))
    if truncated > 0.5:
        warnings.append(f"{truncated:.0%} of the policy's answers hit eval.max_new_tokens")
    pairwise = results.get("pairwise") or {}
    if pairwise and pairwise["failure_rate"] == pairwise["failure_rate"] and pairwise["failure_rate"] > 0.2:
        warnings.append(f"{pairwise['failure_rate']:.0%} of the pairs got no verdict in some order")
    return warnings
