"""``make ablations SEEDS=N``: the seed is one more sweep dimension, in the training sweep and in
the evaluation sweep that mirrors it job for job (what make would run, read with ``make -n``)."""

from __future__ import annotations

import subprocess

from conftest import REPO_ROOT
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser


def _make(*args: str) -> subprocess.CompletedProcess:
    # -o: never (re)build the virtual environment from a test
    return subprocess.run(["make", "-o", ".venv/.installed", "ablations", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


def test_seeds_sweep_in_training_and_evaluation():
    proc = _make("-n", "AXES=kl_beta", "SEEDS=3", "EVAL=1")
    assert proc.returncode == 0, proc.stderr
    commands = [line for line in proc.stdout.splitlines() if "-m dynalign." in line or "'seed=" in line]
    text = "\n".join(commands)
    assert text.count("'seed=range(0,3)'") == 2  # the training sweep and the evaluation sweep
    assert "dynalign.train -m" in text and "dynalign.evaluate -m" in text


def test_bad_seeds_stop_before_any_run():
    for bad in ("0", "two", "-1"):
        proc = _make("AXES=kl_beta", f"SEEDS={bad}")
        assert proc.returncode == 2 and f"SEEDS must be a whole number >= 1 (got '{bad}')" in proc.stdout


def test_seed_range_is_the_last_dimension_of_the_axis_sweep():
    """Hydra's basic sweeper (the sweep's params first, then the command line): each value's seeds
    are consecutive jobs, in the same order for the training and the evaluation sweep."""
    parser = OverridesParser.create()
    overrides = parser.parse_overrides(["grpo.beta=0.0,0.04", "seed=range(0,2)"])
    [batch] = BasicSweeper.split_arguments(overrides, None)
    assert batch == [["grpo.beta=0.0", "seed=0"], ["grpo.beta=0.0", "seed=1"],
                     ["grpo.beta=0.04", "seed=0"], ["grpo.beta=0.04", "seed=1"]]
