"""The training loop: resume reproduces the uninterrupted run; accumulation is exact; stop = save."""

import json
import os
import signal
import threading

import pytest
import torch

from helpers import CountingBatches as Batches
from helpers import SEQ, Recorder, eval_fn, tiny_model
from helpers import train_spec as cfg
from llmlab.checkpoint import latest_checkpoint, load_checkpoint
from llmlab.errors import UserError
from llmlab.train.loop import Callbacks, TrainingInterrupted, load_best, train
from llmlab.train.objectives import LanguageModeling

def run(tmp, dropout=0.0, **kw):
    rec = Recorder()
    model = tiny_model(dropout=dropout)
    result = train(model, LanguageModeling(), Batches(4), cfg(**kw), tmp, evaluate=eval_fn, callbacks=rec, seed=1)
    return model, result, rec


def test_loss_decreases_and_checkpoints_are_complete(tmp_path):
    model, result, rec = run(tmp_path / "ck", max_steps=30, save_every=10, eval_every=10)
    assert result.step == 30 and result.resumed_from == 0
    assert rec.logs[-1][1] < rec.logs[0][1]
    # only complete checkpoints, the newest two, and no temporary folders
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["best", "latest", "step-00000020", "step-00000030"]
    state = load_checkpoint(latest_checkpoint(tmp_path / "ck"))
    assert state["progress"]["step"] == 30 and set(state) >= {"model", "optimizer", "schedule", "data", "rng", "progress"}
    assert state["progress"]["best_value"] is not None


class Crash(RuntimeError):
    pass


class CrashingBatches(Batches):
    """Dies while building step 10 (as a killed process would), after step 8's checkpoint."""

    def next_batch(self):
        if self.i == 18:  # 2 micro-batches per step: the first of step 10
            raise Crash()
        return super().next_batch()


def crash_then_resume(tmp, dropout=0.0, **kw):
    with pytest.raises(Crash):
        train(tiny_model(dropout=dropout), LanguageModeling(), CrashingBatches(4), cfg(**kw), tmp, evaluate=eval_fn, seed=1)
    assert load_checkpoint(latest_checkpoint(tmp))["progress"]["step"] == 8
    return run(tmp, dropout=dropout, **kw)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    # dropout on: resuming must restore the RNG state too
    full_model, _, full = run(tmp_path / "a", dropout=0.1)
    resumed_model, result, rest = crash_then_resume(tmp_path / "b", dropout=0.1)
    assert result.resumed_from == 8
    assert [s for s, _ in rest.logs] == list(range(9, 13))
    for (s1, l1), (s2, l2) in zip(full.logs[8:], rest.logs):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-6)
    later = [e for e in full.evals if e[0] > 8]
    assert [e[0] for e in later] == [e[0] for e in rest.evals]
    assert [e[1] for e in later] == pytest.approx([e[1] for e in rest.evals], abs=1e-6)
    for p, q in zip(full_model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_a_resume_between_a_checkpoint_and_a_log_line_logs_what_the_uninterrupted_run_logged(tmp_path):
    """Checkpoints every 3 steps, a log line every 2: the run dies in step 10, after step 9's
    checkpoint; the resumed run's step-10 line must average steps 9 and 10, as the uninterrupted one."""
    every = dict(save_every=3, log_every=2, eval_every=6)
    _, _, full = run(tmp_path / "a", **every)
    with pytest.raises(Crash):
        train(tiny_model(), LanguageModeling(), CrashingBatches(4), cfg(**every), tmp_path / "b", evaluate=eval_fn, seed=1)
    assert load_checkpoint(latest_checkpoint(tmp_path / "b"))["progress"]["step"] == 9
    _, result, resumed = run(tmp_path / "b", **every)
    assert result.resumed_from == 9

    def logged(rec, after):
        return [(step, {k: v for k, v in m.items() if k != "train/tokens_per_sec"}) for step, m in rec.metrics if step > after]

    assert [step for step, _ in logged(resumed, 9)] == [10, 12]
    for (s1, m1), (s2, m2) in zip(logged(full, 9), logged(resumed, 9), strict=True):
        assert s1 == s2 and m1.keys() == m2.keys()
        for key in m1:
            assert m1[key] == pytest.approx(m2[key], abs=1e-6), (s1, key)


def test_resume_without_optimizer_state_differs(tmp_path):
    _, _, with_opt = crash_then_resume(tmp_path / "a")
    _, _, without = crash_then_resume(tmp_path / "b", load_optimizer=False)
    assert with_opt.logs[0][1] == pytest.approx(without.logs[0][1], abs=1e-7)  # same weights at step 9
    assert with_opt.logs[-1][1] != pytest.approx(without.logs[-1][1], abs=1e-6)  # fresh moments change the path


def test_gradient_accumulation_invariance():
    """batch 1 x accumulation 8 gives the loss and gradients of batch 8 x accumulation 1."""
    data = Batches(8).next_batch()
    grads = []
    for bs, accum in ((8, 1), (1, 8)):
        model = tiny_model(dropout=0.0)
        obj = LanguageModeling()
        micro = [{k: v[i:i + bs] for k, v in data.items()} for i in range(0, 8, bs)]
        units = sum(obj.count(b) for b in micro)
        total = 0.0
        for b in micro:
            loss_sum, _ = obj(model, b)
            (loss_sum / units).backward()
            total += float(loss_sum.detach() / units)
        grads.append((total, [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_loop_accumulation_matches_large_batch(tmp_path):
    """The loop itself: 2 steps of 4x2 micro-batches equal 2 steps of one 8-row batch."""

    class Merged(Batches):
        def next_batch(self):
            a, b = super().next_batch(), super().next_batch()
            return {k: torch.cat([a[k], b[k]]) for k in a}

    ra, rb = Recorder(), Recorder()
    ma, mb = tiny_model(dropout=0.0), tiny_model(dropout=0.0)
    train(ma, LanguageModeling(), Batches(4), cfg(max_steps=3, gradient_accumulation_steps=2), tmp_path / "a", callbacks=ra, seed=1)
    train(mb, LanguageModeling(), Merged(4), cfg(max_steps=3, batch_sequences=8, gradient_accumulation_steps=1), tmp_path / "b", callbacks=rb, seed=1)
    for (_, la), (_, lb) in zip(ra.logs, rb.logs):
        assert la == pytest.approx(lb, rel=1e-5)
    for p, q in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


def test_best_model_is_kept(tmp_path):
    model, result, rec = run(tmp_path / "ck", max_steps=12, eval_every=4)
    best_step, best_loss = min(rec.evals, key=lambda e: e[1])
    assert result.best_step == best_step and result.best_eval_loss == pytest.approx(best_loss)
    load_best(model, result)
    assert eval_fn(model)["eval/loss"] == pytest.approx(best_loss, abs=1e-6)


def test_eval_at_start_makes_the_starting_model_a_candidate_for_the_best(tmp_path):
    """Judged by a metric that training only lowers (maximize the eval loss), the starting model is
    the best: with eval_at_start it is kept (step 0, its exact weights), without it the first
    evaluated step is."""
    start = {k: v.clone() for k, v in tiny_model(dropout=0.0).state_dict().items()}
    results = {}
    for at_start in (True, False):
        rec, model = Recorder(), tiny_model(dropout=0.0)
        results[at_start] = train(model, LanguageModeling(), Batches(4), cfg(max_steps=8, eval_every=4, eval_at_start=at_start),
                                  tmp_path / str(at_start), evaluate=eval_fn, callbacks=rec, seed=1, maximize=True)
        assert [s for s, _ in rec.evals] == ([0] if at_start else []) + [4, 8]
        if at_start:
            assert rec.evals[0][1] > max(v for _, v in rec.evals[1:])  # the loss went down
            load_best(model, results[at_start])
            for k, v in model.state_dict().items():
                torch.testing.assert_close(v, start[k], atol=0, rtol=0)
    assert results[True].best_step == 0 and results[False].best_step == 4


@pytest.mark.parametrize("scores, margin, best_step", [
    ((0.50, 0.53, 0.52), 0.0, 4),   # any gain counts
    ((0.50, 0.53, 0.52), 0.02, 4),  # +3 points clears a 2-point margin
    ((0.50, 0.53, 0.52), 0.04, 0),  # +3 does not clear 4: the start stays
    ((0.50, 0.53, 0.56), 0.04, 8),  # +6 over the start does (measured against the best so far, the start)
])
def test_min_improvement_keeps_the_best_unless_beaten_by_the_margin(tmp_path, scores, margin, best_step):
    """A held-out score must beat the best so far by more than `min_improvement` to replace it; the
    kept model is that evaluation's weights (the start's exact weights when it stays)."""
    values = iter(scores)
    start = {k: v.clone() for k, v in tiny_model(dropout=0.0).state_dict().items()}
    model = tiny_model(dropout=0.0)
    result = train(model, LanguageModeling(), Batches(4),
                   cfg(max_steps=8, eval_every=4, eval_at_start=True, min_improvement=margin), tmp_path,
                   evaluate=lambda m: {"eval/exact_match": next(values)}, seed=1, best_metric="eval/exact_match",
                   maximize=True)
    assert result.best_step == best_step
    assert result.best_eval_loss == pytest.approx(scores[best_step // 4])
    load_best(model, result)
    same = all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    assert same == (best_step == 0)


@pytest.mark.parametrize("maximize, scores, target, stop, margin", [
    (False, (2.0, 1.5, 0.9, 0.5), 1.0, 6, 0.0),   # a loss: stops at the first evaluation at or below the target
    (True, (0.2, 0.4, 0.45, 0.7), 0.45, 6, 0.0),  # exact match: at or above it
    (False, (2.0, 1.5, 1.2, 1.1), 1.0, 8, 0.0),   # never reached: max_steps is the cap
    # with min_improvement, 0.46 at step 4 reaches the target without beating the best (0.2) by 0.3: the
    # stage would hand on a model under the target, so it goes on until the kept best reaches it
    (True, (0.2, 0.46, 0.55, 0.7), 0.45, 6, 0.3),
])
def test_stop_at_ends_the_run_at_the_first_evaluation_that_reaches_it(tmp_path, maximize, scores, target, stop, margin):
    """`stop_at` stops training at the evaluation whose kept best reaches it, saves that step as
    finished, and a rerun from the checkpoints trains no further."""
    metric = "eval/exact_match" if maximize else "eval/loss"
    values = iter(scores)
    result = train(tiny_model(dropout=0.0), LanguageModeling(), Batches(4),
                   cfg(max_steps=8, eval_every=2, save_every=100, stop_at=target, min_improvement=margin), tmp_path,
                   evaluate=lambda m: {metric: next(values)}, seed=1, best_metric=metric, maximize=maximize)
    assert result.step == stop and result.best_step == stop
    saved = load_checkpoint(latest_checkpoint(tmp_path))["progress"]
    assert saved["step"] == stop and saved["stopped"] == (stop < 8)
    again = train(tiny_model(dropout=0.0), LanguageModeling(), Batches(4),
                  cfg(max_steps=8, eval_every=2, save_every=100, stop_at=target, min_improvement=margin), tmp_path,
                  evaluate=lambda m: {metric: 0.0 if maximize else 9.0}, seed=1, best_metric=metric, maximize=maximize)
    assert again.step == stop and again.resumed_from == stop


def test_stop_at_without_held_out_data_is_one_sentence_before_any_step(tmp_path):
    with pytest.raises(UserError, match="stop_at .* has none: give it validation data"):
        train(tiny_model(), LanguageModeling(), Batches(4), cfg(stop_at=1.0), tmp_path, evaluate=None, seed=1)
    assert latest_checkpoint(tmp_path) is None


def test_sigterm_saves_checkpoint_and_stops(tmp_path):
    class Killer(Batches):
        def next_batch(self):
            if self.i == 10:  # during step 5 (2 micro-batches per step)
                os.kill(os.getpid(), signal.SIGTERM)
            return super().next_batch()

    assert threading.current_thread() is threading.main_thread()
    with pytest.raises(TrainingInterrupted) as info:
        train(tiny_model(), LanguageModeling(), Killer(4), cfg(save_every=100), tmp_path / "ck", seed=1)
    assert info.value.step == 6
    assert load_checkpoint(latest_checkpoint(tmp_path / "ck"))["progress"]["step"] == 6


class Poisoned(Batches):
    """Batches carrying a `poison` value the objective adds to its loss: NaN during the given
    optimizer steps (2 micro-batches per step), 0 otherwise."""

    def __init__(self, steps):
        super().__init__(4)
        self.steps = set(steps)

    def next_batch(self):
        step = self.i // 2 + 1
        batch = super().next_batch()
        batch["poison"] = torch.tensor(float("nan") if step in self.steps else 0.0)
        return batch


class PoisonedObjective(LanguageModeling):
    def __call__(self, model, batch):
        loss, extra = super().__call__(model, batch)
        return loss + batch["poison"], extra


def finite(state):
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def test_a_nan_step_is_skipped_counted_and_training_goes_on(tmp_path):
    rec = Recorder()
    model = tiny_model()
    result = train(model, PoisonedObjective(), Poisoned([5]), cfg(max_steps=12, log_every=2), tmp_path / "ck",
                   callbacks=rec, seed=1)
    assert result.step == 12 and finite(model.state_dict())
    logged = dict(rec.metrics)  # step -> metrics
    assert "train/skipped_steps" not in logged[4] and logged[6]["train/skipped_steps"] == 1.0
    assert logged[12]["train/skipped_steps"] == 1.0 and all(torch.isfinite(torch.tensor(m["train/loss"])) for m in logged.values())


def test_nan_steps_in_a_row_stop_the_stage_and_the_last_good_checkpoint_stays_latest(tmp_path):
    from llmlab.errors import UserError
    from llmlab.train.loop import NonFiniteTraining

    with pytest.raises(NonFiniteTraining, match=r"3 optimizer steps in a row \(steps 7-9\).*step-00000005.*lower train.lr") as info:
        train(tiny_model(), PoisonedObjective(), Poisoned([7, 8, 9]), cfg(max_steps=20, save_every=5),
              tmp_path / "ck", seed=1)
    assert isinstance(info.value, UserError)  # an expected failure: one sentence, no traceback
    state = load_checkpoint(latest_checkpoint(tmp_path / "ck"))
    assert state["progress"]["step"] == 5 and finite(state["model"])


def test_a_diverging_run_never_writes_a_nan_checkpoint(tmp_path):
    from llmlab.train.loop import NonFiniteTraining

    with pytest.raises(NonFiniteTraining, match="lower train.lr"):
        train(tiny_model(), LanguageModeling(), Batches(4), cfg(lr=1e6, grad_clip=None, max_steps=40, save_every=1),
              tmp_path / "ck", seed=1)
    for folder in (tmp_path / "ck").glob("step-*"):
        assert finite(load_checkpoint(folder)["model"])


def test_checkpoint_holds_no_pickled_objects(tmp_path):
    run(tmp_path / "ck", max_steps=4)
    # weights_only=True refuses arbitrary pickles: loading proves the checkpoint is plain data
    state = torch.load(latest_checkpoint(tmp_path / "ck") / "state.pt", weights_only=True)
    assert json.dumps(state["schedule"])


def test_objective_metrics_are_logged_as_window_means(tmp_path):
    """Extra metrics an objective returns (summed per micro-batch) reach the log, divided by units."""

    class Counting(LanguageModeling):
        def __call__(self, model, batch):
            loss, _ = super().__call__(model, batch)
            return loss, {"obj/targets": self.count(batch).float(), "obj/rows": torch.tensor(float(batch["input_ids"].shape[0]))}

    seen = []

    class Rec(Callbacks):
        def on_log(self, step, metrics):
            seen.append(metrics)

    train(tiny_model(), Counting(), Batches(4), cfg(max_steps=4, log_every=2), tmp_path / "ck", callbacks=Rec(), seed=1)
    assert len(seen) == 2
    for m in seen:
        assert m["obj/targets"] == pytest.approx(1.0)  # sum of targets / sum of targets
        assert m["obj/rows"] == pytest.approx(1 / (SEQ - 1))  # rows per target token: each row has SEQ-1
