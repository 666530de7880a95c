"""``evaluate_policy``: one evaluation of a policy, from the CLI or from the training loop.

The phases, each timed, load one model at a time:

1. ``eval_policy``: the policy answers the CA prompts; the policy judges its own answers
   with the training rubric (the self-judge, for calibration); lm-eval tasks on the
   consolidated policy (its Hugging Face directory, never a ZeRO shard);
2. ``eval_baseline``: the baseline's answers and lm-eval results (both cached on disk);
3. ``eval_judge``: the external judge scores both sides pointwise and compares every pair
   in both orders;

then the statistics (pure functions of :mod:`dynalign.eval.stats`), the files in
``out_dir``, the tracker's metrics and table, and a line in the history JSONL.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NamedTuple

from dynalign.config import ConfigError, TrainConfig
from dynalign.distributed import barrier, get_rank, get_world_size
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
    free_memory,
    judge_pairs_in_chunks,
    pointwise_summary,
    score_in_chunks,
)
from dynalign.eval.lm_harness import (
    PreparedTasks,
    lm_eval_cache_key,
    metric_deltas,
    prepare_tasks,
    run_lm_eval,
)
from dynalign.eval.prompts import EvalPrompt, eval_prompt_set
from dynalign.eval.settings import ResolvedEval, resolve_eval
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
from dynalign.rollout.base import Sampler, SamplingParams
from dynalign.rundir import RunDir
from dynalign.runtime import PhaseTimer
from dynalign.tracking import Tracker


def evaluate_policy(cfg: TrainConfig, policy_path: str | Path | None, *, out_dir: str | Path,
                    iteration: int | None = None, tracker: Tracker | None = None,
                    policy_sampler: Sampler | None = None, self_judge: Judge | None = None,
                    step: int | None = None, history_path: str | Path | None = None) -> dict[str, Any]:
    """Evaluate the policy at ``policy_path`` (a Hugging Face directory); returns the results.

    Called on every rank (the training loop goes through :func:`evaluate_iteration`): rank 0
    evaluates while the other ranks wait at a barrier (and return ``{}``). With one rank,
    ``policy_sampler`` (answers) and ``self_judge`` (calibration) are used as they are; with
    several they are sharded collectives, so the policy is loaded from ``policy_path``.
    Metrics go to ``tracker`` at ``step`` (default ``iteration * steps_per_iteration``, the
    loop's global step at the end of iteration ``iteration``); ``history_path`` (default
    ``<out_dir>/../eval_history.jsonl``) gets one line per evaluation.
    """
    if get_rank() != 0:
        barrier()
        return {}
    try:
        if get_world_size() > 1:
            policy_sampler = self_judge = None
        return _evaluate(cfg, policy_path, Path(out_dir), iteration, tracker, policy_sampler, self_judge,
                         step, history_path)
    finally:
        barrier()


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


def _evaluate(cfg: TrainConfig, policy_path: str | Path | None, out: Path, iteration: int | None,
              tracker: Tracker | None, policy_sampler: Sampler | None, self_judge: Judge | None,
              step: int | None, history_path: str | Path | None) -> dict[str, Any]:
    e, resolved = cfg.eval, resolve_eval(cfg)
    if policy_path is None and (policy_sampler is None or e.lm_eval_tasks):
        raise ValueError("evaluate_policy needs policy_path, the policy's Hugging Face directory (lm-eval "
                         "runs on it; answers come from policy_sampler when one is given)")
    out.mkdir(parents=True, exist_ok=True)
    timer = PhaseTimer()
    tasks = prepare_tasks(e.lm_eval_tasks, out, e.lm_eval_include_path)  # fail before loading
    prompts = eval_prompt_set(e.num_prompts, prompts_file=e.prompts_file, held_out=resolved.held_out_dataset,
                              column=cfg.generator.prompt_column)
    texts = [p.prompt for p in prompts]
    params = SamplingParams(max_new_tokens=e.max_new_tokens, temperature=float(e.temperature), seed=cfg.seed)
    chunk = max(1, cfg.rollout.batch_size)

    with timer("policy"):
        policy, self_judged, lm_policy = _policy_phase(cfg, policy_path, policy_sampler, self_judge, texts,
                                                       params, tasks, chunk)
    with timer("baseline"):
        baseline, lm_baseline, lm_cached = _baseline_phase(cfg, resolved.baseline, texts, params, tasks,
                                                           chunk)
    with timer("judge"):
        judged = _judge_phase(cfg, resolved, texts, policy, baseline, chunk)

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
                      for side, result in (("policy", judged.policy), ("baseline", judged.baseline))
                      if result is not None},
        "pairwise": _pairwise(judged.pairs, policy, baseline, cfg) if baseline is not None else {},
        "calibration": calibration(self_judged, judged.policy) if self_judged is not None else {},
        "lm_eval": {"tasks": list(tasks.names), "policy": lm_policy, "baseline": lm_baseline,
                    "delta": metric_deltas(lm_policy, lm_baseline), "baseline_cached": lm_cached}
        if tasks.names else {},
        "capability": capability_summary(lm_policy, lm_baseline, margin=e.capability_margin,
                                         tasks=tasks.names) if tasks.names else {},
    }
    results["warnings"] = _warnings(results, policy, cfg)
    results["timing"] = {k.removeprefix("time/"): v for k, v in timer.pop().items()}
    results["metrics"] = report.flat_metrics(results)

    rows = report.per_prompt_rows(prompts, policy, baseline, judged.policy, judged.baseline, self_judged,
                                  judged.pairs)
    report.write_outputs(out, results, rows, report.render_summary(results))
    report.append_history(Path(history_path) if history_path else out.parent / report.HISTORY_FILE, results)
    if tracker is not None:
        tracker.log(results["metrics"], results["step"])
        tracker.log_samples(rows, results["step"])
    return results


# ------------------------------------------------------------------ phases


def _load_sampler(cfg: TrainConfig, path: str | Path | None) -> Sampler:
    """A whole model of ``path`` as an ``HFSampler``, with the run's dtype and settings."""
    return load_hf_sampler(cfg.model, path=str(path), batch_size=cfg.rollout.batch_size)


def _policy_phase(cfg: TrainConfig, policy_path: str | Path | None, policy_sampler: Sampler | None,
                  self_judge: Judge | None, texts: list[str], params: SamplingParams, tasks: PreparedTasks,
                  chunk: int):
    owned = policy_sampler is None
    sampler = policy_sampler or _load_sampler(cfg, policy_path)
    try:
        answers = generate_answers(sampler, texts, params, chunk=chunk, desc="policy answers")
        self_judged = None
        if cfg.eval.self_judge:
            self_judge = self_judge or build_self_judge(cfg, sampler)
            self_judged = score_in_chunks(self_judge, texts, answers.texts, chunk=chunk, desc="self-judge")
        lm_results: dict = {}
        if tasks.names:
            # the loop's sampler may hold ZeRO shards (and must stay in train mode): lm-eval always
            # runs on the consolidated export
            lm_sampler: Any = sampler if owned else _load_sampler(cfg, policy_path)
            lm_results = _lm_eval(lm_sampler, tasks, cfg)
            del lm_sampler
    finally:
        del sampler, policy_sampler, self_judge
        free_memory()
    return answers, self_judged, lm_results


def _baseline_phase(cfg: TrainConfig, baseline: str, texts: list[str], params: SamplingParams,
                    tasks: PreparedTasks, chunk: int) -> tuple[Answers | None, dict, bool]:
    """Baseline answers and lm-eval results, from the cache when possible (the model is loaded
    only for what is missing)."""
    e = cfg.eval
    answers_key = answers_cache_key(baseline, texts, params)
    lm_key = lm_eval_cache_key(baseline, tasks.names, e.lm_eval_limit, e.lm_eval_num_fewshot)
    answers = cached_answers(answers_key) if e.pairwise else None
    lm_results = read_cache("lm_eval", lm_key) if tasks.names else {}
    lm_cached = bool(tasks.names) and lm_results is not None
    need_answers = e.pairwise and answers is None
    if need_answers or (tasks.names and lm_results is None):
        sampler: Any = _load_sampler(cfg, baseline)
        try:
            if need_answers:
                answers = generate_answers(sampler, texts, params, chunk=chunk, desc="baseline answers")
                store_answers(answers_key, answers)
            if tasks.names and lm_results is None:
                lm_results = _lm_eval(sampler, tasks, cfg)
                write_cache("lm_eval", lm_key, lm_results)
        finally:
            del sampler
            free_memory()
    return answers, lm_results or {}, lm_cached


class _Judged(NamedTuple):
    policy: JudgeResult  # the external judge on the policy's answers
    baseline: JudgeResult | None  # ... on the baseline's (with pairwise on)
    pairs: list[PairJudgement]  # every pair, both orders ([] with pairwise off)


def _judge_phase(cfg: TrainConfig, resolved: ResolvedEval, texts: list[str], policy: Answers,
                 baseline: Answers | None, chunk: int) -> _Judged:
    judge = build_external_judge(cfg, resolved)
    try:
        external = score_in_chunks(judge, texts, policy.texts, chunk=chunk, desc="judge policy")
        if baseline is None:
            return _Judged(external, None, [])
        external_baseline = score_in_chunks(judge, texts, baseline.texts, chunk=chunk, desc="judge baseline")
        pairs = judge_pairs_in_chunks(judge, texts, policy.texts, baseline.texts, chunk=chunk)
        return _Judged(external, external_baseline, pairs)
    finally:
        judge.close()  # an HTTP judge's connection pool
        del judge
        free_memory()


def _lm_eval(sampler: Any, tasks: PreparedTasks, cfg: TrainConfig) -> dict:
    e = cfg.eval
    return run_lm_eval(sampler.model, sampler.tokenizer, tasks, limit=e.lm_eval_limit,
                       batch_size=e.lm_eval_batch_size, num_fewshot=e.lm_eval_num_fewshot,
                       bootstrap_iters=e.bootstrap_samples, seed=cfg.seed)


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
