"""The command line in real subprocesses: config printing and early, readable failures."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO_ROOT


def _run(*args: str, cache) -> subprocess.CompletedProcess:
    env = {**os.environ, "DYNALIGN_CACHE": str(cache), "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "dynalign.train", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cfg_job_prints_config_without_loading_a_model(tmp_path):
    proc = _run("--cfg", "job", "grpo.group_size=8", cache=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "group_size: 8" in proc.stdout
    assert "name_or_path: tiny" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # the tiny model was not built


def test_bad_value_exits_nonzero_naming_the_key(tmp_path):
    proc = _run("grpo.group_size=1", cache=tmp_path)
    assert proc.returncode == 2
    assert "grpo.group_size" in proc.stderr and ">= 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_wrong_type_exits_nonzero_naming_the_key(tmp_path):
    proc = _run("grpo.lr=fast", cache=tmp_path)
    assert proc.returncode != 0
    assert "grpo.lr" in proc.stderr and "Traceback" not in proc.stderr
