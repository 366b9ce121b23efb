"""Prefect tasks that open and close a pipeline's parent MLflow run (wrapping llmlab.pipeline_runs)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from llmlab.foreground import adopt_run as adopt_foreground_run
from llmlab.pipeline_runs import close_pipeline_run, open_pipeline_run


@task(name="open-mlflow-run", cache_policy=NO_CACHE)
def open_run(spec: str, flow_run_id: str | None) -> str:
    return open_pipeline_run(spec, flow_run_id)


@task(name="adopt-mlflow-run", cache_policy=NO_CACHE)
def adopt_run(spec: str, handoff: str, flow_run_id: str | None) -> str:
    return adopt_foreground_run(spec, handoff, flow_run_id)


@task(name="close-mlflow-run", cache_policy=NO_CACHE)
def close_run(spec: str, run_id: str, status: str, results: dict[str, dict], reused: dict[str, str],
              chosen: dict[str, str] | None = None) -> dict | None:
    return close_pipeline_run(spec, run_id, status, results, reused, chosen)
