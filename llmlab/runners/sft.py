"""The sft stage: supervised fine-tuning on conversations, full or with LoRA adapters.

Starts from an upstream stage's model (`from`) or any transformers causal LM (`model:` dir or hub
name), with its own tokenizer and chat template (llmlab's ChatML added when it has none). The loss
counts assistant tokens and their end-of-turn token only. Outputs: `model/` (full fine-tuning) or
`adapters/final` and `adapters/best` in peft's format (LoRA; the merge stage folds them into a plain
model). Validation loss is on held-out conversations, never training ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmlab.data.formats import SFT
from llmlab.estimate import lm_forward, training_work
from llmlab.runners.kind import StageKind, describe_sequences
from llmlab.spec.stages import SftStage

if TYPE_CHECKING:
    from llmlab.estimate import Forward, ModelSource
    from llmlab.runners.context import StageContext
    from llmlab.spec import Pipeline


def run_sft(ctx: StageContext) -> tuple[dict[str, str], dict[str, float]]:
    from llmlab.data.sft import SFTBatches, eval_batches, prepare_sft_data
    from llmlab.device import pick_device
    from llmlab.evaluate import perplexity
    from llmlab.models import model_context
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
    from llmlab.train.loop import train
    from llmlab.train.objectives import LanguageModeling

    stage, spec = ctx.config, ctx.spec
    model, tok, base, new_ids = load_start(ctx)
    seq_len = min(stage.max_seq_len or model_context(model), model_context(model))
    data = prepare_sft_data(stage.data, tok, seq_len, spec.seed,
                            stage.val_fraction, stage.max_examples,
                            max_val_examples=val_limit(stage, stage.train.batch_sequences * stage.train.eval_steps))
    report_data(ctx, data, "conversations")
    if stage.lora is not None:
        model = attach_lora(ctx, model, tok, stage.lora, new_ids)
    pad = tok.pad_token_id
    batches = SFTBatches(data.train, stage.train.batch_sequences, spec.seed, stage.packing, seq_len, pad)
    val = eval_batches(data.val, stage.train.batch_sequences, pad)
    if not val:
        no_validation(ctx)
    model.to(pick_device())
    ckpt = prepare_checkpoints(ctx)
    result = train(model, LanguageModeling.from_train(stage.train), batches, stage.train, ckpt,
                   evaluate=(lambda m: perplexity(m, val)) if val else None,
                   callbacks=StageCallbacks(ctx), seed=spec.seed, label=ctx.name)
    outputs = {"checkpoints": str(ckpt), **save_trained(ctx, model, tok, base, result, stage.lora is not None,
                                                        stage.train.save_best_only)}
    final = perplexity(model.to(pick_device()), val) if val else {}
    return outputs, stage_metrics(ctx, result, final)


def _forward(spec: Pipeline, block: Any, source: ModelSource) -> Forward:
    """Conversations padded to the batch's longest (at most max_seq_len); the causal-LM loss's logits."""
    return lm_forward(block, source.shape, block.train.batch_sequences)


KIND = StageKind(
    name="sft", config=SftStage, run=run_sft, main_output="output",
    summary="supervised fine-tuning on conversations", data=(("data", SFT),), policy=True,
    forward=_forward, work=training_work, describe=describe_sequences)
