"""What the training runners share: checkpoint folders tied to a config, callbacks that send the
loop's metrics to metrics.jsonl and MLflow, model loading, loss-curve plots, model artifacts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from llmlab.checkpoint import atomic_dir, atomic_write_json, atomic_write_text
from llmlab.device import pick_device
from llmlab.lora import apply_lora, is_adapter_parameter, resolve_targets, save_adapters, trainable_share
from llmlab.models import fit_embeddings, load_causal_lm, weights_dtype
from llmlab.parallel import barrier, current
from llmlab.runners.context import StageContext
from llmlab.spec import config_hash
from llmlab.tokenizer import ensure_chat_template, load_tokenizer
from llmlab.train.loop import load_best

MODEL_ARTIFACT_LIMIT = 200 * 2**20  # model folders larger than this are tracked by path + fingerprint


def log_model(ctx: StageContext, model_dir: Path) -> None:
    """Small models go to MLflow whole; large ones by path and fingerprint only."""
    size = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file())
    if size <= MODEL_ARTIFACT_LIMIT:
        ctx.run.log_artifact(model_dir, "model")
    ctx.run.set_tags({"llmlab.model_path": str(model_dir.resolve()), "llmlab.model_bytes": size})


def _checkpoint_identity(ctx: StageContext, config: dict) -> dict[str, Any]:
    """What a checkpoint must share with this run to be resumed: everything but the horizon."""
    stable = {k: v for k, v in config.items() if k != "train"}
    stable["train"] = {k: v for k, v in config["train"].items()
                       if k not in ("max_steps", "load_optimizer", "eval_every", "save_every", "log_every", "optimizer")}
    return {"config": config_hash(stable), "inputs": {k: v.fingerprint for k, v in ctx.inputs.items()}}


def prepare_checkpoints(ctx: StageContext) -> Path:
    """The stage's checkpoint folder, emptied when its checkpoints belong to a different config
    (by rank 0 alone in a distributed stage; the others wait for it)."""
    ckpt = ctx.checkpoint_dir
    if current().main:
        identity = _checkpoint_identity(ctx, ctx.resolved)
        id_file = ckpt / "identity.json"
        if ckpt.exists() and (not id_file.is_file() or json.loads(id_file.read_text()) != identity):
            print(f"[{ctx.name}] config or inputs changed since the last checkpoint: starting afresh")
            shutil.rmtree(ckpt)
            (ctx.out_dir / "metrics.jsonl").unlink(missing_ok=True)
        ckpt.mkdir(parents=True, exist_ok=True)
        atomic_write_json(id_file, identity)
    barrier()
    return ckpt


def report_data(ctx: StageContext, examples: Any, unit: str) -> None:
    """Say what the stage's data gave — per source: training and validation examples, malformed
    rows skipped (the first quoted), dropped and truncated examples — in the log and the MLflow run."""
    print(f"[{ctx.name}] {len(examples.train):,} training and {len(examples.val):,} validation {unit}")
    for report in examples.reports:
        print(f"[{ctx.name}]   {report.summary()}")
    stats = examples.stats
    ctx.run.set_tags({"llmlab.train_examples": len(examples.train), "llmlab.val_examples": len(examples.val),
                      "llmlab.malformed_rows": stats["malformed"], "llmlab.data_unit": unit,
                      **{f"llmlab.data.{i}": report.summary()[:500] for i, report in enumerate(examples.reports)}})
    ctx.log({"data/train_examples": float(len(examples.train)), "data/val_examples": float(len(examples.val)),
             "data/malformed_rows": float(stats["malformed"])}, 0)


def val_limit(stage: Any, limit: int | None) -> int | None:
    """How many validation examples a stage reads: none at all (not even a source's own validation
    split) when its val_fraction is 0."""
    return 0 if stage.val_fraction == 0 else limit


def no_validation(ctx: StageContext) -> None:
    print(f"[{ctx.name}] no validation examples (val_fraction {ctx.config.val_fraction:g}): no eval metrics are logged "
          f"and the last model is kept")
    ctx.run.set_tags({"llmlab.validation": "none"})


class StageCallbacks:
    def __init__(self, ctx: StageContext):
        self.ctx = ctx

    def on_start(self, info: dict[str, Any]) -> None:
        self.ctx.run.set_tags({f"llmlab.{k}": v for k, v in info.items()})
        # metrics logged after the checkpoint we resume from will be logged again: drop them
        metrics = self.ctx.out_dir / "metrics.jsonl"
        if metrics.exists():
            rows = [r for r in metrics.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= info["resumed_from"]]
            atomic_write_text(metrics, "".join(r + "\n" for r in rows))

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        self.ctx.log(metrics, step)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.ctx.log(metrics, step)

    def on_checkpoint(self, step: int, path: Path) -> None:
        if self.ctx.run is not None:
            self.ctx.run.flush()  # what is checkpointed is also in MLflow


def base_model_dir(ctx: StageContext) -> str:
    """The model a training stage starts from: its `from` stage's, or its `model` dir / hub name."""
    stage = ctx.config
    return ctx.inputs[stage.start].outputs["model"] if stage.start else stage.model


def load_start(ctx: StageContext, chat: bool = True) -> tuple[Any, Any, str, list[int]]:
    """(model, tokenizer, base, new token ids) a training stage starts from: the base model in the
    stage's `model_dtype`, its own tokenizer (or the stage's `tokenizer:`); for conversations
    (`chat`) a tokenizer without a chat template gets llmlab's ChatML one. Embeddings grow to the
    tokenizer when it has tokens the model lacks; those new rows must train (see `attach_lora`).
    `gradient_checkpointing` is switched on here."""
    stage = ctx.config
    base = base_model_dir(ctx)
    tok = load_tokenizer(stage.tokenizer or base)
    model = load_causal_lm(base, weights_dtype(stage.train.model_dtype, pick_device(), getattr(stage, "lora", None) is not None))
    added = ensure_chat_template(tok) if chat else []
    grown = fit_embeddings(model, tok)
    new_ids = list(range(len(tok) - grown, len(tok)))
    if added or grown:
        print(f"[{ctx.name}] {'added the chat tokens ' + ', '.join(tok.convert_ids_to_tokens(added)) + ' and ChatML template; ' if added else ''}"
              f"{grown} new embedding rows for the tokenizer's {len(tok):,} tokens (they train)")
        ctx.run.set_tags({"llmlab.added_tokens": ",".join(tok.convert_ids_to_tokens(added)), "llmlab.new_embedding_rows": grown})
    if stage.train.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model, tok, base, new_ids


def plot_loss_curve(metrics_file: Path, out: Path, title: str) -> Path | None:
    """train/loss and eval/loss against optimizer step, as a PNG."""
    if not metrics_file.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("train/loss", "eval/loss"):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=key, marker="o" if key.startswith("eval") else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def stage_metrics(ctx: StageContext, result: Any, final: dict[str, float]) -> dict[str, float]:
    """A training stage's closing metrics (its final evaluation, steps, best step), with its loss
    curve plotted and logged."""
    plot = plot_loss_curve(ctx.out_dir / "metrics.jsonl", ctx.out_dir / "loss_curve.png", ctx.name)
    if plot:
        ctx.run.log_artifact(plot, "plots")
    metrics = {**final, "train/steps": float(result.step), "train/seconds": float(result.seconds)}
    if result.best_step is not None:
        metrics["best_step"] = float(result.best_step)
    return metrics


def save_trained(ctx: StageContext, model: Any, tokenizer: Any, base: str, result: Any, lora: bool,
                 best_only: bool) -> dict[str, str]:
    """Write a fine-tuning stage's outputs and leave `model` holding the weights it exported.

    LoRA: peft adapters `adapters/final` and `adapters/best` (the stage's output is best when
    `best_only`, else final). Full training: `model/` with the tokenizer (best or last weights)."""
    model.to("cpu")
    if lora:
        adapters = ctx.out_dir / "adapters"
        final_dir = save_adapters(model, adapters / "final", base_model=base, tokenizer=tokenizer)
        final_state = {n: p.detach().clone() for n, p in model.named_parameters() if is_adapter_parameter(n)}
        load_best(model, result)
        best_dir = save_adapters(model, adapters / "best", base_model=base, tokenizer=tokenizer)
        if not best_only:
            model.load_state_dict(final_state, strict=False)
        ctx.run.log_artifact(adapters, "adapters")
        return {"adapters": str(best_dir if best_only else final_dir), "output": str(adapters)}
    if best_only:
        load_best(model, result)
    model_dir = ctx.out_dir / "model"
    with atomic_dir(model_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    log_model(ctx, model_dir)
    return {"model": str(model_dir), "output": str(model_dir)}


def attach_lora(ctx: StageContext, model: Any, tokenizer: Any, lora: Any, new_ids: list[int] = ()) -> Any:
    """Wrap `model` with the stage's LoRA adapters on the modules playing the preset's roles
    (`llmlab.lora.resolve_targets`); the embedding rows of the tokenizer's special tokens train too
    (`train_special_tokens`), every row with `train_embeddings`, and always those of tokens just added
    (`new_ids`). Report what trains."""
    targets = resolve_targets(model, lora.preset, lora.target_modules)
    rows = sorted(set(tokenizer.all_special_ids if lora.train_special_tokens else []) | set(new_ids))
    if lora.train_embeddings:
        rows = list(range(model.get_input_embeddings().weight.shape[0]))
    model = apply_lora(model, lora.r, lora.alpha, lora.dropout, targets, rows or None)
    trainable, total = trainable_share(model)
    print(f"[{ctx.name}] LoRA {lora.preset} on {', '.join(targets)}: {trainable:,} of {total:,} parameters "
          f"train ({100 * trainable / total:.2f}%)")
    ctx.run.set_tags({"llmlab.lora_targets": ",".join(targets), "llmlab.lora_trainable_share": f"{trainable / total:.6f}"})
    ctx.log({"lora/trainable_params": float(trainable), "lora/trainable_share": trainable / total}, 0)
    return model
