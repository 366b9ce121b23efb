"""The preferences stage: on-policy preference pairs from a model's own samples.

For each training prompt, `samples_per_prompt` answers are sampled from the starting model (batched,
KV-cached: the RL sampler) and scored with the stage's reward; the best and the worst non-empty answer become
a chosen / rejected pair when their scores differ by more than `min_margin` (with
`answer_as_chosen`, a prompt whose samples all tie keeps the row's `answer` as chosen and its worst
sample as rejected). Outputs: `pairs/pairs.jsonl` (format `plain`: prompt messages, chosen,
rejected, and their scores) and `model`, the starting model's folder passed through, so a dpo stage
that starts `from` this stage trains that same model on these pairs.
"""

from __future__ import annotations

import json
import random
from typing import TYPE_CHECKING, Any

from llmlab.data.formats import PROMPTS
from llmlab.runners.kind import StageKind, reward_models
from llmlab.spec.stages import PreferencesStage

if TYPE_CHECKING:
    from llmlab.runners.context import StageContext


def best_and_worst(scores: list[float], rng: random.Random, usable: list[int] | None = None) -> tuple[int, int]:
    """Indices of the highest and the lowest score among `usable` (default: all); ties broken at
    random (seeded), so the pair does not always take the first sample."""
    usable = list(range(len(scores))) if usable is None else usable
    top, bottom = max(scores[i] for i in usable), min(scores[i] for i in usable)
    return (rng.choice([i for i in usable if scores[i] == top]),
            rng.choice([i for i in usable if scores[i] == bottom]))


def run_preferences(ctx: StageContext) -> tuple[dict[str, str], dict[str, float]]:
    import torch

    from llmlab.checkpoint import atomic_dir
    from llmlab.data.prompts import prepare_prompt_data
    from llmlab.data.tasks import cut_at_end_of_turn
    from llmlab.device import pick_device
    from llmlab.errors import UserError
    from llmlab.generate import stop_token_ids
    from llmlab.models import load_causal_lm, model_context
    from llmlab.rewards import load_reward
    from llmlab.runners.common import base_model_dir, report_data
    from llmlab.tokenizer import ensure_chat_template, load_tokenizer
    from llmlab.train.rollout import Sampling, chunked, sample_rollout, score_completions

    stage, spec = ctx.config, ctx.spec
    base = base_model_dir(ctx)
    tok = load_tokenizer(stage.tokenizer or base)
    ensure_chat_template(tok)
    device = pick_device()
    model = load_causal_lm(base).to(device).eval()
    context = model_context(model)
    max_prompt = stage.max_prompt_length or context - stage.max_new_tokens
    if max_prompt < 1 or max_prompt + stage.max_new_tokens > context:
        raise UserError(f"stage '{ctx.name}': max_prompt_length ({max_prompt}) + max_new_tokens ({stage.max_new_tokens}) "
                         f"must fit the model's context of {context} tokens; lower max_new_tokens or max_prompt_length")
    data = prepare_prompt_data(stage.data, tok, max_prompt, spec.seed, 0.0, stage.max_prompts, max_val_prompts=0)
    report_data(ctx, data, "prompts")
    reward_name = stage.reward or f"reward stage {stage.reward_stage}"
    reward_fn = load_reward(ctx.inputs[stage.reward_stage].outputs["model"] if stage.reward_stage else stage.reward,
                            device=str(device))
    sampling = Sampling(stage.max_new_tokens, stage.temperature, stage.top_k, stage.top_p, stop_token_ids(tok, model),
                        tok.pad_token_id if tok.pad_token_id is not None else 0)
    k = stage.samples_per_prompt
    generator = torch.Generator(device=device).manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    rows, counts = [], {"prompts": 0, "with_signal": 0, "from_answer": 0, "best_scores": 0.0, "mean_scores": 0.0}
    for part in chunked(len(data.train), stage.batch_prompts):
        prompts = data.train[part]
        repeated = [p for p in prompts for _ in range(k)]  # prompt-major: each prompt's k samples together
        rollout = sample_rollout(model, tok, [p.ids for p in repeated], sampling, generator)
        scores = score_completions(reward_fn, repeated, rollout.completions, reward_name).tolist()
        for i, prompt in enumerate(prompts):
            own = scores[i * k:(i + 1) * k]
            answers = [cut_at_end_of_turn(c).strip() for c in rollout.completions[i * k:(i + 1) * k]]
            counts["prompts"] += 1
            counts["best_scores"] += max(own)
            counts["mean_scores"] += sum(own) / k
            usable = [j for j, a in enumerate(answers) if a]  # an empty answer makes no response to train on
            if not usable:
                continue
            best, worst = best_and_worst(own, rng, usable)
            chosen, chosen_score = answers[best], own[best]
            if own[best] - own[worst] <= stage.min_margin or chosen == answers[worst]:
                answer = prompt.extras.get("answer")
                if not stage.answer_as_chosen or answer is None or str(answer).strip() == answers[worst]:
                    continue
                chosen, chosen_score = str(answer), None
                counts["from_answer"] += 1
            else:
                counts["with_signal"] += 1
            rows.append({"prompt": prompt.messages, "chosen": chosen, "rejected": answers[worst],
                         "chosen_score": chosen_score, "rejected_score": own[worst],
                         **{key: value for key, value in prompt.extras.items() if key in ("answer", "task")}})
    if not rows:
        raise UserError(f"stage '{ctx.name}': no prompt gave a pair — every prompt's {k} samples scored the same under "
                         f"{reward_name}; sample more (samples_per_prompt), at a higher temperature, or set "
                         f"answer_as_chosen: true")
    target = ctx.out_dir / "pairs"
    with atomic_dir(target) as tmp:
        (tmp / "pairs.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    n = max(counts["prompts"], 1)
    metrics = {"preferences/pairs": float(len(rows)), "preferences/prompts": float(counts["prompts"]),
               "preferences/signal_share": counts["with_signal"] / n, "preferences/from_answer_share": counts["from_answer"] / n,
               "preferences/best_of_n": counts["best_scores"] / n, "preferences/mean_score": counts["mean_scores"] / n}
    ctx.log(metrics, 0)
    ctx.run.set_tags({"llmlab.reward": reward_name})
    ctx.run.log_artifact(target / "pairs.jsonl", "pairs")
    print(f"[{ctx.name}] {len(rows):,} pairs from {counts['prompts']:,} prompts x {k} samples: "
          f"{counts['with_signal']:,} with a better and a worse sample, {counts['from_answer']:,} with the answer as "
          f"chosen; best-of-{k} {metrics['preferences/best_of_n']:.3f}, mean score {metrics['preferences/mean_score']:.3f}")
    return {"pairs": str(target), "model": base}, metrics


def _describe(spec: Any, block: Any, est: Any) -> str:
    prompts = f"up to {block.max_prompts:,}" if block.max_prompts else "all"
    return f"{prompts} prompts x {block.samples_per_prompt} samples, the best and the worst of each kept as a pair"


KIND = StageKind(
    name="preferences", config=PreferencesStage, run=run_preferences, main_output="pairs",
    summary="sample answers, score them, write preference pairs", data=(("data", PROMPTS),), policy=True,
    models=reward_models, describe=_describe)

