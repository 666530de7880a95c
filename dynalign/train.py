"""``python -m dynalign.train``: Dynamic Alignment, iteration after iteration.

Each iteration the policy trains on a prompt set (shipped seeds, a dataset on disk, or
prompts it wrote itself); each step it samples a group of answers per prompt, judges its
own answers with the rubric, turns the rewards into group-relative advantages and takes
GRPO steps on the DeepSpeed engine. At the end of an iteration it exports the policy, moves
the KL reference to it, checkpoints and runs the evaluation hook; the checkpoint records which
of these stages are still to run, so an interrupted run finishes them when it resumes. Every
phase is timed under its name: the step's as ``time/<phase>`` with ``time/step`` their sum,
the iteration's (``prompts``, ``export``, ``reference``, ``checkpoint``, ``eval``,
``frozen_judge``) with the first step logged after them and, for the last iteration, in the
run summary.

How it departs from plain GRPO: the reward model is the policy itself (or a frozen copy of
it as the iteration began, or an external judge); unparseable judgements are NaN rewards
that get zero advantage (never a default score); groups with no reward spread can be masked
out (dynamic sampling, counted); the prompt distribution can move with the policy.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from dynalign.cli import launch_record, run_main, save_launch_record, validated_config
from dynalign.config import TrainConfig, register_configs
from dynalign.distributed import (
    adopt_slurm_launch,
    all_reduce,
    barrier,
    failure_ends_launch,
    gather_strings,
    get_rank,
    init_distributed,
    is_main_process,
    print0,
    reduce_metrics,
)
from dynalign.grpo import group_advantages, zero_spread_groups
from dynalign.io import cut_jsonl
from dynalign.memory import fmt_bytes
from dynalign.rundir import RunDir, RunDirError
from dynalign.runtime import PhaseTimer, Preemption, seed_everything, step_seed
from dynalign.teardown import device_free_gib, memory_metrics, release_memory
from dynalign.tracking import RunInfo, Tracker, build_tracker, console_postfix, prompt_files

if TYPE_CHECKING:  # torch-heavy modules stay lazily imported
    from dynalign.engine import PolicyEngine, TrainBatch
    from dynalign.judge import Judge, JudgeResult
    from dynalign.rollout import Rollouts, Sampler

register_configs()

# Step metrics that count things (summed over the ranks); every other one is averaged.
SUMMED_METRICS = ("groups/zero_spread_dropped", "judge/judgements", "judge/hist/")
# What ends an iteration, in order; the checkpoint is written after the first two.
END_STAGES = ("export", "reference", "checkpoint", "eval")


@dataclass
class Position:
    """Where the run is; saved in every checkpoint, so a resumed run continues exactly here."""

    iteration: int = 0  # iterations whose steps are all done
    step: int = 0  # step within the iteration
    global_step: int = 0  # steps done over the whole run
    pending: list[str] = field(default_factory=list)  # END_STAGES of iteration `iteration` still to run

    def advance(self, steps_per_iteration: int) -> None:
        self.step += 1
        self.global_step += 1
        if self.step == steps_per_iteration:
            self.iteration, self.step = self.iteration + 1, 0


@dataclass
class Parts:
    """The stateful objects the loop drives; only the judge changes (``judge.source=frozen``)."""

    engine: PolicyEngine
    sampler: Sampler  # the policy's: rollouts, and the verdicts of the self-judge
    judge: Judge

    def close(self) -> None:
        """Close the judge (and the model it loaded), then the sampler; the engine is closed apart."""
        self.judge.close()
        self.sampler.close()


# ------------------------------------------------------------------ building the parts


def build_parts(cfg: TrainConfig, engine: PolicyEngine, run_dir: Path, iteration: int) -> Parts:
    """The policy sampler and the judge of ``iteration`` around the engine."""
    sampler = build_policy_sampler(cfg, engine)
    return Parts(engine, sampler, build_loop_judge(cfg, sampler, run_dir, iteration, engine.model_path))


def build_policy_sampler(cfg: TrainConfig, engine: PolicyEngine) -> Sampler:
    """The sampler of ``rollout`` on the engine's policy.

    It truncates nothing by itself: rollouts cap prompts at ``grpo.max_prompt_length`` per call,
    while the self-judge sends its long rubric prompts through the same sampler whole. The
    engine comes first: a vLLM sampler joins the process group it created.
    """
    from dynalign.rollout import build_sampler, zero3_gather

    return build_sampler(
        cfg.rollout, tokenizer=engine.tokenizer, model=engine.module, model_path=engine.model_path,
        max_prompt_length=None, max_completion_length=cfg.grpo.max_completion_length,
        seed=cfg.seed, dtype=cfg.model.dtype, gather=zero3_gather(engine.ds_engine), shares_weights=True,
        model_config=cfg.model)


def build_loop_judge(cfg: TrainConfig, sampler: Sampler, run_dir: Path, iteration: int,
                     base_model: str) -> Judge:
    """The judge of iteration ``iteration``: ``judge.source`` picks the model behind it."""
    from dynalign.judge import build_judge, resolve_judge_model

    frozen = None
    if cfg.judge.source == "frozen":
        path = frozen_judge_model(iteration, run_dir, base_model)
        print0(f"dynalign: iteration {iteration + 1} is judged by the frozen policy {path}")
        frozen = side_sampler(cfg, path)
    return build_judge(cfg.judge, sampler, frozen_sampler=frozen,
                       make_sampler=lambda ext: side_sampler(cfg, resolve_judge_model(ext, cfg.model)))


def frozen_judge_model(iteration: int, run_dir: Path, base_model: str) -> str:
    """What judges iteration ``iteration`` under ``judge.source=frozen``: the policy as the
    iteration began, i.e. the base model for the first one, then the export ``iter_<k>/``
    written at the end of the iteration before."""
    if iteration == 0:
        return base_model
    path = RunDir(run_dir).export(iteration)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"judge.source=frozen: iteration {iteration + 1} is judged by the policy "
                                f"exported when it began, {path}, which is missing")
    return str(path)


def renew_frozen_judge(cfg: TrainConfig, parts: Parts, run_dir: Path, iteration: int) -> None:
    """Replace the frozen judge by the one of ``iteration``, freeing the old model first (two
    whole copies beside the policy need not fit)."""
    parts.judge.close()
    del parts.judge  # the only reference to the old judge and its model
    gc.collect()
    parts.judge = build_loop_judge(cfg, parts.sampler, run_dir, iteration, parts.engine.model_path)


def side_sampler(cfg: TrainConfig, path: str):
    """A whole (never ZeRO-partitioned) model beside the policy: the frozen judge, a local external
    judge, or the prompt writer of a multi-rank run."""
    from dynalign.models import load_hf_sampler

    return load_hf_sampler(cfg.model, path=path, batch_size=cfg.rollout.batch_size)


def sync_sampler(cfg: TrainConfig, parts: Parts) -> None:
    """Give the sampler the policy's weights when it holds its own copy (vLLM: gathered
    ``rollout.vllm.sync_bucket_mib`` at a time into copies on this rank's device, the engine's),
    and wake it up."""
    if parts.sampler.needs_weight_sync:
        bucket = cfg.rollout.vllm.sync_bucket_mib * 2**20
        parts.sampler.update_weights(parts.engine.export_weights(on_device=True, bucket_bytes=bucket))
    parts.sampler.wake_up()


def prompt_writer(cfg: TrainConfig, parts: Parts, run_dir: Path) -> Sampler | Callable[[], Sampler]:
    """What writes an iteration's prompts when the policy regenerates them: the policy sampler
    itself, on every rank. Under ZeRO-3 each rank gathers the policy once for the whole
    generation and samples its own shards (:mod:`dynalign.datagen.pipeline`)."""
    return parts.sampler


def prompts_for_iteration(cfg: TrainConfig, iteration: int, writer: Sampler | Callable[[], Sampler],
                          run_dir: Path, rank: int) -> list[str]:
    """The training prompts of an iteration, shuffled by (seed, iteration): every rank agrees.

    Rank 0 selects them and writes them to the run directory, every rank reads them back. A set
    the policy regenerates is sampled by every rank (a share of the shards each); rank 0
    filters, deduplicates and writes it.
    """
    from dynalign.datagen.select import help_select_training_prompts, select_training_prompts

    layout = RunDir(run_dir)
    if rank == 0:
        prompt_set = select_training_prompts(cfg.generator, writer, model_name=cfg.model.name_or_path,
                                             iteration=iteration, run_dir=run_dir)
        prompts = list(prompt_set.train)
        layout.prompts.mkdir(parents=True, exist_ok=True)
        layout.prompts_file(iteration).write_text(json.dumps(prompts))
    else:
        help_select_training_prompts(cfg.generator, writer, model_name=cfg.model.name_or_path,
                                     iteration=iteration)
    barrier()
    prompts = json.loads(layout.prompts_file(iteration).read_text())
    shuffle = torch.Generator().manual_seed(step_seed(cfg.seed, iteration))
    return [prompts[i] for i in torch.randperm(len(prompts), generator=shuffle)]


def step_prompts(prompts: Sequence[str], cfg: TrainConfig, step: int, rank: int,
                 world_size: int) -> list[str]:
    """This rank's share of the prompts of step ``step`` (cycling through the iteration's set)."""
    per_step, per_rank = cfg.grpo.prompts_per_step, cfg.grpo.prompts_per_step // world_size
    start = step * per_step + rank * per_rank
    return [prompts[(start + i) % len(prompts)] for i in range(per_rank)]


# ------------------------------------------------------------------------ one step


def make_batch(rollouts: Rollouts, advantages: torch.Tensor, keep: torch.Tensor) -> TrainBatch:
    """Rollouts as the engine's batch; rows not kept (masked groups, truncation) count for nothing."""
    from dynalign.engine import TrainBatch

    inputs = rollouts.model_inputs()
    completion_mask = inputs.completion_mask * keep[:, None].to(inputs.completion_mask.dtype)  # [N, C]
    return TrainBatch(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                      completion_mask=completion_mask, advantages=advantages.float(),
                      sampler_logprobs=rollouts.logprobs)


def rewards_to_advantages(rewards: torch.Tensor, rollouts: Rollouts,
                          cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Group-relative advantages [N], the rows that enter the loss [N] and their statistics."""
    g = cfg.grpo
    advantages = group_advantages(rewards, g.group_size, scale=g.scale_rewards)  # [N]
    keep = torch.ones_like(rewards, dtype=torch.bool)  # [N]
    stats: dict[str, float] = {}
    if g.dynamic_sampling:
        flat = zero_spread_groups(rewards, g.group_size)  # [N / G]
        keep &= ~flat.repeat_interleave(g.group_size)
        stats["groups/zero_spread_dropped"] = float(flat.sum())
    if g.mask_truncated:
        keep &= ~rollouts.truncated
    stats["advantages/mean"] = float(advantages.mean())
    stats["advantages/abs_mean"] = float(advantages.abs().mean())
    stats["batch/rows_kept_frac"] = float(keep.float().mean())
    return advantages, keep, stats


def wants_sampler_logprobs(cfg: TrainConfig) -> bool:
    """Whether rollouts bring the sampler's own log-probs: for the IS correction, and from vLLM
    (they cost it nothing) to log the mismatch. Samplers return them at temperature 1, so they
    compare with the trainer's only at rollout temperature 1."""
    r = cfg.rollout
    return cfg.grpo.sampler_is_correction or (r.backend == "vllm" and r.temperature == 1.0)


def grpo_step(cfg: TrainConfig, parts: Parts, prompts: list[str], position: Position, rank: int,
              timer: PhaseTimer) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Roll out, judge, compute advantages, update, sync: one GRPO step on this rank's prompts."""
    from dynalign.rollout import sampling_params
    from dynalign.rollout.base import reusing_prefixes

    g, engine, sampler = cfg.grpo, parts.engine, parts.sampler
    seed = step_seed(cfg.seed, position.global_step, rank)
    params = sampling_params(cfg.rollout, g.max_completion_length, seed=seed,
                             max_prompt_length=g.max_prompt_length, logprobs=wants_sampler_logprobs(cfg))
    with timer("gen"), reusing_prefixes(sampler):  # each prompt prefilled once for its G answers
        rollouts = sampler.sample([[{"role": "user", "content": p}] for p in prompts], g.group_size, params)
    with timer("judge"):
        answered = [prompts[i] for i in rollouts.prompt_index.tolist()]
        judged = parts.judge.score(answered, rollouts.texts, seed=seed)
    with timer("adv"):
        advantages, keep, adv_stats = rewards_to_advantages(judged.rewards, rollouts, cfg)
        batch = make_batch(rollouts, advantages, keep)
    with timer("ref"):
        awake = device_free_gib()
        sampler.sleep()  # vLLM's memory goes to the reference pass and the update (enable_sleep_mode)
        asleep = device_free_gib()
        if g.beta > 0:
            batch = batch.with_logprobs(ref=engine.reference_logprobs(batch))
        if g.num_iterations > 1:
            batch = batch.with_logprobs(old=engine.policy_logprobs(batch))
    with timer("update"):
        free_for_update = device_free_gib()
        updates = [engine.train_step(batch) for _ in range(g.num_iterations)]
    with timer("sync"):
        sync_sampler(cfg, parts)

    metrics = {f"train/{k}": v for k, v in updates[-1].items()}  # already over the whole batch
    if awake is not None and asleep is not None and free_for_update is not None:  # this rank's device
        metrics.update({"mem/sleep_freed_gib": asleep - awake, "mem/update_free_gib": free_for_update})
    metrics.update(step_metrics(judged, rollouts, adv_stats))
    metrics["train/skipped_steps"] = float(engine.skipped_steps)
    return metrics, step_samples(cfg, position, answered, rollouts, judged)


def step_metrics(judged: JudgeResult, rollouts: Rollouts, adv_stats: dict[str, float], *,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Judge, completion and advantage statistics of the whole step, from every rank's share.

    Means and stds of the reward and of each aspect are exact over the step's parsed values:
    each rank gives its mean and mean of squares, weighted by how many it parsed. The length
    correlations are the mean of the ranks' own. ``reduce`` is :func:`reduce_metrics`'.
    """
    from dynalign.judge import judge_stats

    lengths = rollouts.completion_lengths.float()  # [N]
    local = judge_stats(judged, lengths) | adv_stats
    local["completions/length_mean"] = float(lengths.mean())
    local["completions/truncated_frac"] = float(rollouts.truncated.float().mean())
    spread = {"judge/reward": judged.rewards,  # [N] each
              **{f"judge/{a}": judged.scores[:, i] for i, a in enumerate(judged.aspect_names)}}
    weights: dict[str, float] = {}
    for name, values in spread.items():
        moments = parsed_moments(values)
        local[f"{name}_mean"], local[f"{name}_meansq"] = moments[1:]
        weights[f"{name}_mean"] = weights[f"{name}_meansq"] = moments[0]
        del local[f"{name}_std"]  # from the moments, once they are the whole step's
    local["reward/mean"], weights["reward/mean"] = local["judge/reward_mean"], weights["judge/reward_mean"]
    step = reduce_metrics(local, summed=lambda key: key.startswith(SUMMED_METRICS), weights=weights,
                          reduce=reduce)
    for name in spread:
        meansq, mean = step.pop(f"{name}_meansq"), step[f"{name}_mean"]
        step[f"{name}_std"] = math.sqrt(max(0.0, meansq - mean**2)) if math.isfinite(meansq) else math.nan
    return dict(sorted(step.items()))


def parsed_moments(values: torch.Tensor) -> tuple[float, float, float]:
    """(count, mean, mean of squares) of the finite ``values`` [N], in float64 so that the step's
    variance E[x^2] - E[x]^2 keeps its digits; the moments are NaN when none is finite."""
    parsed = values[torch.isfinite(values)].double()  # [n]
    if parsed.numel() == 0:
        return 0.0, math.nan, math.nan
    return float(parsed.numel()), float(parsed.mean()), float(parsed.square().mean())


def step_samples(cfg: TrainConfig, position: Position, answered: list[str], rollouts: Rollouts,
                 judged: JudgeResult) -> list[dict[str, Any]]:
    """The first ``logger.samples_per_log`` answers of this rank, with their verdicts."""
    return [{"iteration": position.iteration, "prompt": answered[i], "completion": rollouts.texts[i],
             "reward": float(judged.rewards[i]), "reason": judged.reasons[i],
             "scores": dict(zip(judged.aspect_names, judged.scores[i].tolist(), strict=True)),
             "judge_rationale": judged.texts[i][0] if judged.texts[i] else ""}
            for i in range(min(len(rollouts), cfg.logger.samples_per_log))]


# ------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, info: RunInfo, job: ExitStack) -> dict[str, Any]:
    from dynalign.engine import PolicyEngine
    from dynalign.models import MODEL_NOTICES, resolve_model_path

    resolve_model_path(cfg.model)  # build the embedded model, if it is the one, before joining the group
    dist_info = init_distributed()
    rank, world = dist_info.rank, dist_info.world_size
    if notice := MODEL_NOTICES.get(cfg.model.name_or_path):
        print0(f"dynalign: {notice}")
    cfg.validate(world_size=world)
    seed_everything(cfg.seed)
    engine = PolicyEngine.from_config(cfg)
    job.callback(engine.close)
    timer, between = PhaseTimer(), PhaseTimer()  # the step's phases; the iteration's, around the steps
    position = resume(cfg, engine, info.run_dir)
    close_iteration(cfg, engine, info.run_dir, position, between)  # what an interruption cut short
    parts = build_parts(cfg, engine, info.run_dir, position.iteration)
    job.callback(parts.close)
    if position.global_step:
        sync_sampler(cfg, parts)  # a sampler with its own weights loaded the base model, not the checkpoint
    tracker = build_tracker(cfg.logger, info, rank)
    job.callback(tracker.close)
    if "eval" in position.pending:
        with between("eval"):
            evaluate_pending(cfg, parts, info, position, tracker)
    metrics: dict[str, float] = {}
    with Preemption() as preemption, tqdm(total=cfg.iterations * cfg.steps_per_iteration,
                                          initial=position.global_step, desc="dynalign", unit="step",
                                          disable=rank != 0, dynamic_ncols=True) as bar:
        while position.iteration < cfg.iterations:
            iteration = position.iteration
            with between("prompts"):
                prompts = prompts_for_iteration(cfg, iteration, prompt_writer(cfg, parts, info.run_dir),
                                                info.run_dir, rank)
            tracker.log_artifact("prompts", prompt_files(info.run_dir, iteration), iteration + 1,
                                 {"prompts": len(prompts)})
            rewards: list[float] = []  # of this iteration's steps, for its summary line
            while position.iteration == iteration:
                mine = step_prompts(prompts, cfg, position.step, rank, world)
                metrics, samples = grpo_step(cfg, parts, mine, position, rank, timer)
                rewards.append(metrics["reward/mean"])
                position.advance(cfg.steps_per_iteration)
                if position.iteration > iteration:
                    position.pending = end_stages(cfg, position.iteration)
                log_step(cfg, tracker, bar, position, metrics | timer.pop() | between.pop(total=None),
                         samples, iteration)
                if _agreed(preemption.requested):
                    return preempted(cfg, engine, info.run_dir, position, tracker)
            if rewards:  # a resumed iteration may have no step left
                print0(f"dynalign: iteration {iteration + 1}: reward {rewards[0]:.3f} at its first step, "
                       f"{rewards[-1]:.3f} at its last ({len(rewards)} steps)")
            end_of_iteration(cfg, parts, info, position, tracker, between)
            if cfg.export_each_iteration:
                tracker.log_artifact("policy", [RunDir(info.run_dir).export(iteration + 1)], iteration + 1)
    # the last iteration's end has no step after it to carry its times: the summary does
    summary = {"global_step": position.global_step, "final_reward": metrics.get("reward/mean", math.nan),
               "skipped_steps": engine.skipped_steps, **between.pop(total=None), **memory_metrics(),
               **finish_checkpoints(cfg, engine, info.run_dir)}
    tracker.finish(summary)
    print0(f"dynalign: done: {cfg.iterations} iterations, {position.global_step} steps, "
           f"final reward {summary['final_reward']:.3f}, run dir {info.run_dir}")
    return summary


def log_step(cfg: TrainConfig, tracker: Tracker, bar: tqdm, position: Position, metrics: dict[str, float],
             samples: list[dict[str, Any]], iteration: int) -> None:
    """Metrics every step, a samples table every ``logger.log_samples_every`` steps, the progress bar."""
    metrics["perf/tokens_per_s"] = metrics.get("train/tokens", 0.0) / max(metrics["time/step"], 1e-9)
    metrics["iteration"] = float(iteration)
    tracker.log(metrics, step=position.global_step)
    every = cfg.logger.log_samples_every
    if every and position.global_step % every == 0:
        tracker.log_samples(samples, step=position.global_step)
    bar.update(1)
    bar.set_postfix({"iteration": iteration + 1, **console_postfix(metrics)})  # in this order


def end_of_iteration(cfg: TrainConfig, parts: Parts, info: RunInfo, position: Position, tracker: Tracker,
                     timer: PhaseTimer) -> None:
    """Export the policy, move the KL reference to it, checkpoint, evaluate when due; then, under
    ``judge.source=frozen``, load the next iteration's judge (the policy just exported)."""
    close_iteration(cfg, parts.engine, info.run_dir, position, timer)
    with timer("eval"):
        evaluate_pending(cfg, parts, info, position, tracker)
    if cfg.judge.source == "frozen" and position.iteration < cfg.iterations:
        with timer("frozen_judge"):
            renew_frozen_judge(cfg, parts, info.run_dir, position.iteration)


def close_iteration(cfg: TrainConfig, engine: PolicyEngine, run_dir: Path, position: Position,
                    timer: PhaseTimer) -> None:
    """The engine's share of an iteration's end, as far as ``position.pending`` asks: export the
    policy, move the KL reference to it, checkpoint (recording that only the evaluation is left).

    Each stage can run again from the same weights with the same result, so a run interrupted
    anywhere in here redoes them all from the checkpoint it resumes from.
    """
    done, pending = position.iteration, position.pending
    if "checkpoint" not in pending:
        return
    with timer("export"):
        if "export" in pending:
            engine.export_hf(RunDir(run_dir).export(done))
    with timer("reference"):
        if "reference" in pending:
            engine.update_reference()
    position.pending = [stage for stage in pending if stage == "eval"]
    with timer("checkpoint"):
        save_checkpoint(cfg, engine, run_dir, position)


def evaluate_pending(cfg: TrainConfig, parts: Parts, info: RunInfo, position: Position,
                     tracker: Tracker) -> None:
    """The evaluation of the iteration just ended, if due and not yet done; the checkpoint then
    records it as done, so a resumed run evaluates each iteration once."""
    from dynalign.engine import record_client_state
    from dynalign.eval import evaluate_iteration

    if "eval" not in position.pending:
        return
    # calibration is the policy judging its own answers: a frozen or external judge is not it
    self_judge = parts.judge if cfg.judge.source == "self" else None
    evaluate_iteration(cfg, info.run_dir, position.iteration, tracker=tracker,
                       policy_sampler=parts.sampler, self_judge=self_judge)
    position.pending.remove("eval")
    record_client_state(parts.engine, RunDir(info.run_dir).checkpoints, vars(position))


def preempted(cfg: TrainConfig, engine: PolicyEngine, run_dir: Path, position: Position,
              tracker: Tracker) -> dict[str, Any]:
    """SIGTERM or SIGUSR1 on some rank: checkpoint after this step and end the run cleanly. After
    an iteration's last step, the checkpoint records its whole end as pending."""
    save_checkpoint(cfg, engine, run_dir, position)
    print0(f"dynalign: preempted; checkpoint saved at step {position.global_step}")
    tracker.finish({"preempted": True, "global_step": position.global_step})
    return {"preempted": True, "global_step": position.global_step}


def save_checkpoint(cfg: TrainConfig, engine: PolicyEngine, run_dir: Path, position: Position) -> Path:
    """Checkpoint with the run's position, keep the newest ``checkpoints_to_keep``, report the sizes."""
    from dynalign.engine import checkpoint_bytes, complete_checkpoints

    path = engine.save(RunDir(run_dir).checkpoints, vars(position), keep=cfg.checkpoints_to_keep)
    if is_main_process():
        kept = complete_checkpoints(path.parent)
        print0(f"dynalign: checkpoint {path}: {fmt_bytes(checkpoint_bytes(path))} "
               f"({len(kept)} kept, {fmt_bytes(sum(map(checkpoint_bytes, kept)))} in all)")
    return path


def finish_checkpoints(cfg: TrainConfig, engine: PolicyEngine, run_dir: Path) -> dict[str, float]:
    """The run ended: under ``checkpoint_optimizer_at_end=false`` its checkpoints drop what only a
    resume would read. Returns the size of the newest checkpoint, for the summary."""
    from dynalign.engine import checkpoint_bytes, resumable_checkpoint

    root = RunDir(run_dir).checkpoints
    if not cfg.checkpoint_optimizer_at_end:
        freed = engine.drop_training_state(root)
        print0(f"dynalign: checkpoint_optimizer_at_end=false: the checkpoints dropped their optimizer and "
               f"module states ({fmt_bytes(freed)}); the final weights are "
               f"{RunDir(run_dir).export(cfg.iterations)}")
    newest = resumable_checkpoint(root) if is_main_process() else None
    return {"checkpoint/size_gib": checkpoint_bytes(newest) / 2**30} if newest else {}


def resume(cfg: TrainConfig, engine: PolicyEngine, run_dir: Path) -> Position:
    """Where to start: from scratch, the run directory's newest complete checkpoint, or a given one.

    ``resume=auto`` without any checkpoint starts from step 0, dropping what a run killed before
    its first checkpoint logged; the logs are cut back to the checkpoint either way.
    """
    if cfg.resume == "never":
        return Position()
    source = auto_checkpoint(RunDir(run_dir).checkpoints) if cfg.resume == "auto" else Path(cfg.resume)
    position = Position(**engine.load(source)) if source is not None else Position()
    exported = RunDir(run_dir).export(position.iteration) / "config.json"
    if position.pending == ["eval"] and not exported.exists():
        position.pending = ["export", "checkpoint", "eval"]  # resume=PATH: the export is another run's
    dropped = cut_logs(run_dir, position)
    if source is None:
        print0(f"dynalign: resume=auto: no checkpoint in {run_dir}, starting from step 0"
               + (f" (dropped {dropped} records logged before the first checkpoint)" if dropped else ""))
    else:
        left = f" (still to run: {', '.join(position.pending)})" if position.pending else ""
        print0(f"dynalign: resumed from {source} at iteration {position.iteration}, "
               f"step {position.global_step}{left}")
    return position


def auto_checkpoint(root: Path) -> Path | None:
    """What ``resume=auto`` loads: the checkpoint ``latest`` names, else the newest complete one;
    None when the run never checkpointed. Checkpoints none of which is complete refuse: starting
    over would silently throw their steps away."""
    from dynalign.engine import LATEST_FILE, CheckpointError, resumable_checkpoint
    from dynalign.engine.checkpoint import checkpoint_step

    source = resumable_checkpoint(root)
    if source is None and root.is_dir():
        left = sorted(p.name for p in root.iterdir()
                      if checkpoint_step(p) is not None or p.name == LATEST_FILE)
        if left:
            raise CheckpointError(root, f"holds {', '.join(left)} but no complete checkpoint: move them "
                                        "away to start over, or resume=PATH one of them")
    return source


def check_auto_resume(cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse ``resume=auto`` of a checkpoint its run dropped the training state of, before any
    model is built or loaded: the checkpoint :func:`auto_checkpoint` finds, refused as the load
    would refuse it. Only reads, so every rank checks for itself and all of them stop."""
    from dynalign.engine.checkpoint import check_resumable, read_state

    source = auto_checkpoint(RunDir(run_dir).checkpoints) if cfg.resume == "auto" else None
    if source is not None:
        check_resumable(source, read_state(source))


def cut_logs(run_dir: Path, position: Position) -> int:
    """Drop the records logged after ``position`` (they are logged again, identically) and torn
    lines, on rank 0; with the iteration's evaluation pending, its records go too. Returns how
    many records of steps were dropped."""
    from dynalign.distributed import get_rank

    if get_rank() != 0:
        return 0
    step, redo_eval = position.global_step, "eval" in position.pending

    def logged_before(record: dict[str, Any]) -> bool:
        at = record.get("step")
        if not isinstance(at, int):
            return False
        return at < step or (at == step and not (redo_eval and _is_evaluation(record)))

    layout = RunDir(run_dir)
    dropped = cut_jsonl(layout.metrics, logged_before) + cut_jsonl(layout.samples, logged_before)
    cut_jsonl(layout.eval_history, lambda r: isinstance(r.get("step"), int)
              and (r["step"] < step or (r["step"] == step and not redo_eval)))
    return dropped


def _is_evaluation(record: dict[str, Any]) -> bool:
    """A metrics line or samples row the evaluation logged (``eval/...`` metrics, its table rows)."""
    return record.get("table") == "eval" or all(k == "step" or k.startswith("eval/") for k in record)


def end_stages(cfg: TrainConfig, done: int) -> list[str]:
    """The END_STAGES that end iteration ``done`` (1-based) under ``cfg``."""
    from dynalign.eval import evaluation_due

    wanted = {"export": cfg.export_each_iteration,
              "reference": cfg.grpo.beta > 0 and cfg.update_reference_each_iteration,
              "checkpoint": True, "eval": evaluation_due(cfg, done)}
    return [stage for stage in END_STAGES if wanted[stage]]


def _agreed(flag: bool) -> bool:
    """True on every rank when any rank saw the flag."""
    return bool(all_reduce(torch.tensor([float(flag)]), "max").item() > 0)


# ---------------------------------------------------------------------- entry point


def run_info(cfg: DictConfig) -> RunInfo:
    """Run directory, name, W&B group and the composed config, from Hydra's runtime."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    name = hc.job.override_dirname or "default"
    group = hc.sweep.dir if hc.mode == RunMode.MULTIRUN else hc.run.dir
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    return RunInfo(run_dir=Path(hc.runtime.output_dir), name=name, group=str(group), config=config,
                   overrides=tuple(hc.overrides.task), swept=tuple(hc.sweeper.get("params") or {}),
                   job_num=hc.job.num if hc.mode == RunMode.MULTIRUN else None)


def claim_run_dir(cfg: TrainConfig, run_dir: Path) -> None:
    """Delete what interrupted writes left there, then refuse a fresh run (``resume=never``) in a
    directory an earlier run used, unless ``overwrite=true`` deletes what that run left; called
    under the directory's lock."""
    layout = RunDir(run_dir)
    if freed := layout.clear_leftovers():
        print0(f"dynalign: deleted {fmt_bytes(freed)} that interrupted writes left in {run_dir}")
    found = layout.previous_run()
    if cfg.resume != "never" or not found:
        return
    if not cfg.overwrite:
        raise RunDirError(f"{run_dir} holds an earlier run ({', '.join(found)}): resume=auto continues it, "
                          "overwrite=true deletes it, or choose another hydra.run.dir")
    layout.clear_previous_run()
    print0(f"dynalign: overwrite=true: deleted the earlier run in {run_dir} ({', '.join(found)})")


def owned_train(cfg: TrainConfig, info: RunInfo, record: dict[str, str]) -> dict[str, Any]:
    """``train`` holding the run directory (rank 0 locks it for the whole run; the other ranks of
    the launch share it), the launch's ``record`` (:func:`~dynalign.cli.launch_record`) saved in it
    once it is the run's. A directory or checkpoint it may not use ends the process with one
    line naming it, before any model is loaded (or, for a checkpoint that is broken rather than
    refused, when it is read)."""
    from dynalign.engine import CheckpointError

    try:
        if int(os.environ.get("RANK", "0")) != 0:
            return train_job(cfg, info)
        with RunDir(info.run_dir).owned():
            claim_run_dir(cfg, info.run_dir)
            return train_job(cfg, info, record)
    except (RunDirError, CheckpointError) as err:
        print(f"dynalign: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def train_job(cfg: TrainConfig, info: RunInfo, record: dict[str, str] | None = None) -> dict[str, Any]:
    """``train`` as one job of a launch: the run, or one job of a sweep, which runs in this process
    (on every rank) after the jobs before it; rank 0 saves the launch's ``record`` once nothing
    refuses the run. What the job opened is closed when it ends, on error too, and its memory given
    back, so the next job starts as the first did; the process group stays for it (it is destroyed
    at exit)."""
    try:
        with ExitStack() as job:  # closes what train() opens, newest first
            check_auto_resume(cfg, info.run_dir)  # before join_launch builds the embedded model
            if record is not None:
                save_launch_record(info.run_dir, record)
            join_launch(cfg, info)
            return train(cfg, info, job)
    except BaseException as err:
        traceback.clear_frames(err.__traceback__)  # Hydra keeps a failed job's error until the sweep ends
        raise
    finally:
        release_memory()


def join_launch(cfg: TrainConfig, info: RunInfo) -> None:
    """Build the embedded model, make the process group (the first job) or join it (the next jobs of
    a sweep) with ``distributed.timeout_minutes``, and check that every rank runs in one directory.

    transformers writes a model on rank 0 only once a group exists, so a later job's embedded model
    is built by rank 0 while the other ranks wait (``train`` then finds it built).
    """
    from dynalign.models import resolve_model_path

    if not torch.distributed.is_initialized() or get_rank() == 0:
        resolve_model_path(cfg.model)
    init_distributed(timedelta(minutes=cfg.distributed.timeout_minutes))
    barrier()  # a later job: the others wait for rank 0's build
    dirs = gather_strings(str(info.run_dir))
    if len(set(dirs)) > 1:
        other = next(rank for rank, path in enumerate(dirs) if path != dirs[0])
        raise RunDirError(f"the ranks run in different directories (rank 0: {dirs[0]}, rank {other}: "
                          f"{dirs[other]}): on several nodes pass hydra.run.dir (hydra.sweep.dir for a "
                          "sweep) on a filesystem they all see, or export one DYNALIGN_RUN_STAMP everywhere")


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, Any]:
    from dynalign.plan import check_launch

    adopt_slurm_launch()  # a hydra/launcher=slurm job of several tasks: ranks from SLURM's variables
    with failure_ends_launch():
        config = validated_config(cfg)
        check_launch(config)  # a run whose memory plan does not fit stops here, before anything loads
        return owned_train(config, run_info(cfg), launch_record(cfg))


if __name__ == "__main__":
    adopt_slurm_launch()  # before Hydra stamps the run directory: ranks of a node share their parent's time
    run_main(main)
