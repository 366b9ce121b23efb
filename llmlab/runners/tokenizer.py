"""The tokenizer stage: train a byte-level BPE on the spec's text sources (interleaved by weight)."""

from __future__ import annotations

from llmlab.checkpoint import atomic_dir
from llmlab.data.pretrain import TEXT
from llmlab.data.reader import SourceReport, stream
from llmlab.runners.context import StageContext
from llmlab.tokenizer import train_tokenizer


def run_tokenizer(ctx: StageContext) -> tuple[dict[str, str], dict[str, float]]:
    """Train a byte-level BPE on the spec's text sources (interleaved by weight)."""
    cfg = ctx.config.train
    limit = cfg.max_documents
    reports: list[SourceReport] = []

    def texts():  # every document (a tokenizer holds nothing out), up to max_documents
        for i, (_, _, text) in enumerate(stream(cfg.data, TEXT, ctx.spec.seed, 0.0, reports)):
            if limit is not None and i >= limit:
                return
            yield text

    target = ctx.out_dir / "tokenizer"
    with atomic_dir(target) as tmp:
        tok = train_tokenizer(texts(), cfg.vocab_size, tmp, cfg.min_frequency)
    for source, report in zip(cfg.data, reports):
        report.check(source, TEXT)
        print(f"[{ctx.name}] {report.summary()}")
    metrics = {"tokenizer/vocab_size": float(len(tok))}
    ctx.log(metrics, 0)
    ctx.run.log_artifact(target, "tokenizer")
    return {"tokenizer": str(target)}, metrics
