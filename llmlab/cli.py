"""`llmlab`: the command line.

    llmlab validate FILE     every spec error at once (exit 2), with YAML path, line and fix
    llmlab schema            JSON Schema of the spec, for editors
    llmlab inspect FILE      stage graph, parameter count and a training-memory estimate
    llmlab run FILE          run the pipeline as a local Prefect flow
    llmlab env [--probe]     versions, devices, endpoints and fast paths here, for a bug report
    llmlab sync              send MLflow records that wait on disk (made while the server was down)

This is the only module of llmlab that may reach `flows/` (to start a run). `validate` and `schema`
import neither torch nor prefect, so they answer in well under a second.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import typer

from llmlab.paths import quiet_defaults
from llmlab.spec import Pipeline, SpecError, json_schema, load_spec

quiet_defaults()  # before transformers is imported by any command

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="llmlab: a language model's whole life from one YAML spec.")


def _version(value: bool) -> None:
    if value:
        from llmlab import __version__

        typer.echo(f"llmlab {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print llmlab's version and exit")) -> None:
    """llmlab: a language model's whole life from one YAML spec."""


def _load_or_exit(file: Path) -> Pipeline:
    try:
        return load_spec(file)
    except SpecError as err:
        typer.echo(f"{len(err.issues)} problem{'s' if len(err.issues) != 1 else ''} in {file}:", err=True)
        for issue in err.issues:
            typer.echo("  " + issue.render(str(file)), err=True)
        raise typer.Exit(2)


@app.command()
def validate(file: Path = typer.Argument(..., metavar="FILE", help="pipeline spec (YAML)")) -> None:
    """Check a spec: every error at once, each with its YAML path and how to fix it."""
    spec = _load_or_exit(file)
    _preflight_or_exit(file, spec)
    typer.echo(f"{file}: valid — pipeline '{spec.name}', stages: {' -> '.join(spec.stage_names())}")


def _preflight_or_exit(file: Path, spec: Pipeline) -> None:
    """Open every local data file, tokenizer and model folder the spec names; every problem at once."""
    from llmlab.preflight import preflight

    problems, notes = preflight(spec, file)
    for note in notes:
        typer.echo(note if note.startswith("warning:") else f"note: {note}", err=True)
    if problems:
        typer.echo(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} with what {file} names:", err=True)
        for problem in problems:
            typer.echo("  " + problem.render(), err=True)
        raise typer.Exit(2)


@app.command()
def schema(
    markdown: bool = typer.Option(False, "--markdown", help="every block and field as Markdown tables (docs/spec.md)"),
) -> None:
    """Print the spec's JSON Schema, every field described (point your editor's YAML plugin at it)."""
    if markdown:
        from llmlab.spec.docs import spec_markdown

        typer.echo(spec_markdown(), nl=False)
        return
    typer.echo(json.dumps(json_schema(), indent=2))


@app.command()
def inspect(
    file: Path = typer.Argument(..., metavar="FILE", help="pipeline spec (YAML)"),
    detail: bool = typer.Option(False, "--detail", help="each stage's memory by component, and what it assumes"),
) -> None:
    """Stage graph, parameter count and a training-memory estimate per training stage."""
    spec = _load_or_exit(file)
    from llmlab.estimate import SPEC_MODEL, breakdown, describe, spec_model, spec_vocab, stage_model
    from llmlab.model.memory import count_parameters
    from llmlab.runners.context import stage_block
    from llmlab.runners.registry import estimate_stage, kind_of

    typer.echo(f"pipeline {spec.name} (seed {spec.seed}, outputs in {spec.output_root}/)")
    if spec.tokenizer is None:
        typer.echo("tokenizer: none in the spec; each stage uses its model's own (or the stage's `tokenizer:`)")
    if any(stage_model(spec, name).label == SPEC_MODEL for name in spec.stages):
        vocab, known = spec_vocab(spec)
        m, own = spec.model, spec_model(spec)
        typer.echo(f"model: {m.n_layers} layers x d_model {m.d_model}, {m.attention_type} {m.n_heads}/{m.num_kv_heads} heads, "
                   f"{m.positional_encoding}, {m.norm_type}, {m.activation}; "
                   f"vocab {vocab if known else f'from the tokenizer ({vocab} assumed)'}")
        typer.echo(f"parameters: {count_parameters(own.shape):,}" if own.shape else f"parameters: unknown ({own.problem})")
    else:
        typer.echo("model: no stage builds the spec's `model:` block; each stage's starting model is shown with it")
    typer.echo("stages:")
    width = max(len(n) for n in spec.stage_names())
    for name in spec.stage_names():
        kind = kind_of(spec, name)
        block = stage_block(spec, name)
        est = estimate_stage(spec, name)
        bound = {k: v for k, v in spec.dependencies(name).items() if k != "tokenizer"}
        sel = spec.selection(name)
        src = (f"{', '.join(bound)} (the branch whose {sel.stage} has the {sel.mode} {sel.metric})" if sel else
               ", ".join(bound.values())) or ("tokenizer" if spec.trains_tokenizer and name != "tokenizer" else "-")
        line = f"  {name:<{width}} kind {kind.name:<11} from {src}; {kind.summary}"
        if kind.describe is not None:
            line += f": {kind.describe(spec, block, est)}"
        typer.echo(line + (f"; {describe(est)}" if est is not None else ""))
        if est is None:
            continue
        if est.params is not None and (est.model != SPEC_MODEL or est.trainable != est.params):
            own = f"{est.model}: " if est.model != SPEC_MODEL else ""
            trains = f", {est.trainable:,} train" if est.trainable != est.params else ""
            typer.echo(f"{'':13}{own}{est.params:,} parameters{trains}")
        if detail:
            typer.echo(f"{'':13}{breakdown(est)}")
    typer.echo("memory: rule of thumb (fp32 weights, gradients, optimizer state, activations, logits, and what each "
               "stage kind adds), not a measurement; --detail shows the parts")


@app.command()
def run(
    file: Path = typer.Argument(..., metavar="FILE", help="pipeline spec (YAML)"),
    force: list[str] = typer.Option([], "--force", metavar="STAGE", help="rerun this stage even if it finished (repeatable)"),
    only: list[str] = typer.Option([], "--only", metavar="STAGE", help="run only this stage, on the others' finished outputs (repeatable)"),
    from_stage: str | None = typer.Option(None, "--from", metavar="STAGE", help="rerun this stage and every stage after it"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks for expected failures too (or LLMLAB_DEBUG=1)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="say what would run or be reused, and why; run nothing"),
    sweep: list[str] = typer.Option([], "--sweep", metavar="STAGE.FIELD=VALUE", help="run only these values of a sweep: STAGE.FIELD=VALUE (repeatable)"),
    record_reused: bool = typer.Option(False, "--record-reused", hidden=True,
                                       help="record a run whose every stage is reused; run none (what a fully reused "
                                            "run starts in the background)"),
    follow: str | None = typer.Option(None, "--follow", metavar="DIR", hidden=True,
                                      help="record the stages another llmlab process runs (a hand-over folder; "
                                           "what `run --only` starts in the background)"),
) -> None:
    """Run a pipeline as a local Prefect flow; finished, unchanged stages are reused."""
    if debug:
        os.environ["LLMLAB_DEBUG"] = "1"
    spec = _load_or_exit(file)
    _check_stage_flags(file, spec, force, only, from_stage)
    narrow = _sweep_option(file, spec, sweep)
    if dry_run:
        _show_plan(file, force, only, from_stage, as_json=False, sweep=narrow)
        return
    _preflight_or_exit(file, spec)
    from llmlab.serve import configure_environment, prefect_api_problem

    configure_environment()
    problem = prefect_api_problem()
    if problem:
        typer.echo(problem, err=True)
        raise typer.Exit(2)
    if only and not (record_reused or follow):
        from llmlab.foreground import eligible

        if eligible(spec, only, narrow):
            _run_here(file, only, force, sweep, narrow)
            return
    if follow:
        os.nice(10)  # the stages run in the foreground process: it comes first
    if not (force or only or from_stage or record_reused or follow):
        from llmlab.plan import all_reused

        reused = all_reused(file, narrow)
        if reused is not None:  # decided before Prefect starts: nothing to wait for
            _record_reused_in_background(file, sweep)
            _print_results(reused)
            return
    with _prefect_server():
        try:
            state = _run_flow(file, force, only, from_stage, narrow, only_reused=record_reused, follow=follow)
        finally:
            if follow:  # the hand-over folder has served
                import shutil

                shutil.rmtree(follow, ignore_errors=True)
    if state.is_failed() or state.is_crashed() or state.is_cancelled():
        error = state.result(raise_on_failure=False)
        if isinstance(error, KeyboardInterrupt) or INTERRUPTED in (state.message or ""):
            typer.echo(("\n" + state.message + "\n" if INTERRUPTED in (state.message or "") else "") + INTERRUPTED_LINE,
                       err=True)
            raise typer.Exit(130)
        # an expected failure's message is its one sentence; a bug's traceback is in the flow's log above
        typer.echo(f"\npipeline failed: {state.message}", err=True)
        typer.echo("finished stages are kept; fix the cause and run again to continue", err=True)
        raise typer.Exit(1)
    _print_results(state.result())


def _print_results(results: dict[str, dict]) -> None:
    typer.echo("")
    width = max([10] + [len(n) for n in results])
    for name, r in results.items():
        shown = {k: round(v, 4) for k, v in r["metrics"].items() if "/" in k}
        status = "reused" if r["reused"] else r["status"]
        typer.echo(f"{name:<{width}} {status:<9} {r['seconds']:>7.1f}s  {r['output_dir']}  {shown}")


def _record_reused_in_background(file: Path, sweep: list[str]) -> None:
    """A run whose every stage is reused answers at once; its Prefect flow run (each stage Cached) and
    MLflow parent run are recorded by the same flow in a process of its own, which runs no stage."""
    import subprocess
    import sys

    from llmlab.paths import state_dir

    logs = state_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "llmlab.cli", "run", str(file), "--record-reused"]
    for value in sweep:
        args += ["--sweep", value]
    with open(logs / "reused-runs.log", "ab") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    typer.echo(f"every stage is reused (same config, inputs and code; outputs intact): nothing runs. The run is recorded "
               f"in Prefect and MLflow in the background (process {proc.pid}, log {logs / 'reused-runs.log'})")


INTERRUPTED = "interrupted at step"  # the sentence of a stage stopped by Ctrl+C or SIGTERM (llmlab.train.signals)
INTERRUPTED_LINE = "interrupted: finished stages are kept and an interrupted stage resumes from its last checkpoint"


def _run_here(file: Path, only: list[str], force: list[str], sweep: list[str], narrow: dict) -> None:
    """`--only`: the stages run in this process (no Prefect or MLflow loaded here); a background
    flow records them (`llmlab.foreground`)."""
    from llmlab.errors import debug_enabled, expected_failure
    from llmlab.foreground import run_here

    try:
        results = run_here(str(file), only, force, sweep, narrow, say=typer.echo)
    except KeyboardInterrupt:
        typer.echo(INTERRUPTED_LINE, err=True)
        raise typer.Exit(130)
    except Exception as exc:
        sentence = expected_failure(exc)
        if sentence is None or debug_enabled():
            raise
        if INTERRUPTED in sentence:
            typer.echo(f"\n{sentence}\n{INTERRUPTED_LINE}", err=True)
            raise typer.Exit(130)
        log = getattr(exc, "stage_log", None)
        typer.echo(f"\npipeline failed: {sentence}" + (f" (traceback in {log})" if log else ""), err=True)
        typer.echo("finished stages are kept; fix the cause and run again to continue", err=True)
        raise typer.Exit(1)
    _print_results(results)


def _run_flow(file: Path, force: list[str], only: list[str], from_stage: str | None, narrow: dict,
              only_reused: bool = False, follow: str | None = None) -> Any:
    from flows.pipeline import drain_reporting, pipeline

    try:
        return pipeline(spec=str(file), force=force, only=only, from_stage=from_stage, sweep=narrow or None,
                        only_reused=only_reused, follow=follow, return_state=True)
    except KeyboardInterrupt:
        typer.echo(INTERRUPTED_LINE, err=True)
        raise typer.Exit(130)
    finally:
        drain_reporting()


@contextlib.contextmanager
def _prefect_server() -> Iterator[None]:
    """With no Prefect API set (PREFECT_API_URL, `llmlab serve`), the state directory's local server
    (`llmlab.prefect_server`): started once, in a session of its own, and kept for the next runs."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from llmlab.prefect_server import idle_seconds, lease

    with lease() as (url, started):
        os.environ["PREFECT_API_URL"] = url
        ui = url.removesuffix("/api")
        idle = idle_seconds()
        kept = "it stops when this run ends" if idle == 0 else \
            f"kept for the next runs, it stops {idle / 60:g} min after the last one (`llmlab stop` now)"
        typer.echo(f"Prefect: {'started ' if started else ''}a local server at {ui}; {kept}")
        try:
            yield
        finally:
            os.environ.pop("PREFECT_API_URL", None)


def _check_stage_flags(file: Path, spec: Pipeline, force: list[str], only: list[str], from_stage: str | None) -> None:
    names = spec.stage_names()
    for flag, value in [("--force", s) for s in force] + [("--only", s) for s in only] + ([("--from", from_stage)] if from_stage else []):
        if not spec.expand_names([value]):
            typer.echo(f"{flag} {value}: no such stage in {file} (stages: {', '.join(names)})", err=True)
            raise typer.Exit(2)


def _sweep_option(file: Path, spec: Pipeline, given: list[str]) -> dict[str, dict[str, list]]:
    """`--sweep dpo.beta=0.1 --sweep dpo.beta=0.3` -> {"dpo": {"beta": [0.1, 0.3]}}, checked against the spec."""
    import yaml

    narrow: dict[str, dict[str, list]] = {}
    for item in given:
        target, _, value = item.partition("=")
        stage = next((b for b in sorted(spec.graph.labels, key=len, reverse=True) if target.startswith(b + ".")), None)
        if not value or stage is None:
            typer.echo(f"--sweep {item}: give STAGE.FIELD=VALUE for a swept stage of {file} "
                       f"(swept: {', '.join(spec.graph.labels) or 'none'})", err=True)
            raise typer.Exit(2)
        narrow.setdefault(stage, {}).setdefault(target[len(stage) + 1:], []).append(yaml.safe_load(value))
    _, problems = spec.graph.narrowed(narrow)
    if problems:
        typer.echo(f"--sweep: {'; '.join(problems)}", err=True)
        raise typer.Exit(2)
    return narrow


def _show_plan(file: Path, force: list[str], only: list[str], from_stage: str | None, as_json: bool,
               sweep: dict[str, dict[str, list]] | None = None) -> None:
    from llmlab.plan import as_json as plan_json
    from llmlab.plan import plan_run, render

    rows = plan_run(file, force, only, from_stage, sweep)
    if as_json:
        typer.echo(json.dumps(plan_json(rows), indent=2))
    else:
        typer.echo(f"plan for {file} (nothing runs):")
        typer.echo(render(rows))


@app.command()
def plan(
    file: Path = typer.Argument(..., metavar="FILE", help="pipeline spec (YAML)"),
    force: list[str] = typer.Option([], "--force", metavar="STAGE", help="as llmlab run --force"),
    only: list[str] = typer.Option([], "--only", metavar="STAGE", help="as llmlab run --only"),
    from_stage: str | None = typer.Option(None, "--from", metavar="STAGE", help="as llmlab run --from"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable rows"),
    sweep: list[str] = typer.Option([], "--sweep", metavar="STAGE.FIELD=VALUE", help="as llmlab run --sweep"),
) -> None:
    """What `llmlab run` would do: each stage and branch reused or run, why, and its estimated time and memory."""
    spec = _load_or_exit(file)
    _check_stage_flags(file, spec, force, only, from_stage)
    _show_plan(file, force, only, from_stage, as_json, _sweep_option(file, spec, sweep))


@app.command()
def chat(
    model: str = typer.Argument(..., metavar="MODEL", help="a model dir, a stage output dir (runs/tiny/dpo), or SPEC.yaml:STAGE"),
    temperature: float = typer.Option(0.7, metavar="T", help="sampling temperature (0 = greedy)"),
    top_p: float = typer.Option(0.9, metavar="P", help="nucleus sampling mass"),
    max_new_tokens: int = typer.Option(256, metavar="N", help="longest reply in tokens"),
) -> None:
    """Chat with a model: its chat template when it has one, plain continuation otherwise."""
    from llmlab.chat import chat_loop
    from llmlab.models import ModelNotFound, resolve_model_dir

    try:
        model_dir = resolve_model_dir(model)
    except (ModelNotFound, SpecError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2)
    chat_loop(model_dir, temperature, top_p, max_new_tokens)


@app.command()
def generate(
    model: str = typer.Argument(..., metavar="MODEL", help="a model dir, a stage output dir, or SPEC.yaml:STAGE"),
    prompts: Path = typer.Option(..., metavar="FILE", help="a .txt file (one prompt per line) or .jsonl (a 'prompt' field per line)"),
    out: Path | None = typer.Option(None, metavar="PATH", help="where to write the JSONL (default: standard output)"),
    temperature: float = typer.Option(0.0, metavar="T", help="sampling temperature (0 = greedy)"),
    top_p: float = typer.Option(1.0, metavar="P", help="nucleus sampling mass"),
    max_new_tokens: int = typer.Option(256, metavar="N", help="longest completion in tokens"),
) -> None:
    """Complete every prompt of a file; one JSON line per prompt: {"prompt", "completion"}."""
    from llmlab.completions import generate_file, read_prompts
    from llmlab.models import ModelNotFound, resolve_model_dir

    try:
        model_dir = resolve_model_dir(model)
        rows = generate_file(model_dir, read_prompts(prompts), temperature, top_p, max_new_tokens)
    except (ModelNotFound, SpecError, ValueError, FileNotFoundError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if out is None:
        typer.echo(text, nl=False)
    else:
        from llmlab.checkpoint import atomic_write_text

        atomic_write_text(out, text)
        typer.echo(f"{len(rows)} completions written to {out}", err=True)


@app.command()
def report(
    run: str = typer.Argument(..., metavar="RUN", help="a pipeline run id (MLflow parent run) or a pipeline name (its newest run)"),
    out: Path | None = typer.Option(None, metavar="PATH", help="output folder (default: reports/<run>)"),
) -> None:
    """Rebuild a past run's evaluation report (table, plots, training curves) from MLflow."""
    from llmlab.tracking import rebuild_report

    target = out or Path("reports") / run
    try:
        files = rebuild_report(run, target)
    except LookupError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2)
    typer.echo("\n".join(str(f) for f in files))


@app.command()
def merge(
    source: Path = typer.Argument(..., metavar="PATH", help="an adapter folder, or a stage output folder that holds adapters/"),
    out: Path = typer.Argument(..., metavar="PATH", help="where to write the merged model"),
    base_model: str | None = typer.Option(None, metavar="MODEL", help="base model dir or hub name (default: the one the adapters record)"),
) -> None:
    """Fold LoRA adapters into their base model: a plain transformers model folder."""
    from llmlab.merge import MergeError, merge_adapters, merge_stage_output

    try:
        if (source / "adapter_config.json").is_file():
            merged = merge_adapters(source, base_model, out)
        else:
            merged = merge_stage_output(source, out, base_model)
    except MergeError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2)
    typer.echo(f"merged model written to {merged}")


@app.command()
def export(
    model: str = typer.Argument(..., metavar="MODEL", help="a model dir, a stage output dir, or SPEC.yaml:STAGE"),
    out: Path = typer.Argument(..., metavar="PATH", help="where to write the exported model"),
    format: str = typer.Option("hf", "--format", metavar="FORMAT", help="hf (transformers, our model code) or llama (stock LlamaForCausalLM)"),
) -> None:
    """Export a model: `hf` for transformers with llmlab's code, `llama` for stock transformers (no llmlab needed)."""
    from llmlab.export import ExportError, export_model
    from llmlab.models import ModelNotFound, resolve_model_dir

    try:
        written = export_model(resolve_model_dir(model), out, format)
    except (ModelNotFound, ExportError, SpecError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2)
    typer.echo(f"{format} model written to {written}")


@app.command()
def init(
    path: Path | None = typer.Argument(None, metavar="PATH", help="where to write the spec (default: pipelines/<name>.yaml)"),
    defaults: bool = typer.Option(False, "--defaults", help="no questions: the demo's recipe (pipelines/tiny.yaml) as my-model"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing file"),
) -> None:
    """A wizard that asks for the architecture, size, stages and each stage's optimizer, then writes a spec."""
    from llmlab.wizard import run_wizard, write_spec

    spec = run_wizard(lambda key, question, default: typer.prompt(question, default=default), typer.echo, defaults)
    target = path or Path("pipelines") / f"{spec['name']}.yaml"
    try:
        write_spec(spec, target, overwrite=force)
    except FileExistsError:
        typer.echo(f"{target} exists: pass --force to overwrite, or give another path", err=True)
        raise typer.Exit(2)
    typer.echo(f"wrote {target}; next: llmlab inspect {target} && llmlab run {target}")


@app.command()
def serve(
    prefect_port: int = typer.Option(None, metavar="PORT", help="Prefect server port (default $LLMLAB_PREFECT_PORT or 4200)"),
    mlflow_port: int = typer.Option(None, metavar="PORT", help="MLflow UI port (default $LLMLAB_MLFLOW_PORT or 5000)"),
) -> None:
    """Start a Prefect server, a process worker and the MLflow UI on 127.0.0.1; register the deployments."""
    from llmlab.serve import serve as start

    try:
        info = start(prefect_port, mlflow_port)
    except (RuntimeError, TimeoutError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1)
    typer.echo(f"Prefect UI  {info['prefect_ui']}\nMLflow UI   {info['mlflow_ui']}")
    typer.echo(f"run a pipeline: PREFECT_API_URL={info['prefect_api_url']} prefect deployment run 'llmlab/tiny'")
    typer.echo("stop everything: make stop")


@app.command()
def stop() -> None:
    """Stop exactly what `llmlab serve` started, and the local Prefect server `llmlab run` keeps."""
    from llmlab.prefect_server import stop as stop_local
    from llmlab.serve import stop as halt

    stopped = halt() + (["the local Prefect server of llmlab run"] if stop_local() else [])
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@app.command()
def sync() -> None:
    """Send the MLflow records that wait on disk (runs made while a tracking server did not answer)."""
    from llmlab.pipeline_runs import sync_all

    lines = sync_all()
    typer.echo("\n".join(lines) if lines else "nothing waits: MLflow has every record")
    if any("does not answer" in line for line in lines):
        raise typer.Exit(1)


@app.command()
def runs(
    pipeline: str | None = typer.Argument(None, metavar="NAME", help="pipeline name (default: all)"),
    limit: int = typer.Option(20, metavar="N", help="how many runs to show"),
) -> None:
    """Recent pipeline runs from MLflow: status, duration, each stage's status and cache hits, the
    model each run registered, and which version holds each alias (champion)."""
    from llmlab.pipeline_runs import champions, list_runs, send_waiting
    from llmlab.tracking import answers, default_tracking_uri

    uri = default_tracking_uri()
    if not answers(uri):
        typer.echo(f"MLflow at {uri} does not answer: start it (make serve), or unset MLFLOW_TRACKING_URI to read the "
                   f"local store", err=True)
        raise typer.Exit(1)
    send_waiting(uri)  # records of runs made while it was down go first
    for c in champions(pipeline):
        typer.echo(f"{c['alias']}: {c['model']} version {c['version']} (stage {c['stage']}, run {c['run_id']})")
    found = list_runs(pipeline, limit)
    if not found:
        typer.echo("no pipeline runs recorded yet" + (f" for '{pipeline}'" if pipeline else ""))
        return
    import datetime

    name_width = max([8] + [len(r["pipeline"]) for r in found])
    stage_width = max([12] + [len(st["stage"]) for r in found for st in r["stages"]])
    typer.echo(f"{'started':<19}  {'pipeline':<{name_width}}  {'status':<9} {'seconds':>8}  MLflow run, registered model")
    for r in found:
        when = datetime.datetime.fromtimestamp(r["start"] / 1000).strftime("%Y-%m-%d %H:%M:%S")
        model = f"  registered {r['registered']}" if r.get("registered") else ""
        promotion = f" ({r['promotion']})" if r.get("promotion") else ""
        typer.echo(f"{when}  {r['pipeline']:<{name_width}}  {r['status']:<9} {r['seconds']:>7.1f}s  {r['run_id']}{model}{promotion}")
        for st in r["stages"]:
            mark = "cached" if st["reused"] else st["status"]
            typer.echo(f"    {st['stage']:<{stage_width}} {mark:<9} {st['seconds']:>7.1f}s")


@app.command()
def env(
    file: Path | None = typer.Argument(None, metavar="FILE", help="a pipeline spec, for its tracking.uri (optional)"),
    probe: bool = typer.Option(False, "--probe", help="try torch.compile and the static decoder here (seconds on a "
                                                      "GPU; longer on a CPU)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of Markdown"),
) -> None:
    """Versions, devices, what `auto` picks, where runs go and (with --probe) whether the fast paths
    work here: paste it into a bug report. Secrets are masked."""
    from llmlab.environment import collect, render

    spec_uri = _load_or_exit(file).tracking.uri if file is not None else None
    info = collect(probe=probe, spec_uri=spec_uri)
    typer.echo(json.dumps(info, indent=2) if as_json else render(info))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
