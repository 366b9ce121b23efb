"""The one training loop. Methods differ by objective and batch source, never by a copied loop.

    result = train(model, objective, batches, spec.train, ckpt_dir, evaluate=fn, callbacks=cb, seed=1)

- One step is one optimizer update: `gradient_accumulation_steps` micro-batches, each's summed loss
  divided by the token count of the whole step, so batch 1 x accumulation 8 equals batch 8 x 1.
- It knows no tracker and no orchestrator: metrics leave through `Callbacks`, which `stages.py`
  connects to files and MLflow.
- Resumable: model, optimizer, schedule, step, RNG and data position are checkpointed atomically every
  `save_every` steps; a run started on a folder that holds a checkpoint continues it, reproducing the
  uninterrupted run's losses. SIGINT/SIGTERM save a checkpoint at the next step boundary and stop.
- An optimizer with `hessian_due()` (Sophia) gets, when due, an extra forward/backward of
  `optimizer.hessian_loss(model, batch)` on the step's first micro-batch, then `update_hessian(n)`.
"""

from __future__ import annotations

import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from llmlab.checkpoint import atomic_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from llmlab.optim import Schedule, build_optimizer


class Objective(Protocol):
    """A training objective: a pure function of (model, batch) plus the step's normaliser."""

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | int:
        """Normaliser units (e.g. target tokens) in a micro-batch, known before the forward."""

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(summed loss over the micro-batch, summed extra metrics) — summed, not averaged."""


class BatchSource(Protocol):
    def next_batch(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Callbacks:
    """Hooks the loop calls; the default does nothing. Subclass in the stage that runs the loop."""

    def on_start(self, info: dict[str, Any]) -> None: ...
    def on_log(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved at `step` and the stage can be resumed."""

    def __init__(self, step: int):
        super().__init__(f"training interrupted at step {step}; checkpoint saved, rerun to resume")
        self.step = step


@dataclass
class TrainResult:
    step: int  # optimizer steps done
    resumed_from: int  # the step a checkpoint resumed from (0 = fresh start)
    best_eval_loss: float | None  # the best value of `best_metric`
    best_step: int | None
    best_path: Path | None  # model weights of the best evaluation (None: no evaluation ran)
    last_metrics: dict[str, float] = field(default_factory=dict)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 autocast pays on GPUs that support it. On CPUs it does not: without AMX/AVX512-BF16 a
    training step is 30-40x slower than fp32 (shared notes), and with AMX a 1M-parameter model
    measured 20-22k tok/s in bf16 against 23-24k in fp32 (docs/benchmarks.md). So `auto` keeps CPUs
    in fp32; `precision: bf16` still forces it."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a `precision` setting: None means plain fp32."""
    if precision == "bf16" or (precision == "auto" and bf16_is_fast(device)):
        return torch.bfloat16
    return None


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks at step boundaries (main thread only)."""

    def __init__(self) -> None:
        self.raised = False
        self._first: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
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


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _bar(done: float, width: int = 20) -> str:
    """A text progress bar, e.g. [#######-------------] 35%; one per log line, so it reads the same
    in a terminal, in Prefect's logs and in CI output."""
    filled = int(round(done * width))
    return f"[{'#' * filled}{'-' * (width - filled)}] {100 * done:3.0f}%"


def _fmt_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def train(
    model: torch.nn.Module,
    objective: Objective,
    batches: BatchSource,
    cfg: Any,
    ckpt_dir: str | Path,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    callbacks: Callbacks | None = None,
    seed: int = 0,
    label: str = "train",
    best_metric: str = "eval/loss",
    maximize: bool = False,
) -> TrainResult:
    """Run (or resume) training as configured by `cfg` (a spec TrainSpec). See module docstring.
    The best model is the evaluation with the lowest `best_metric` (highest with `maximize`, e.g.
    an RL stage's held-out reward)."""
    from llmlab.distributed import Engine, ShardedBatches, all_sum, any_rank, barrier, broadcast_object, current

    cb = callbacks or Callbacks()
    ckpt_dir = Path(ckpt_dir)
    device = next(model.parameters()).device
    amp = autocast_dtype(cfg.precision, device)
    par = current()
    engine = Engine(model, par)  # single process, DDP or FSDP2 (see llmlab.distributed)
    if par.active and not getattr(batches, "per_rank", False):
        batches = ShardedBatches(batches, par.rank, par.world)
    optimizer = build_optimizer(engine.owner, cfg.optimizer, cfg.lr, cfg.weight_decay)
    schedule = Schedule(cfg.scheduler, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio, cfg.power)
    step, best_loss, best_step = 0, None, None
    torch.manual_seed(seed)
    random.seed(seed)

    resume = latest_checkpoint(ckpt_dir)
    if resume is not None:
        state = load_checkpoint(resume)
        engine.load_model_state(state["model"])
        if cfg.load_optimizer:
            engine.load_optimizer_state(optimizer, state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        schedule.extend(cfg.max_steps, state["step"])
        batches.load_state_dict(state["data"])
        _set_rng_state(state["rng"])
        step, best_loss, best_step = state["step"], state["best_eval_loss"], state["best_step"]
    resumed_from = step
    best_path = ckpt_dir / "best" if (ckpt_dir / "best" / "state.pt").is_file() else None

    trainable = sum(p.numel() for p in engine.owner.parameters() if p.requires_grad)
    total = sum(p.numel() for p in engine.owner.parameters())
    info = {"resumed_from": resumed_from, "trainable_params": trainable, "total_params": total,
            "device": str(device), "precision": str(amp or torch.float32)}
    if par.active:
        local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in engine.owner.parameters())
        info.update(world_size=par.world, strategy=par.strategy, parameters_on_this_rank=local)
    cb.on_start(info)
    say = print if par.main else (lambda *a, **k: None)
    where = f"{par.world} processes ({par.strategy}) on {device}" if par.active else str(device)
    say(f"[{label}] {trainable:,} trainable of {total:,} parameters on {where} ({amp or torch.float32});"
        f" {'resuming from step ' + str(step) if step else 'starting'} -> {cfg.max_steps} steps")
    if par.active:
        say(f"[{label}] global batch per step = batch_size {cfg.batch_size} x accumulation "
            f"{cfg.gradient_accumulation_steps} x world size {par.world} = "
            f"{cfg.batch_size * cfg.gradient_accumulation_steps * par.world}")

    def checkpoint() -> None:
        model_state, optim_state = engine.model_state(), engine.optimizer_state(optimizer)  # collective under FSDP
        data_state = batches.state_dict()  # on every rank: a per-rank source (RL rollouts) gathers its ranks' queues
        if par.main:
            path = save_checkpoint(ckpt_dir, step, {
                "model": model_state, "optimizer": optim_state, "schedule": schedule, "data": data_state,
                "rng": _rng_state(), "step": step, "best_eval_loss": best_loss, "best_step": best_step,
            })
            cb.on_checkpoint(step, path)
        barrier()

    def run_eval() -> dict[str, float]:
        nonlocal best_loss, best_step, best_path
        evaluated = engine.eval_model
        evaluated.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            metrics = evaluate(evaluated) if evaluate else {}  # every rank, the same data
        evaluated.train()
        metrics = broadcast_object(metrics)  # rank 0's numbers everywhere: one best-model decision for all
        loss = metrics.get(best_metric) if metrics else None
        if loss is not None and (best_loss is None or (loss > best_loss if maximize else loss < best_loss)):
            best_loss, best_step = loss, step
            state = engine.model_state()
            if par.main:
                with atomic_dir(ckpt_dir / "best") as tmp:
                    torch.save({"model": state, "step": step, "eval_loss": loss}, tmp / "state.pt")
            barrier()
            best_path = ckpt_dir / "best"
        if metrics:
            cb.on_eval(step, metrics)
            say(f"[{label}] step {step} " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    engine.train_model.train()
    window_loss = torch.zeros((), device=device)
    window_units = torch.zeros((), device=device)
    window_extra: dict[str, torch.Tensor] = {}  # objective metrics (e.g. dpo/accuracy), summed like the loss
    window_tokens, window_start, run_start = 0, time.perf_counter(), time.perf_counter()
    last: dict[str, float] = {}
    grad_norm = torch.zeros(())
    with _StopFlag() as stop:
        while step < cfg.max_steps:
            lr_factor = schedule.factor(step)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr_factor
            micro = [batches.next_batch() for _ in range(cfg.gradient_accumulation_steps)]
            micro = [{k: v.to(device) for k, v in b.items()} for b in micro]
            if hasattr(optimizer, "hessian_due") and optimizer.hessian_due():
                # curvature-aware optimizers (Sophia) estimate the Hessian on this step's first
                # micro-batch at the current weights, before the step's gradients accumulate
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    h_loss, h_count = optimizer.hessian_loss(engine.train_model, micro[0])
                h_loss.backward()
                optimizer.update_hessian(h_count)
                optimizer.zero_grad(set_to_none=True)
            local_units = sum(torch.as_tensor(objective.count(b), device=device, dtype=torch.float32) for b in micro)
            # the step's normaliser counts every rank's units; DDP/FSDP average gradients over
            # ranks, so each rank's loss is scaled by the world size to make the sum exact
            units = all_sum(torch.as_tensor(local_units, device=device)).clamp(min=1)
            scale = float(par.world)
            step_loss = torch.zeros((), device=device)
            for i, b in enumerate(micro):
                with engine.no_sync(last=i == len(micro) - 1), \
                        torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    loss_sum, extra = objective(engine.train_model, b)
                    (loss_sum / units * scale).backward()
                step_loss += loss_sum.detach()
                for key, value in extra.items():
                    window_extra[key] = window_extra.get(key, 0.0) + torch.as_tensor(value, device=device).detach().float()
                window_tokens += int(b["input_ids"].numel())
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in engine.owner.parameters() if p.grad is not None],
                cfg.grad_clip if cfg.grad_clip is not None else float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_loss += step_loss
            window_units += local_units

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                now = time.perf_counter()
                all_units = all_sum(window_units)  # over every rank's micro-batches
                loss_val = (all_sum(window_loss) / all_units).item()
                tokens = float(all_sum(torch.tensor(float(window_tokens), device=device)))
                last = {"train/loss": loss_val, "train/lr": cfg.lr * lr_factor, "train/grad_norm": float(grad_norm),
                        "train/tokens_per_sec": tokens / max(now - window_start, 1e-9)}
                # per-method metrics, averaged over the window's units like the loss
                last.update({key: float(all_sum(value) / all_units) for key, value in sorted(window_extra.items())})
                window_extra.clear()
                if not math.isfinite(loss_val):
                    raise FloatingPointError(f"[{label}] loss is {loss_val} at step {step}: lower lr or check data")
                cb.on_log(step, last)
                rate = (step - resumed_from) / max(now - run_start, 1e-9)
                say(f"[{label}] {_bar(step / cfg.max_steps)} step {step}/{cfg.max_steps} loss {loss_val:.4f} lr {last['train/lr']:.2e} "
                      f"{last['train/tokens_per_sec']:,.0f} tok/s eta {_fmt_eta((cfg.max_steps - step) / max(rate, 1e-9))}", flush=True)
                window_loss.zero_()
                window_units.zero_()
                window_tokens, window_start = 0, now
            if evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                last.update(run_eval())
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                checkpoint()
            if any_rank(stop.raised):  # a signal may reach one worker first: all stop at this step
                if step % cfg.save_every != 0 and step != cfg.max_steps:
                    checkpoint()
                raise TrainingInterrupted(step)
    if evaluate is not None and step == resumed_from and best_path is None:
        last.update(run_eval())  # a resumed, already finished run still reports its numbers
    engine.finish()
    return TrainResult(step, resumed_from, best_loss, best_step, best_path, last)


def load_best(model: torch.nn.Module, result: TrainResult) -> None:
    """Put the best evaluation's weights into `model` (no-op when no evaluation ran)."""
    if result.best_path is not None:
        model.load_state_dict(torch.load(result.best_path / "state.pt", map_location="cpu", weights_only=True)["model"])
