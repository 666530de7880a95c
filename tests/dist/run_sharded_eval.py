"""Regenerate an iteration's prompts and evaluate a policy, as the training loop does; run by
tests/test_sharded_eval.py.

``--mode loop`` (under ``torchrun``, or as a plain process): the loop's own parts, a ZeRO-3
engine on ``model.name_or_path`` with its sampler and self-judge, write the prompts of
iteration 0 (``prompts_for_iteration``), export the policy to ``<run>/iter_1`` and evaluate it
(``evaluate_iteration``). ``--mode export`` (one process): the same prompts written by a whole
copy of the model, and an evaluation of the export ``--export`` loaded whole, as
``python -m dynalign.evaluate`` would.

Every rank records what it did (the prompts it answered and judged per phase, the lm-eval tasks
it ran, the generation shards it sampled); rank 0 writes the records of every rank to ``--out``.
Hydra overrides follow the options.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from hydra import compose, initialize_config_dir  # noqa: E402

import dynalign.datagen.pipeline as pipeline  # noqa: E402
import dynalign.eval.runner as runner  # noqa: E402
from dynalign.config import CONF_DIR, register_configs, to_train_config  # noqa: E402
from dynalign.distributed import gather_object, get_rank, init_distributed  # noqa: E402

WORK: dict[str, list] = defaultdict(list)  # what this rank did, by phase


def record_calls() -> None:
    """Wrap the functions that do an evaluation's and a generation's work to note each call's size."""
    answers, score, pairs, lm_eval = (runner.generate_answers, runner.score_in_chunks,
                                      runner.judge_pairs_in_chunks, runner.lm_eval_each)
    sample_shard = pipeline.sample_shard

    def generate_answers(sampler, prompts, params, **kwargs):
        WORK[kwargs["desc"]].append(len(prompts))
        return answers(sampler, prompts, params, **kwargs)

    def score_in_chunks(judge, prompts, candidates, **kwargs):
        WORK[kwargs["desc"]].append(len(prompts))
        return score(judge, prompts, candidates, **kwargs)

    def judge_pairs_in_chunks(judge, prompts, policy, baseline, **kwargs):
        WORK["pairwise"].append(len(prompts))
        return pairs(judge, prompts, policy, baseline, **kwargs)

    def lm_eval_each(cfg, tasks, model_path, loaded=None):
        WORK["lm_eval"] += list(tasks.names)
        return lm_eval(cfg, tasks, model_path, loaded)

    def sampled_shard(shard_index, *args, **kwargs):
        WORK["shards"].append(shard_index)
        return sample_shard(shard_index, *args, **kwargs)

    runner.generate_answers, runner.score_in_chunks = generate_answers, score_in_chunks
    runner.judge_pairs_in_chunks, runner.lm_eval_each = judge_pairs_in_chunks, lm_eval_each
    pipeline.sample_shard = sampled_shard


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("loop", "export"), required=True)
    parser.add_argument("--run-dir", required=True, help="the run directory")
    parser.add_argument("--out", required=True, help="every rank's records (JSON), written by rank 0")
    parser.add_argument("--export", help="--mode export: the exported policy to evaluate")
    args, overrides = parser.parse_known_args()

    from dynalign.train import Parts, build_parts, prompt_writer, prompts_for_iteration, side_sampler

    world = init_distributed().world_size
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = to_train_config(compose(config_name="train", overrides=overrides))
    cfg.validate(world_size=world)
    record_calls()
    run = Path(args.run_dir)
    if args.mode == "loop":
        from dynalign.engine import PolicyEngine

        engine = PolicyEngine.from_config(cfg)
        parts: Parts = build_parts(cfg, engine, run, iteration=0)
        prompts = prompts_for_iteration(cfg, 0, prompt_writer(cfg, parts, run), run, get_rank())
        engine.export_hf(run / "iter_1")
        results = runner.evaluate_iteration(cfg, run, 1, policy_sampler=parts.sampler, self_judge=parts.judge)
        engine.close()
    else:
        prompts = prompts_for_iteration(cfg, 0, side_sampler(cfg, args.export), run, 0)
        results = runner.evaluate_policy(cfg, args.export, out_dir=run / "eval" / "iter_1", iteration=1)
    ranks = gather_object({"work": dict(WORK), "prompts": prompts, "returned_results": bool(results)})
    if ranks is not None:
        Path(args.out).write_text(json.dumps({"world_size": world, "ranks": ranks}))


if __name__ == "__main__":
    main()
