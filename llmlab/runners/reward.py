"""The reward stage: a reward model trained on preference pairs (Bradley–Terry), for ppo/grpo.

The starting model's backbone gets a fresh scalar head (`LlmlabForSequenceClassification`, or any
transformers model's sequence-classification class); the whole network trains. Reports held-out
pair accuracy. Output: `model/`, a sequence-classification model with one label and the tokenizer,
which a later stage names with `reward_stage:` (or any tool loads with
`AutoModelForSequenceClassification`).
"""

from __future__ import annotations

import torch

from llmlab.checkpoint import atomic_dir
from llmlab.data.preference import PreferenceBatches, eval_batches, prepare_preference_data
from llmlab.device import pick_device
from llmlab.models import fit_embeddings, load_sequence_classifier, model_context, weights_dtype
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
from llmlab.runners.context import StageContext
from llmlab.tokenizer import ensure_chat_template, load_tokenizer
from llmlab.train.loop import load_best, train
from llmlab.train.reward import RewardObjective, reward_evaluate


def load_reward_backbone(path: str, tokenizer, dtype=torch.float32):
    """A one-output sequence-classification model from a causal LM folder (head initialised fresh)
    or from a reward model folder, its embeddings fitted to the tokenizer."""
    model = load_sequence_classifier(path, dtype, num_labels=1)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    fit_embeddings(model, tokenizer)
    return model


def run_reward(ctx: StageContext) -> tuple[dict[str, str], dict[str, float]]:
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
    result = train(model, RewardObjective(), batches, stage.train, ckpt, evaluate=(lambda m: reward_evaluate(m, val)) if val else None,
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
