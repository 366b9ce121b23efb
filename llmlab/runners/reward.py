"""The reward stage: a reward model trained on preference pairs (Bradley–Terry), for ppo/grpo.

The starting model's backbone gets a fresh scalar head (`LlmlabForSequenceClassification`, or any
transformers model's sequence-classification class); the whole network trains. Reports held-out
pair accuracy. Output: `model/`, a sequence-classification model with one label and the tokenizer,
which a later stage names with `reward_stage:` (or any tool loads with
`AutoModelForSequenceClassification`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmlab.data.formats import PREFERENCE
from llmlab.estimate import sequence_batch, training_work
from llmlab.runners.kind import StageKind, describe_pairs
from llmlab.spec.stages import RewardStage

if TYPE_CHECKING:
    from llmlab.estimate import Forward, ModelSource
    from llmlab.runners.context import StageContext
    from llmlab.spec import Pipeline


def run_reward(ctx: StageContext) -> tuple[dict[str, str], dict[str, float]]:
    from llmlab.checkpoint import atomic_dir
    from llmlab.data.preference import PreferenceBatches, eval_batches, prepare_preference_data
    from llmlab.device import pick_device
    from llmlab.models import load_reward_backbone, model_context, weights_dtype
    from llmlab.runners.common import (
        StageCallbacks,
        base_model_dir,
        log_model,
        no_validation,
        prepare_checkpoints,
        report_data,
        stage_metrics,
        val_limit,
    )
    from llmlab.tokenizer import ensure_chat_template, load_tokenizer
    from llmlab.train.loop import load_best, train
    from llmlab.train.reward import RewardObjective, reward_evaluate

    stage, spec = ctx.config, ctx.spec
    base = base_model_dir(ctx)
    tok = load_tokenizer(stage.tokenizer or base)
    ensure_chat_template(tok)
    model = load_reward_backbone(base, tok, weights_dtype(stage.train.model_dtype, pick_device(), lora=False))
    if stage.train.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    mini = stage.train.batch_pairs
    seq_len = min(stage.max_seq_len or model_context(model), model_context(model))
    data = prepare_preference_data(stage.data, tok, seq_len, spec.seed, stage.val_fraction,
                                   stage.max_examples, max_val_examples=val_limit(stage, mini * stage.train.eval_steps))
    report_data(ctx, data, "pairs")
    model.to(pick_device())
    val = eval_batches(data.val, mini, tok.pad_token_id)
    if not val:
        no_validation(ctx)
    batches = PreferenceBatches(data.train, mini, spec.seed, tok.pad_token_id)
    ckpt = prepare_checkpoints(ctx)
    result = train(model, RewardObjective(), batches, stage.train, ckpt,
                   evaluate=(lambda m: reward_evaluate(m, val)) if val else None,
                   callbacks=StageCallbacks(ctx), seed=spec.seed, label=ctx.name, best_metric="eval/loss")
    if stage.train.save_best_only:
        load_best(model, result)
    model.eval()
    final = reward_evaluate(model, val) if val else {}
    model_dir = ctx.out_dir / "model"
    model.to("cpu")
    with atomic_dir(model_dir) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    log_model(ctx, model_dir)
    if final:
        print(f"[{ctx.name}] held-out pair accuracy {final['eval/accuracy']:.3f}, margin {final['eval/margin']:.3f}")
    return {"model": str(model_dir), "checkpoints": str(ckpt)}, stage_metrics(ctx, result, final)


def _forward(spec: Pipeline, block: Any, source: ModelSource) -> Forward:
    """Both sequences of each pair; a scalar head scores the last token, so no vocabulary-wide logits."""
    fwd = sequence_batch(block, source.shape, 2 * block.train.batch_pairs)
    fwd.scalar_head = True
    return fwd


KIND = StageKind(
    name="reward", config=RewardStage, run=run_reward, main_output="model",
    summary="train a reward model on preference pairs", data=(("data", PREFERENCE),),
    forward=_forward, work=training_work, describe=describe_pairs)
