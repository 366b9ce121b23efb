"""Learning-rate schedules: none | cosine | linear | polynomial, with linear warmup and a floor.

A schedule maps the optimizer step about to be taken (0-based count of finished steps) to a factor of
the base lr. It counts optimizer steps, never micro-batches.

Extending a run: when a resumed run raises `max_steps`, the schedule does not restart (which would
jump the lr back up) and does not keep the old horizon (which would hit the floor early). It continues
from the factor it had reached at the resume step and decays from there to the floor over the new
horizon: `factor(s) = floor + (f_resume - floor) * shape((s - s_resume) / (max_steps - s_resume))`.
A resume still inside the warmup just moves the horizon (the warmup finishes, nothing jumps). Note
that extending a run that already reached its end continues at the floor (f_resume = floor).

    sched = Schedule("cosine", warmup_steps=100, max_steps=1000, min_lr_ratio=0.1)
    lr = base_lr * sched.factor(step)
"""

from __future__ import annotations

import math

SHAPES = {  # progress p in [0, 1] -> remaining share of the decay, 1 at p=0 and 0 at p=1
    "none": lambda p, power: 1.0,
    "cosine": lambda p, power: 0.5 * (1.0 + math.cos(math.pi * p)),
    "linear": lambda p, power: 1.0 - p,
    "polynomial": lambda p, power: (1.0 - p) ** power,
}


class Schedule:
    """A stateful lr schedule (state = horizon and the anchor set by an extension)."""

    def __init__(self, kind: str, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0, power: float = 1.0):
        if kind not in SHAPES:
            raise ValueError(f"unknown scheduler '{kind}': choose one of {', '.join(SHAPES)}")
        self.kind, self.warmup_steps, self.max_steps = kind, warmup_steps, max_steps
        self.min_lr_ratio, self.power = min_lr_ratio, power
        self.anchor_step = 0  # where the current decay segment starts
        self.anchor_factor: float | None = None  # None = the original schedule (with warmup)

    def factor(self, step: int) -> float:
        floor = self.min_lr_ratio if self.kind != "none" else 1.0
        if self.anchor_factor is None:
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            start, top = self.warmup_steps, 1.0
        else:
            start, top = self.anchor_step, self.anchor_factor
        span = max(1, self.max_steps - start)
        p = min(1.0, max(0.0, (step - start) / span))
        return floor + (top - floor) * SHAPES[self.kind](p, self.power)

    def extend(self, new_max_steps: int, step: int) -> None:
        """Resume with a new horizon: continue from the current factor (see module docstring)."""
        if new_max_steps == self.max_steps:
            return
        if self.anchor_factor is None and step <= self.warmup_steps:
            # the decay has not begun: finish the warmup, then decay over the new horizon
            self.max_steps = new_max_steps
            return
        self.anchor_factor = self.factor(step)
        self.anchor_step = step
        self.max_steps = new_max_steps

    def state_dict(self) -> dict:
        return {"max_steps": self.max_steps, "anchor_step": self.anchor_step, "anchor_factor": self.anchor_factor}

    def load_state_dict(self, state: dict) -> None:
        self.max_steps = state["max_steps"]
        self.anchor_step = state["anchor_step"]
        self.anchor_factor = state["anchor_factor"]
