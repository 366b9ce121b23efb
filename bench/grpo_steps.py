"""What GRPO steps do to a model's held-out exact match, step by step, from a given model folder.

    .venv/bin/python bench/grpo_steps.py MODEL_DIR [--optimizer adamw|sgd] [--lr 1e-4] [--steps 40] [--warmup 5] [--every 10]
                     [--temperature 1.0] [--kl 0.04] [--rollout-prompts 16] [--batch-prompts 8] [--lora R] [--fixed] [--seed 2]
                     [--negative-weight 1.0] [--answer-weight 0.0] [--answer-prompts N] [--answers-only N] [--no-dynamic] [--val 200]
                     [--eps E] [--beta2 B] [--max-group-mean M] [--rounds 4] [--ema D]
                     [--reward exact_match] [--greedy-in-group] [--no-std]

Runs llmlab's own GRPO rollout step (`GRPOPrepare`, dynamic sampling on) and objective
(`GRPOObjective`) with llmlab's AdamW or momentum SGD (`--optimizer`, built from the spec's
optimizer block) on the built-in task prompts, and prints greedy exact match on the
held-out validation prompts before the first step and every `--every` steps, with the rollouts' mean
reward and the k3 KL to the starting model. `--fixed` trains on the same prompts every rollout
(no dynamic sampling): the rollout reward on them must rise if the update is sound.
`--negative-weight 0` learns from rewarded completions only (negative advantages dropped);
`--answer-weight W` adds W x the NLL of each rollout prompt's reference answer (an SFT term through
the same log-prob path; `--answer-prompts N`: of N fresh training prompts a step instead); `--answers-only N` is the control without RL: each step that NLL on N fresh
training prompts; `--no-dynamic` keeps zero-variance groups; `--val N` scores N prompts;
`--max-group-mean M` trains only on groups with at most a share M of right answers (hard prompts;
`--rounds` extra sampling rounds to find them); `--ema D` also scores a moving average of the
weights (decay D) at each report; `--reward` scores the rollouts with another reward (e.g.
`partial_match`); `--greedy-in-group` makes one of each group's completions the greedy answer (the one
exact match scores); `--no-std` leaves the advantages r - mean(group) undivided by the group's std
(Dr. GRPO).

It isolates the RL step from the pipeline (no checkpoint selection, no schedule but a linear warmup):
docs/benchmarks.md ("What limits grpo") has what each of these did to the demo's dpo models.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmlab.data.prompts import prepare_prompt_data  # noqa: E402
from llmlab.data.sources import DataSource  # noqa: E402
from llmlab.data.tasks import exact_match  # noqa: E402
from llmlab.generate import stop_token_ids  # noqa: E402
from llmlab.lora import apply_lora, resolve_targets  # noqa: E402
from llmlab.models import load_causal_lm  # noqa: E402
from llmlab.optim import build_optimizer  # noqa: E402
from llmlab.rewards import load_reward  # noqa: E402
from llmlab.spec import TrainSpec  # noqa: E402
from llmlab.tokenizer import ensure_chat_template, load_tokenizer  # noqa: E402
import llmlab.train.grpo as grpo_module  # noqa: E402
from llmlab.train.grpo import GRPOObjective, GRPOPrepare  # noqa: E402
from llmlab.train.rollout import (  # noqa: E402
    Sampling, disable_dropout, policy_logps, rollout_logps, sample_rollout, score_completions, select_rollouts)

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model folder (e.g. runs/tiny/dpo/model)")
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--momentum", type=float, default=0.9, help="sgd's momentum")
    parser.add_argument("--eps", type=float, default=None, help="adamw's eps (default: the spec's)")
    parser.add_argument("--beta2", type=float, default=None, help="adamw's beta2 (default: the spec's)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="linear warmup steps")
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--kl", type=float, default=0.04, help="k3 KL coefficient (0: no reference)")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (GRPO's group size)")
    parser.add_argument("--rollout-prompts", type=int, default=16)
    parser.add_argument("--batch-prompts", type=int, default=8)
    parser.add_argument("--lora", type=int, default=0, help="train LoRA adapters of this rank on every linear layer (0: all weights)")
    parser.add_argument("--fixed", action="store_true", help="the same prompts every rollout, no dynamic sampling")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--negative-weight", type=float, default=1.0,
                        help="scale of negative advantages (0: learn from rewarded completions only)")
    parser.add_argument("--answer-weight", type=float, default=0.0, help="weight of the NLL of the prompts' reference answers")
    parser.add_argument("--answer-prompts", type=int, default=0, metavar="N",
                        help="with --answer-weight: the NLL on N fresh training prompts a step instead of the rollout's")
    parser.add_argument("--answers-only", type=int, default=0, metavar="N",
                        help="the control: no RL, each step the NLL of N fresh prompts' reference answers")
    parser.add_argument("--no-dynamic", action="store_true", help="keep zero-variance groups (no dynamic sampling)")
    parser.add_argument("--val", type=int, default=200, help="held-out validation prompts")
    parser.add_argument("--max-group-mean", type=float, default=None,
                        help="dynamic sampling keeps only groups whose mean reward is at most this (hard prompts)")
    parser.add_argument("--ema", type=float, default=0.0,
                        help="also score an exponential moving average of the weights with this decay (0: off)")
    parser.add_argument("--reward", default="exact_match", help="the rollouts' reward (a built-in name or module:function)")
    parser.add_argument("--greedy-in-group", action="store_true",
                        help="one of each group's completions is the greedy answer (the one exact match scores)")
    parser.add_argument("--no-std", action="store_true",
                        help="advantages r - mean(group), not divided by the group's std (Dr. GRPO)")
    parser.add_argument("--rounds", type=int, default=4, help="dynamic sampling's extra rounds per rollout at most")
    args = parser.parse_args()
    if args.max_group_mean is not None and (args.fixed or args.no_dynamic):
        parser.error("--max-group-mean chooses which groups dynamic sampling keeps; drop --fixed / --no-dynamic")
    if not 0.0 <= args.ema < 1.0:
        parser.error(f"--ema is a decay in [0, 1) (0: off), not {args.ema}")
    torch.manual_seed(args.seed)
    tok = load_tokenizer(args.model)
    ensure_chat_template(tok)
    model = load_causal_lm(args.model)
    disable_dropout(model)
    data = prepare_prompt_data([DataSource(path="builtin:tasks-prompts")], tok, 100, args.seed, 0.05, None,
                               max_val_prompts=args.val)
    reward = load_reward(args.reward)
    sampling = Sampling(12, args.temperature, 0, 1.0, stop_token_ids(tok, model),
                        tok.pad_token_id if tok.pad_token_id is not None else 0)
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    if args.lora:
        model = apply_lora(model, args.lora, 2.0 * args.lora, 0.0, resolve_targets(model, "all"))
    micro = args.batch_prompts * args.group
    greedy = Sampling(12, 0.0, 0, 1.0, sampling.stop_ids, sampling.pad_id)
    if args.no_std:
        grpo_module.group_advantages = lambda r, g: (r.view(-1, g) - r.view(-1, g).mean(dim=1, keepdim=True)).view(-1)

    class Prepare(GRPOPrepare):
        def _sample(self, prompts, g):
            if not args.greedy_in_group:
                return super()._sample(prompts, g)
            G = self.group_size
            sampled = sample_rollout(self.model, self.tokenizer, [p.ids for p in prompts for _ in range(G - 1)], self.s, g)
            best = sample_rollout(self.model, self.tokenizer, [p.ids for p in prompts], greedy, None)
            parts = [part for i in range(len(prompts)) for part in ((sampled, list(range(i * (G - 1), (i + 1) * (G - 1)))),
                                                                     (best, [i]))]
            r = select_rollouts(parts, self.s.pad_id)
            return r, score_completions(self.reward_fn, [p for p in prompts for _ in range(G)], r.completions, self.reward_name)

        def wanted_groups(self, scores: torch.Tensor) -> torch.Tensor:
            keep = super().wanted_groups(scores)
            if args.max_group_mean is not None:  # hard prompts only: few of the group's answers right
                keep &= scores.view(-1, self.group_size).mean(dim=1) <= args.max_group_mean
            return keep

    prepare = Prepare(model, (lambda r: rollout_logps(frozen, r, args.temperature, micro)[0]) if args.kl else None,
                      tok, reward, args.reward, sampling, args.group, micro, args.seed, not (args.fixed or args.no_dynamic),
                      args.rounds)
    objective = GRPOObjective(0.2, args.kl, args.temperature)
    adam = {k: v for k, v in (("eps", args.eps), ("beta2", args.beta2)) if v is not None}
    spec = TrainSpec(optimizer={"name": args.optimizer, **({"momentum": args.momentum} if args.optimizer == "sgd" else adam)})
    optimizer = build_optimizer(model, spec.optimizer, args.lr, 0.0)

    trained = [p for p in model.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in trained] if args.ema else []

    def update_ema() -> None:
        with torch.no_grad():
            for e, p in zip(ema, trained):
                e.mul_(args.ema).add_(p, alpha=1.0 - args.ema)

    def held_out() -> str:
        """Greedy exact match on the validation prompts, overall and per task family."""
        model.eval()
        hits: dict[str, list[float]] = {}
        with torch.no_grad():
            for i in range(0, len(data.val), 64):
                chunk = data.val[i:i + 64]
                r = sample_rollout(model, tok, [p.ids for p in chunk], greedy, None)
                for c, p in zip(r.completions, chunk):
                    hits.setdefault(p.extras.get("task", "?"), []).append(float(exact_match(c, str(p.extras["answer"]))))
        model.train()
        every = [h for v in hits.values() for h in v]
        return f"{sum(every) / len(every):.3f} (" + ", ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in sorted(hits.items())) + ")"

    def scored() -> str:
        """held_out() of the weights, and with --ema of their moving average too."""
        text = held_out()
        if ema:
            with torch.no_grad():
                kept = [p.detach().clone() for p in trained]
                for e, p in zip(ema, trained):
                    p.copy_(e)
                text += f"; ema {held_out()}"
                for k, p in zip(kept, trained):
                    p.copy_(k)
        return text

    print(f"model {args.model}: {len(data.val)} held-out prompts, {args.optimizer} lr {args.lr}, temperature {args.temperature}, "
          f"kl {args.kl}, {args.rollout_prompts} prompts x {args.group} per rollout, {micro} completions per step"
          + (", fixed prompts" if args.fixed else "") + (f", LoRA r={args.lora}" if args.lora else ""))
    print(f"step 0: held-out exact match {held_out()}", flush=True)
    position, step, rollout, start = 0, 0, 0, time.perf_counter()

    end = tok.convert_tokens_to_ids("<|im_end|>")

    def answer_nll(ps) -> torch.Tensor:
        comps = [tok.encode(p.extras["answer"], add_special_tokens=False) + [end] for p in ps]
        P, N = max(len(p.ids) for p in ps), max(len(c) for c in comps)
        ids = torch.full((len(ps), P + N), sampling.pad_id)
        am = torch.zeros((len(ps), P + N), dtype=torch.long)
        cm = torch.zeros((len(ps), N))
        for i, (p, c) in enumerate(zip(ps, comps)):
            ids[i, P - len(p.ids):P], am[i, P - len(p.ids):P] = torch.tensor(p.ids), 1
            ids[i, P:P + len(c)], am[i, P:P + len(c)], cm[i, :len(c)] = torch.tensor(c), 1, 1
        _, lp, _, _ = policy_logps(model, ids, am, P, 1.0)
        return -((lp * cm).sum(1) / cm.sum(1)).mean()

    def draw(n: int) -> list:
        nonlocal position
        position += n
        return data.train[position - n:position]

    while args.answers_only and step < args.steps:  # the control: supervised steps, no rollouts
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        optimizer.zero_grad()
        answer_nll(draw(args.answers_only)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % args.every == 0:
            print(f"step {step}: held-out exact match {held_out()} ({time.perf_counter() - start:.0f} s)", flush=True)
    while step < args.steps:
        prompts = data.train[:args.rollout_prompts] if args.fixed else draw(args.rollout_prompts)
        rows, stats = prepare(prompts, rollout, None if args.fixed else draw)
        if args.negative_weight != 1.0:
            adv = rows["advantages"]
            rows["advantages"] = torch.where(adv < 0, adv * args.negative_weight, adv)
        rollout += 1
        for i in range(0, rows["input_ids"].size(0), micro):
            batch = {k: (v[i:i + micro] if v.dim() else v) for k, v in rows.items()}
            for group in optimizer.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
            loss_sum, metrics = objective(model, batch)
            n = objective.count(batch)
            optimizer.zero_grad()
            total = loss_sum / n
            if args.answer_weight:
                total = total + args.answer_weight * answer_nll(draw(args.answer_prompts) if args.answer_prompts else prompts)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if ema:
                update_ema()
            step += 1
            if step % args.every == 0 or args.fixed:
                kl = float(metrics["rl/kl"]) / n
                print(f"step {step}: held-out exact match {scored()}, rollout reward {stats['rl/reward_mean']:.3f}, "
                      f"kl {kl:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
            if step >= args.steps:
                break


if __name__ == "__main__":
    main()
