"""Evaluation: Collective Agency alignment (external judge) and general capability (lm-eval).

What the training loop and ``python -m dynalign.evaluate`` call:

* :func:`evaluate_iteration` -- the training loop's hook (one line after each iteration's
  export): runs :func:`evaluate_policy` every ``eval.every_n_iterations`` iterations;
* :func:`evaluate_policy` -- one evaluation of a policy, shared among the ranks
  (:mod:`dynalign.eval.shards`): answers to the CA eval prompts,
  pointwise CA scores by an external judge (mean and bootstrap 95% interval per aspect),
  pairwise comparison with the baseline in both orders, self-judge calibration against the
  external judge, lm-evaluation-harness tasks with deltas to the baseline; writes
  ``eval_results.json``, ``eval_samples.jsonl`` and ``eval_summary.md``;
* :func:`eval_prompt_set` -- the eval prompts: shipped curated prompts, then held-out ones;
* the pure statistics of :mod:`dynalign.eval.stats` (bootstrap, pairwise, calibration).

Names are imported on first use (PEP 562): importing the package loads no model code.
"""

from __future__ import annotations

from dynalign._lazy import lazy_exports

_MODULES = {
    "runner": ("evaluate_iteration", "evaluate_policy", "evaluation_due", "calibration"),
    "settings": ("ResolvedEval", "resolve_eval"),
    "shards": ("Share", "share_of"),
    "prompts": ("EvalPrompt", "curated_prompts", "eval_prompt_set"),
    "stats": ("bootstrap_ci", "calibration_stats", "mean_with_ci", "pairwise_summary", "spearman",
              "win_rate"),
    "judging": ("build_external_judge", "judge_pairs_in_chunks", "pointwise_summary"),
    "lm_harness": ("prepare_tasks", "run_lm_eval"),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
