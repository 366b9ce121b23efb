"""The merge stage: fold LoRA adapters into their base model, giving a plain model directory.

Input: an sft stage that trained adapters (`from`), or an adapter folder (`adapters:`, with
`base_model:` or the base recorded in its adapter_config.json). Output: `model/` in transformers
format with the tokenizer and chat template; its logits equal the adapted model's.
"""

from __future__ import annotations

from pathlib import Path

from llmlab.merge import merge_adapters, merge_stage_output
from llmlab.runners.common import log_model
from llmlab.runners.context import StageContext


def run_merge(ctx: StageContext) -> tuple[dict[str, str], dict[str, float]]:
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
    log_model(ctx, Path(target))
    return {"model": str(target)}, {}
