"""``python -m dynalign.train`` that receives a real SIGTERM right after logging step ``K``.

Usage: ``python tests/dist/train_until.py K key=value ...`` (Hydra overrides as for the CLI).
The signal goes through the run's own handler (dynalign.runtime.Preemption) at an exact step,
which a test sending it from outside could only hit by timing. The run's tracker is wrapped:
its first record of step ``K`` is followed by the signal.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

import dynalign.tracking

signal_after = int(sys.argv.pop(1))
build_tracker = dynalign.tracking.build_tracker


class SignalAfter:
    def __init__(self, tracker) -> None:
        self.tracker, self.sent = tracker, False

    def log(self, metrics, step: int) -> None:
        self.tracker.log(metrics, step)
        if step == signal_after and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)

    def __getattr__(self, name):
        return getattr(self.tracker, name)


dynalign.tracking.build_tracker = lambda *args, **kwargs: SignalAfter(build_tracker(*args, **kwargs))
runpy.run_module("dynalign.train", run_name="__main__", alter_sys=True)
