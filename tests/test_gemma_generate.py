"""``python -m dynalign.generate`` with a real base model (Gemma 3 270M) and the raw few-shot
templates (``generator=base_model``): the model's own prompts survive the filters.

Slow: converting Gemma takes ~2 minutes unless ``DYNALIGN_CACHE`` (read when this module is
collected) already holds it, and sampling runs at a few tokens per second on a busy CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

USER_CACHE = os.environ.get("DYNALIGN_CACHE")  # before the session fixture points it elsewhere
TYPOGRAPHIC = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-",
                             "\u2014": "-", "\u2026": "..."})


@pytest.fixture
def gemma_cache(request):
    if USER_CACHE:
        return USER_CACHE
    return str(request.getfixturevalue("cache_dir"))


@pytest.mark.slow  # Gemma 3 270M: conversion ~2 min if not cached, then 2-4 calls of 128 tokens
def test_base_model_generates_its_own_english_questions(tmp_path, gemma_cache):
    out = tmp_path / "prompts"
    args = [sys.executable, "-m", "dynalign.generate", "model=gemma3_270m", "generator=base_model",
            "generator.num_prompts=6", "generator.calls_per_shard=2", "generator.max_calls=4",
            f"generator.output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = {**os.environ, "DYNALIGN_CACHE": gemma_cache, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["generated_rows"] > 0, summary
    assert summary["coverage"]["templates"].keys() - {"seed"} <= {"advice_column", "help_forum"}
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    generated = [r["prompt"] for r in rows if r["source"] == "generated"]
    assert len(generated) == summary["generated_rows"]
    for prompt in generated:
        assert prompt.translate(TYPOGRAPHIC).isascii(), prompt
        assert prompt.endswith(("?", ".")) and len(prompt.split()) >= 6, prompt
