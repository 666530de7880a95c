"""The training loop's own pieces, fast and in process: advantages into a batch, the prompt and
step bookkeeping, metrics over ranks, the order of the phases, the frozen judge, and one real
GRPO step that moves every trainable parameter."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dynalign.config import ConfigError, to_train_config
from dynalign.distributed import reduce_metrics
from dynalign.judge import JudgeResult
from dynalign.rollout import Rollouts
from dynalign.runtime import PhaseTimer
from dynalign.tracking import RunInfo, console_postfix
from dynalign.train import (
    Parts,
    Position,
    cut_logs,
    end_of_iteration,
    end_stages,
    frozen_judge_model,
    grpo_step,
    make_batch,
    rewards_to_advantages,
    step_metrics,
    step_prompts,
)

EPS = 1e-4  # group_advantages' eps: a group with rewards (0, 2) gets advantages -+1 / (1 + EPS)


@pytest.fixture
def train_cfg(compose_cfg):
    """``train_cfg(*overrides)``: the validated TrainConfig of ``conf/train.yaml`` plus overrides."""
    return lambda *overrides: to_train_config(compose_cfg(list(overrides)))


def rollouts(finish_reasons: list[str], group_size: int = 2) -> Rollouts:
    """N hand-made rollouts: 2 prompt tokens, 3 completion slots of which row i fills 1 + i % 3."""
    n = len(finish_reasons)
    completion_mask = torch.tensor([[1] * (1 + i % 3) + [0] * (2 - i % 3) for i in range(n)])  # [N, 3]
    ones = torch.ones(n, 2, dtype=torch.long)  # [N, 2]
    return Rollouts(prompt_ids=ones, prompt_mask=ones,
                    completion_ids=torch.full((n, 3), 5) * completion_mask, completion_mask=completion_mask,
                    texts=[f"answer {i}" for i in range(n)], finish_reasons=finish_reasons,
                    prompt_index=torch.arange(n) // group_size)


def judgement(rewards: list[float]) -> JudgeResult:
    """A judge's result with the given rewards, one aspect equal to the reward."""
    r = torch.tensor(rewards)
    ok = ["ok" if math.isfinite(x) else "no_verdict" for x in rewards]
    return JudgeResult(rewards=r, scores=r[:, None].clone(), reasons=ok, judgement_reasons=[[o] for o in ok],
                       texts=[["verdict"] for _ in rewards], nonces=["n"] * len(rewards),
                       aspect_names=("knowledge",), scale=(0, 5))


# ------------------------------------------------------------------ advantages into a batch


def test_dynamic_sampling_masks_and_counts_groups_without_spread(train_cfg):
    cfg = train_cfg("grpo.group_size=2", "grpo.dynamic_sampling=true")
    rewards = torch.tensor([1.0, 1.0, 0.0, 2.0])
    advantages, keep, stats = rewards_to_advantages(rewards, rollouts(["stop"] * 4), cfg)
    torch.testing.assert_close(advantages, torch.tensor([0.0, 0.0, -1 / (1 + EPS), 1 / (1 + EPS)]))
    assert keep.tolist() == [False, False, True, True]
    assert stats["groups/zero_spread_dropped"] == 1.0
    assert stats["batch/rows_kept_frac"] == 0.5
    assert stats["advantages/abs_mean"] == pytest.approx(0.5 / (1 + EPS))

    _, keep, stats = rewards_to_advantages(rewards, rollouts(["stop"] * 4), train_cfg("grpo.group_size=2"))
    assert keep.all() and "groups/zero_spread_dropped" not in stats  # off by default


def test_truncated_answers_leave_the_loss_only_when_asked(train_cfg):
    rewards, rolled = torch.tensor([0.0, 2.0, 0.0, 2.0]), rollouts(["stop", "length", "length", "stop"])
    cfg = train_cfg("grpo.group_size=2", "grpo.mask_truncated=true")
    _, keep, stats = rewards_to_advantages(rewards, rolled, cfg)
    assert keep.tolist() == [True, False, False, True] and stats["batch/rows_kept_frac"] == 0.5
    _, keep, _ = rewards_to_advantages(rewards, rolled, train_cfg("grpo.group_size=2"))
    assert keep.all()


def test_nan_rewards_get_zero_advantage_and_stay_out_of_the_baseline(train_cfg):
    cfg = train_cfg("grpo.group_size=3", "grpo.dynamic_sampling=true")
    rewards = torch.tensor([math.nan, 1.0, 3.0, math.nan, 2.0, math.nan])
    advantages, keep, stats = rewards_to_advantages(rewards, rollouts(["stop"] * 6, group_size=3), cfg)
    # group 1: baseline (1 + 3) / 2 = 2, std 1; a NaN counted as 0 would give a baseline of 4/3
    torch.testing.assert_close(advantages, torch.tensor([0.0, -1 / (1 + EPS), 1 / (1 + EPS), 0.0, 0.0, 0.0]))
    # group 2 has one defined reward: nothing to compare, dropped as zero spread
    assert keep.tolist() == [True] * 3 + [False] * 3 and stats["groups/zero_spread_dropped"] == 1.0


def test_make_batch_zeroes_the_completion_mask_of_dropped_rows():
    rolled = rollouts(["stop"] * 3)
    advantages = torch.tensor([0.5, -0.5, 1.0], dtype=torch.float64)
    batch = make_batch(rolled, advantages, torch.tensor([True, False, True]))
    assert batch.completion_mask.tolist() == [[1, 0, 0], [0, 0, 0], [1, 1, 1]]
    assert batch.input_ids.tolist()[2] == [1, 1, 5, 5, 5]
    assert batch.advantages.dtype == torch.float32 and batch.advantages.tolist() == [0.5, -0.5, 1.0]


# ------------------------------------------------------------------ prompts, position, resume


def test_step_prompts_split_over_ranks_and_cycle_past_the_end(train_cfg):
    cfg, prompts = train_cfg("grpo.prompts_per_step=4"), ["a", "b", "c", "d", "e"]
    assert [step_prompts(prompts, cfg, 0, rank, 2) for rank in (0, 1)] == [["a", "b"], ["c", "d"]]
    assert [step_prompts(prompts, cfg, 1, rank, 2) for rank in (0, 1)] == [["e", "a"], ["b", "c"]]


def test_position_advances_into_the_next_iteration():
    position = Position(iteration=0, step=0, global_step=0)
    position.advance(steps_per_iteration=2)
    assert vars(position) == {"iteration": 0, "step": 1, "global_step": 1, "pending": []}
    position.advance(steps_per_iteration=2)
    assert vars(position) == {"iteration": 1, "step": 0, "global_step": 2, "pending": []}


def test_resume_cuts_local_logs_back_to_the_checkpoint(tmp_path):
    kept = ['{"step": 1, "reward/mean": 0.25}', '{"step":2,  "reward/mean": null}', '{"step": 2, "x": 1}']
    torn = '{"step": 3, "rew'  # a kill in the middle of a write
    (tmp_path / "metrics.jsonl").write_text("\n".join([*kept, '{"step": 3, "reward/mean": 1.0}', torn]))
    (tmp_path / "samples.jsonl").write_text('{"step": 3, "prompt": "p"}\n{"step": 4, "prompt": "q"}\n')
    assert cut_logs(tmp_path, Position(global_step=2)) == 4
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(kept) + "\n"  # byte for byte
    assert (tmp_path / "samples.jsonl").read_text() == ""


def test_a_pending_evaluation_takes_its_logged_records_with_it(tmp_path):
    step = '{"step": 2, "reward/mean": 0.5}'
    evaluation = '{"step": 2, "eval/ca/policy/overall/mean": 3.0, "eval/time/judge": 1.0}'
    (tmp_path / "metrics.jsonl").write_text(f"{step}\n{evaluation}\n")
    (tmp_path / "samples.jsonl").write_text('{"step": 2, "prompt": "p"}\n{"step": 2, "table": "eval"}\n')
    (tmp_path / "eval").mkdir()
    history = tmp_path / "eval" / "eval_history.jsonl"
    history.write_text('{"step": 1, "iteration": 1}\n{"step": 2, "iteration": 2}\n')
    cut_logs(tmp_path, Position(iteration=2, global_step=2, pending=["eval"]))
    assert (tmp_path / "metrics.jsonl").read_text() == step + "\n"
    assert (tmp_path / "samples.jsonl").read_text() == '{"step": 2, "prompt": "p"}\n'
    assert history.read_text() == '{"step": 1, "iteration": 1}\n'


def test_an_iteration_ends_with_the_stages_its_config_asks_for(train_cfg):
    assert end_stages(train_cfg("iterations=3"), 1) == ["export", "checkpoint"]
    cfg = train_cfg("iterations=3", "grpo.beta=0.1", "eval.every_n_iterations=2")
    assert end_stages(cfg, 1) == ["export", "reference", "checkpoint"]
    assert end_stages(cfg, 2) == ["export", "reference", "checkpoint", "eval"]
    assert end_stages(cfg, 3) == ["export", "reference", "checkpoint", "eval"]  # the last one


# ------------------------------------------------------------------ metrics over ranks


def fake_world(shares: list[dict], weights: list[dict], summed) -> list[dict]:
    """``reduce_metrics`` on every rank of a fake world: a first pass records what each rank packs,
    the second hands every rank the sum, as an all-reduce would."""
    packed: list[torch.Tensor] = []
    for share, w in zip(shares, weights, strict=True):
        reduce_metrics(share, summed=summed, weights=w, reduce=lambda t: packed.append(t.clone()) or t)
    total = torch.stack(packed).sum(0)
    return [reduce_metrics(share, summed=summed, weights=w, reduce=lambda t: total.clone())
            for share, w in zip(shares, weights, strict=True)]


def test_reduce_metrics_is_the_identity_in_a_world_of_one():
    share = {"judge/reward_std": 0.3, "groups/zero_spread_dropped": 2.0, "judge/length_pearson": math.nan,
             "completions/length_mean": 7.25}
    out = reduce_metrics(share, summed=lambda k: k.startswith("groups/"))
    assert out.keys() == share.keys() and math.isnan(out.pop("judge/length_pearson"))
    assert out == {k: v for k, v in share.items() if k != "judge/length_pearson"}


def test_reduce_metrics_sums_counts_and_averages_the_rest_over_finite_ranks():
    shares = [{"count": 3.0, "frac": 0.5, "corr": math.nan, "mean": 1.0, "none": math.nan},
              {"none": math.nan, "mean": 3.0, "corr": 0.4, "frac": 0.0, "count": 1.0}]  # another order
    weights = [{"mean": 1.0}, {"mean": 3.0}]  # rank 1 has three times the parsed rewards
    for rank in fake_world(shares, weights, summed=lambda k: k == "count"):
        assert rank.keys() == shares[0].keys()
        assert rank["count"] == 4.0 and rank["frac"] == 0.25 and rank["corr"] == 0.4
        assert rank["mean"] == (1.0 * 1 + 3.0 * 3) / 4 and math.isnan(rank["none"])


def step_world(shares: list[tuple[JudgeResult, Rollouts]], adv: list[dict]) -> list[dict]:
    """``step_metrics`` on every rank of a fake world, handed the sum of what they pack (``fake_world``)."""
    packed: list[torch.Tensor] = []
    for (judged, rolled), stats in zip(shares, adv, strict=True):
        step_metrics(judged, rolled, stats, reduce=lambda t: packed.append(t.clone()) or t)
    total = torch.stack(packed).sum(0)
    return [step_metrics(judged, rolled, stats, reduce=lambda t: total.clone())
            for (judged, rolled), stats in zip(shares, adv, strict=True)]


def test_step_metrics_combine_the_ranks_shares():
    """Two ranks' judgements of one step: counts add up, rates and means are the whole step's."""
    shares = [(judgement([1.0, math.nan, 2.0, 2.0]), rollouts(["stop", "length", "stop", "stop"])),
              (judgement([4.0, 5.0, 4.0, 4.0]), rollouts(["stop"] * 4))]
    adv = [{"groups/zero_spread_dropped": 1.0, "batch/rows_kept_frac": 0.5},
           {"groups/zero_spread_dropped": 2.0, "batch/rows_kept_frac": 0.0}]
    metrics, other = step_world(shares, adv)

    assert metrics == other
    assert metrics["groups/zero_spread_dropped"] == 3.0 and metrics["batch/rows_kept_frac"] == 0.25
    assert metrics["judge/judgements"] == 8.0 and metrics["judge/hist/reward/4"] == 3.0
    assert metrics["judge/reward_nan_rate"] == 1 / 8 and metrics["completions/truncated_frac"] == 1 / 8
    assert metrics["reward/mean"] == pytest.approx(22 / 7)  # the 7 parsed rewards, not (5/3 + 17/4) / 2
    assert metrics["judge/knowledge_mean"] == pytest.approx(22 / 7)
    assert metrics["completions/length_mean"] == pytest.approx((1 + 2 + 3 + 1) / 4)


def test_step_metrics_stds_are_the_whole_steps():
    """The std of the 7 parsed rewards of two ranks, not the mean of the ranks' stds; an aspect's
    ranks are weighted by that aspect's parsed scores."""
    nan = math.nan
    rewards = [[1.0, nan, 2.0, 2.0], [4.0, 5.0, 4.0, 4.0]]
    style = [[3.0, 3.0, nan, nan], [0.0, 1.0, 2.0, 3.0]]
    shares = []
    for r, s in zip(rewards, style, strict=True):
        scores = torch.tensor([r, s]).T  # [4, 2]
        judged = replace(judgement(r), aspect_names=("knowledge", "style"), scores=scores)
        shares.append((judged, rollouts(["stop"] * 4)))
    metrics, other = step_world(shares, [{}, {}])

    assert metrics == other and not any("meansq" in key for key in metrics)
    parsed = torch.tensor([1.0, 2.0, 2.0, 4.0, 5.0, 4.0, 4.0])
    # E[x^2] - E[x]^2 = 82/7 - (22/7)^2 = 90/49; the ranks' stds average to (sqrt(2/9) + sqrt(3/16)) / 2
    assert metrics["judge/reward_std"] == pytest.approx(math.sqrt(90) / 7)
    assert metrics["judge/reward_std"] == pytest.approx(parsed.std(unbiased=False).item())
    assert metrics["judge/knowledge_std"] == pytest.approx(math.sqrt(90) / 7)
    # style: 3, 3 | 0, 1, 2, 3 -> mean 2 (ranks weighted 2 : 4, not 3 : 4), E[x^2] - 4 = 32/6 - 4
    assert metrics["judge/style_mean"] == pytest.approx(2.0)
    assert metrics["judge/style_std"] == pytest.approx(math.sqrt(4 / 3))
    style_parsed = torch.tensor([3.0, 3.0, 0.0, 1.0, 2.0, 3.0])
    assert metrics["judge/style_std"] == pytest.approx(style_parsed.std(unbiased=False).item())
    # a world of one: judge_stats' own std; no parsed reward at all: NaN
    alone = step_metrics(*shares[1], {}, reduce=lambda t: t)
    assert alone["judge/reward_std"] == pytest.approx(math.sqrt(3 / 16))
    unparsed = step_metrics(judgement([nan, nan]), rollouts(["stop"] * 2), {}, reduce=lambda t: t)
    assert math.isnan(unparsed["judge/reward_std"]) and math.isnan(unparsed["reward/mean"])


def test_the_console_shows_the_reward_spread_and_how_the_policy_moves_not_the_loss():
    # an on-policy GRPO step: the loss is ~0 by construction, the rest is what tells steps apart
    metrics = {"reward/mean": 1.9016, "judge/reward_std": 0.0069, "train/loss": -1e-9,
               "train/grad_norm": 1.066, "train/entropy": 6.9009}
    assert console_postfix(metrics) == {"reward": "1.902±0.007", "grad": "1.07", "entropy": "6.90"}
    assert console_postfix(metrics | {"train/kl_mean": 0.01234})["kl"] == "0.0123"  # with grpo.beta > 0


# ------------------------------------------------------------------ the order of the phases


class Recorder:
    """Fakes of the loop's stateful parts that write what the loop asks of them into one list."""

    def __init__(self, needs_weight_sync: bool) -> None:
        self.calls: list[str] = []
        self.needs_weight_sync = needs_weight_sync
        self.skipped_steps = 0
        self.model_path = "base-model"

    # Sampler
    def sample(self, prompts, n, params) -> Rollouts:
        self.calls.append("sample")
        return rollouts(["stop"] * (len(prompts) * n), group_size=n)

    def sleep(self) -> None:
        self.calls.append("sleep")

    def wake_up(self) -> None:
        self.calls.append("wake_up")

    def update_weights(self, named) -> None:
        self.calls.append(f"update_weights({', '.join(name for name, _ in named)})")

    # Judge
    def score(self, prompts, candidates, *, seed=None) -> JudgeResult:
        self.calls.append("score")
        return judgement([float(i % 2) for i in range(len(candidates))])

    def close(self) -> None:
        self.calls.append("close")

    # PolicyEngine
    def train_step(self, batch) -> dict[str, float]:
        self.calls.append("train_step")
        return {"loss": 0.0, "tokens": float(batch.completion_mask.sum())}

    def reference_logprobs(self, batch) -> torch.Tensor:
        self.calls.append("reference_logprobs")
        return torch.zeros(batch.completion_mask.shape)  # [N, C]

    def export_weights(self, *, on_device=False, bucket_bytes=0):
        self.calls.append(f"export_weights(on_device={on_device}, bucket_bytes={bucket_bytes})")
        yield "w", torch.zeros(1)

    def export_hf(self, directory) -> None:
        self.calls.append(f"export_hf({Path(directory).name})")
        Path(directory).mkdir(parents=True)
        (Path(directory) / "config.json").write_text("{}")

    def save(self, directory, client_state, *, keep) -> Path:
        """A complete checkpoint of nothing but its state, as the real one is named and found."""
        step = client_state["global_step"]
        self.calls.append(f"save(step {step})")
        path = Path(directory) / f"step_{step}"
        path.mkdir(parents=True, exist_ok=True)
        state = {"client_state": client_state, "global_step": step, "skipped_steps": 0,
                 "reference_updated": False, "world_size": 1, "files": {}}
        (path / "dynalign_state.json").write_text(json.dumps(state))
        return path


@pytest.mark.parametrize("needs_weight_sync", [True, False], ids=["own-weights", "shared-weights"])
def test_the_sampler_sleeps_from_the_reference_pass_to_the_sync(train_cfg, needs_weight_sync):
    cfg = train_cfg("grpo.group_size=2", "grpo.prompts_per_step=2", "grpo.micro_batch_size=2",
                    "grpo.beta=0.04", "rollout.vllm.sync_bucket_mib=3")
    fake = Recorder(needs_weight_sync)
    timer = PhaseTimer()
    metrics, samples = grpo_step(cfg, Parts(fake, fake, fake), ["p", "q"], Position(), 0, timer)
    # the sync: buckets of rollout.vllm.sync_bucket_mib, copied on the trainer's device
    synced = [f"export_weights(on_device=True, bucket_bytes={3 * 2**20})", "update_weights(w)"]
    assert fake.calls == ["sample", "score", "sleep", "reference_logprobs", "train_step",
                          *(synced if needs_weight_sync else []), "wake_up"]
    assert not any(key.startswith("mem/") for key in metrics)  # device memory: with CUDA only
    phases = ("gen", "judge", "adv", "ref", "update", "sync", "step")
    assert timer.pop().keys() == {f"time/{p}" for p in phases}
    assert metrics["reward/mean"] == 0.5 and samples[1]["prompt"] == "p" and samples[2]["prompt"] == "q"


def test_phase_timer_total_is_optional():
    timer = PhaseTimer()
    with timer("export"):
        pass
    assert timer.pop(total=None).keys() == {"time/export"}
    assert timer.pop() == {"time/step": 0.0}


# ------------------------------------------------------------------ the frozen judge


def test_the_frozen_judge_is_the_policy_as_the_iteration_began(tmp_path):
    assert frozen_judge_model(0, tmp_path, "base") == "base"
    with pytest.raises(FileNotFoundError, match="iter_1"):
        frozen_judge_model(1, tmp_path, "base")
    (tmp_path / "iter_1").mkdir()
    (tmp_path / "iter_1" / "config.json").write_text("{}")
    assert frozen_judge_model(1, tmp_path, "base") == str(tmp_path / "iter_1")


def test_frozen_judging_over_several_iterations_needs_the_exports(train_cfg):
    with pytest.raises(ConfigError, match="export_each_iteration"):
        train_cfg("judge.source=frozen", "iterations=2", "export_each_iteration=false").validate()
    train_cfg("judge.source=frozen", "export_each_iteration=false", "iterations=1").validate()
    train_cfg("judge.source=self", "iterations=2", "export_each_iteration=false").validate()


def test_dropping_the_optimizer_at_the_end_needs_the_final_export(train_cfg):
    with pytest.raises(ConfigError, match="^export_each_iteration: checkpoint_optimizer_at_end=false"):
        train_cfg("checkpoint_optimizer_at_end=false", "export_each_iteration=false").validate()
    train_cfg("checkpoint_optimizer_at_end=false").validate()
    train_cfg("export_each_iteration=false").validate()


def test_end_of_iteration_times_its_phases_and_loads_the_next_frozen_judge(train_cfg, tmp_path, monkeypatch):
    import dynalign.train

    loaded: list[str] = []
    monkeypatch.setattr(dynalign.train, "side_sampler",
                        lambda cfg, path: loaded.append(path) or Recorder(needs_weight_sync=False))
    cfg = train_cfg("judge.source=frozen", "iterations=3")
    fake = Recorder(needs_weight_sync=False)
    parts = Parts(fake, fake, fake)
    info = RunInfo(run_dir=tmp_path, name="test", group="test", config={})
    timer = PhaseTimer()
    position = Position(iteration=1, global_step=2, pending=end_stages(cfg, 1))
    end_of_iteration(cfg, parts, info, position, tracker=None, timer=timer)
    assert fake.calls == ["export_hf(iter_1)", "save(step 2)", "close"]  # the old judge is let go
    assert loaded == [str(tmp_path / "iter_1")] and parts.judge is not fake
    assert position.pending == []
    phases = ("export", "reference", "checkpoint", "eval", "frozen_judge")
    assert timer.pop(total=None).keys() == {f"time/{p}" for p in phases}

    fake.calls.clear()  # after the last iteration nothing is judged any more
    position = Position(iteration=3, global_step=6, pending=end_stages(cfg, 3))
    end_of_iteration(cfg, Parts(fake, fake, fake), info, position, None, timer)
    assert fake.calls == ["export_hf(iter_3)", "save(step 6)"] and len(loaded) == 1

    fake.calls.clear()  # an iteration whose end is done (a resumed run) is not ended again
    end_of_iteration(cfg, Parts(fake, fake, fake), info, Position(iteration=3, global_step=6), None, timer)
    assert fake.calls == []


# ------------------------------------------------------------------ one real step


class AlternatingJudge:
    """Rewards 0, 1, 0, 1...: every group has spread, so every answer carries an advantage."""

    def score(self, prompts, candidates, *, seed=None) -> JudgeResult:
        return judgement([float(i % 2) for i in range(len(candidates))])

    def close(self) -> None:
        pass


def test_one_grpo_step_changes_every_trainable_parameter(train_cfg, tiny_model_path, tmp_path):
    from dynalign.engine import PolicyEngine
    from dynalign.train import build_parts

    cfg = train_cfg(f"model.name_or_path={tiny_model_path}", "grpo.group_size=2", "grpo.prompts_per_step=2",
                    "grpo.micro_batch_size=2", "grpo.max_completion_length=8", "grpo.lr=1e-3")
    assert cfg.deepspeed.stage == 3
    engine = PolicyEngine.from_config(cfg)
    try:
        parts = build_parts(cfg, engine, tmp_path, iteration=0)
        parts.judge = AlternatingJudge()
        trainable = {name for name, p in engine.module.named_parameters() if p.requires_grad}
        before = dict(engine.export_weights())  # gathered from the ZeRO-3 shards
        prompts = ["What is kindness?", "Plan a garden."]
        metrics, _ = grpo_step(cfg, parts, prompts, Position(), 0, PhaseTimer())
        after = dict(engine.export_weights())
    finally:
        engine.close()
    assert metrics["train/skipped_steps"] == 0 and metrics["advantages/abs_mean"] > 0.9
    assert trainable and trainable <= before.keys()
    unchanged = sorted(name for name in trainable if torch.equal(before[name], after[name]))
    assert not unchanged, f"parameters the step did not move: {unchanged}"


class RecordingJudge(AlternatingJudge):
    """Keeps the answers it was asked to score."""

    def __init__(self) -> None:
        self.answers: list[str] = []

    def score(self, prompts, candidates, *, seed=None) -> JudgeResult:
        self.answers += candidates
        return super().score(prompts, candidates, seed=seed)


def test_a_step_reads_each_prompt_once_and_samples_what_a_plain_call_would(train_cfg, tiny_model_path,
                                                                           tmp_path):
    """The rollout prefills the prompt text all rows share once, then each prompt's own tokens once
    for its G answers; the answers are those of a sampler call without reuse at the step's seed."""
    from test_judge_generate_prefix import recording_forwards

    from dynalign.engine import PolicyEngine
    from dynalign.rollout import sampling_params
    from dynalign.train import build_parts, step_seed

    cfg = train_cfg(f"model.name_or_path={tiny_model_path}", "grpo.group_size=4", "grpo.prompts_per_step=2",
                    "grpo.micro_batch_size=8", "grpo.max_completion_length=6", "rollout.temperature=1.0")
    prompts = ["What is kindness?", "Plan a garden for a small school."]
    engine = PolicyEngine.from_config(cfg)
    try:
        parts = build_parts(cfg, engine, tmp_path, iteration=0)
        parts.judge = judge = RecordingJudge()
        params = sampling_params(cfg.rollout, 6, seed=step_seed(cfg.seed, 0, 0),
                                 max_prompt_length=cfg.grpo.max_prompt_length)
        plain = parts.sampler.sample([[{"role": "user", "content": p}] for p in prompts], 4, params)
        with recording_forwards(engine.module) as shapes:
            grpo_step(cfg, parts, prompts, Position(), 0, PhaseTimer())
    finally:
        engine.close()
    assert judge.answers == plain.texts and len(set(plain.texts)) > 1
    shared, own, last = shapes[:3]
    assert shared[0] == 1 and own[0] == 2 and last == (8, 1)  # then 5 decoding steps of 8 rows
    assert shapes[3:8] == [(8, 1)] * 5
    assert shapes[8][0] == 2  # the update: one packed row per prompt


def test_the_sampler_log_probs_travel_to_the_loss_and_the_mismatch_is_logged(train_cfg, tiny_model_path,
                                                                               tmp_path):
    """HF ``generate`` and the training forward compute the same distribution: with the IS
    correction on, every weight is ~1 and the logged mismatch is float32 noise."""
    from dynalign.engine import PolicyEngine
    from dynalign.train import build_parts

    cfg = train_cfg(f"model.name_or_path={tiny_model_path}", "grpo.group_size=2", "grpo.prompts_per_step=2",
                    "grpo.micro_batch_size=2", "grpo.max_completion_length=8", "rollout.temperature=1.0",
                    "grpo.sampler_is_correction=true", "grpo.sampler_is_cap=1.5")
    engine = PolicyEngine.from_config(cfg)
    try:
        parts = build_parts(cfg, engine, tmp_path, iteration=0)
        parts.judge = AlternatingJudge()
        prompts = ["What is kindness?", "Plan a garden."]
        metrics, _ = grpo_step(cfg, parts, prompts, Position(), 0, PhaseTimer())
    finally:
        engine.close()
    assert metrics["train/tokens"] == 2 * 2 * 8  # a random model runs to the limit
    assert metrics["train/sampler_logp_abs_diff"] < 1e-4  # a random 1024-token model: ~7 if they differed
    assert metrics["train/sampler_ratio_max"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["train/sampler_is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["train/sampler_is_clipped_frac"] == 0.0


def test_is_correction_needs_rollouts_at_temperature_one(train_cfg):
    with pytest.raises(ConfigError, match="rollout.temperature"):
        train_cfg("grpo.sampler_is_correction=true", "rollout.temperature=0.7")
