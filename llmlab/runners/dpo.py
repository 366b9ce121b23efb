"""The dpo stage: Direct Preference Optimization on preference pairs.

The reference model, by default the stage's starting model, costs no second copy when it need not:
- with `lora:`, the reference is the same network with its adapters disabled;
- with `precompute_reference: true`, reference log-probs are scored once before training and the
  reference model is dropped;
- otherwise a frozen copy; or `reference_stage` / `reference_model` names another model.
A dpo stage that starts `from` a preferences stage also trains on the pairs that stage wrote.
Outputs: `model/` (full training) or `adapters/{final,best}` (LoRA), like the sft stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmlab.data.formats import PREFERENCE
from llmlab.estimate import lm_forward, named_model, reference_bytes, stage_model, training_work
from llmlab.runners.kind import NamedModel, StageKind, describe_pairs
from llmlab.spec.stages import DpoStage

if TYPE_CHECKING:
    from llmlab.estimate import Forward, ModelSource, StageEstimate, Work
    from llmlab.runners.context import StageContext
    from llmlab.spec import Pipeline

# Logit-sized fp32 tensors alive at the peak with a live reference, counted with tests/helpers.py's
# PeakMemory: the policy's logits and log-softmax, then the reference's forward (logits, the shifted
# copy, log-softmax) while they live. Precomputed, as a causal-LM step (memory.LM_LOSS_LOGIT_COPIES).
LIVE_REFERENCE_LOGIT_COPIES = 5


def run_dpo(ctx: StageContext) -> tuple[dict[str, str], dict[str, float]]:
    import copy
    from pathlib import Path

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
    from llmlab.train.dpo import DPOObjective, attach_reference_logps, dpo_evaluate, model_reference
    from llmlab.train.loop import train

    stage, spec = ctx.config, ctx.spec
    model, tok, base, new_ids = load_start(ctx)
    seq_len = min(stage.max_seq_len or model_context(model), model_context(model))
    mini = stage.train.batch_pairs
    sources = list(stage.data)
    upstream = ctx.inputs.get(stage.start) if stage.start else None
    if upstream is not None and "pairs" in upstream.outputs:  # on-policy pairs of the model it starts from
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
    chunking = {"chunked": str(stage.train.chunked_loss), "chunk_tokens": stage.train.loss_chunk_tokens}
    if ref_model is not None:
        reference = model_reference(ref_model, **chunking)
        kind = f"model {ref_dir}"
    elif stage.lora is not None:
        reference = model_reference(model, disable_adapters=True, **chunking)  # no second copy
        kind = "the same model with adapters disabled"
    else:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        reference = model_reference(ref_model, **chunking)
        kind = "a frozen copy of the starting model"
    if stage.precompute_reference:
        attach_reference_logps(reference, data.train, mini, tok.pad_token_id, device)
        attach_reference_logps(reference, data.val, mini, tok.pad_token_id, device)
        reference, ref_model = None, None  # scored once: the reference leaves memory
        kind += ", precomputed"
    print(f"[{ctx.name}] reference: {kind}")
    ctx.run.set_tags({"llmlab.reference": kind})
    objective = DPOObjective(stage.beta, stage.label_smoothing, stage.sft_weight, reference, **chunking)
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


def _forward(spec: Pipeline, block: Any, source: ModelSource) -> Forward:
    """Both sequences of each pair; the reference (unless precomputed) and the logits it keeps alive."""
    live = not block.precompute_reference
    fwd = lm_forward(block, source.shape, 2 * block.train.batch_pairs, copies=LIVE_REFERENCE_LOGIT_COPIES if live else 0)
    if live:
        other = (stage_model(spec, block.reference_stage) if block.reference_stage else
                 named_model(block.reference_model) if block.reference_model else None)
        notes: list[str] = []
        fwd.parts["reference model"] = reference_bytes(spec, block, source, notes, other)
        fwd.notes[:0] = notes  # what the reference is, before the batch
    else:
        fwd.notes.insert(0, "reference: scored once before training, then dropped")
    return fwd


def _work(block: Any, est: StageEstimate) -> Work:
    """A live reference scores every sequence too: 2 more FLOPs per parameter and token."""
    live_reference = 0 if block.precompute_reference else 2 * (est.params or 0)
    return training_work(block, est, 6 * (est.params or 0) + live_reference)


def _models(block: Any) -> list[NamedModel]:
    return [NamedModel(block.reference_model, "reference model", "causal")] if block.reference_model else []


KIND = StageKind(
    name="dpo", config=DpoStage, run=run_dpo, main_output="output",
    summary="direct preference optimization on preference pairs", data=(("data", PREFERENCE),), policy=True,
    models=_models, forward=_forward, work=_work, describe=describe_pairs)
