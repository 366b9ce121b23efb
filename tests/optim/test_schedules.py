"""Schedules: warmup end, midpoint and end values; the extension rule (continue from the current
factor over the new horizon), also through the training loop's resume."""

import math

import pytest

from llmlab.optim import Schedule

WARM, MAX, FLOOR = 10, 110, 0.1  # decay runs over steps 10..110, midpoint 60


@pytest.mark.parametrize("kind,mid", [
    ("cosine", FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * 0.5))),
    ("linear", FLOOR + (1 - FLOOR) * 0.5),
    ("polynomial", FLOOR + (1 - FLOOR) * 0.5 ** 2),
])
def test_values_at_warmup_end_midpoint_and_end(kind, mid):
    s = Schedule(kind, WARM, MAX, min_lr_ratio=FLOOR, power=2.0)
    assert s.factor(0) == pytest.approx(1 / WARM)  # linear warmup, never a zero first step
    assert s.factor(WARM // 2 - 1) == pytest.approx(0.5)
    assert s.factor(WARM) == pytest.approx(1.0)  # warmup end: the peak
    assert s.factor(60) == pytest.approx(mid)
    assert s.factor(MAX) == pytest.approx(FLOOR)  # the end: the floor, and never below it
    assert s.factor(MAX + 50) == pytest.approx(FLOOR)
    values = [s.factor(i) for i in range(WARM, MAX + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_none_is_constant_after_warmup():
    s = Schedule("none", 4, 20, min_lr_ratio=0.5)
    assert [s.factor(i) for i in (0, 3, 4, 12, 20)] == pytest.approx([0.25, 1.0, 1.0, 1.0, 1.0])


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown scheduler"):
        Schedule("step", 0, 10)


@pytest.mark.parametrize("kind", ["cosine", "linear", "polynomial"])
def test_extension_continues_from_the_current_factor(kind):
    s = Schedule(kind, WARM, MAX, min_lr_ratio=FLOOR, power=2.0)
    at_resume = s.factor(60)
    s.extend(210, step=60)
    assert s.factor(60) == pytest.approx(at_resume)  # no jump at the resume step
    assert s.factor(210) == pytest.approx(FLOOR)  # the floor moves to the new horizon
    assert s.factor(110) > FLOOR + 0.1 * (at_resume - FLOOR)  # not at the floor where the old run ended
    # halfway through the new segment: the shape at p = 0.5, scaled between f_resume and the floor
    shape = {"cosine": 0.5, "linear": 0.5, "polynomial": 0.25}[kind]
    assert s.factor(135) == pytest.approx(FLOOR + (at_resume - FLOOR) * shape)
    # the state survives a checkpoint
    t = Schedule(kind, WARM, MAX, min_lr_ratio=FLOOR, power=2.0)
    t.load_state_dict(s.state_dict())
    assert [t.factor(i) for i in range(60, 211, 10)] == pytest.approx([s.factor(i) for i in range(60, 211, 10)])


def test_extension_twice_and_unchanged_horizon():
    s = Schedule("linear", 0, 100)
    s.extend(100, step=50)
    assert s.factor(75) == pytest.approx(0.25)  # same horizon: nothing changes
    s.extend(150, step=50)  # from 0.5 at step 50 to 0 at 150
    assert s.factor(100) == pytest.approx(0.25)
    s.extend(300, step=100)  # from 0.25 at step 100 to 0 at 300
    assert s.factor(100) == pytest.approx(0.25) and s.factor(200) == pytest.approx(0.125)


def test_extension_during_warmup_finishes_the_warmup():
    s = Schedule("cosine", 10, 50)
    s.extend(100, step=5)
    assert s.factor(5) == pytest.approx(0.6)
    assert s.factor(10) == pytest.approx(1.0)  # the warmup still reaches the peak
    assert s.factor(55) == pytest.approx(0.5)  # the decay spans 10..100
    assert s.factor(100) == pytest.approx(0.0)


def test_loop_resume_that_extends_max_steps(tmp_path):
    from helpers import CountingBatches as Batches
    from helpers import Recorder, tiny_model
    from helpers import optimizer_train_spec as cfg

    from llmlab.train.loop import train
    from llmlab.train.objectives import LanguageModeling

    class Crash(RuntimeError):
        pass

    class Dies(Batches):
        def next_batch(self):
            if self.i == 4:  # while building step 5, after step 3's checkpoint
                raise Crash()
            return super().next_batch()

    plan = dict(warmup_steps=2, save_every=3, scheduler="linear")
    with pytest.raises(Crash):  # a 2 + 4 step linear schedule, interrupted at step 3 (factor 0.75)
        train(tiny_model(), LanguageModeling(), Dies(), cfg("adamw", max_steps=6, **plan), tmp_path, seed=1)
    rec = Recorder()
    train(tiny_model(), LanguageModeling(), Batches(), cfg("adamw", max_steps=10, **plan), tmp_path, callbacks=rec, seed=1)
    # resumed at step 3 with max 10: from 0.75 down to 0 over the 7 remaining steps, no jump
    lr = cfg("adamw").lr
    assert [s for s, _ in rec.logs] == list(range(4, 11))
    assert [l for _, l in rec.lrs] == pytest.approx([lr * 0.75 * (1 - i / 7) for i in range(7)])


@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1])
def test_extending_a_run_that_decayed_to_zero_says_the_new_steps_cannot_train(tmp_path, capsys, min_lr_ratio):
    from helpers import CountingBatches as Batches
    from helpers import Recorder, tiny_model
    from helpers import optimizer_train_spec as cfg

    from llmlab.train.loop import train
    from llmlab.train.objectives import LanguageModeling

    plan = dict(warmup_steps=1, save_every=3, scheduler="cosine", min_lr_ratio=min_lr_ratio)
    train(tiny_model(), LanguageModeling(), Batches(), cfg("adamw", max_steps=6, **plan), tmp_path, seed=1)
    capsys.readouterr()
    rec = Recorder()
    train(tiny_model(), LanguageModeling(), Batches(), cfg("adamw", max_steps=9, **plan), tmp_path, callbacks=rec, seed=1)
    out = capsys.readouterr().out
    lrs = [lr for _, lr in rec.lrs]
    assert [s for s, _ in rec.logs] == [7, 8, 9]
    if min_lr_ratio == 0:  # the schedule ended at 0: the extension trains at lr 0, and says so
        assert lrs == [0.0, 0.0, 0.0] and "cannot change the model: rerun the stage with --force" in out
    else:  # a floor above 0: the extension trains at the floor, silently
        assert lrs == pytest.approx([cfg("adamw").lr * min_lr_ratio] * 3) and "cannot change the model" not in out
