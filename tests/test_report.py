"""dynalign.report on hand-made run directories: rows, values, eval numbers, files, W&B records."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from dynalign import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, axis: str, num: int, overrides: list[str], *, rewards=(1.0, 2.0),
             failure=(0.0, 0.5), step_time=(3.0, 1.0), summary: dict | None = None, finished: bool = True,
             swept: dict | None = None, evals: dict[int, dict] | None = None,
             reward_key: str = "reward/mean", seed: int | None = None,
             samples: dict[int, list[dict]] | None = None) -> Path:
    """A run directory as ``python -m dynalign.train -m`` leaves it (only the files the report reads):
    the seed in its composed config, and, per evaluated iteration, results and per-prompt samples."""
    name = ",".join(o for o in overrides if not o.startswith(("+experiment", "seed=")))
    run = root / f"ablation-{axis}" / f"{num}_{name}"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"logger": {"group": f"ablation-{axis}"}} | ({"seed": seed} if seed is not None else {})
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    hydra = {"hydra": {"job": {"num": num}, "sweeper": {"params": swept or {}}}}
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    lines = [{"step": i + 1, reward_key: r, "judge/parse_failure_rate": f, "time/step": t}
             for i, (r, f, t) in enumerate(zip(rewards, failure, step_time, strict=True))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    if finished:
        body = summary if summary is not None else {"global_step": len(rewards), "final_reward": rewards[-1]}
        (run / "summary.json").write_text(json.dumps(body))
    for k, results in (evals or {}).items():
        out = run / "eval" / f"iter_{k}"
        (out / ".hydra").mkdir(parents=True)  # evaluate's own Hydra dir: not a run of its own
        (out / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["checkpoint=x"]))
        (out / "eval_results.json").write_text(json.dumps(results))
        rows = (samples or {}).get(k)
        if rows is not None:
            (out / "eval_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def eval_results(ca: float, win: float | None, capability: dict | None = None) -> dict:
    """An ``eval_results.json``: CA score, win rate and the capability section as the evaluation writes it."""
    return {"pointwise": {"policy": {"overall": {"mean": ca, "ci_low": ca - 0.1, "ci_high": ca + 0.1}},
                          "baseline": {"overall": {"mean": 0.0}}},
            "pairwise": {"win_rate": win} if win is not None else {},
            "capability": capability or {}}


def capability(*verdicts: str, deltas=None) -> dict:
    """A capability section with one task per verdict (task_0, task_1...)."""
    deltas = deltas or [0.0] * len(verdicts)
    overall = "preserved" if all(v == "preserved" for v in verdicts) else \
        "degraded" if "degraded" in verdicts else "not shown"
    return {"margin": 0.02, "level": 0.95, "verdict": overall,
            "tasks": {f"task_{i}": {"metric": "acc", "delta": d, "verdict": v}
                      for i, (v, d) in enumerate(zip(verdicts, deltas, strict=True))}}


BETA = {"grpo.beta": "0.0,0.04"}


@pytest.fixture
def runs(tmp_path) -> Path:
    root = tmp_path / "tiny"
    make_run(root, "kl_beta", 0, ["grpo.beta=0.0", "+experiment=[preset_tiny,ablation_kl_beta]"], swept=BETA,
             seed=0, rewards=(1.0, 2.0), failure=(0.0, 0.5), step_time=(3.0, 1.0),
             evals={1: eval_results(2.0, 0.25, capability("degraded")),
                    2: eval_results(3.5, 0.75, capability("preserved", "not shown", deltas=[0.04, -0.01]))})
    make_run(root, "kl_beta", 1, ["grpo.beta=0.04", "+experiment=[preset_tiny,ablation_kl_beta]"], swept=BETA,
             seed=0, rewards=(1.5, 1.25, 1.0), failure=(0.0, 0.0, 0.3), step_time=(2.0, 4.0, 5.0))
    # generate mode on the tiny model: every reward NaN (null), the summary's too
    make_run(root, "judge_mode", 0, ["judge.mode=generate"], swept={"judge.mode": "generate,logprob"},
             rewards=(None, None), failure=(1.0, 1.0), summary={"global_step": 2, "final_reward": None})
    make_run(root, "judge_mode", 1, ["judge.mode=logprob"], swept={"judge.mode": "generate,logprob"},
             finished=False)  # killed after two steps
    failed = root / "ablation-judge" / "2_judge.source=external"
    (failed / ".hydra").mkdir(parents=True)  # crashed before its first step
    (failed / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["judge.source=external"]))
    (failed / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"logger": {"group": "ablation-judge"}}))
    return root


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_runs_csv_holds_each_runs_numbers(runs, tmp_path):
    out = tmp_path / "report"
    report.build_report([runs], out)
    rows = _csv(out / "runs.csv")
    assert [(r["axis"], r["value"], r["status"]) for r in rows] == [
        ("judge", "judge.source=external", "failed"),  # no hydra.yaml: all overrides but the experiment
        ("judge_mode", "generate", "done"), ("judge_mode", "logprob", "incomplete"),
        ("kl_beta", "0.0", "done"), ("kl_beta", "0.04", "done")]  # axes by name, values in sweep order
    beta0, beta4 = rows[3], rows[4]
    assert float(beta0["final_reward"]) == 2.0 and float(beta4["final_reward"]) == 1.0
    # the reward the report compares: the mean over the last 5 steps (all of these runs' steps)
    assert float(beta0["reward_last_steps"]) == 1.5 and float(beta4["reward_last_steps"]) == 1.25
    assert float(beta0["judge_failure_rate"]) == pytest.approx(0.25)
    assert float(beta4["judge_failure_rate"]) == pytest.approx(0.1)
    assert float(beta0["time_per_step_s"]) == pytest.approx(2.0)  # median of 3.0 and 1.0
    assert float(beta4["time_per_step_s"]) == pytest.approx(4.0)
    # the newest evaluation (iter_2): CA 3.5, win 0.75, one task not shown -> not shown; worst delta -0.01
    assert beta0["eval_iteration"] == "2"
    assert float(beta0["ca_score"]) == 3.5 and float(beta0["win_rate"]) == 0.75
    assert beta0["capability"] == "not shown" and float(beta0["capability_min_delta"]) == -0.01
    assert beta4["ca_score"] == beta4["win_rate"] == beta4["capability"] == "n/a"
    assert rows[1]["final_reward"] == "n/a" and float(rows[1]["judge_failure_rate"]) == 1.0
    assert rows[2]["final_reward"] == "2.0"  # no summary: the last logged step
    assert int(rows[3]["steps"]) == 2 and int(rows[4]["steps"]) == 3 and int(rows[0]["steps"]) == 0
    assert [r["seed"] for r in rows] == ["n/a", "n/a", "n/a", "0", "0"]  # from the composed config, if any


def test_report_markdown_and_plots_with_one_seed(runs, tmp_path):
    out = tmp_path / "report"
    report.build_report([runs], out, title="Ablations, preset tiny")
    text = (out / "report.md").read_text()
    assert text.startswith("# Ablations, preset tiny")
    # one seed: the means alone, no interval, no mark
    assert ("| kl_beta | `0.0` (baseline) | 1 | 1 done | 1.500 | 3.500 | 0.750 | not shown (1/1 seeds) "
            "| 0.250 | 2.00 |") in text
    assert "| kl_beta | `0.04` | 1 | 1 done | 1.250 | n/a | n/a | n/a | 0.100 | 4.00 |" in text
    assert ("## kl_beta\n\nBaseline `0.0`; 1 seed per value. **One seed per value: no intervals and no "
            "tests.**") in text
    assert "- `0.04` - `0.0`: reward -0.250 (1 paired seed: no interval); CA score n/a; win rate n/a" in text
    assert "- `logprob` - `generate`: reward not compared (different judges); CA score n/a" in text
    # unfinished runs are listed and left out of the statistics
    assert "did not finish" in text and "judge `judge.source=external` (failed)" in text
    assert "| judge_mode | `logprob` | 0 | 1 incomplete | n/a |" in text
    # axes that change the judge get a caveat naming the key, and their rewards are not compared
    assert "## judge_mode\n\nNote: the runs differ in `judge.mode`, so each is rewarded" in text
    assert "## judge\n\nNote: the runs differ in `judge.source`" in text
    assert "- `logprob` - `generate`: reward not compared (different judges)" in text
    for name in ("reward_kl_beta.png", "reward_judge_mode.png", "reward_judge.png", "ca_vs_capability.png"):
        path = out / "plots" / name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        assert f"(plots/{name})" in text
    table = _csv(out / "report.csv")
    assert [(r["axis"], r["value"], r["seeds"]) for r in table] == [
        ("judge", "judge.source=external", "0"), ("judge_mode", "generate", "1"),
        ("judge_mode", "logprob", "0"), ("kl_beta", "0.0", "1"), ("kl_beta", "0.04", "1")]
    assert table[3]["baseline"] == "True" and table[3]["reward_ci_low"] == "n/a"


def test_without_evaluations_the_scatter_is_na(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "kl_beta", 0, ["grpo.beta=0.0"], swept=BETA)
    out = tmp_path / "report"
    report.build_report([root], out)
    assert not (out / "plots" / "ca_vs_capability.png").exists()
    text = (out / "report.md").read_text()
    assert "n/a: no run has both a CA score and a capability test" in text
    assert "One value: nothing to compare." in text


def test_older_reward_key_and_torn_last_line(tmp_path):
    root = tmp_path / "runs"
    run = make_run(root, "rubric", 0, ["judge=hhh_rubric"], swept={"judge": "ca_rubric,hhh_rubric"},
                   rewards=(0.5, 0.75), finished=False, reward_key="judge/reward_mean")
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "judge/reward_me')  # killed mid-write
    record = report.read_local_run(run)
    assert record.steps == [1, 2] and record.rewards == [0.5, 0.75] and record.final_reward == 0.75
    assert record.value == "hhh_rubric" and record.axis == "rubric"


def test_find_run_dirs_skips_evaluations_inside_runs(runs):
    found = report.find_run_dirs(runs)
    assert len(found) == 5
    assert not any("eval" in p.parts for p in found)


@pytest.mark.parametrize("overrides,swept,expected", [
    ({"grpo.beta": "0.04", "experiment": "[a,b]"}, ["grpo.beta"], "0.04"),
    ({"grpo.beta": "0.04", "seed": "1"}, ["grpo.beta"], "0.04"),
    ({"a": "1", "b": "2"}, ["a", "b"], "a=1,b=2"),
    ({"grpo.lr": "1e-5", "experiment": "x"}, [], "grpo.lr=1e-5"),
    ({"experiment": "x"}, [], "default"),
    ({"grpo.lr": "1e-5", "seed": "2"}, [], "grpo.lr=1e-5"),  # a hand sweep over seeds: never the value
    ({"grpo.beta": "0.0", "seed": "1"}, ["grpo.beta", "seed"], "0.0"),  # seeds in hydra.sweeper.params
])
def test_value_of(overrides, swept, expected):
    assert report.value_of(overrides, swept) == expected


def test_parse_overrides_and_axis():
    assert report.parse_overrides(["+experiment=[p,a]", "~foo=1", "judge=hhh_rubric", "junk"]) == {
        "experiment": "[p,a]", "foo": "1", "judge": "hhh_rubric"}
    assert report.axis_of("ablation-loss_type") == "loss_type"
    assert report.axis_of(None, Path("multirun/ablations/tiny/ablation-judge")) == "judge"
    assert report.axis_of("my-sweep") == "my-sweep"


def test_capability_from_the_section_or_from_older_results():
    section = capability("preserved", "degraded", deltas=[0.01, -0.2])
    numbers = report.eval_numbers(eval_results(1.0, 0.5, section))
    assert numbers["capability"] == "degraded" and numbers["capability_min_delta"] == -0.2
    assert numbers["capability_margin"] == 0.02
    # results written before the section existed: the test is run on their lm-eval numbers at the
    # default margin (acc 0.5 vs 0.5, stderrs 0.01: [-0.0277, 0.0277] straddles -0.02 -> not shown)
    older = {"lm_eval": {"tasks": ["t"], "policy": {"t": {"acc": 0.5, "acc_stderr": 0.01}},
                         "baseline": {"t": {"acc": 0.5, "acc_stderr": 0.01}}, "delta": {"t": {"acc": 0.0}}}}
    assert report.capability_of(older)["tasks"]["t"]["verdict"] == "not shown"
    assert report.eval_numbers(older)["capability"] == "not shown"
    numbers = report.eval_numbers({"pointwise": {"policy": {"overall": {"mean": None}}}})
    assert math.isnan(numbers["ca_score"]) and math.isnan(numbers["win_rate"])  # JSON null reads as missing
    assert numbers["capability"] is None  # no lm-eval: no verdict, not a "not shown"


def test_latest_eval_is_the_highest_iteration(tmp_path):
    run = tmp_path / "run"
    for k in (2, 10, 9):
        (run / "eval" / f"iter_{k}").mkdir(parents=True)
        (run / "eval" / f"iter_{k}" / "eval_results.json").write_text(json.dumps({"k": k}))
    (run / "eval" / "iter_x").mkdir()
    assert report.latest_eval(run) == (10, {"k": 10})
    assert report.latest_eval(tmp_path / "none") is None


class FakeRun:
    def __init__(self, name, group, state, rows, summary, config=None):
        self.name, self.group, self.state, self.path = name, group, state, ["me", "proj", name]
        self._rows, self.summary, self.config = rows, summary, config or {}

    def scan_history(self):
        return iter(self._rows)


class FakeApi:
    def __init__(self, runs):
        self._runs, self.calls = runs, []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        return self._runs


def test_wandb_records_and_merge(runs):
    remote = FakeRun("grpo.beta=0.04", "ablation-kl_beta", "finished",
                     [{"_step": 1, "reward/mean": 0.5, "time/step": 2.0},
                      {"_step": 2, "reward/mean": 0.7, "time/step": 4.0, "judge/parse_failure_rate": 0.2},
                      {"_step": 2, "eval/ca/policy/overall/mean": 3.0}],
                     {"final_reward": 0.7, "eval/ca/policy/overall/mean": 3.0, "eval/pairwise/win_rate": 0.6,
                      "eval/capability/verdict_code": -1, "eval/capability/margin": 0.02,
                      "eval/capability/tasks/arc/delta": 0.02, "eval/capability/tasks/gsm8k/delta": -0.3},
                     config={"seed": 0})
    only_remote = FakeRun("grpo.loss_type=dapo", "ablation-loss_type", "crashed", [], {})
    other_seed = FakeRun("grpo.beta=0.04,seed=1", "ablation-kl_beta", "finished", [], {})  # seed in the name
    api = FakeApi([remote, only_remote, other_seed])
    records = report.wandb_records("me/proj", api=api)
    assert api.calls == [("me/proj", {"group": {"$regex": "^ablation-"}})]
    r = records[0]
    assert (r.axis, r.value, r.source, r.status) == ("kl_beta", "0.04", "wandb", "done")
    assert r.steps == [1, 2] and r.rewards == [0.5, 0.7] and r.final_reward == 0.7
    assert r.time_per_step_s == 3.0 and r.judge_failure_rate == pytest.approx(0.2)
    assert (r.ca_score, r.win_rate, r.capability, r.capability_min_delta) == (3.0, 0.6, "degraded", -0.3)
    assert r.seed == 0 and r.capability_margin == 0.02
    assert records[1].status == "failed" and math.isnan(records[1].final_reward)
    assert records[1].capability is None and records[1].seed is None
    assert (records[2].value, records[2].seed) == ("0.04", 1)
    merged = report.merge_records(report.local_records([runs]), records)
    beta = [m for m in merged if m.axis == "kl_beta"]
    # the local run of the same value and seed wins; another seed of a value is added
    assert [(m.value, m.seed, m.source) for m in beta] == [("0.0", 0, "local"), ("0.04", 0, "local"),
                                                           ("0.04", 1, "wandb")]
    assert [(m.value, m.seed) for m in merged if m.source == "wandb"] == [("dapo", None), ("0.04", 1)]


def test_wandb_failure_is_a_warning(tmp_path):
    class Broken:
        def runs(self, *a, **kw):
            raise ConnectionError("no network")

    with pytest.warns(UserWarning, match="no network"):
        assert report.wandb_records("me/proj", api=Broken()) == []


def test_cli(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert report.main([str(runs)]) == 0
    out = tmp_path / "reports" / "ablations" / "tiny"
    assert (out / "report.csv").exists() and (out / "runs.csv").exists()
    assert "| kl_beta | `0.0` (baseline) | 1 | 1 done | 1.500 |" in capsys.readouterr().out
    # the last step alone, and the other value as the baseline
    assert report.main([str(runs), "--last-steps", "1", "--baseline", "kl_beta=0.04"]) == 0
    printed = capsys.readouterr().out
    assert "| kl_beta | `0.0` | 1 | 1 done | 2.000 |" in printed
    assert "| kl_beta | `0.04` (baseline) | 1 | 1 done | 1.000 |" in printed
    assert report.main([str(runs), "--baseline", "kl_beta=0.5"]) == 1
    err = capsys.readouterr().err
    assert "--baseline kl_beta=0.5: no such value; the values of kl_beta are 0.0, 0.04" in err
    assert report.main([str(runs), "--baseline", "nope=1"]) == 1
    assert "--baseline names axes without runs: nope" in capsys.readouterr().err
    for bad in (["--last-steps", "0"], ["--baseline", "kl_beta"]):
        with pytest.raises(SystemExit) as info:
            report.main([str(runs), *bad])
        assert info.value.code == 2
    assert report.main([str(tmp_path / "empty")]) == 1
    assert "no runs under" in capsys.readouterr().err


# ------------------------------------------------------------------ seeds: 2 values x 2 seeds

T1 = math.tan(0.475 * math.pi)  # t quantile for 1 degree of freedom (two seeds) at 95%: 12.706


def samples(ca: tuple[float, float], outcomes: tuple[str, str]) -> list[dict]:
    """``eval_samples.jsonl`` rows of two prompts: the policy's external score and the pairwise outcome."""
    return [{"id": f"p{i + 1}", "external_score": score, "pairwise": outcome}
            for i, (score, outcome) in enumerate(zip(ca, outcomes, strict=True))]


def seeded_runs(root: Path, last_ca: float) -> Path:
    """kl_beta 0.0 (baseline) and 0.04, seeds 0 and 1 (on the command line, as `make ablations SEEDS=2`
    passes them), each evaluated on prompts p1, p2; plus an unfinished third seed of 0.04."""
    runs = [  # value, seed, rewards of 3 steps, CA of p1 p2, pairwise of p1 p2, capability
        ("0.0", 0, (0.0, 1.0, 2.0), (1.0, 2.0), ("win", "loss"), "preserved"),
        ("0.0", 1, (0.0, 2.0, 3.0), (2.0, 3.0), ("tie", "loss"), "preserved"),
        ("0.04", 0, (0.0, 1.0, 1.0), (3.0, 4.0), ("win", "failed"), "preserved"),
        ("0.04", 1, (0.0, 1.0, 2.0), (4.0, last_ca), ("loss", "tie"), "not shown"),
    ]
    points = {"win": 1.0, "tie": 0.5, "loss": 0.0}
    for num, (value, seed, rewards, ca, outcomes, verdict) in enumerate(runs):
        decided = [points[o] for o in outcomes if o in points]
        overrides = [f"grpo.beta={value}", f"seed={seed}", "+experiment=[preset_tiny,ablation_kl_beta]"]
        make_run(root, "kl_beta", num, overrides, swept=BETA, seed=seed, rewards=rewards,
                 failure=(0.0, 0.0, 0.0), step_time=(1.0, 1.0, 1.0),
                 evals={1: eval_results(sum(ca) / 2, sum(decided) / len(decided), capability(verdict))},
                 samples={1: samples(ca, outcomes)})
    make_run(root, "kl_beta", 4, ["grpo.beta=0.04", "seed=2"], swept=BETA, seed=2, rewards=(9.0,),
             failure=(0.0,), step_time=(1.0,), finished=False)  # killed: listed, left out of the statistics
    return root


def test_two_seeds_give_intervals_tests_and_words(tmp_path):
    out = tmp_path / "report"
    [axis] = report.build_report([seeded_runs(tmp_path / "runs", last_ca=5.1)], out, last_steps=2)
    text = (out / "report.md").read_text()
    # reward = mean of the last 2 steps: 0.0 -> 1.5, 2.5 (mean 2, se sqrt(0.5 / 2) = 0.5); 0.04 -> 1.0, 1.5
    # (mean 1.25, se sqrt(0.125 / 2) = 0.25). CA per prompt [seed, prompt]: 0.0 -> [[1, 2], [2, 3]]: mean 2,
    # variance 0.5 / 2 (seed means 1.5, 2.5) + 0.5 / 2 (prompt means 1.5, 2.5); 0.04 -> [[3, 4], [4, 5.1]]:
    # seed means 3.5, 4.55 and prompt means 3.5, 4.55, each var 0.55125 -> variance 0.55125.
    # win points: 0.0 -> [[1, 0], [0.5, 0]]: seed means 0.5, 0.25 (var 0.03125), prompt means 0.75, 0
    # (var 0.28125) -> variance 0.15625; 0.04 -> [[1, -], [0, 0.5]]: seed means 1, 0.25 (var 0.28125),
    # prompt means 0.5, 0.5 -> variance 0.140625.
    assert (f"| kl_beta | `0.0` (baseline) | 2 | 2 done | 2.000 ± {T1 * 0.5:.3f} | "
            f"2.000 ± {T1 * math.sqrt(0.5):.3f} | 0.375 ± {T1 * math.sqrt(0.15625):.3f} | "
            "preserved (2/2 seeds) | 0.000 | 1.00 |") in text
    # CA differences [seed, prompt]: [[2, 2], [2, 2.1]]: mean 2.025, variance 0.00125 / 2 + 0.00125 / 2:
    # the interval [1.576, 2.474] excludes 0, so it is marked; reward and win rate are not
    assert (f"| kl_beta | `0.04` | 2 | 2 done, 1 incomplete | 1.250 ± {T1 * 0.25:.3f} | "
            f"4.025 ± {T1 * math.sqrt(0.55125):.3f} ▲ | 0.625 ± {T1 * math.sqrt(0.140625):.3f} | "
            "not shown (1 preserved, 1 not shown) | 0.000 | 1.00 |") in text
    ca_half = T1 * math.sqrt(0.00125)
    assert f"+2.025 [{2.025 - ca_half:+.3f}, {2.025 + ca_half:+.3f}]" == "+2.025 [+1.576, +2.474]"
    # reward differences per seed -0.5, -1.0: mean -0.75, se 0.25; win: [[0, -], [-0.5, 0.5]]: mean 0,
    # prompt means -0.25, 0.5 -> variance 0.28125 / 2
    assert ("- `0.04` - `0.0`: reward -0.750 [-3.927, +2.427]; CA score +2.025 [+1.576, +2.474] ▲; "
            "win rate +0.000 [-4.765, +4.765]") in text
    assert ("Baseline `0.0`; 2 seeds per value. **Supported at the 95% level** (against `0.0`): `0.04` "
            "higher CA score (+2.025 [+1.576, +2.474]). Every other difference is inside the noise.") in text
    assert "kl_beta `0.04` seed 2 (incomplete)" in text

    rows = {r["value"]: r for r in _csv(out / "report.csv")}
    assert float(rows["0.04"]["ca_score_diff_ci_low"]) == pytest.approx(2.025 - ca_half)
    assert rows["0.04"]["ca_score_supported"] == "1" and rows["0.04"]["reward_supported"] == "0"
    assert rows["0.0"]["ca_score_diff"] == "n/a" and rows["0.0"]["baseline"] == "True"
    assert float(rows["0.0"]["reward_ci_high"]) == pytest.approx(2.0 + T1 * 0.5)
    assert [r["seed"] for r in _csv(out / "runs.csv")] == ["0", "1", "0", "1", "2"]

    # bands: per step over the baseline's seeds: (0, 0) -> a zero band, (1, 2) and (2, 3) -> +- t(1) * 0.5
    baseline = axis.values[0]
    label, steps, mean, low, high = report.plots.reward_bands(baseline)
    assert label == "0.0 (2 seeds)" and steps == [1, 2, 3]
    assert mean.tolist() == [0.0, 1.5, 2.5]
    assert low.tolist() == pytest.approx([0.0, 1.5 - T1 * 0.5, 2.5 - T1 * 0.5])
    assert high.tolist() == pytest.approx([0.0, 1.5 + T1 * 0.5, 2.5 + T1 * 0.5])
    assert (out / "plots" / "reward_kl_beta.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "plots" / "ca_vs_capability.png").read_bytes()[:8] == PNG_MAGIC


def test_differences_inside_the_noise_are_said_in_words(tmp_path):
    out = tmp_path / "report"
    report.build_report([seeded_runs(tmp_path / "runs", last_ca=7.0)], out, last_steps=2)
    text = (out / "report.md").read_text()
    # CA differences [[2, 2], [2, 4]]: mean 2.5, variance 0.5 / 2 + 0.5 / 2 -> +-8.98: holds 0
    assert f"CA score +2.500 [{2.5 - T1 * math.sqrt(0.5):+.3f}, {2.5 + T1 * math.sqrt(0.5):+.3f}];" in text
    assert ("**No difference from `0.0` is supported at the 95% level**: every difference below is inside "
            "the noise between seeds and prompts.") in text
    rows = [line for line in text.splitlines() if line.startswith(("| kl_beta", "- `0.04`"))]
    assert len(rows) == 3 and not any("▲" in line or "▼" in line for line in rows)


def test_a_supported_difference_below_the_smallest_of_interest_is_negligible(tmp_path):
    runs = seeded_runs(tmp_path / "runs", last_ca=5.1)  # CA +2.025 [+1.576, +2.474]: supported
    out = tmp_path / "report"
    report.build_report([runs], out, last_steps=2, min_effects={"ca_score": 3.0})
    text = (out / "report.md").read_text()
    assert ("- `0.04` - `0.0`: reward -0.750 [-3.927, +2.427]; CA score +2.025 [+1.576, +2.474] "
            "(negligible); win rate +0.000 [-4.765, +4.765]") in text
    assert ("**No difference from `0.0` that matters is supported at the 95% level**: every difference "
            "below is inside the noise between seeds and prompts or too small to matter. Supported but "
            "smaller than the smallest difference of interest, so negligible: `0.04` higher CA score "
            "(+2.025 [+1.576, +2.474]).") in text
    assert "smallest difference of interest (reward 0.05, CA score 3, win rate 0.02; `--min-effect`)" in text
    rows = [line for line in text.splitlines() if line.startswith(("| kl_beta", "- `0.04`"))]
    assert len(rows) == 3 and not any("▲" in line or "▼" in line for line in rows)
    row = {r["value"]: r for r in _csv(out / "report.csv")}["0.04"]
    assert (row["ca_score_supported"], row["ca_score_negligible"]) == ("0", "True")
    # the same difference with the defaults (CA 0.05) is a finding, marked
    report.build_report([runs], out, last_steps=2)
    row = {r["value"]: r for r in _csv(out / "report.csv")}["0.04"]
    assert (row["ca_score_supported"], row["ca_score_negligible"]) == ("1", "False")


def test_min_effect_on_the_command_line(tmp_path, capsys):
    runs = seeded_runs(tmp_path / "runs", last_ca=5.1)
    assert report.main([str(runs), "--out", str(tmp_path / "r"), "--min-effect", "ca_score=2.5"]) == 0
    assert "CA score +2.025 [+1.576, +2.474] (negligible)" in (tmp_path / "r" / "report.md").read_text()
    for bad in ("ca=1", "ca_score=-1", "ca_score=x", "reward"):
        with pytest.raises(SystemExit) as info:
            report.main([str(runs), "--min-effect", bad])
        assert info.value.code == 2
        expected = f"METRIC one of reward, ca_score, win_rate and SIZE >= 0 (got '{bad}')"
        assert expected in capsys.readouterr().err


def test_runs_of_the_random_tiny_model_are_said_to_be_no_finding(tmp_path):
    runs = seeded_runs(tmp_path / "runs", last_ca=5.1)
    report.build_report([runs], tmp_path / "a", last_steps=2)
    assert "whose weights are random" not in (tmp_path / "a" / "report.md").read_text()  # model unknown
    for config in runs.glob("*/*/.hydra/config.yaml"):
        composed = yaml.safe_load(config.read_text())
        config.write_text(yaml.safe_dump({**composed, "model": {"name_or_path": "tiny"}}))
    report.build_report([runs], tmp_path / "b", last_steps=2)
    text = (tmp_path / "b" / "report.md").read_text()
    assert "**Every run here trains the embedded tiny model, whose weights are random.**" in text
    assert "no difference in it, marked or not, is a finding about alignment" in text


def test_a_baseline_without_numbers_is_said_to_be_one(tmp_path):
    root = tmp_path / "runs"
    swept = {"judge.mode": "generate,logprob"}
    for num, (mode, seed) in enumerate([("generate", 0), ("generate", 1), ("logprob", 0), ("logprob", 1)]):
        generate = mode == "generate"  # no verdict ever parsed: every reward NaN
        make_run(root, "judge_mode", num, [f"judge.mode={mode}", f"seed={seed}"], swept=swept, seed=seed,
                 rewards=(None, None) if generate else (1.0, 2.0 + seed), failure=(float(generate),) * 2,
                 summary={"global_step": 2, "final_reward": None if generate else 2.0})
    report.build_report([root], tmp_path / "r")
    text = (tmp_path / "r" / "report.md").read_text()
    assert ("The baseline `generate` has no reward, CA score or win rate (judge failure rate 1.000): nothing "
            "to test against. `--baseline judge_mode=VALUE` tests against another value.") in text
    report.build_report([root], tmp_path / "r", baselines={"judge_mode": "logprob"})
    text = (tmp_path / "r" / "report.md").read_text()
    assert "No value has numbers on 2 or more finished seeds it shares with the baseline `logprob`" in text
