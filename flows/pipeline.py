"""The pipeline flow: a spec compiled into one Prefect task per stage.

    llmlab run pipelines/tiny.yaml                        # runs this flow locally
    prefect deployment run 'llmlab/tiny'                  # through a worker (see prefect.yaml)

Stages run in declaration order (the tokenizer first when the spec trains one); each gets the
results of the stages it names in `from` (and the tokenizer stage's), passed as small dicts.
"""

from __future__ import annotations

from llmlab.paths import configure_environment

configure_environment()

from prefect import flow  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from llmlab.spec import load_spec  # noqa: E402
from tasks.stages import run_stage  # noqa: E402
from tasks.tracking import close_run, open_run  # noqa: E402


def _run_name() -> str:
    from pathlib import Path

    return Path(flow_run.parameters["spec"]).stem


@flow(name="llmlab", flow_run_name=_run_name, log_prints=True)
def pipeline(spec: str) -> dict[str, dict]:
    """Run every stage of the spec file `spec`; returns {stage: StageResult dict}."""
    plan = load_spec(spec)
    parent = open_run(spec, flow_run.id)
    results: dict[str, dict] = {}
    try:
        for name in plan.stage_names():
            deps = [] if name == "tokenizer" else plan.stages[name].inputs
            if "tokenizer" in results and name != "tokenizer":
                deps = ["tokenizer", *deps]
            results[name] = run_stage(spec, name, {d: results[d] for d in deps}, parent)
    except BaseException:
        close_run(spec, parent, "FAILED", results)
        raise
    close_run(spec, parent, "FINISHED", results)
    return results
