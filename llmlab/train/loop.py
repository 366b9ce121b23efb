"""The one training loop. Methods differ by objective and batch source, never by a copied loop.

    result = train(model, objective, batches, spec.train, ckpt_dir, evaluate=fn, callbacks=cb, seed=1)

`Trainer` does the work in named steps, each readable alone:

    resume()        continue from the newest checkpoint, if there is one
    train_step()    one optimizer update: forward/backward over `gradient_accumulation_steps`
                    micro-batches, each's summed loss divided by the units (tokens, pairs,
                    completions) of the whole step — so batch 1 x accumulation 8 equals 8 x 1
    log()           the metrics of the steps since the last log line
    evaluate()      held-out metrics; keeps the best model by `best_metric`
    checkpoint()    model, optimizer, schedule, data position, RNG, the loop's own counters and
                    the metric window since the last log line, each through its `state_dict`,
                    written atomically
    run()           all of the above until `max_steps`, or until SIGINT/SIGTERM (then a checkpoint
                    at the step boundary and `TrainingInterrupted`)

It knows no tracker and no orchestrator: metrics leave through `Callbacks`, which the stage runners
connect to files and MLflow. A run started on a folder that holds a checkpoint continues it and
reproduces the uninterrupted run's losses. An optimizer with `hessian_due()` (Sophia) gets, when
due, an extra forward/backward of `optimizer.hessian_loss(model, batch)` on the step's first
micro-batch, then `update_hessian(n)`.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from llmlab import fastpath
from llmlab.checkpoint import atomic_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from llmlab.device import autocast_dtype
from llmlab.errors import UserError
from llmlab.optim import Schedule, build_optimizer
from llmlab.parallel import Engine, ShardedBatches, all_sum, any_rank, barrier, broadcast_object, current
from llmlab.train.signals import StopFlag, TrainingInterrupted
from llmlab.train.speed import compile_blocks, flops_per_token, peak_flops, should_compile, uncompile_blocks

__all__ = ["BatchSource", "Callbacks", "NonFiniteTraining", "Objective", "TrainResult", "Trainer", "TrainingInterrupted", "load_best",
           "train"]


class Objective(Protocol):
    """A training objective: a pure function of (model, batch) plus the step's normaliser."""

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | int:
        """Normaliser units (e.g. target tokens) in a micro-batch, known before the forward."""

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(summed loss over the micro-batch, summed extra metrics) — summed, not averaged."""


class NonFiniteTraining(UserError):
    """Too many optimizer steps in a row had a NaN/inf loss or gradient norm; the stage stops and
    the last checkpoint (which never holds a skipped step) stays `latest`."""


class BatchSource(Protocol):
    micro_batch: int  # what one next_batch() holds, in `unit`s
    unit: str  # "sequences", "pairs", "completions"

    def next_batch(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Callbacks:
    """Hooks the loop calls; the default does nothing. Subclass in the stage that runs the loop."""

    def on_start(self, info: dict[str, Any]) -> None: ...
    def on_log(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...


@dataclass
class TrainResult:
    step: int  # optimizer steps done
    resumed_from: int  # the step a checkpoint resumed from (0 = fresh start)
    best_eval_loss: float | None  # the best value of `best_metric`
    best_step: int | None
    best_path: Path | None  # model weights of the best evaluation (None: no evaluation ran)
    last_metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # wall time of this attempt's loop: steps, evaluations, checkpoints


# ------------------------------------------------------------------------- what a checkpoint holds


@dataclass
class Progress:
    """The loop's own counters: optimizer steps done and the best evaluation so far."""

    step: int = 0
    best_value: float | None = None  # of `best_metric`
    best_step: int | None = None
    skipped: int = 0  # optimizer steps skipped for a non-finite loss or gradient norm, in all
    skipped_in_row: int = 0  # ... and the current run of them
    stopped: bool = False  # an evaluation reached the train block's `stop_at`: the run is done before max_steps

    def state_dict(self) -> dict:
        return {"step": self.step, "best_value": self.best_value, "best_step": self.best_step,
                "skipped": self.skipped, "skipped_in_row": self.skipped_in_row, "stopped": self.stopped}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.best_value, self.best_step = int(state["step"]), state["best_value"], state["best_step"]
        self.skipped, self.skipped_in_row = int(state.get("skipped", 0)), int(state.get("skipped_in_row", 0))
        self.stopped = bool(state.get("stopped", False))


class RandomState:
    """Python's and torch's global generators (dropout, sampling), so a resumed run draws the same."""

    def state_dict(self) -> dict[str, Any]:
        state = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class ModelState:
    """The model's full (unsharded) weights through the engine; a collective under FSDP."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.engine.model_state()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.engine.load_model_state(state)


class OptimizerState:
    """The optimizer's full state in torch's single-process format, through the engine."""

    def __init__(self, engine: Engine, optimizer: torch.optim.Optimizer):
        self.engine, self.optimizer = engine, optimizer

    def state_dict(self) -> dict:
        return self.engine.optimizer_state(self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_optimizer_state(self.optimizer, state)


@dataclass
class Window:
    """What the steps since the last log line add up to (summed over micro-batches, on device)."""

    loss: torch.Tensor
    units: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # objective metrics (e.g. dpo/accuracy)
    tokens: int = 0
    skipped: int = 0  # steps in this window skipped for a non-finite loss or gradient norm
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def empty(cls, device: torch.device) -> "Window":
        return cls(torch.zeros((), device=device), torch.zeros((), device=device))


class WindowState:
    """The metric window as checkpointed state, so the first log line after a resume averages the same
    steps the uninterrupted run's did (a checkpoint between two log lines holds the steps since the
    last one). Saved as every rank's sums (`state_dict` is a collective: every rank calls it);
    restored on rank 0, the other ranks' windows start empty, so the sums over ranks are unchanged.
    The seconds the window has run are kept too, so tokens/s stays a rate."""

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        window, device = self.trainer.window, self.trainer.device
        return {"loss": float(all_sum(window.loss)), "units": float(all_sum(window.units)),
                "extra": {k: float(all_sum(v)) for k, v in sorted(window.extra.items())},
                "tokens": int(all_sum(torch.tensor(float(window.tokens), device=device))),
                "skipped": window.skipped, "seconds": time.perf_counter() - window.started}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        trainer = self.trainer
        window = Window.empty(trainer.device)
        if trainer.par.main:
            window.loss = torch.tensor(state["loss"], device=trainer.device)
            window.units = torch.tensor(state["units"], device=trainer.device)
            window.extra = {k: torch.tensor(v, device=trainer.device) for k, v in state["extra"].items()}
            window.tokens, window.skipped = int(state["tokens"]), int(state["skipped"])
        window.started = time.perf_counter() - float(state["seconds"])
        trainer.window = window


def _bar(done: float, width: int = 20) -> str:
    """A text progress bar, e.g. [#######-------------] 35%; one per log line, so it reads the same
    in a terminal, in Prefect's logs and in CI output."""
    filled = int(round(done * width))
    return f"[{'#' * filled}{'-' * (width - filled)}] {100 * done:3.0f}%"


def _fmt_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


# ----------------------------------------------------------------------------------- the loop


class Trainer:
    """Trains `model` on `objective` over `batches` as `cfg` (a spec TrainSpec) says; see the
    module docstring. The best model is the evaluation with the lowest `best_metric` (highest with
    `maximize`, e.g. an RL stage's held-out reward)."""

    def __init__(self, model: torch.nn.Module, objective: Objective, batches: BatchSource, cfg: Any,
                 ckpt_dir: str | Path, evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
                 callbacks: Callbacks | None = None, seed: int = 0, label: str = "train",
                 best_metric: str = "eval/loss", maximize: bool = False):
        self.objective, self.cfg, self.evaluate_fn = objective, cfg, evaluate
        self.callbacks = callbacks or Callbacks()
        self.ckpt_dir = Path(ckpt_dir)
        self.label, self.best_metric, self.maximize = label, best_metric, maximize
        self.device = next(model.parameters()).device
        self.amp = autocast_dtype(cfg.precision, self.device)
        self.par = current()
        self.engine = Engine(model, self.par)  # single process, DDP or FSDP2 (see llmlab.parallel)
        if self.par.active and not getattr(batches, "per_rank", False):
            batches = ShardedBatches(batches, self.par.rank, self.par.world)
        self.batches = batches
        self.compile_forced = getattr(cfg, "compile", False) is True
        self.compiled = False
        if should_compile(getattr(cfg, "compile", False), self.device) and not fastpath.broken("compile"):
            try:
                self.compiled = compile_blocks(self.engine.owner) > 0
            except Exception as exc:  # noqa: BLE001  a fast path that fails falls back (llmlab.fastpath)
                fastpath.failed("compile", "compiling the model's blocks", exc, self.compile_forced)
        if self.compiled:
            fastpath.record("compile", "compiled")
        elif not fastpath.taken().get("compile"):
            fastpath.record("compile", "eager")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # train/peak_memory_gib counts from here (the weights are in)
        self.compile_seconds: float | None = None  # the first step's wall time when compiled (it compiles)
        self.peak = peak_flops(self.device)  # None off CUDA or on an unknown card: no MFU
        self.token_flops: float | None = None
        self.compile_logged = False
        self.optimizer = build_optimizer(self.engine.owner, cfg.optimizer, cfg.lr, cfg.weight_decay)
        self.schedule = Schedule(cfg.scheduler, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio, cfg.power)
        self.progress = Progress()
        torch.manual_seed(seed)
        random.seed(seed)
        self.resumed_from = 0
        self.best_path: Path | None = None
        self.last: dict[str, float] = {}
        self.window = Window.empty(self.device)
        self.grad_norm = torch.zeros(())
        self.lr_factor = 1.0
        self.run_started = time.perf_counter()

    # -- what is checkpointed, each with state_dict / load_state_dict
    def checkpointed(self) -> dict[str, Any]:
        return {"model": ModelState(self.engine), "optimizer": OptimizerState(self.engine, self.optimizer),
                "schedule": self.schedule, "data": self.batches, "rng": RandomState(), "progress": self.progress,
                "window": WindowState(self)}

    @property
    def step(self) -> int:
        return self.progress.step

    def say(self, *args: Any, **kwargs: Any) -> None:
        if self.par.main:  # rank 0 reports for everyone
            print(*args, **kwargs)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def resume(self) -> None:
        """Continue from the newest checkpoint in the folder, if any: every checkpointed part
        reloads, the schedule stretches to a larger `max_steps`, and `load_optimizer: false`
        starts the optimizer afresh (to switch optimizers mid-run)."""
        found = latest_checkpoint(self.ckpt_dir)
        if found is not None:
            saved = load_checkpoint(found)
            for key, part in self.checkpointed().items():
                if (key == "optimizer" and not self.cfg.load_optimizer) or key not in saved:
                    continue  # a checkpoint written before the loop kept its metric window has none
                part.load_state_dict(saved[key])
                if key == "schedule":
                    self.schedule.extend(self.cfg.max_steps, saved["progress"]["step"])
        self.resumed_from = self.step
        if (self.ckpt_dir / "best" / "state.pt").is_file():
            self.best_path = self.ckpt_dir / "best"

    def announce(self) -> None:
        """Tell the callbacks and the console what trains, where, and from which step."""
        owner, par = self.engine.owner, self.par
        trainable = sum(p.numel() for p in owner.parameters() if p.requires_grad)
        total = sum(p.numel() for p in owner.parameters())
        precision = str(self.amp or torch.float32)
        info = {"resumed_from": self.resumed_from, "trainable_params": trainable, "total_params": total,
                "device": str(self.device), "precision": precision}
        if par.active:
            local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in owner.parameters())
            info.update(world_size=par.world, strategy=par.strategy, parameters_on_this_rank=local)
        self.callbacks.on_start(info)
        where = f"{par.world} processes ({par.strategy}) on {self.device}" if par.active else str(self.device)
        self.say(f"[{self.label}] {trainable:,} trainable of {total:,} parameters on {where} ({precision});"
                 f" {'resuming from step ' + str(self.step) if self.step else 'starting'} -> {self.cfg.max_steps} steps")
        if 0 < self.step < self.cfg.max_steps and self.schedule.factor(self.step) == 0:
            # a finished run extended to a larger max_steps continues from the lr it had reached: zero here
            self.say(f"[{self.label}] the lr schedule reached 0 by step {self.step}, so the steps to {self.cfg.max_steps} "
                     f"cannot change the model: rerun the stage with --force to train {self.cfg.max_steps} steps afresh, "
                     f"or give it min_lr_ratio > 0")
        if par.active:
            size, unit = self.batches.micro_batch, self.batches.unit
            accumulation = self.cfg.gradient_accumulation_steps
            self.say(f"[{self.label}] global batch per step = {size} {unit} x accumulation {accumulation} x world size "
                     f"{par.world} = {size * accumulation * par.world} {unit}")

    def _hessian_update(self, batch: dict[str, torch.Tensor]) -> None:
        """Curvature-aware optimizers (Sophia) estimate the Hessian on this step's first micro-batch
        at the current weights, before the step's gradients accumulate."""
        with self._autocast():
            h_loss, h_count = self.optimizer.hessian_loss(self.engine.train_model, batch)
        h_loss.backward()
        self.optimizer.update_hessian(h_count)
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self) -> None:
        """One optimizer update over `gradient_accumulation_steps` micro-batches."""
        engine, window = self.engine, self.window
        self.lr_factor = self.schedule.factor(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * self.lr_factor
        first = self.compiled and self.compile_seconds is None
        started = time.perf_counter()
        micro = [self.batches.next_batch() for _ in range(self.cfg.gradient_accumulation_steps)]
        micro = [{k: v.to(self.device) for k, v in b.items()} for b in micro]
        if self.peak is not None and self.token_flops is None:
            self.token_flops = flops_per_token(self.engine.owner, micro[0]["input_ids"].shape[-1])
        local_units = sum(torch.as_tensor(self.objective.count(b), device=self.device, dtype=torch.float32) for b in micro)
        # the step's normaliser counts every rank's units; DDP/FSDP average gradients over ranks, so
        # each rank's loss is scaled by the world size to make the sum exact
        units = all_sum(torch.as_tensor(local_units, device=self.device)).clamp(min=1)
        if first:  # compilation happens in this step: if it fails, the step runs again eagerly
            rng = RandomState().state_dict()
            try:
                step_loss, step_extra = self._forward_backward(micro, units)
            except (torch.OutOfMemoryError, UserError):
                raise
            except Exception as exc:  # noqa: BLE001  a fast path that fails falls back (llmlab.fastpath)
                fastpath.failed("compile", "running the first compiled step", exc, self.compile_forced)
                uncompile_blocks(engine.owner)
                self.compiled, first = False, False
                self.optimizer.zero_grad(set_to_none=True)
                RandomState().load_state_dict(rng)  # the eager step draws what the compiled one would have
                step_loss, step_extra = self._forward_backward(micro, units)
        else:
            step_loss, step_extra = self._forward_backward(micro, units)
        window.tokens += sum(int(b["input_ids"].numel()) for b in micro)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in engine.owner.parameters() if p.grad is not None],
            self.cfg.grad_clip if self.cfg.grad_clip is not None else float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # a DTensor under FSDP
        # one host sync per step: a non-finite loss or gradient on any rank skips the update everywhere
        bad = any_rank(not bool(torch.isfinite(step_loss) & torch.isfinite(grad_norm)))
        self.progress.step += 1
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self.skip_step(float(step_loss), float(grad_norm))
            return
        self.grad_norm = grad_norm
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if first:
            self.compile_seconds = time.perf_counter() - started
        self.progress.skipped_in_row = 0
        window.loss += step_loss
        window.units += local_units
        for key, value in step_extra.items():
            window.extra[key] = window.extra.get(key, 0.0) + value

    def _forward_backward(self, micro: list[dict[str, torch.Tensor]], units: torch.Tensor
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A curvature estimate when the optimizer wants one, then forward and backward over the step's
        micro-batches, each's summed loss over the whole step's `units`; returns the step's summed loss
        and objective metrics (gradients are left accumulated)."""
        if hasattr(self.optimizer, "hessian_due") and self.optimizer.hessian_due():
            self._hessian_update(micro[0])
        engine, scale = self.engine, float(self.par.world)
        step_loss = torch.zeros((), device=self.device)
        step_extra: dict[str, torch.Tensor] = {}
        for i, b in enumerate(micro):
            with engine.no_sync(last=i == len(micro) - 1), self._autocast():
                loss_sum, extra = self.objective(engine.train_model, b)
                (loss_sum / units * scale).backward()
            step_loss += loss_sum.detach()
            for key, value in extra.items():
                step_extra[key] = step_extra.get(key, 0.0) + torch.as_tensor(value, device=self.device).detach().float()
        return step_loss, step_extra

    def skip_step(self, loss: float, grad_norm: float) -> None:
        """The step just taken had a NaN/inf loss or gradient norm: its update is dropped (the data
        moves on); `max_nonfinite_steps` of them in a row stop the stage."""
        progress, limit = self.progress, self.cfg.max_nonfinite_steps
        progress.skipped += 1
        progress.skipped_in_row += 1
        self.window.skipped += 1
        self.say(f"[{self.label}] step {self.step}: loss {loss} / gradient norm {grad_norm} is not finite: "
                 f"update skipped ({progress.skipped_in_row} in a row, {limit} allowed)", flush=True)
        if progress.skipped_in_row >= limit:
            first = self.step - progress.skipped_in_row + 1
            kept = latest_checkpoint(self.ckpt_dir)
            where = f"the last good checkpoint ({kept.resolve().name}) stays latest" if kept else "no checkpoint was written"
            raise NonFiniteTraining(
                f"[{self.label}] loss or gradient norm was NaN/inf at {progress.skipped_in_row} optimizer steps in a row "
                f"(steps {first}-{self.step}); {where}: lower train.lr, keep train.grad_clip set, or check the data "
                f"of those steps, then run again (train.max_nonfinite_steps = {limit})")

    def log(self) -> None:
        """Send the window's mean loss and metrics to the callbacks and print a progress line."""
        now, window, cfg = time.perf_counter(), self.window, self.cfg
        all_units = all_sum(window.units)  # over every rank's micro-batches (of the steps not skipped)
        tokens = float(all_sum(torch.tensor(float(window.tokens), device=self.device)))
        lr = cfg.lr * self.lr_factor
        metrics = {"train/lr": lr, "train/tokens_per_sec": tokens / max(now - window.started, 1e-9)}
        if self.peak is not None and self.token_flops:
            metrics["train/mfu"] = metrics["train/tokens_per_sec"] * self.token_flops / (self.peak * self.par.world)
        if self.device.type == "cuda":  # this rank's high-water mark since the stage began: to hold against `llmlab inspect`
            metrics["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.compile_seconds is not None and not self.compile_logged:
            metrics["train/compile_seconds"] = self.compile_seconds  # the first step, compiling included
            self.compile_logged = True
        if float(all_units) > 0:  # a window of skipped steps only has no loss to report
            metrics["train/loss"] = loss = (all_sum(window.loss) / all_units).item()
            metrics["train/grad_norm"] = float(self.grad_norm)
            # per-method metrics, averaged over the window's units like the loss
            metrics.update({key: float(all_sum(value) / all_units) for key, value in sorted(window.extra.items())})
        else:
            loss = math.nan
        if self.progress.skipped:
            metrics["train/skipped_steps"] = float(self.progress.skipped)
        self.last = metrics
        self.callbacks.on_log(self.step, metrics)
        rate = (self.step - self.resumed_from) / max(now - self.run_started, 1e-9)
        self.say(f"[{self.label}] {_bar(self.step / cfg.max_steps)} step {self.step}/{cfg.max_steps} loss {loss:.4f} "
                 f"lr {lr:.2e} {metrics['train/tokens_per_sec']:,.0f} tok/s "
                 + (f"mfu {100 * metrics['train/mfu']:.1f}% " if "train/mfu" in metrics else "")
                 + f"eta {_fmt_eta((cfg.max_steps - self.step) / max(rate, 1e-9))}", flush=True)
        self.window = Window.empty(self.device)
        self.window.started = now

    @property
    def min_improvement(self) -> float:
        """How much an evaluation must beat the best so far by to replace it (0 for configs without the field)."""
        return float(getattr(self.cfg, "min_improvement", 0.0) or 0.0)

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics (every rank evaluates the same data; rank 0's numbers decide for all);
        a new best by `best_metric` (by more than the train block's `min_improvement`) is saved as `best/`
        beside the checkpoints."""
        evaluated = self.engine.eval_model
        evaluated.eval()
        with torch.no_grad(), self._autocast():
            metrics = self.evaluate_fn(evaluated) if self.evaluate_fn else {}
        evaluated.train()
        metrics = broadcast_object(metrics)
        value = metrics.get(self.best_metric) if metrics else None
        best = self.progress.best_value
        margin = self.min_improvement
        if value is not None and (best is None or (value > best + margin if self.maximize else value < best - margin)):
            self.progress.best_value, self.progress.best_step = value, self.step
            state = self.engine.model_state()
            if self.par.main:
                with atomic_dir(self.ckpt_dir / "best") as tmp:
                    torch.save({"model": state, "step": self.step, "eval_loss": value}, tmp / "state.pt")
            barrier()
            self.best_path = self.ckpt_dir / "best"
        if metrics:
            self.callbacks.on_eval(self.step, metrics)
            self.say(f"[{self.label}] step {self.step} " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def reached_target(self) -> bool:
        """Whether the kept best on `best_metric` — the model the stage hands on — has reached the train
        block's `stop_at` (never without one). The best, not this evaluation: with `min_improvement` an
        evaluation can reach the target without replacing a best that is under it."""
        target = getattr(self.cfg, "stop_at", None)
        best = self.progress.best_value
        if target is None or best is None:
            return False
        return best >= target if self.maximize else best <= target

    def checkpoint(self) -> None:
        """Every checkpointed part's state, written atomically by rank 0 (each part's state_dict is
        taken on every rank: under FSDP it is a collective, and RL rollouts gather their ranks' queues)."""
        blob = {key: part.state_dict() for key, part in self.checkpointed().items()}
        broken = [name for name, t in blob["model"].items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if broken:  # never make a NaN model the one a rerun resumes from
            raise NonFiniteTraining(
                f"[{self.label}] weights {', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''} hold NaN/inf at "
                f"step {self.step}; the checkpoint was not written and the previous one stays latest: lower train.lr "
                f"or keep train.grad_clip set, then run again")
        if self.par.main:
            path = save_checkpoint(self.ckpt_dir, self.step, blob)
            self.callbacks.on_checkpoint(self.step, path)
        barrier()

    def _due(self, every: int) -> bool:
        return self.step % every == 0 or self.step == self.cfg.max_steps

    def run(self) -> TrainResult:
        if getattr(self.cfg, "stop_at", None) is not None and self.evaluate_fn is None:
            raise UserError(f"[{self.label}] train.stop_at ({self.cfg.stop_at:g}) is checked on held-out data, and this "
                            f"stage has none: give it validation data (val_fraction above 0, or a validation split) "
                            f"or drop stop_at")
        self.resume()
        self.announce()
        cfg = self.cfg
        if self.evaluate_fn is not None and self.step == 0 and getattr(cfg, "eval_at_start", False):
            self.last.update(self.evaluate())  # step 0: the starting model's score, a candidate for the best
        self.engine.train_model.train()
        self.run_started = time.perf_counter()
        if self.step == 0:  # a resumed window keeps the seconds its steps took
            self.window.started = self.run_started
        with StopFlag() as stop:
            while self.step < cfg.max_steps and not self.progress.stopped:
                self.train_step()
                if self._due(cfg.log_every):
                    self.log()
                if self.evaluate_fn is not None and self._due(cfg.eval_every):
                    metrics = self.evaluate()
                    self.last.update(metrics)
                    if self.reached_target():  # rank 0's numbers, broadcast: every rank stops here
                        self.progress.stopped = True
                        self.say(f"[{self.label}] step {self.step}: the best {self.best_metric} "
                                 f"{self.progress.best_value:.4f} (step {self.progress.best_step}) reached stop_at "
                                 f"{cfg.stop_at:g}; the stage stops here (max_steps {cfg.max_steps})", flush=True)
                if self._due(cfg.save_every) or self.progress.stopped:
                    self.checkpoint()  # a stop is saved with its step, so a rerun resumes as finished
                if any_rank(stop.raised):  # a signal may reach one worker first: all stop at this step
                    if not self._due(cfg.save_every):
                        self.checkpoint()
                    raise TrainingInterrupted(self.step)
        if self.evaluate_fn is not None and self.step == self.resumed_from and self.best_path is None:
            self.last.update(self.evaluate())  # a resumed, already finished run still reports its numbers
        if self.progress.best_step == 0 and self.step > 0 and getattr(cfg, "save_best_only", False):
            margin = self.min_improvement
            self.say(f"[{self.label}] no evaluated step beat the starting model on {self.best_metric} "
                     f"({self.progress.best_value:.4f})" + (f" by more than min_improvement {margin:g}" if margin else "")
                     + ": the stage's model is the one it started from", flush=True)
        self.engine.finish()
        return TrainResult(self.step, self.resumed_from, self.progress.best_value, self.progress.best_step,
                           self.best_path, self.last, round(time.perf_counter() - self.run_started, 3))


def train(model: torch.nn.Module, objective: Objective, batches: BatchSource, cfg: Any, ckpt_dir: str | Path,
          evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None, callbacks: Callbacks | None = None,
          seed: int = 0, label: str = "train", best_metric: str = "eval/loss", maximize: bool = False) -> TrainResult:
    """Run (or resume) training; see `Trainer`."""
    return Trainer(model, objective, batches, cfg, ckpt_dir, evaluate, callbacks, seed, label, best_metric,
                   maximize).run()


def load_best(model: torch.nn.Module, result: TrainResult) -> None:
    """Put the best evaluation's weights into `model` (no-op when no evaluation ran)."""
    if result.best_path is not None:
        model.load_state_dict(torch.load(result.best_path / "state.pt", map_location="cpu", weights_only=True)["model"])
