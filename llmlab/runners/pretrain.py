"""The pretrain stage: a causal LM on packed text, from scratch or continued from `from`.

From scratch it builds llmlab's decoder from the spec's `model:` block with the tokenizer stage's
vocabulary; continued, it loads the upstream model and its tokenizer. Outputs: `model/` (the best
validation weights unless `save_best_only: false`) and `checkpoints/`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmlab.data.formats import TEXT
from llmlab.estimate import lm_forward, training_work
from llmlab.runners.kind import StageKind, block_config, describe_sequences
from llmlab.spec.stages import PretrainStage

if TYPE_CHECKING:
    from llmlab.estimate import Forward, ModelSource
    from llmlab.runners.context import StageContext
    from llmlab.spec import Pipeline


def run_pretrain(ctx: StageContext) -> tuple[dict[str, str], dict[str, float]]:
    from llmlab.checkpoint import atomic_dir
    from llmlab.data.pretrain import BlockSampler, LMBatches, eval_batches, prepare_pretrain_data
    from llmlab.device import pick_device
    from llmlab.evaluate import perplexity
    from llmlab.model import LlmlabConfig, LlmlabForCausalLM, build_model, count_parameters
    from llmlab.models import load_causal_lm
    from llmlab.runners.common import StageCallbacks, log_model, no_validation, prepare_checkpoints, stage_metrics
    from llmlab.tokenizer import load_tokenizer
    from llmlab.train.loop import load_best, train
    from llmlab.train.objectives import LanguageModeling

    stage, spec = ctx.config, ctx.spec
    if stage.inputs:  # continued pretraining: the upstream model and its tokenizer
        tok_dir = ctx.inputs[stage.inputs[0]].outputs["model"]
        model = load_causal_lm(tok_dir)
    else:
        tok_dir = ctx.tokenizer_dir()
        tok = load_tokenizer(tok_dir)
        config = LlmlabConfig(**spec.model.model_dump(), vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model = build_model(config, seed=spec.seed)
    tok = load_tokenizer(tok_dir)
    seq_len = model.config.max_seq_len
    data = prepare_pretrain_data(stage.data, tok_dir, seq_len, spec.seed, stage.val_fraction, stage.max_tokens)
    print(f"[{ctx.name}] data: {data.meta['train_tokens']:,} training tokens, {data.meta['val_tokens']:,} validation tokens"
          f"{' (cached)' if data.from_cache else ''}")
    ctx.run.set_tags({"llmlab.train_tokens": data.meta["train_tokens"], "llmlab.val_tokens": data.meta["val_tokens"],
                      "llmlab.params": count_parameters(model)})
    sampler = BlockSampler(data.train_path, seq_len, stage.train.batch_sequences, spec.seed)
    val = eval_batches(data.val_path, seq_len, stage.train.batch_sequences, stage.train.eval_steps) if stage.val_fraction else []
    if not val:
        no_validation(ctx)
    eos_id = None
    if stage.document_masks:
        if isinstance(model, LlmlabForCausalLM) and tok.eos_token_id is not None:
            eos_id = tok.eos_token_id
        else:
            print(f"[{ctx.name}] document_masks: off — {type(model).__name__} takes no segment ids (llmlab's own "
                  f"model does); blocks attend across documents")
    model.to(pick_device())
    ckpt = prepare_checkpoints(ctx)
    result = train(model, LanguageModeling.from_train(stage.train), LMBatches(sampler, eos_id), stage.train, ckpt,
                   evaluate=(lambda m: perplexity(m, val)) if val else None, callbacks=StageCallbacks(ctx),
                   seed=spec.seed, label=ctx.name)
    if stage.train.save_best_only:
        load_best(model, result)
    final = perplexity(model, val) if val else {}
    model_dir = ctx.out_dir / "model"
    with atomic_dir(model_dir) as tmp:
        model.to("cpu").save_pretrained(tmp)
        tok.save_pretrained(tmp)
    log_model(ctx, model_dir)
    return {"model": str(model_dir), "checkpoints": str(ckpt)}, stage_metrics(ctx, result, final)


def _resolve(spec: Pipeline, stage: str) -> dict[str, Any]:
    """A pretrain stage from scratch also runs with the spec's `model:` block and tokenizer."""
    cfg = block_config(spec, stage)
    if not spec.stages[stage].inputs:
        cfg["model"] = spec.model.model_dump(mode="json")
    cfg["tokenizer"] = ("stage" if spec.trains_tokenizer else
                        spec.tokenizer.model_dump(mode="json", by_alias=True) if spec.tokenizer else None)
    return cfg


def _forward(spec: Pipeline, block: Any, source: ModelSource) -> Forward:
    """Packed blocks of the model's whole context, no padding; the causal-LM loss's logits."""
    return lm_forward(block, source.shape, block.train.batch_sequences, padded=False)


KIND = StageKind(
    name="pretrain", config=PretrainStage, run=run_pretrain, main_output="model",
    summary="train a causal LM on packed text", data=(("data", TEXT),), resolve=_resolve,
    forward=_forward, work=training_work, describe=describe_sequences)
