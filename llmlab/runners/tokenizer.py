"""The tokenizer stage: train a byte-level BPE on the spec's text sources (interleaved by weight).

It is the pipeline's first stage, named `tokenizer`, when the spec's `tokenizer:` block trains one;
its output folder `tokenizer/` is what a pretrain stage from scratch builds its vocabulary from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmlab.data.formats import TEXT
from llmlab.runners.kind import StageKind
from llmlab.spec.blocks import TokenizerSpec

if TYPE_CHECKING:
    from llmlab.runners.context import StageContext
    from llmlab.spec import Pipeline


def run_tokenizer(ctx: StageContext) -> tuple[dict[str, str], dict[str, float]]:
    """Train a byte-level BPE on the spec's text sources (interleaved by weight)."""
    from llmlab.checkpoint import atomic_dir
    from llmlab.data.reader import SourceReport, stream
    from llmlab.tokenizer import train_tokenizer

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


def _resolve(spec: Pipeline, stage: str) -> dict[str, Any]:
    return {"kind": "tokenizer", "seed": spec.seed, "tokenizer": spec.tokenizer.model_dump(mode="json", by_alias=True)}


def _describe(spec: Any, block: Any, est: Any) -> str:
    return f"vocab {block.train.vocab_size:,}"


KIND = StageKind(
    name="tokenizer", config=TokenizerSpec, run=run_tokenizer, main_output="tokenizer",
    summary="train a byte-level BPE tokenizer", data=(("train.data", TEXT),), resolve=_resolve, describe=_describe)
