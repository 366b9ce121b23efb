"""Stopping a training run cleanly: SIGINT/SIGTERM become a flag the loop checks at step boundaries.

    with StopFlag() as stop:
        while ...:
            one_step()
            if stop.raised:
                save_checkpoint(); raise TrainingInterrupted(step)

The first signal asks for a stop at the end of the current step (a checkpoint is written, so a
rerun resumes there); the same signal again stops at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved at `step` and the stage can be resumed."""

    def __init__(self, step: int):
        super().__init__(f"training interrupted at step {step}; checkpoint saved, rerun to resume")
        self.step = step


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag (main thread only: elsewhere signals are not ours to handle)."""

    def __init__(self) -> None:
        self.raised = False
        self._first: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        # the same signal twice (Ctrl+C, Ctrl+C): stop now. A different one is the same request
        # again: Ctrl+C in a terminal reaches torchrun's workers as SIGINT, then torchrun's SIGTERM.
        if self.raised and signum == self._first:
            raise KeyboardInterrupt
        if self.raised:
            return
        self.raised, self._first = True, signum
        print(f"\nreceived signal {signum}: saving a checkpoint at the end of this step", file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
