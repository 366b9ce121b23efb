"""The merge stage: fold LoRA adapters into their base model, giving a plain model directory.

Input: a stage that trained adapters (`from`), or an adapter folder (`adapters:`, with
`base_model:` or the base recorded in its adapter_config.json). Output: `model/` in transformers
format with the tokenizer and chat template; its logits equal the adapted model's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmlab.runners.kind import NamedModel, StageKind
from llmlab.spec.stages import MergeStage

if TYPE_CHECKING:
    from llmlab.runners.context import StageContext


def run_merge(ctx: StageContext) -> tuple[dict[str, str], dict[str, float]]:
    from llmlab.merge import merge_adapters, merge_stage_output
    from llmlab.runners.common import log_model

    stage = ctx.config
    target = ctx.out_dir / "model"
    if stage.inputs:
        upstream = ctx.inputs[stage.inputs[0]]
        if "adapters" in upstream.outputs:  # the adapters that stage chose (best or final)
            merge_adapters(upstream.outputs["adapters"], stage.base_model, target)
        else:
            merge_stage_output(upstream.output_dir, target, stage.base_model)
    else:
        merge_adapters(stage.adapters, stage.base_model, target)
    log_model(ctx, target)
    return {"model": str(target)}, {}


def _models(block: Any) -> list[NamedModel]:
    named = [NamedModel(block.adapters, "adapters", "adapters")] if block.adapters else []
    return named + ([NamedModel(block.base_model, "base model", "causal")] if block.base_model else [])


KIND = StageKind(
    name="merge", config=MergeStage, run=run_merge, main_output="model",
    summary="fold LoRA adapters into a plain model", models=_models)
