"""``python -m dynalign.generate`` in real subprocesses: composition, early failures, kill -9 + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT
from test_datagen_openai import loopback_server, openai_config


def _env(cache) -> dict:
    return {**os.environ, "DYNALIGN_CACHE": str(cache), "PYTHONPATH": str(REPO_ROOT)}


def _args(tmp_path, *overrides: str, flags: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "dynalign.generate", *flags, "generator=ca_prompts", *overrides,
            f"hydra.run.dir={tmp_path / 'hydra'}"]


def _run(tmp_path, *overrides: str, cache, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(_args(tmp_path, *overrides, flags=flags), cwd=REPO_ROOT, env=_env(cache),
                          capture_output=True, text=True, timeout=300)


def test_cli_composes_the_generator_group_without_loading_a_model(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    proc = _run(tmp_path, "generator.num_prompts=5000", flags=("--cfg", "job"), cache=cache)
    assert proc.returncode == 0, proc.stderr
    assert "num_prompts: 5000" in proc.stdout and "name: ca_prompts" in proc.stdout
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize("override, key", [
    ("generator.num_prompts=0", "generator.num_prompts"),
    ("generator.eval_fraction=1.5", "generator.eval_fraction"),
    ("generator.top_p=0", "generator.top_p"),
    ("generator.dedup_threshold=0", "generator.dedup_threshold"),
    ("generator.models=[]", "generator.models"),
    ("generator.models=[openai:some-model]", "generator.endpoint.base_url"),
])
def test_bad_values_exit_2_naming_the_key(tmp_path, override, key):
    proc = _run(tmp_path, override, f"generator.output_dir={tmp_path / 'out'}", cache=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_wrong_type_exits_nonzero_naming_the_key(tmp_path):
    proc = _run(tmp_path, "generator.num_prompts=many", cache=tmp_path)
    assert proc.returncode != 0
    assert "generator.num_prompts" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow  # a subprocess that imports transformers and loads the model: ~20-35 s on 2 cores
def test_cli_run_with_the_tiny_policy_writes_a_dataset(tmp_path, cache_dir, tiny_model_path):
    import datasets

    out = tmp_path / "out"
    proc = _run(tmp_path, "generator.num_prompts=3", "generator.max_new_tokens=8",
                f"generator.output_dir={out}", cache=cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert "prompts written to" in proc.stdout
    loaded = datasets.load_from_disk(str(out / "dataset"))
    assert len(loaded["train"]) + len(loaded["eval"]) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["calls"] >= 1 and summary["rows"] == 3
    shard = json.loads((out / "shards" / "shard_00000.json").read_text())
    assert shard["generator_model"] == "tiny"


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_loses_nothing_and_duplicates_nothing(tmp_path):
    out, ref = tmp_path / "out", tmp_path / "ref"
    with loopback_server(delay_s=0.25) as (server, url):
        overrides = ("generator.num_prompts=64", "generator.calls_per_shard=2",
                     "generator.models=[openai:loopback-model]", f"generator.endpoint.base_url={url}",
                     f"generator.output_dir={out}")
        proc = subprocess.Popen(_args(tmp_path, *overrides), cwd=REPO_ROOT, env=_env(tmp_path),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not list((out / "shards").glob("shard_*.json")):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no shard written in 120 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        written = {p.name: p.read_bytes() for p in (out / "shards").glob("shard_*.json")}
        assert not (out / "dataset").exists(), "the run finished before it was killed"
        state = json.loads((out / "state.json").read_text())
        assert state["next_shard"] in (len(written), len(written) - 1)  # state trails the shards by <= 1

        resumed = subprocess.run(_args(tmp_path, *overrides), cwd=REPO_ROOT, env=_env(tmp_path),
                                 capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        from dynalign.datagen import generate_prompts

        generate_prompts(openai_config(url, ref, num_prompts=64, calls_per_shard=2), progress=False)

    for name, data in written.items():  # every shard written before the kill is intact
        assert (out / "shards" / name).read_bytes() == data
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (ref / "prompts.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 64
    assert ids == [r["id"] for r in reference]  # the same prompts as a run that was never killed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_shard"] == len(written) and summary["rows"] == 64
