"""Stage runners: what Prefect tasks call. Paths and fingerprints in, a StageResult out.

    result = execute_stage("pipelines/tiny.yaml", "pretrain", inputs={"tokenizer": {...}}, parent_run_id=rid)

`execute_stage` is the one generic wrapper: it resolves the stage's config, opens its MLflow run,
writes `<workdir>/<stage>/stage.json` (status running -> finished | failed | interrupted), and calls
the runner for the stage's kind from `RUNNERS` (a plain dict). Runners write their outputs
atomically and return (outputs, metrics). A stage is finished only when stage.json says so.
Outputs per stage: `model/` (transformers format, tokenizer included), `checkpoints/`,
`metrics.jsonl`, `stage.json`; the tokenizer stage writes `tokenizer/`; eval writes `results.json`
and `report.md`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmlab import __version__
from llmlab.checkpoint import atomic_dir, atomic_write_json, atomic_write_text, fingerprint
from llmlab.spec import Pipeline, config_hash, load_spec

MODEL_ARTIFACT_LIMIT = 200 * 2**20  # model folders larger than this are tracked by path + fingerprint


@dataclass
class StageResult:
    """What a stage hands to the next: small, JSON-able (Prefect persists and hashes it)."""

    stage: str
    kind: str
    output_dir: str
    fingerprint: str  # of the stage's main output (model / tokenizer / results)
    config_hash: str
    mlflow_run_id: str | None
    status: str
    outputs: dict[str, str] = field(default_factory=dict)  # name -> path, e.g. model, tokenizer
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    reused: bool = False  # True when a finished output was reused instead of running

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StageResult":
        return cls(**d)


@dataclass
class StageContext:
    """Everything a runner needs; built by execute_stage."""

    spec: Pipeline
    name: str
    config: Any  # the stage's spec block (TokenizerSpec for the tokenizer stage)
    out_dir: Path
    inputs: dict[str, StageResult]
    run: Any  # tracking.StageRun or None

    def log(self, metrics: dict[str, float], step: int) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run is not None:
            self.run.log_metrics(metrics, step)

    def tokenizer_dir(self) -> str:
        """Where this stage's tokenizer lives: the tokenizer stage's output, or the spec's name/path."""
        if "tokenizer" in self.inputs:
            return self.inputs["tokenizer"].outputs["tokenizer"]
        tok = self.spec.tokenizer
        return tok.path or tok.name  # type: ignore[return-value]


def resolved_config(spec: Pipeline, stage: str) -> dict[str, Any]:
    """The stage's full configuration as it will run: its block plus what it inherits."""
    if stage == "tokenizer":
        return {"kind": "tokenizer", "seed": spec.seed, "tokenizer": spec.tokenizer.model_dump(mode="json", by_alias=True)}
    cfg = spec.stages[stage].model_dump(mode="json", by_alias=True)
    cfg["seed"] = spec.seed
    if cfg["kind"] == "pretrain" and not spec.stages[stage].inputs:
        cfg["model"] = spec.model.model_dump(mode="json")
    if cfg["kind"] == "pretrain":
        cfg["tokenizer"] = spec.tokenizer.model_dump(mode="json", by_alias=True) if spec.tokenizer.train is None else "stage"
    return cfg


def stage_kind(spec: Pipeline, stage: str) -> str:
    return "tokenizer" if stage == "tokenizer" else spec.stages[stage].kind


def execute_stage(spec_file: str, stage: str, inputs: dict[str, dict], parent_run_id: str | None,
                  force: bool = False) -> dict[str, Any]:
    """Run one stage of a spec file; returns StageResult.to_dict(). Raises on failure.

    Holds a lock on the stage's output folder, so concurrent runs never write into each other; a
    run that waited for the lock reuses what the other run finished (unless `force`). `force`
    also discards the stage's checkpoints, so it starts from step 0."""
    from llmlab.reuse import cache_key, finished_result, stage_lock

    spec = load_spec(spec_file)
    out_dir = Path(spec.output_root) / stage
    with stage_lock(out_dir, stage):
        if not force:
            done = finished_result(spec, stage, inputs)
            if done is not None:
                print(f"[{stage}] reusing the finished output in {out_dir} (same config, inputs and code)")
                return {**done, "reused": True}
        elif (out_dir / "checkpoints").exists():
            shutil.rmtree(out_dir / "checkpoints")
        return _execute(spec, spec_file, stage, inputs, parent_run_id, cache_key(spec, stage, inputs))


def _execute(spec: Pipeline, spec_file: str, stage: str, inputs: dict[str, dict], parent_run_id: str | None,
             key: str) -> dict[str, Any]:
    from llmlab.tracking import Tracker
    from llmlab.train.loop import TrainingInterrupted

    kind = stage_kind(spec, stage)
    out_dir = Path(spec.output_root) / stage
    config = resolved_config(spec, stage)
    chash = config_hash(config)
    in_results = {k: StageResult.from_dict(v) for k, v in inputs.items()}
    tracker = Tracker(spec.tracking.uri, spec.tracking.experiment or spec.name)
    run = tracker.start_stage_run(parent_run_id, stage, kind, tags={
        "llmlab.config_hash": chash, "llmlab.cache_key": key, "llmlab.version": __version__,
        **{f"llmlab.input.{k}.run_id": v.mlflow_run_id for k, v in in_results.items()},
        **{f"llmlab.input.{k}.fingerprint": v.fingerprint for k, v in in_results.items()},
    })
    run.log_params(config)
    record = {"stage": stage, "kind": kind, "config": config, "config_hash": chash, "cache_key": key,
              "status": "running", "inputs": {k: v.fingerprint for k, v in in_results.items()},
              "input_runs": {k: v.mlflow_run_id for k, v in in_results.items()}, "mlflow_run_id": run.run_id,
              "llmlab_version": __version__, "started": time.time()}
    atomic_write_json(out_dir / "stage.json", record)
    atomic_write_json(out_dir / "config.json", config)
    run.log_artifact(out_dir / "config.json")
    run.log_artifact(spec_file, "spec")
    metrics_file = out_dir / "metrics.jsonl"
    if metrics_file.exists() and not (out_dir / "checkpoints").exists():
        metrics_file.unlink()  # a fresh start: metrics of an older, discarded attempt go
    ctx = StageContext(spec, stage, stage_block(spec, stage), out_dir, in_results, run)
    started = time.perf_counter()
    try:
        outputs, metrics = RUNNERS[kind](ctx)
    except TrainingInterrupted:
        atomic_write_json(out_dir / "stage.json", {**record, "status": "interrupted"})
        run.finish("KILLED")
        raise
    except BaseException as exc:
        atomic_write_json(out_dir / "stage.json", {**record, "status": "failed", "error": f"{type(exc).__name__}: {exc}"})
        run.finish("FAILED")
        raise
    main = outputs[MAIN_OUTPUT[kind]]
    result = StageResult(stage, kind, str(out_dir), fingerprint(main), chash, run.run_id, "finished",
                         outputs, metrics, round(time.perf_counter() - started, 2))
    if metrics_file.exists():
        run.log_artifact(metrics_file)
    run.set_tags({"llmlab.fingerprint": result.fingerprint})
    atomic_write_json(out_dir / "stage.json", {**record, "status": "finished", "fingerprint": result.fingerprint,
                                               "outputs": outputs, "metrics": metrics, "finished": time.time(),
                                               "seconds": result.seconds, "result": result.to_dict()})
    run.finish("FINISHED")
    return result.to_dict()


def stage_block(spec: Pipeline, stage: str) -> Any:
    return spec.tokenizer if stage == "tokenizer" else spec.stages[stage]


def log_model(ctx: StageContext, model_dir: Path) -> None:
    """Small models go to MLflow whole; large ones by path and fingerprint only."""
    size = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file())
    if size <= MODEL_ARTIFACT_LIMIT:
        ctx.run.log_artifact(model_dir, "model")
    ctx.run.set_tags({"llmlab.model_path": str(model_dir.resolve()), "llmlab.model_bytes": size})


# --------------------------------------------------------------------------- tokenizer


def run_tokenizer(ctx: StageContext) -> tuple[dict[str, str], dict[str, float]]:
    """Train a byte-level BPE on the spec's text sources (interleaved by weight)."""
    from llmlab.data.sources import interleave, iter_texts
    from llmlab.tokenizer import train_tokenizer

    cfg = ctx.config.train
    streams = [(iter_texts(s.path, s.subset, s.split, s.column), s.weight) for s in cfg.data]
    limit = cfg.max_documents

    def texts():
        for i, (_, text) in enumerate(interleave(streams, ctx.spec.seed)):
            if limit is not None and i >= limit:
                return
            yield text

    target = ctx.out_dir / "tokenizer"
    with atomic_dir(target) as tmp:
        tok = train_tokenizer(texts(), cfg.vocab_size, tmp, cfg.min_frequency)
    metrics = {"tokenizer/vocab_size": float(len(tok))}
    ctx.log(metrics, 0)
    ctx.run.log_artifact(target, "tokenizer")
    return {"tokenizer": str(target)}, metrics


# --------------------------------------------------------------------------- pretrain


def _checkpoint_identity(ctx: StageContext, config: dict) -> dict[str, Any]:
    """What a checkpoint must share with this run to be resumed: everything but the horizon."""
    stable = {k: v for k, v in config.items() if k != "train"}
    stable["train"] = {k: v for k, v in config["train"].items()
                       if k not in ("max_steps", "load_optimizer", "eval_every", "save_every", "log_every", "optimizer")}
    return {"config": config_hash(stable), "inputs": {k: v.fingerprint for k, v in ctx.inputs.items()}}


def prepare_checkpoints(ctx: StageContext) -> Path:
    """The stage's checkpoint folder, emptied when its checkpoints belong to a different config."""
    ckpt = ctx.out_dir / "checkpoints"
    identity = _checkpoint_identity(ctx, resolved_config(ctx.spec, ctx.name))
    id_file = ckpt / "identity.json"
    if ckpt.exists() and (not id_file.is_file() or json.loads(id_file.read_text()) != identity):
        print(f"[{ctx.name}] config or inputs changed since the last checkpoint: starting afresh")
        shutil.rmtree(ckpt)
        (ctx.out_dir / "metrics.jsonl").unlink(missing_ok=True)
    ckpt.mkdir(parents=True, exist_ok=True)
    atomic_write_json(id_file, identity)
    return ckpt


class _StageCallbacks:
    def __init__(self, ctx: StageContext):
        self.ctx = ctx

    def on_start(self, info: dict[str, Any]) -> None:
        self.ctx.run.set_tags({f"llmlab.{k}": v for k, v in info.items()})
        # metrics logged after the checkpoint we resume from will be logged again: drop them
        metrics = self.ctx.out_dir / "metrics.jsonl"
        if metrics.exists():
            rows = [r for r in metrics.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= info["resumed_from"]]
            atomic_write_text(metrics, "".join(r + "\n" for r in rows))

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        self.ctx.log(metrics, step)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.ctx.log(metrics, step)

    def on_checkpoint(self, step: int, path: Path) -> None:
        if self.ctx.run is not None:
            self.ctx.run.flush()  # what is checkpointed is also in MLflow


class LMBatches:
    """Adapts a BlockSampler to the loop's batch dicts (labels = inputs; the model shifts)."""

    def __init__(self, sampler: Any):
        self.sampler = sampler

    def next_batch(self) -> dict[str, Any]:
        x = self.sampler.next_batch()
        return {"input_ids": x, "labels": x}

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def load_model(path: str) -> Any:
    """A causal LM from a local folder (ours or any transformers model) or a hub name, fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    import llmlab.model  # noqa: F401  (registers the llmlab architecture)

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def run_pretrain(ctx: StageContext) -> tuple[dict[str, str], dict[str, float]]:
    from llmlab.data.pretrain import BlockSampler, eval_batches, prepare_pretrain_data
    from llmlab.evaluate import perplexity
    from llmlab.model import LlmlabConfig, build_model, count_parameters
    from llmlab.tokenizer import load_tokenizer
    from llmlab.train.loop import load_best, pick_device, train
    from llmlab.train.objectives import LanguageModeling

    stage, spec = ctx.config, ctx.spec
    if stage.inputs:  # continued pretraining: the upstream model and its tokenizer
        tok_dir = ctx.inputs[stage.inputs[0]].outputs["model"]
        model = load_model(tok_dir)
    else:
        tok_dir = ctx.tokenizer_dir()
        tok = load_tokenizer(tok_dir)
        config = LlmlabConfig(**spec.model.model_dump(), vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model = build_model(config, seed=spec.seed)
    tok = load_tokenizer(tok_dir)
    seq_len = model.config.max_seq_len
    data = prepare_pretrain_data([s.model_dump(exclude={"format"}) for s in stage.data], tok_dir, seq_len, spec.seed,
                                 stage.val_fraction, stage.max_tokens)
    print(f"[{ctx.name}] data: {data.meta['train_tokens']:,} training tokens, {data.meta['val_tokens']:,} validation tokens"
          f"{' (cached)' if data.from_cache else ''}")
    ctx.run.set_tags({"llmlab.train_tokens": data.meta["train_tokens"], "llmlab.val_tokens": data.meta["val_tokens"],
                      "llmlab.params": count_parameters(model)})
    sampler = BlockSampler(data.train_path, seq_len, stage.train.batch_size, spec.seed)
    val = eval_batches(data.val_path, seq_len, stage.train.batch_size, stage.train.eval_steps)
    model.to(pick_device())
    ckpt = prepare_checkpoints(ctx)
    result = train(model, LanguageModeling(), LMBatches(sampler), stage.train, ckpt,
                   evaluate=lambda m: perplexity(m, val), callbacks=_StageCallbacks(ctx), seed=spec.seed, label=ctx.name)
    if stage.train.save_best_only:
        load_best(model, result)
    final = perplexity(model, val)
    model_dir = ctx.out_dir / "model"
    with atomic_dir(model_dir) as tmp:
        model.to("cpu").save_pretrained(tmp)
        tok.save_pretrained(tmp)
    plot = plot_curves(ctx.out_dir / "metrics.jsonl", ctx.out_dir / "loss_curve.png", ctx.name)
    if plot:
        ctx.run.log_artifact(plot, "plots")
    log_model(ctx, model_dir)
    metrics = {**final, "train/steps": float(result.step)}
    if result.best_step is not None:
        metrics["best_step"] = float(result.best_step)
    return {"model": str(model_dir), "checkpoints": str(ckpt)}, metrics


def plot_curves(metrics_file: Path, out: Path, title: str) -> Path | None:
    """train/loss and eval/loss against optimizer step, as a PNG."""
    if not metrics_file.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("train/loss", "eval/loss"):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=key, marker="o" if key.startswith("eval") else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- eval


def run_eval(ctx: StageContext) -> tuple[dict[str, str], dict[str, float]]:
    """Score every input model on the same held-out batches; samples from fixed prompts; a report."""
    import numpy as np

    from llmlab.data.pretrain import eval_batches, prepare_pretrain_data
    from llmlab.evaluate import perplexity, render_report, unigram_perplexity
    from llmlab.generate import generate
    from llmlab.tokenizer import load_tokenizer
    from llmlab.train.loop import pick_device

    stage, spec = ctx.config, ctx.spec
    results: dict[str, Any] = {"pipeline": spec.name, "stage": ctx.name, "prompts": stage.prompts,
                               "temperature": stage.temperature, "batches": stage.batches,
                               "batch_size": stage.batch_size, "models": {}}
    metrics: dict[str, float] = {}
    for name in stage.inputs:
        model_dir = ctx.inputs[name].outputs["model"]
        model = load_model(model_dir).to(pick_device())
        tok = load_tokenizer(model_dir)
        seq_len = stage.seq_len or model.config.max_seq_len
        data = prepare_pretrain_data([s.model_dump(exclude={"format"}) for s in stage.data], model_dir, seq_len, spec.seed,
                                     stage.val_fraction, None)
        batches = eval_batches(data.val_path, seq_len, stage.batch_size, stage.batches)
        scores = perplexity(model, batches)
        train_tokens = np.memmap(data.train_path, dtype=data.meta["dtype"], mode="r")
        scores["unigram_ppl"] = unigram_perplexity(train_tokens, batches, len(tok))
        samples = generate(model, tok, stage.prompts, stage.max_new_tokens, stage.temperature,
                           seed=spec.seed, prefix_ids=[tok.eos_token_id])
        results["models"][name] = {**scores, "samples": samples}
        results["seq_len"] = seq_len
        results["val_tokens"] = int(sum(b.numel() for b in batches))
        for key, value in scores.items():
            metrics[f"{name}/{key}"] = value
        print(f"[{ctx.name}] {name}: loss {scores['eval/loss']:.4f} ppl {scores['eval/ppl']:.2f} "
              f"(unigram {scores['unigram_ppl']:.2f})")
    ctx.log(metrics, 0)
    results_file = ctx.out_dir / "results.json"
    atomic_write_json(results_file, results)
    report = ctx.out_dir / "report.md"
    atomic_write_text(report, render_report(results))
    plot = plot_bars(results, ctx.out_dir / "perplexity.png")
    for path, where in ((results_file, None), (report, None), (plot, "plots")):
        ctx.run.log_artifact(path, where)
    return {"results": str(results_file), "report": str(report)}, metrics


def plot_bars(results: dict[str, Any], out: Path) -> Path:
    """Held-out perplexity per model, with the unigram baseline, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(names, [results["models"][n]["eval/ppl"] for n in names], label="model")
    ax.scatter(names, [results["models"][n]["unigram_ppl"] for n in names], color="red", zorder=3, label="unigram baseline")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"{results['pipeline']}: {results['stage']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


RUNNERS: dict[str, Callable[[StageContext], tuple[dict[str, str], dict[str, float]]]] = {
    "tokenizer": run_tokenizer,
    "pretrain": run_pretrain,
    "eval": run_eval,
}
MAIN_OUTPUT = {"tokenizer": "tokenizer", "pretrain": "model", "eval": "results"}

