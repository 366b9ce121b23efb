"""The tokenizer stage: train a byte-level BPE on the spec's text sources (interleaved by weight)."""

from __future__ import annotations

from llmlab.checkpoint import atomic_dir
from llmlab.data.sources import interleave, iter_texts
from llmlab.runners.context import StageContext
from llmlab.tokenizer import train_tokenizer


def run_tokenizer(ctx: StageContext) -> tuple[dict[str, str], dict[str, float]]:
    """Train a byte-level BPE on the spec's text sources (interleaved by weight)."""
    cfg = ctx.config.train
    streams = [(iter_texts(s.path, s.subset, s.split, s.column), s.weight) for s in cfg.data]
    limit = cfg.max_documents

    def texts():
        for i, (_, text) in enumerate(interleave(streams, ctx.spec.seed)):
            if limit is not None and i >= limit:
                return
            yield text

    target = ctx.out_dir / "tokenizer"
    with atomic_dir(target) as tmp:
        tok = train_tokenizer(texts(), cfg.vocab_size, tmp, cfg.min_frequency)
    metrics = {"tokenizer/vocab_size": float(len(tok))}
    ctx.log(metrics, 0)
    ctx.run.log_artifact(target, "tokenizer")
    return {"tokenizer": str(target)}, metrics
