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
             reward_key: str = "reward/mean") -> Path:
    """A run directory as ``python -m dynalign.train -m`` leaves it (only the files the report reads)."""
    name = ",".join(o for o in overrides if not o.startswith("+experiment"))
    run = root / f"ablation-{axis}" / f"{num}_{name}"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"logger": {"group": f"ablation-{axis}"}}))
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
    return run


def eval_results(ca: float, win: float | None, deltas: dict) -> dict:
    return {"pointwise": {"policy": {"overall": {"mean": ca, "ci_low": ca - 0.1, "ci_high": ca + 0.1}},
                          "baseline": {"overall": {"mean": 0.0}}},
            "pairwise": {"win_rate": win} if win is not None else {},
            "lm_eval": {"delta": deltas} if deltas else {}}


BETA = {"grpo.beta": "0.0,0.04"}


@pytest.fixture
def runs(tmp_path) -> Path:
    root = tmp_path / "tiny"
    make_run(root, "kl_beta", 0, ["grpo.beta=0.0", "+experiment=[preset_tiny,ablation_kl_beta]"], swept=BETA,
             rewards=(1.0, 2.0), failure=(0.0, 0.5), step_time=(3.0, 1.0),
             evals={1: eval_results(2.0, 0.25, {"t": {"acc": 0.5}}),
                    2: eval_results(3.5, 0.75, {"mmlu": {"acc,none": 0.02, "acc_norm,none": 0.04,
                                                         "acc_stderr,none": 9.0},
                                                "gsm8k": {"exact_match,strict-match": -0.01}})})
    make_run(root, "kl_beta", 1, ["grpo.beta=0.04", "+experiment=[preset_tiny,ablation_kl_beta]"], swept=BETA,
             rewards=(1.5, 1.25, 1.0), failure=(0.0, 0.0, 0.3), step_time=(2.0, 4.0, 5.0))
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


def test_report_rows_hold_the_runs_numbers(runs, tmp_path):
    out = tmp_path / "report"
    records = report.build_report([runs], out)
    rows = _csv(out / "report.csv")
    assert [(r["axis"], r["value"], r["status"]) for r in rows] == [
        ("judge", "judge.source=external", "failed"),  # no hydra.yaml: all overrides but the experiment
        ("judge_mode", "generate", "done"), ("judge_mode", "logprob", "incomplete"),
        ("kl_beta", "0.0", "done"), ("kl_beta", "0.04", "done")]  # axes by name, values in sweep order
    beta0, beta4 = rows[3], rows[4]
    assert float(beta0["final_reward"]) == 2.0 and float(beta4["final_reward"]) == 1.0
    assert float(beta0["judge_failure_rate"]) == pytest.approx(0.25)
    assert float(beta4["judge_failure_rate"]) == pytest.approx(0.1)
    assert float(beta0["time_per_step_s"]) == pytest.approx(2.0)  # median of 3.0 and 1.0
    assert float(beta4["time_per_step_s"]) == pytest.approx(4.0)
    # the newest evaluation (iter_2): CA 3.5, win 0.75, capability (acc_norm 0.04 + exact_match -0.01) / 2
    assert beta0["eval_iteration"] == "2"
    assert float(beta0["ca_score"]) == 3.5 and float(beta0["win_rate"]) == 0.75
    assert float(beta0["capability_delta"]) == pytest.approx(0.015)
    assert beta4["ca_score"] == beta4["win_rate"] == beta4["capability_delta"] == "n/a"
    assert rows[1]["final_reward"] == "n/a" and float(rows[1]["judge_failure_rate"]) == 1.0
    assert rows[2]["final_reward"] == "2.0"  # no summary: the last logged step
    assert int(rows[3]["steps"]) == 2 and int(rows[4]["steps"]) == 3 and int(rows[0]["steps"]) == 0
    assert [r.value for r in records] == [r["value"] for r in rows]


def test_report_markdown_and_plots(runs, tmp_path):
    out = tmp_path / "report"
    report.build_report([runs], out, title="Ablations, preset tiny")
    text = (out / "report.md").read_text()
    assert text.startswith("# Ablations, preset tiny")
    assert "| kl_beta | `0.0` | done | 2 | 2.000 | 3.500 | 0.750 | 0.015 | 0.250 | 2.00 |" in text
    assert "| kl_beta | `0.04` | done | 3 | 1.000 | n/a | n/a | n/a | 0.100 | 4.00 |" in text
    assert "did not finish" in text and "judge `judge.source=external` (failed)" in text
    # axes that change the judge get a caveat naming the key; the others none
    assert "## judge_mode\n\nNote: the runs differ in `judge.mode`, so each is rewarded" in text
    assert "## judge\n\nNote: the runs differ in `judge.source`" in text
    assert "## kl_beta\n\n![" in text
    for name in ("reward_kl_beta.png", "reward_judge_mode.png", "reward_judge.png", "ca_vs_capability.png"):
        path = out / "plots" / name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        assert f"(plots/{name})" in text


def test_without_evaluations_the_scatter_is_na(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "kl_beta", 0, ["grpo.beta=0.0"], swept=BETA)
    out = tmp_path / "report"
    report.build_report([root], out)
    assert not (out / "plots" / "ca_vs_capability.png").exists()
    assert "n/a: no run has both a CA score and a capability delta" in (out / "report.md").read_text()


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
])
def test_value_of(overrides, swept, expected):
    assert report.value_of(overrides, swept) == expected


def test_parse_overrides_and_axis():
    assert report.parse_overrides(["+experiment=[p,a]", "~foo=1", "judge=hhh_rubric", "junk"]) == {
        "experiment": "[p,a]", "foo": "1", "judge": "hhh_rubric"}
    assert report.axis_of("ablation-loss_type") == "loss_type"
    assert report.axis_of(None, Path("multirun/ablations/tiny/ablation-judge")) == "judge"
    assert report.axis_of("my-sweep") == "my-sweep"


def test_capability_delta_picks_each_tasks_main_metric():
    delta = {"arc": {"acc,none": 0.1, "acc_norm,none": 0.3}, "gsm8k": {"exact_match,flexible": 0.1},
             "odd": {"zeta": 0.2, "alpha": 0.4}, "empty": {}}
    assert report.capability_delta(delta) == pytest.approx((0.3 + 0.1 + 0.4) / 3)
    assert math.isnan(report.capability_delta({})) and math.isnan(report.capability_delta(None))
    numbers = report.eval_numbers({"pointwise": {"policy": {"overall": {"mean": None}}}})
    assert all(math.isnan(v) for v in numbers.values())  # JSON null (NaN) reads back as missing


def test_latest_eval_is_the_highest_iteration(tmp_path):
    run = tmp_path / "run"
    for k in (2, 10, 9):
        (run / "eval" / f"iter_{k}").mkdir(parents=True)
        (run / "eval" / f"iter_{k}" / "eval_results.json").write_text(json.dumps({"k": k}))
    (run / "eval" / "iter_x").mkdir()
    assert report.latest_eval(run) == (10, {"k": 10})
    assert report.latest_eval(tmp_path / "none") is None


class FakeRun:
    def __init__(self, name, group, state, rows, summary):
        self.name, self.group, self.state, self.path = name, group, state, ["me", "proj", name]
        self._rows, self.summary = rows, summary

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
                      "eval/lm_eval/delta/arc/acc_norm": 0.02, "eval/lm_eval/delta/arc/acc": 0.5})
    only_remote = FakeRun("grpo.loss_type=dapo", "ablation-loss_type", "crashed", [], {})
    api = FakeApi([remote, only_remote])
    records = report.wandb_records("me/proj", api=api)
    assert api.calls == [("me/proj", {"group": {"$regex": "^ablation-"}})]
    r = records[0]
    assert (r.axis, r.value, r.source, r.status) == ("kl_beta", "0.04", "wandb", "done")
    assert r.steps == [1, 2] and r.rewards == [0.5, 0.7] and r.final_reward == 0.7
    assert r.time_per_step_s == 3.0 and r.judge_failure_rate == pytest.approx(0.2)
    assert (r.ca_score, r.win_rate, r.capability_delta) == (3.0, 0.6, 0.02)
    assert records[1].status == "failed" and math.isnan(records[1].final_reward)
    merged = report.merge_records(report.local_records([runs]), records)
    beta = [m for m in merged if m.axis == "kl_beta"]
    assert [m.source for m in beta] == ["local", "local"]  # the local run of the same value wins
    assert [m.value for m in merged if m.source == "wandb"] == ["dapo"]


def test_wandb_failure_is_a_warning(tmp_path):
    class Broken:
        def runs(self, *a, **kw):
            raise ConnectionError("no network")

    with pytest.warns(UserWarning, match="no network"):
        assert report.wandb_records("me/proj", api=Broken()) == []


def test_cli(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert report.main([str(runs)]) == 0
    assert (tmp_path / "reports" / "ablations" / "tiny" / "report.csv").exists()
    assert "| kl_beta | `0.0` |" in capsys.readouterr().out
    assert report.main([str(tmp_path / "empty")]) == 1
    assert "no runs under" in capsys.readouterr().err
