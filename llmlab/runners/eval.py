"""The eval stage: every input model scored on the same held-out batches, samples, a report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llmlab.checkpoint import atomic_write_json
from llmlab.data.preference import preference_pairs
from llmlab.data.pretrain import eval_batches, prepare_pretrain_data
from llmlab.data.tasks import cut_at_end_of_turn
from llmlab.device import pick_device
from llmlab.evaluate import (
    checkable_prompts,
    exact_match_accuracy,
    perplexity,
    preference_accuracy,
    render_user_prompts,
    unigram_perplexity,
)
from llmlab.generate import generate
from llmlab.models import load_causal_lm, model_context
from llmlab.report import write_report
from llmlab.rewards import load_reward
from llmlab.runners.context import StageContext
from llmlab.tokenizer import load_tokenizer
from llmlab.tracking import stage_histories


MAX_EVAL_CONTEXT = 2048  # held-out text is scored in blocks of at most this many tokens (a hub model's context can be 32k)


def evaluated(ctx: StageContext) -> list[tuple[str, str]]:
    """(display name, model folder or hub name) of every model the stage scores: `from` stages first."""
    stage = ctx.config
    return ([(name, ctx.inputs[name].outputs["model"]) for name in stage.model_stages]
            + [(m.name, m.path) for m in stage.models])


def tokenizer_folder(ctx: StageContext, name: str, model_dir: str, tok) -> str:
    """A local folder holding the model's tokenizer files (a hub model's are saved under the stage)."""
    if Path(model_dir).expanduser().is_dir():
        return model_dir
    folder = ctx.out_dir / "tokenizers" / name
    tok.save_pretrained(str(folder))
    return str(folder)


def run_eval(ctx: StageContext) -> tuple[dict[str, str], dict[str, float]]:
    """Score every input model on the same held-out batches; samples from fixed prompts; a report."""
    stage, spec = ctx.config, ctx.spec
    results: dict[str, Any] = {"pipeline": spec.name, "stage": ctx.name, "prompts": stage.prompts,
                               "temperature": stage.temperature, "batches": stage.batches,
                               "batch_sequences": stage.batch_sequences, "models": {},
                               "model_order": [name for name, _ in evaluated(ctx)]}
    metrics: dict[str, float] = {}
    pairs = checkable_prompts(stage.tasks, stage.tasks_limit)
    if pairs:
        results["tasks"] = {"prompts": len(pairs), "sources": [s.model_dump() for s in stage.tasks]}
    reward_fn, reward_name = None, stage.reward or (f"reward stage {stage.reward_stage}" if stage.reward_stage else None)
    if reward_name is not None:
        if not pairs:
            raise ValueError(f"eval stage '{ctx.name}': `reward` scores the completions of `tasks` prompts; add a tasks source")
        reward_fn = load_reward(ctx.inputs[stage.reward_stage].outputs["model"] if stage.reward_stage else stage.reward,
                                device=str(pick_device()))
    for name, model_dir in evaluated(ctx):
        model = load_causal_lm(model_dir).to(pick_device())
        tok = load_tokenizer(model_dir)
        seq_len = stage.seq_len or min(model_context(model), MAX_EVAL_CONTEXT)
        data = prepare_pretrain_data(stage.data, tokenizer_folder(ctx, name, model_dir, tok), seq_len, spec.seed,
                                     stage.val_fraction, None)
        batches = eval_batches(data.val_path, seq_len, stage.batch_sequences, stage.batches)
        scores = perplexity(model, batches)
        train_tokens = np.memmap(data.train_path, dtype=data.meta["dtype"], mode="r")
        scores["unigram_ppl"] = unigram_perplexity(train_tokens, batches, len(tok))
        samples = generate(model, tok, stage.prompts, stage.max_new_tokens, stage.temperature, seed=spec.seed,
                           prefix_ids=[tok.eos_token_id] if tok.eos_token_id is not None else None)
        if stage.preferences:  # the named split's rows, tokenized with this model's template
            prefs = preference_pairs(stage.preferences, tok, seq_len, stage.preferences_limit)
            scores["preference_accuracy"] = preference_accuracy(model, prefs, tok.pad_token_id)
            results["preferences"] = {"pairs": len(prefs)}
        if pairs:
            scores["exact_match"], ended = exact_match_accuracy(model, tok, pairs, with_stop=True)
            if reward_fn is not None:  # scored as RL scores rollouts: the prompt as rendered, the stop token kept
                rewards = reward_fn(render_user_prompts(tok, [p for p, _ in pairs]), ended, answers=[a for _, a in pairs])
                scores["reward_mean"] = sum(rewards) / len(rewards)
            answers = [cut_at_end_of_turn(c) for c in ended]
            results.setdefault("task_samples", {})[name] = [
                {"prompt": p, "answer": a, "completion": c} for (p, a), c in list(zip(pairs, answers))[:10]]
        results["models"][name] = {**scores, "samples": samples}
        results["seq_len"] = seq_len
        results["val_tokens"] = int(sum(b.numel() for b in batches))
        for key, value in scores.items():
            metrics[f"{name}/{key}"] = value
        em = f", exact match {scores['exact_match']:.3f} on {len(pairs)} held-out tasks" if pairs else ""
        em += f", preference accuracy {scores['preference_accuracy']:.3f}" if "preference_accuracy" in scores else ""
        em += f", mean reward ({reward_name}) {scores['reward_mean']:.3f}" if "reward_mean" in scores else ""
        print(f"[{ctx.name}] {name}: loss {scores['eval/loss']:.4f} ppl {scores['eval/ppl']:.2f} "
              f"(unigram {scores['unigram_ppl']:.2f}){em}")
    ctx.log(metrics, 0)
    results_file = ctx.out_dir / "results.json"
    atomic_write_json(results_file, results)
    histories = {name: stage_histories(ctx.run.client, ctx.inputs[name].mlflow_run_id) for name in stage.model_stages
                 if ctx.inputs[name].mlflow_run_id}
    files = write_report(results, histories, ctx.out_dir)
    ctx.run.log_artifact(results_file)
    for path in files:
        ctx.run.log_artifact(path, None if path.suffix in (".md", ".html") else "plots")
    return {"results": str(results_file), "report": str(ctx.out_dir / "report.md")}, metrics
