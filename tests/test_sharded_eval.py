"""Evaluation and prompt regeneration shared among ranks (:mod:`dynalign.eval.shards`).

The pure sharing and joining functions with hand-computed shares; a chunk's answers on the tiny
model whichever rank computes them; and, in real processes (``tests/dist/run_sharded_eval.py``),
two ranks under ``torchrun`` with the loop's ZeRO-3 sampler against one process evaluating the
export: both ranks work, and the files are the same.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT

from dynalign.eval.answers import Answers, generate_answers
from dynalign.eval.judging import concat_results
from dynalign.eval.shards import SEED_PHASES, join, share_of
from dynalign.judge import JudgeResult
from dynalign.runtime import step_seed

# ------------------------------------------------------------------ pure functions


@pytest.mark.parametrize("n, chunk, world", [(10, 3, 2), (5, 2, 2), (3, 4, 2), (7, 1, 3), (0, 2, 2),
                                             (50, 8, 8), (9, 3, 3), (1, 1, 4)])
def test_shares_cover_every_item_once_in_order_in_whole_chunks(n, chunk, world):
    shares = [share_of(n, chunk, rank, world) for rank in range(world)]
    assert join([list(s.items) for s in shares]) == list(range(n))  # rank order is item order
    assert join([list(s.chunks) for s in shares]) == list(range(-(-n // chunk)))
    sizes = [len(s.chunks) for s in shares]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)  # the first ranks get more
    for s in shares:
        assert s.items.start == min(n, s.chunks.start * chunk)  # a share starts where its first chunk does


def test_uneven_and_empty_shares():
    # 10 items in chunks of 3: chunks [0-2] [3-5] [6-8] [9]; two ranks take two chunks each
    assert share_of(10, 3, 0, 2).items == range(0, 6) and share_of(10, 3, 1, 2).items == range(6, 10)
    # 5 items in chunks of 2: three chunks, rank 0 takes two
    assert share_of(5, 2, 0, 2).items == range(0, 4) and share_of(5, 2, 1, 2).items == range(4, 5)
    # 3 items in one chunk of 4: rank 1 gets nothing, and says so
    empty = share_of(3, 4, 1, 2)
    assert share_of(3, 4, 0, 2).items == range(0, 3) and len(empty.items) == 0 and len(empty.chunks) == 0
    assert empty.of(["a", "b", "c"]) == [] and empty.seeds(0, "pairwise") == []
    # tasks, one a chunk: three tasks on two ranks
    tasks = ["mmlu", "gsm8k", "arc"]
    assert share_of(3, 1, 0, 2).of(tasks) == ["mmlu", "gsm8k"] and share_of(3, 1, 1, 2).of(tasks) == ["arc"]
    assert join([[], ["a"], [], ["b", "c"]]) == ["a", "b", "c"]
    with pytest.raises(ValueError):
        share_of(3, 0, 0, 1)
    with pytest.raises(ValueError):
        share_of(3, 1, 2, 2)


def test_a_chunk_keeps_its_seed_on_any_number_of_ranks():
    alone = share_of(10, 3, 0, 1).seeds(7, "judge policy")
    second = share_of(10, 3, 1, 2).seeds(7, "judge policy")  # chunks 2 and 3
    assert second == alone[2:] == [step_seed(7, SEED_PHASES["judge policy"], k) for k in (2, 3)]
    assert len(set(alone)) == 4  # chunks are seeded apart
    assert alone != share_of(10, 3, 0, 1).seeds(7, "pairwise")  # and phases


def _result(rewards: list[float], mass: bool = True) -> JudgeResult:
    n = len(rewards)
    return JudgeResult(rewards=torch.tensor(rewards), scores=torch.tensor(rewards)[:, None],
                       reasons=["ok"] * n, judgement_reasons=[["ok"]] * n, texts=[[""]] * n,
                       nonces=[str(i) for i in range(n)], aspect_names=("a",),
                       score_mass=torch.full((n, 1), 0.5) if mass else None)


def test_joined_parts_equal_the_whole():
    whole = Answers(["a", "b", "c", "d", "e"], [1, 2, 3, 4, 5], [False, True, False, True, False])
    shares = [share_of(5, 2, rank, 2).items for rank in range(2)]
    assert Answers.join([whole.share(items) for items in shares]) == whole
    assert whole.share(range(4, 5)) == Answers(["e"], [5], [False])
    # a rank with no prompt sends an empty result (no score_mass): the others' masses stay
    joined = concat_results([_result([1.0, 2.0]), _result([], mass=False), _result([3.0])])
    assert joined.rewards.tolist() == [1.0, 2.0, 3.0] and joined.score_mass is not None
    assert joined.score_mass.shape == (3, 1) and joined.nonces == ["0", "1", "0"]


def test_rank_parts_join_in_prompt_and_task_order():
    """Three ranks: two with prompts, the last with none (more ranks than batches); lm-eval tasks
    spread over all three. Rank 0 gets back one rank's view, in order."""
    from dynalign.eval.runner import _join_parts, _Part

    def part(texts, rewards, tasks, cached):
        answers = Answers(texts, [1] * len(texts), [False] * len(texts)) if texts else None
        judged = _result(rewards) if texts else None
        return _Part(answers, judged, None, judged, None, [], [{t: {"acc": 1.0}} for t in tasks],
                     [{t: {"acc": 0.5}} for t in tasks], cached)

    joined = _join_parts([part(["a", "b"], [1.0, 2.0], ["t0"], [True]), part(["c"], [3.0], ["t1"], [False]),
                          part([], [], ["t2"], [True])])
    assert joined.policy.texts == ["a", "b", "c"] and joined.external.rewards.tolist() == [1.0, 2.0, 3.0]
    assert joined.self_judged is not None and joined.external_baseline is None and joined.pairs == []
    assert list(joined.lm_policy) == ["t0", "t1", "t2"] and joined.lm_baseline["t2"] == {"acc": 0.5}
    assert joined.lm_cached is False  # t1's baseline was computed


# ------------------------------------------------------------------ the tiny model


def test_an_answer_depends_on_its_chunk_not_on_the_rank(tiny_model_path):
    """Sampled answers (temperature 1): the shares of two ranks, answered apart, are the answers
    of one rank; a chunk sampled with another seed is not."""
    from dynalign.config import ModelConfig
    from dynalign.models import load_hf_sampler
    from dynalign.rollout import SamplingParams

    sampler = load_hf_sampler(ModelConfig(name_or_path=str(tiny_model_path)), batch_size=2)
    prompts = ["How do I fix a bike?", "Why is the sky blue?", "Plan a garden.", "Explain taxes.",
               "Cook rice well."]
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)

    def answer(rank: int, world: int) -> Answers:
        share = share_of(len(prompts), 2, rank, world)
        return generate_answers(sampler, share.of(prompts), params, chunk=2,
                                seeds=share.seeds(params.seed, "policy answers"))

    alone = answer(0, 1)
    assert Answers.join([answer(0, 2), answer(1, 2)]) == alone
    assert Answers.join([answer(r, 3) for r in range(3)]) == alone
    reseeded = generate_answers(sampler, prompts[4:], params, chunk=2, seeds=[123])
    assert reseeded.texts != alone.texts[4:]  # the seed does matter: the equality above is not vacuous


# ------------------------------------------------------------------ two processes


def _perturbed_copy(source: Path, target: Path) -> Path:
    """The tiny model with every weight moved by seeded noise: a policy that is not its baseline."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(source, target)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=noise))
    model.save_pretrained(target)
    return target


def _task_copy(target: Path) -> Path:
    """A second lm-eval task (the shipped one under another name), so that each rank runs one."""
    from dynalign.eval.lm_harness import SHIPPED_TASKS_DIR

    target.mkdir()
    shutil.copy(SHIPPED_TASKS_DIR / "ca_mini_mc.jsonl", target / "ca_mini_mc_b.jsonl")
    text = (SHIPPED_TASKS_DIR / "ca_mini_mc.yaml").read_text()
    (target / "ca_mini_mc_b.yaml").write_text(text.replace("task: ca_mini_mc", "task: ca_mini_mc_b")
                                              .replace("ca_mini_mc.jsonl", "ca_mini_mc_b.jsonl"))
    return target


def _worker(*args: str, cache: Path, nproc: int = 1) -> dict:
    from dynalign.distributed import LAUNCHER_VARIABLES, free_port

    out = cache.parent / f"records-{nproc}.json"
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                     f"--master_port={free_port()}"]
    env = {k: v for k, v in os.environ.items() if k not in (*LAUNCHER_VARIABLES, "LOCAL_WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", DYNALIGN_CACHE=str(cache),
               PYTHONPATH=str(REPO_ROOT))
    command = [*launcher, str(REPO_ROOT / "tests" / "dist" / "run_sharded_eval.py"), "--out", str(out), *args]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


def _comparable_results(run: Path) -> dict:
    """eval_results.json without what differs between any two runs (when, how long)."""
    results = json.loads((run / "eval" / "iter_1" / "eval_results.json").read_text())
    del results["timestamp"], results["timing"]
    results["metrics"] = {k: v for k, v in results["metrics"].items() if not k.startswith("eval/time/")}
    return results


def _generated(run: Path) -> tuple[list[dict], list[dict], dict]:
    """The regenerated set: each shard (its calls, their completions, the rows kept) and the
    prompt rows without their timestamps, and the summary without its timing."""
    folder = run / "prompts" / "iter_000"
    shards = [json.loads(path.read_text()) for path in sorted((folder / "shards").iterdir())]
    rows = [json.loads(line) for line in (folder / "prompts.jsonl").read_text().splitlines()]
    summary = json.loads((folder / "summary.json").read_text())
    for key in ("elapsed_s", "output_dir"):
        summary.pop(key)

    def timeless(value):
        if isinstance(value, dict):
            return {k: timeless(v) for k, v in value.items() if k != "timestamp"}
        return [timeless(v) for v in value] if isinstance(value, list) else value

    return timeless(shards), timeless(rows), summary


@pytest.mark.slow  # two torchrun ranks and one process, each loading the tiny model a few times: ~2-4 min
def test_two_ranks_share_the_work_and_write_what_one_rank_writes(tmp_path, tiny_model_path):
    policy = _perturbed_copy(tiny_model_path, tmp_path / "policy")
    tasks = _task_copy(tmp_path / "tasks")
    overrides = [
        f"model.name_or_path={policy}", f"eval.baseline={tiny_model_path}",
        f"eval.judge.model={tiny_model_path}", "judge.source=self", "logger.backend=none",
        "eval.batch_size=2",  # a chunk: 2 prompts
        "eval.every_n_iterations=1", "eval.num_prompts=5", "eval.max_new_tokens=6", "eval.temperature=1.0",
        "eval.bootstrap_samples=50", "eval.lm_eval_tasks=[ca_mini_mc,ca_mini_mc_b]",
        f"eval.lm_eval_include_path={tasks}", "eval.lm_eval_limit=4",
        "generator.regenerate_each_iteration=true", "generator.num_prompts=8", "generator.calls_per_shard=2",
        "generator.max_new_tokens=16", "generator.max_calls=6",  # 3 shards: the second round has one
    ]
    two, one = tmp_path / "two", tmp_path / "one"
    records_two = _worker("--mode", "loop", "--run-dir", str(two), *overrides, cache=tmp_path / "cache-two",
                          nproc=2)
    records_one = _worker("--mode", "export", "--run-dir", str(one), "--export", str(two / "iter_1"),
                          *overrides, cache=tmp_path / "cache-one")
    assert records_two["world_size"] == 2 and records_one["world_size"] == 1
    (rank0, rank1), (alone,) = records_two["ranks"], records_one["ranks"]

    # each rank answered and judged its share: 3 chunks of 2, 2 on rank 0 and 1 on rank 1
    for phase in ("policy answers", "self-judge", "baseline answers", "judge policy", "judge baseline",
                  "pairwise"):
        assert (rank0["work"][phase], rank1["work"][phase], alone["work"][phase]) == ([4], [1], [5]), phase
    assert rank0["work"]["lm_eval"] == ["ca_mini_mc"] * 2 and rank1["work"]["lm_eval"] == ["ca_mini_mc_b"] * 2
    assert alone["work"]["lm_eval"] == ["ca_mini_mc", "ca_mini_mc_b"] * 2  # the policy's, then the baseline's
    assert rank0["returned_results"] and not rank1["returned_results"] and alone["returned_results"]

    # the same evaluation, file for file
    assert _comparable_results(two) == _comparable_results(one)
    samples = [(run / "eval" / "iter_1" / "eval_samples.jsonl").read_text() for run in (two, one)]
    assert samples[0] == samples[1] and len(samples[0].splitlines()) == 5
    results = _comparable_results(two)
    assert set(results["lm_eval"]["policy"]) == {"ca_mini_mc", "ca_mini_mc_b"}
    assert results["pairwise"]["decided"] + results["pairwise"]["failed"] == 5

    # the prompts: shards 0 and 2 on rank 0, 1 on rank 1 (shard 3 is past max_calls); rank 0 wrote
    # what one rank writes
    assert rank0["work"]["shards"] == [0, 2] and rank1["work"]["shards"] == [1]
    assert alone["work"]["shards"] == [0, 1, 2]
    shards, rows, summary = _generated(two)
    assert (shards, rows, summary) == _generated(one)
    assert [s["shard"] for s in shards] == [0, 1, 2] and len(rows) == summary["rows"] == 8
    assert all(call["completion"] for s in shards for call in s["calls"])  # every call was sampled
    assert rank0["prompts"] == rank1["prompts"] == alone["prompts"] and rank0["prompts"]
