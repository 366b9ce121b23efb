"""Prefect tasks — the units a Prefect flow runs and caches — as thin wrappers over llmlab functions:
paths and configs in, small dicts out. `stage_tasks` runs stages (and checks, selects, preflights);
`tracking_tasks` opens and closes the pipeline's MLflow run. Elsewhere in llmlab, "task" means an
evaluation task (a family of checkable prompts); here it means a Prefect task."""
