"""One Prefect task runs any stage: the stage kind is looked up inside llmlab (`stages.RUNNERS`).

The task is a thin wrapper over `llmlab.stages.execute_stage`; it passes paths, fingerprints and
run ids, never models or tensors.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from llmlab.stages import execute_stage


@task(name="stage", task_run_name="{stage}", cache_policy=NO_CACHE, log_prints=True)
def run_stage(spec: str, stage: str, inputs: dict[str, dict], parent_run_id: str | None) -> dict:
    """Run stage `stage` of spec file `spec` on its upstream results; returns its StageResult dict."""
    return execute_stage(spec, stage, inputs, parent_run_id)
