"""The eval stage: every input model scored on the same held-out batches, samples, a report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmlab.data.formats import PREFERENCE, PROMPTS, TEXT
from llmlab.runners.kind import NamedModel, StageKind, reward_models
from llmlab.spec.stages import EvalStage

if TYPE_CHECKING:
    from llmlab.runners.context import StageContext

MAX_EVAL_CONTEXT = 2048  # held-out text is scored in blocks of at most this many tokens (a hub model's context can be 32k)


def evaluated(ctx: StageContext) -> list[tuple[str, str]]:
    """(display name, model folder, adapter folder or hub name) of every model the stage scores: `from`
    stages first (a stage that trained LoRA adapters is scored by its adapters on their base model)."""
    stage = ctx.config
    outputs = {name: ctx.inputs[name].outputs for name in stage.model_stages}
    return ([(name, out.get("model") or out["adapters"]) for name, out in outputs.items()]
            + [(m.name, m.path) for m in stage.models])


def load_evaluated(path: str) -> tuple[Any, Any]:
    """(model on the best device, tokenizer) of a model folder or hub name, or adapters folded into their base."""
    from pathlib import Path

    from llmlab.device import pick_device
    from llmlab.merge import merged_model
    from llmlab.models import load_causal_lm
    from llmlab.tokenizer import load_tokenizer

    if (Path(path) / "adapter_config.json").is_file():
        model, tok = merged_model(path)
        return model.to(pick_device()), tok or load_tokenizer(path)
    return load_causal_lm(path).to(pick_device()), load_tokenizer(path)


def tokenizer_folder(ctx: StageContext, name: str, model_dir: str, tok) -> str:
    """A local folder holding the model's tokenizer files (a hub model's are saved under the stage)."""
    if Path(model_dir).expanduser().is_dir():
        return model_dir
    folder = ctx.out_dir / "tokenizers" / name
    tok.save_pretrained(str(folder))
    return str(folder)


def upstream_histories(ctx: StageContext) -> dict[str, dict]:
    """Training curves of every stage this eval's models came from that finished (sft included, which
    an eval rarely names: its merge stage is what it scores; one branch of a sweep, not its
    siblings), from their folders' metrics.jsonl (what their MLflow runs hold, and there even
    while MLflow does not answer)."""
    from llmlab.report import HISTORY_KEYS

    histories = {}
    ancestors, todo = set(), [ctx.inputs[n].stage for n in ctx.inputs]
    while todo:
        name = todo.pop()
        if name not in ancestors and name in ctx.spec.stage_names():
            ancestors.add(name)
            todo += list(ctx.spec.dependencies(name).values())
    for name in ctx.spec.stage_names()[: ctx.spec.stage_names().index(ctx.name)]:
        log = ctx.spec.stage_dir(name) / "metrics.jsonl"
        if name not in ancestors or not log.is_file():
            continue
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        histories[name] = {k: sorted((int(r["step"]), float(r[k])) for r in rows if k in r and "step" in r)
                           for k in HISTORY_KEYS}
    return histories


def score_benchmarks(ctx: StageContext, name: str, model: Any, tok: Any, scores: dict[str, Any]) -> dict[str, Any]:
    """The stage's lm-evaluation-harness tasks on one model: each task's metrics and standard errors as
    `bench/<task>/<metric>` (and `..._stderr`) in its scores, every scored document in
    `benchmarks/<model>/<task>.jsonl`; returns the results (their documents feed the contamination check)."""
    from llmlab.benchmarks.run import run_benchmarks
    from llmlab.checkpoint import atomic_write_text

    found = run_benchmarks(model, tok, ctx.config.benchmarks, ctx.spec.seed)
    folder = ctx.out_dir / "benchmarks" / name
    shown = []
    for task, result in found.items():
        for metric, value in result.metrics.items():
            scores[f"bench/{task}/{metric}"] = value
            if metric in result.stderr:
                scores[f"bench/{task}/{metric}_stderr"] = result.stderr[metric]
            shown.append(f"{task} {metric} {value:.3f}")
        atomic_write_text(folder / f"{task}.jsonl", "".join(json.dumps(s, default=str) + "\n" for s in result.samples))
    ctx.run.log_artifact(folder, f"benchmarks/{name}")
    print(f"[{ctx.name}] {name}: " + ", ".join(shown))
    return found


def upstream_training(ctx: StageContext, stage: str) -> list[tuple[list[Any], Any, float]]:
    """(sources, data kind, held-out share) of what every stage upstream of `stage`, and `stage` itself,
    trained on (a tokenizer's text is not the model's training data)."""
    spec, seen, todo, out = ctx.spec, set(), [stage], []
    while todo:
        name = todo.pop()
        if name in seen or name == "tokenizer" or name not in spec.stages:
            continue
        seen.add(name)
        todo += list(spec.dependencies(name).values())
        block = spec.stages[name]
        kind = ctx.kinds[block.kind]
        for field_name, data_kind in kind.data:
            sources = getattr(block, field_name, None) or []
            if sources and kind.name != "eval":
                out.append((list(sources), data_kind, float(getattr(block, "val_fraction", 0.0) or 0.0)))
    return out


def contamination(ctx: StageContext, benchmarked: dict[str, dict[str, Any]], results: dict[str, Any],
                  metrics: dict[str, float]) -> None:
    """For each model trained here and each benchmark task: the share of the task's documents whose
    n-grams occur in the training data upstream of the model (`bench/<task>/contamination`; models
    named by folder or hub name have no known training data and get none)."""
    from llmlab.benchmarks.contamination import NgramIndex, share_seen, training_texts

    documents = [d for per_task in benchmarked.values() for r in per_task.values() for d in r.documents]
    sizes = NgramIndex(ctx.config.contamination_ngram).sizes_for(documents)
    # one index per stage's training data, read once however many models downstream of it are benchmarked
    indexes: dict[str, NgramIndex] = {}
    for name, per_task in benchmarked.items():
        if name not in ctx.config.model_stages:
            continue
        stage = ctx.inputs[name].stage  # the concrete stage (a branch or a round) whose model this is
        parts = []
        for sources, kind, val_fraction in upstream_training(ctx, stage):
            key = json.dumps([[s.model_dump() for s in sources], kind.name, val_fraction])
            if key not in indexes:
                indexes[key] = NgramIndex(ctx.config.contamination_ngram)
                indexes[key].add_texts(training_texts(sources, kind, ctx.spec.seed, val_fraction), sizes)
            parts.append(indexes[key])
        for task, result in per_task.items():
            share = share_seen(parts, result.documents)
            results["models"][name][f"bench/{task}/contamination"] = share
            metrics[f"{name}/bench/{task}/contamination"] = share
            if share > 0:
                print(f"[{ctx.name}] {name}: {share:.1%} of {task}'s documents occur in its training data")


def run_eval(ctx: StageContext) -> tuple[dict[str, str], dict[str, float]]:
    """Score every model on the same held-out batches, tasks and pairs; samples from fixed prompts; a report."""
    import numpy as np

    from llmlab.checkpoint import atomic_write_json
    from llmlab.data.preference import preference_pairs
    from llmlab.data.pretrain import eval_batches, prepare_pretrain_data
    from llmlab.data.tasks import cut_at_end_of_turn
    from llmlab.device import pick_device
    from llmlab.errors import UserError
    from llmlab.evaluate import (
        checkable_prompts,
        perplexity,
        preference_wins,
        score_preferences,
        score_tasks,
        unigram_perplexity,
    )
    from llmlab.generate import generate
    from llmlab.models import model_context
    from llmlab.report import write_report
    from llmlab.rewards import load_reward

    stage, spec = ctx.config, ctx.spec
    results: dict[str, Any] = {"pipeline": spec.name, "stage": ctx.name, "prompts": stage.prompts,
                               "temperature": stage.temperature, "batches": stage.batches,
                               "batch_sequences": stage.batch_sequences, "models": {},
                               "text_sources": [s.path for s in stage.data],
                               "preference_sources": [s.path for s in stage.preferences],
                               "model_order": [name for name, _ in evaluated(ctx)]}
    metrics: dict[str, float] = {}
    tasks = checkable_prompts(stage.tasks, stage.tasks_limit)
    if tasks:
        results["tasks"] = {"prompts": len(tasks), "sources": [s.model_dump() for s in stage.tasks]}
    reward_fn, reward_name = None, stage.reward or (f"reward stage {stage.reward_stage}" if stage.reward_stage else None)
    if reward_name is not None:
        if not tasks:
            raise UserError(f"eval stage '{ctx.name}': `reward` scores the completions of `tasks` prompts; add a tasks source")
        reward_fn = load_reward(ctx.inputs[stage.reward_stage].outputs["model"] if stage.reward_stage else stage.reward,
                                device=str(pick_device()))
    benchmarked: dict[str, dict[str, Any]] = {}  # model -> task -> BenchmarkResult
    harness_seconds = 0.0
    for name, model_dir in evaluated(ctx):
        model, tok = load_evaluated(model_dir)
        seq_len = stage.seq_len or min(model_context(model), MAX_EVAL_CONTEXT)
        scores: dict[str, Any] = {}
        if stage.data:
            data = prepare_pretrain_data(stage.data, tokenizer_folder(ctx, name, model_dir, tok), seq_len, spec.seed,
                                         stage.val_fraction, None)
            batches = eval_batches(data.val_path, seq_len, stage.batch_sequences, stage.batches)
            scores.update(perplexity(model, batches))
            train_tokens = np.memmap(data.train_path, dtype=data.meta["dtype"], mode="r")
            scores["unigram_ppl"] = unigram_perplexity(train_tokens, batches, len(tok))
            results["seq_len"] = seq_len
            results["val_tokens"] = int(sum(b.numel() for b in batches))
        samples = generate(model, tok, stage.prompts, stage.max_new_tokens, stage.temperature, seed=spec.seed,
                           prefix_ids=[tok.eos_token_id] if tok.eos_token_id is not None else None)
        if stage.preferences:  # the named split's rows, tokenized with this model's template
            prefs = preference_pairs(stage.preferences, tok, seq_len, stage.preferences_limit)
            score_preferences(preference_wins(model, prefs, tok.pad_token_id), prefs, scores)
            results["preferences"] = {"pairs": len(prefs)}
        if tasks:
            ended = score_tasks(model, tok, tasks, stage.task_max_new_tokens, reward_fn, scores)
            results.setdefault("task_samples", {})[name] = [
                {"prompt": t.prompt, "answer": t.answer, "family": t.family, "completion": cut_at_end_of_turn(c)}
                for t, c in list(zip(tasks, ended))[:10]]
        if stage.benchmarks:
            started = time.perf_counter()
            benchmarked[name] = score_benchmarks(ctx, name, model, tok, scores)
            harness_seconds += time.perf_counter() - started
        results["models"][name] = {**scores, "samples": samples}
        for key, value in scores.items():
            if isinstance(value, float):
                metrics[f"{name}/{key}"] = value
        for metric in ("exact_match", "preference_accuracy"):
            for family, share in scores.get(f"{metric}_by_family", {}).items():
                metrics[f"{name}/{metric}/{family}"] = share["value"]
        em = f", exact match {scores['exact_match']:.3f} on {len(tasks)} held-out tasks" if tasks else ""
        em += f", preference accuracy {scores['preference_accuracy']:.3f}" if "preference_accuracy" in scores else ""
        em += f", mean reward ({reward_name}) {scores['reward_mean']:.3f}" if "reward_mean" in scores else ""
        text = (f"loss {scores['eval/loss']:.4f} ppl {scores['eval/ppl']:.2f} (unigram {scores['unigram_ppl']:.2f})"
                if "eval/loss" in scores else "")
        print(f"[{ctx.name}] {name}: {text}{em}".replace(": , ", ": "))
    if benchmarked:
        from llmlab.estimate import MEASURED_FIXED

        metrics[MEASURED_FIXED] = harness_seconds  # seconds in the harness: plan counts them apart from the models' work
        results["contamination_ngram"] = stage.contamination_ngram
        contamination(ctx, benchmarked, results, metrics)
    ctx.log(metrics, 0)
    results_file = ctx.out_dir / "results.json"
    atomic_write_json(results_file, results)
    files = write_report(results, upstream_histories(ctx), ctx.out_dir)
    ctx.run.log_artifact(results_file)
    for path in files:
        ctx.run.log_artifact(path, None if path.suffix in (".md", ".html") else "plots")
    return {"results": str(results_file), "report": str(ctx.out_dir / "report.md")}, metrics


def _models(block: Any) -> list[NamedModel]:
    named = [NamedModel(m.path, f"evaluated model '{m.name}'", "causal") for m in block.models]
    return named + reward_models(block)


def _describe(spec: Any, block: Any, est: Any) -> str:
    scored = len(block.model_stages) + len(block.models)
    parts = [f"{block.batches} held-out text batches"]
    parts += [f"{block.tasks_limit} task prompts"] if block.tasks else []
    parts += [f"{block.preferences_limit} pairs"] if block.preferences else []
    return f"{scored} model{'s' if scored != 1 else ''} on " + ", ".join(parts)


BENCHMARK_DOCS = 500  # documents a benchmark without `limit` is counted as, for time estimates
SCORED_TOKENS = 64  # tokens a preference pair's answer or a benchmark document is counted as
BENCHMARK_DOC_SECONDS = 0.0033  # lm-evaluation-harness's own work per document and model (bench/plan_accuracy.py)


def _work(block: EvalStage, est: Any) -> Any:
    """Per model scored: the held-out text's tokens and each pair and benchmark document forward
    (2 x parameters per token); the task answers, the shown continuations and generated benchmark
    answers decoded; and the harness's own time per benchmark document."""
    from llmlab.estimate import Work

    models = len(block.inputs) + len(block.models)
    forward = block.batches * block.batch_sequences * (block.seq_len or est.seq_len) if block.data else 0
    forward += block.preferences_limit * 2 * SCORED_TOKENS if block.preferences else 0
    forward += sum((b.limit or BENCHMARK_DOCS) * SCORED_TOKENS for b in block.benchmarks)
    decode = block.tasks_limit * block.task_max_new_tokens if block.tasks else 0
    decode += len(block.prompts) * block.max_new_tokens
    decode += sum((b.limit or BENCHMARK_DOCS) * block.task_max_new_tokens for b in block.benchmarks if "gen" in b.task)
    flops_per_token = 2 * (est.params or 0)
    documents = sum(b.limit or BENCHMARK_DOCS for b in block.benchmarks)
    return Work(models * forward * flops_per_token, models * decode * flops_per_token,
                fixed_seconds=models * documents * BENCHMARK_DOC_SECONDS)


KIND = StageKind(
    name="eval", config=EvalStage, run=run_eval, main_output="results",
    summary="score models on held-out text, tasks and pairs",
    data=(("data", TEXT), ("tasks", PROMPTS), ("preferences", PREFERENCE)), models=_models, describe=_describe,
    work=_work)

