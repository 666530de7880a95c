"""Evaluation: Collective Agency alignment (external judge) and general capability (lm-eval).

What the training loop and ``python -m dynalign.evaluate`` call:

* :func:`evaluate_iteration` -- the training loop's hook (one line after each iteration's
  export): runs :func:`evaluate_policy` every ``eval.every_n_iterations`` iterations;
* :func:`evaluate_policy` -- one evaluation of a policy: answers to the CA eval prompts,
  pointwise CA scores by an external judge (mean and bootstrap 95% interval per aspect),
  pairwise comparison with the baseline in both orders, self-judge calibration against the
  external judge, lm-evaluation-harness tasks with deltas to the baseline; writes
  ``eval_results.json``, ``eval_samples.jsonl`` and ``eval_summary.md``;
* :func:`eval_prompt_set` -- the eval prompts: shipped curated prompts, then held-out ones;
* the pure statistics of :mod:`dynalign.eval.stats` (bootstrap, pairwise, calibration).

Names are imported on first use (PEP 562): the pure modules load without torch.
"""

from __future__ import annotations

from dynalign._lazy import lazy_exports

_EXPORTS = {
    "evaluate_iteration": "runner",
    "evaluate_policy": "runner",
    "calibration": "runner",
    "EvalSettings": "settings",
    "eval_settings": "settings",
    "resolve_model_dir": "settings",
    "EvalPrompt": "prompts",
    "curated_prompts": "prompts",
    "eval_prompt_set": "prompts",
    "bootstrap_ci": "stats",
    "calibration_stats": "stats",
    "mean_with_ci": "stats",
    "order_vote": "stats",
    "pair_outcome": "stats",
    "pairwise_summary": "stats",
    "spearman": "stats",
    "win_rate": "stats",
    "PairJudgement": "judging",
    "build_external_judge": "judging",
    "judge_pairs": "judging",
    "pointwise_summary": "judging",
    "prepare_tasks": "lm_harness",
    "run_lm_eval": "lm_harness",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
