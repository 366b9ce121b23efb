"""The pretrain stage: a causal LM on packed text, from scratch or continued from `from`."""

from __future__ import annotations

from typing import Any

from llmlab.checkpoint import atomic_dir
from llmlab.data.pretrain import BlockSampler, document_segments, eval_batches, prepare_pretrain_data
from llmlab.device import pick_device
from llmlab.evaluate import perplexity
from llmlab.model import LlmlabConfig, LlmlabForCausalLM, build_model, count_parameters
from llmlab.models import load_causal_lm
from llmlab.runners.common import StageCallbacks, log_model, no_validation, prepare_checkpoints, stage_metrics
from llmlab.runners.context import StageContext
from llmlab.tokenizer import load_tokenizer
from llmlab.train.loop import load_best, train
from llmlab.train.objectives import LanguageModeling


class LMBatches:
    """Adapts a BlockSampler to the loop's batch dicts (labels = inputs; the model shifts)."""

    unit = "sequences"

    def __init__(self, sampler: Any, eos_id: int | None = None):
        self.sampler = sampler
        self.micro_batch = sampler.batch_size
        self.eos_id = eos_id  # given: document masks (each document attends to itself only)

    def next_batch(self) -> dict[str, Any]:
        x = self.sampler.next_batch()
        if self.eos_id is None:
            return {"input_ids": x, "labels": x}
        segments, labels = document_segments(x, self.eos_id)
        return {"input_ids": x, "labels": labels, "segment_ids": segments}

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def run_pretrain(ctx: StageContext) -> tuple[dict[str, str], dict[str, float]]:
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
