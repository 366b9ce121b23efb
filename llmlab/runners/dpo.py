"""The dpo stage: Direct Preference Optimization on preference pairs.

The reference model, by default the stage's starting model, costs no second copy when it need not:
- with `lora:`, the reference is the same network with its adapters disabled;
- with `precompute_reference: true`, reference log-probs are scored once before training and the
  reference model is dropped;
- otherwise a frozen copy; or `reference_stage` / `reference_model` names another model.
Outputs: `model/` (full training) or `adapters/{final,best}` (LoRA), like the sft stage.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from llmlab.data.preference import PreferenceBatches, eval_batches, prepare_preference_data
from llmlab.data.sources import DataSource
from llmlab.device import autocast_dtype, pick_device
from llmlab.models import load_causal_lm, model_context
from llmlab.runners.common import (
    StageCallbacks,
    attach_lora,
    load_start,
    no_validation,
    prepare_checkpoints,
    report_data,
    save_trained,
    stage_metrics,
    val_limit,
)
from llmlab.runners.context import StageContext
from llmlab.train.dpo import DPOObjective, attach_reference_logps, model_reference
from llmlab.train.loop import train


def dpo_evaluate(model: torch.nn.Module, objective: Any, batches: list[dict]) -> dict[str, float]:
    """Held-out DPO loss, preference accuracy, margin and rewards (means over pairs)."""
    device = next(model.parameters()).device
    totals: dict[str, float] = {}
    pairs = 0
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, extra = objective(model, batch)
            n = objective.count(batch)
            pairs += n
            for key, value in {"eval/loss": loss, **{f"eval/{k.split('/')[-1] if k.startswith('dpo/') else k}": v
                                                     for k, v in extra.items()}}.items():
                totals[key] = totals.get(key, 0.0) + float(value)
    return {k: v / max(pairs, 1) for k, v in totals.items()}


def run_dpo(ctx: StageContext) -> tuple[dict[str, str], dict[str, float]]:
    stage, spec = ctx.config, ctx.spec
    model, tok, base, new_ids = load_start(ctx)
    seq_len = min(stage.max_seq_len or model_context(model), model_context(model))
    mini = stage.train.batch_pairs
    sources = list(stage.data)
    upstream = ctx.inputs.get(stage.start) if stage.start else None
    if upstream is not None and upstream.kind == "preferences":  # on-policy pairs of the model it starts from
        sources.append(DataSource(path=str(Path(upstream.outputs["pairs"]) / "pairs.jsonl"), format="plain"))
    data = prepare_preference_data(sources, tok, seq_len, spec.seed, stage.val_fraction, stage.max_examples,
                                   max_val_examples=val_limit(stage, mini * stage.train.eval_steps))
    report_data(ctx, data, "pairs")
    device = pick_device()
    ref_dir = ctx.inputs[stage.reference_stage].outputs["model"] if stage.reference_stage else stage.reference_model
    compute = autocast_dtype(stage.train.precision, device) or torch.float32  # the reference scores in it
    ref_model = load_causal_lm(ref_dir, compute).to(device).eval() if ref_dir else None
    if stage.lora is not None:
        model = attach_lora(ctx, model, tok, stage.lora, new_ids)
    model.to(device)
    if ref_model is not None:
        reference = model_reference(ref_model, chunked=str(stage.train.chunked_loss), chunk_tokens=stage.train.loss_chunk_tokens)
        kind = f"model {ref_dir}"
    elif stage.lora is not None:
        reference = model_reference(model, disable_adapters=True, chunked=str(stage.train.chunked_loss),
                                    chunk_tokens=stage.train.loss_chunk_tokens)  # no second copy
        kind = "the same model with adapters disabled"
    else:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        reference = model_reference(ref_model, chunked=str(stage.train.chunked_loss), chunk_tokens=stage.train.loss_chunk_tokens)
        kind = "a frozen copy of the starting model"
    if stage.precompute_reference:
        attach_reference_logps(reference, data.train, mini, tok.pad_token_id, device)
        attach_reference_logps(reference, data.val, mini, tok.pad_token_id, device)
        reference, ref_model = None, None  # scored once: the reference leaves memory
        kind += ", precomputed"
    print(f"[{ctx.name}] reference: {kind}")
    ctx.run.set_tags({"llmlab.reference": kind})
    objective = DPOObjective(stage.beta, stage.label_smoothing, stage.sft_weight, reference,
                             chunked=str(stage.train.chunked_loss), chunk_tokens=stage.train.loss_chunk_tokens)
    batches = PreferenceBatches(data.train, mini, spec.seed, tok.pad_token_id)
    val = eval_batches(data.val, mini, tok.pad_token_id)
    if not val:
        no_validation(ctx)
    ckpt = prepare_checkpoints(ctx)
    result = train(model, objective, batches, stage.train, ckpt,
                   evaluate=(lambda m: dpo_evaluate(m, objective, val)) if val else None,
                   callbacks=StageCallbacks(ctx), seed=spec.seed, label=ctx.name)
    outputs = {"checkpoints": str(ckpt), **save_trained(ctx, model, tok, base, result, stage.lora is not None,
                                                        stage.train.save_best_only)}
    final = dpo_evaluate(model.to(device), objective, val) if val else {}
    return outputs, stage_metrics(ctx, result, final)
