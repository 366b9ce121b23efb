"""The export stage: a stage's model written as `hf` (transformers, llmlab's code) or `llama`
(stock LlamaForCausalLM, no llmlab needed to load it). An architecture Llama cannot express fails
the stage with every blocking option named."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmlab.runners.kind import StageKind
from llmlab.spec.stages import ExportStage

if TYPE_CHECKING:
    from llmlab.runners.context import StageContext


def run_export(ctx: StageContext) -> tuple[dict[str, str], dict[str, float]]:
    from llmlab.errors import UserError
    from llmlab.export import export_model
    from llmlab.runners.common import log_model

    upstream = ctx.inputs[ctx.config.inputs[0]]
    if "model" not in upstream.outputs:
        raise UserError(f"export: stage '{upstream.stage}' wrote no model/ (adapters only?): export its merge stage")
    target = export_model(upstream.outputs["model"], ctx.out_dir / "model", ctx.config.format)
    ctx.run.set_tags({"llmlab.export_format": ctx.config.format})
    log_model(ctx, target)
    return {"model": str(target)}, {}


KIND = StageKind(
    name="export", config=ExportStage, run=run_export, main_output="model",
    summary="write a stage's model in another format",
    describe=lambda spec, block, est: f"format {block.format}")
