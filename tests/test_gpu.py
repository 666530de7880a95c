"""Every check of ``python -m dynalign.gpu_check`` as a pytest test on this machine's CUDA devices.

``make test-gpu`` runs them (``-m gpu``, with the GPUs visible: ``DYNALIGN_TEST_GPU=1``; every
other test hides them). Each test runs one check in its own process, on every device, and
fails with its detail and tracebacks when the check FAILs; a check that cannot run here
(Gemma or vLLM not installed, DeepSpeedCPUAdam not buildable) is a pytest skip with the check's
own reason. Without CUDA every test here is skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

from dynalign.gpu_check import CHECKS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("name", list(CHECKS))
def test_gpu_check(name, tmp_path):
    out = tmp_path / "gc"
    proc = subprocess.run([sys.executable, "-m", "dynalign.gpu_check", "--only", name, "--out", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=CHECKS[name].timeout_s + 120)
    [result] = json.loads((out / "results.json").read_text())
    if result["status"] == "SKIP":
        pytest.skip(result["detail"])
    failure = f"{result['detail']}\n{''.join(result['tracebacks'])}\n{proc.stderr[-3000:]}"
    assert result["status"] == "PASS", failure
    assert proc.returncode == 0
