"""Rollouts for online RL: sample completions, score them, and feed PPO/GRPO mini-batches to the loop.

    rollout = sample_rollout(policy, prompts, sampling, generator)    # batched, KV-cached
    logits, logps, values, entropy = policy_logps(policy, rollout.input_ids, rollout.attention_mask,
                                         rollout.prompt_width, temperature)
    scores = score_completions(reward_fn, prompts, rollout.completions)

Log-probabilities are always computed on the token ids that were sampled (the sequence is never
decoded and re-tokenised), with one forward pass over prompt + completion whose logits are divided
by the sampling temperature — the same function gives the "old" log-probs at rollout time and the
new ones in the loss, so the first PPO epoch's ratio is exactly 1. (top-k / top-p shape what is
sampled; the log-probs are those of the tempered, unfiltered distribution, as in TRL.) Dropout
must be off in the policy (`disable_dropout`), or old and new would differ by noise.

`RolloutBatches` is the loop's batch source for PPO and GRPO: when its queue is empty it takes the
next prompts, calls the method's `prepare(prompts, rollout_index)` (which samples, scores and
computes advantages), and queues `ppo_epochs` shuffled passes of mini-batches (each split into
`gradient_accumulation_steps` micro-batches). One loop step = one mini-batch update. Its state
(prompt cursor, rollout count, the pending queue) is checkpointed, so a resumed run continues with
the exact rollouts of the uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from llmlab.data.order import EpochWalk
from llmlab.data.prompts import Prompt
from llmlab.generate import positions_from_mask, sample
from llmlab.parallel import gather_objects
from llmlab.train.objectives import IGNORE_INDEX, chunk_tokens_for


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    stop_ids: list[int]
    pad_id: int


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (B, P + N): prompts left-padded to P, completions right-padded to N
    attention_mask: torch.Tensor  # (B, P + N)
    completion_mask: torch.Tensor  # (B, N) float: 1 on sampled tokens (stop token included)
    prompt_width: int  # P
    completions: list[str]  # decoded sampled tokens, stop token included
    stopped: torch.Tensor  # (B,) bool: the row ended with a stop token (else it hit max_new_tokens)
    seconds: float  # generation wall time


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (policy-gradient ratios need a deterministic policy):
    dropout modules, and attention dropout rates kept as floats (ours, transformers' Llama)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr in ("dropout", "attention_dropout", "attn_dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def sample_rollout(model: torch.nn.Module, tokenizer, prompts: list[list[int]], s: Sampling,
                   generator: torch.Generator | None) -> Rollout:
    """Sample one completion per prompt (batched, KV-cached, left-padded) and assemble the
    prompt + completion sequences the losses score."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, s.pad_id)
    ids, mask = ids.to(device), mask.to(device)
    start = time.perf_counter()
    out = sample(model, ids, mask, s.max_new_tokens, s.stop_ids, s.pad_id, s.temperature, s.top_k, s.top_p, generator)
    seconds = time.perf_counter() - start
    N = out.tokens.size(1)
    completion_mask = (torch.arange(N, device=device)[None, :] < out.lengths[:, None]).long()
    tokens = torch.where(completion_mask.bool(), out.tokens, torch.full_like(out.tokens, s.pad_id))
    completions, stopped = [], []
    for row, n in zip(tokens.tolist(), out.lengths.tolist()):
        completions.append(tokenizer.decode(row[:n], skip_special_tokens=False))
        stopped.append(n > 0 and row[n - 1] in s.stop_ids)
    return Rollout(torch.cat([ids, tokens], dim=1), torch.cat([mask, completion_mask], dim=1),
                   completion_mask.float(), ids.size(1), completions, torch.tensor(stopped), seconds)


def select_rollouts(parts: list[tuple[Rollout, list[int]]], pad_id: int) -> Rollout:
    """One rollout of the given rows of several rollouts (re-padded: prompts left, completions right,
    to the widest of them), e.g. the informative groups of several sampling rounds."""
    prompts, completions, stopped, texts, seconds = [], [], [], [], 0.0
    for r, rows in parts:
        seconds += r.seconds
        for i in rows:
            prompt_mask = r.attention_mask[i, :r.prompt_width].bool()
            prompts.append(r.input_ids[i, :r.prompt_width][prompt_mask])
            completions.append(r.input_ids[i, r.prompt_width:][r.completion_mask[i].bool()])
            stopped.append(bool(r.stopped[i]))
            texts.append(r.completions[i])
    P, N = max(len(x) for x in prompts), max((len(x) for x in completions), default=0)
    device = parts[0][0].input_ids.device
    ids = torch.full((len(prompts), P + N), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), P + N), dtype=torch.long, device=device)
    completion_mask = torch.zeros((len(prompts), N), device=device)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids[row, P - len(prompt):P], mask[row, P - len(prompt):P] = prompt, 1
        ids[row, P:P + len(completion)], mask[row, P:P + len(completion)] = completion, 1
        completion_mask[row, :len(completion)] = 1
    return Rollout(ids, mask, completion_mask, P, texts, torch.tensor(stopped), seconds)


def policy_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                 temperature: float, value_head: torch.nn.Module | None = None, chunked: str = "off",
                 chunk_tokens: int = 4096
                 ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(logits (B, N, V) / temperature, log-probs (B, N) of the sampled completion tokens, values
    (B, N) or None, entropies (B, N), detached): position P + t − 1 predicts completion token t.
    With `value_head`, the values are read from the final hidden states at the same positions (the
    input of the LM head). With chunking on (or "auto" and big logits; llmlab's model only) the
    log-probs and entropies come through the head in chunks and the logits are None."""
    positions = positions_from_mask(attention_mask)  # left-padded rows: positions count real tokens
    P = prompt_width
    n = chunk_tokens_for(model, input_ids.numel(), chunked, chunk_tokens)
    if n:
        targets = torch.full_like(input_ids, IGNORE_INDEX)
        targets[:, P - 1:-1] = input_ids[:, P:]
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, logps_targets=targets,
                    logps_temperature=temperature, logps_entropy=True, loss_chunk_tokens=n)
        values = None
        if value_head is not None:
            hidden = out.hidden[:, P - 1:-1]
            values = value_head(hidden.to(value_head.weight.dtype)).squeeze(-1).float()
        return None, out.logps[:, P - 1:-1], values, out.entropy[:, P - 1:-1].detach()
    captured: dict[str, torch.Tensor] = {}
    handle = None
    if value_head is not None:
        head = model.get_output_embeddings()
        handle = head.register_forward_hook(lambda mod, args, out: captured.__setitem__("hidden", args[0]))
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
    finally:
        if handle is not None:
            handle.remove()
    logits = logits[:, P - 1:-1].float() / temperature  # (B, P+N, V) -> (B, N, V)
    targets = input_ids[:, P:]  # (B, N)
    lse = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, targets[..., None]).squeeze(-1) - lse
    with torch.no_grad():
        entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    values = None
    if value_head is not None:
        hidden = captured["hidden"][:, P - 1:-1]  # (B, N, d_model)
        values = value_head(hidden.to(value_head.weight.dtype)).squeeze(-1).float()
    return logits, logps, values, entropy


def reward_kwargs(prompts: list[Prompt]) -> dict[str, list]:
    """The prompt rows' other columns, one list per column every row has (e.g. answer=[...]), and
    `prompt_messages`: each prompt's conversation (a reward model renders it with its own template)."""
    common = set.intersection(*(set(p.extras) for p in prompts)) if prompts else set()
    out = {k: [p.extras[k] for p in prompts] for k in sorted(common)}
    if prompts and all(p.messages for p in prompts) and "prompt_messages" not in out:
        out["prompt_messages"] = [p.messages for p in prompts]
    return out


def score_completions(reward_fn: Callable, prompts: list[Prompt], completions: list[str], name: str) -> torch.Tensor:
    """(B,) rewards from `reward_fn(prompt texts, completions, **columns)`; a clear error when the
    function returns the wrong number of values or something that is not a finite number."""
    scores = reward_fn([p.text for p in prompts], completions, **reward_kwargs(prompts))
    try:
        values = [float(v) for v in scores]
    except (TypeError, ValueError) as e:
        raise TypeError(f"reward {name!r} must return a list of numbers, one per completion; got {scores!r:.200}") from e
    if len(values) != len(completions):
        raise ValueError(f"reward {name!r} returned {len(values)} scores for {len(completions)} completions")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"reward {name!r} returned non-finite scores {bad[:5]}")
    return torch.tensor(values, dtype=torch.float32)


def chunked(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def rollout_logps(model: torch.nn.Module, rollout: Rollout, temperature: float, chunk: int,
                  value_head: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and values) of a whole rollout under `model`, `chunk` rows per forward."""
    logps, values = [], []
    for part in chunked(rollout.input_ids.size(0), chunk):
        _, lp, v, _ = policy_logps(model, rollout.input_ids[part], rollout.attention_mask[part], rollout.prompt_width,
                                temperature, value_head)
        logps.append(lp)
        if v is not None:
            values.append(v)
    return torch.cat(logps), (torch.cat(values) if values else None)


class Preparer(Protocol):
    """A method's rollout step: prompts -> row tensors (all (B, ...)) and rollout statistics. `draw(n)`
    gives n more prompts from the same stream (GRPO's dynamic sampling replaces uninformative ones)."""

    def __call__(self, prompts: list[Prompt], rollout_index: int,
                 draw: Callable[[int], list[Prompt]] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class RolloutBatches:
    """The loop's batch source for PPO/GRPO; see the module docstring. Micro-batches carry the row
    tensors, `prompt_width`, and the rollout's statistics as 0-d tensors under `stats/<name>`."""

    per_rank = True  # under torchrun each rank makes its own rollouts (the loop does not deal batches out)

    def __init__(self, prompts: list[Prompt], prepare: Preparer, prompts_per_rollout: int, mini_batch_size: int,
                 micro_batches: int, ppo_epochs: int, seed: int, amp: torch.dtype | None = None, device_type: str = "cpu",
                 rank: int = 0, world: int = 1):
        """`prompts_per_rollout` counts all ranks' prompts; rank r takes every world-th of them.
        `mini_batch_size` is this rank's share of an update's rows."""
        self.prompts, self.prepare = prompts, prepare
        self.rank, self.world = rank, world
        self.amp, self.device_type = amp, device_type  # the loop's autocast, so old and new log-probs match
        self.prompts_per_rollout, self.mini, self.micro, self.epochs = prompts_per_rollout, mini_batch_size, micro_batches, ppo_epochs
        self.micro_batch, self.unit = mini_batch_size // micro_batches, "completions"
        self.seed = seed
        self.walk = EpochWalk(len(prompts), seed, "prompts")
        self.rollouts = 0
        self.queue: list[dict[str, torch.Tensor]] = []
        self._cycle_start: float | None = None
        self._last_generation = 0.0

    def _fill(self) -> None:
        now = time.perf_counter()
        prompts = [self.prompts[self.walk.take()] for _ in range(self.prompts_per_rollout)][self.rank::self.world]
        key = self.rollouts * self.world + self.rank  # distinct samples per rank and rollout
        with torch.autocast(self.device_type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            rows, stats = self.prepare(prompts, key, draw=self._draw if self.world == 1 else None)
        gen = stats.pop("generation_seconds")
        # the share of the previous rollout-and-update cycle spent generating (first cycle: of the
        # rollout step itself)
        if self._cycle_start is not None:
            stats["rl/generation_share"] = self._last_generation / max(now - self._cycle_start, 1e-9)
        else:
            stats["rl/generation_share"] = gen / max(time.perf_counter() - now, 1e-9)
        self._cycle_start, self._last_generation = now, gen
        B = next(iter(rows.values())).size(0)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + key)
        extra = {"prompt_width": rows.pop("prompt_width")}
        extra.update({f"stats/{k}": torch.tensor(float(v)) for k, v in stats.items()})
        for _ in range(self.epochs):
            order = torch.randperm(B, generator=g)
            for mini in chunked(B, self.mini):
                idx = order[mini]
                for part in chunked(idx.numel(), idx.numel() // self.micro):
                    sel = idx[part]
                    self.queue.append({**{k: v[sel] for k, v in rows.items()}, **extra})
        self.rollouts += 1

    def _draw(self, n: int) -> list[Prompt]:
        """n more prompts from the stream (one process only: ranks would draw different numbers)."""
        return [self.prompts[self.walk.take()] for _ in range(n)]

    def next_batch(self) -> dict[str, torch.Tensor]:
        if not self.queue:
            self._fill()
        return self.queue.pop(0)

    def state_dict(self) -> dict:
        """Call on every rank: each rank's pending mini-batches are its own, so they are gathered."""
        return {"walk": self.walk.state_dict(), "rollouts": self.rollouts, "queues": gather_objects(list(self.queue)),
                "prepare": self.prepare.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.walk.load_state_dict(state["walk"])
        self.rollouts = int(state["rollouts"])
        queues = state["queues"]
        if len(queues) == self.world:
            self.queue = list(queues[self.rank])
        else:  # saved on another number of processes: the unfinished rollout's updates are dropped
            self.queue = []
            if self.rank == 0 and any(queues):
                print(f"resuming on {self.world} processes a run saved on {len(queues)}: the unfinished rollout's "
                      f"{sum(len(q) for q in queues)} pending micro-batches are dropped; the next rollout starts now")
        self.prepare.load_state_dict(state["prepare"])


def stats_metrics(batch: dict[str, Any], rows: int) -> dict[str, torch.Tensor]:
    """A micro-batch's rollout statistics, scaled by its rows (the loop averages summed metrics)."""
    return {k.split("/", 1)[1]: v * rows for k, v in batch.items() if k.startswith("stats/")}


@torch.no_grad()
def rl_evaluate(model: torch.nn.Module, tokenizer, prompts: list[Prompt], reward_fn: Callable, reward_name: str,
                s: Sampling, batch_size: int = 64) -> dict[str, float]:
    """Greedy completions of held-out prompts: mean reward, exact match (when the prompts have an
    `answer` column), mean completion length and the share that stopped on their own."""
    from llmlab.data.tasks import exact_match

    greedy = Sampling(s.max_new_tokens, 0.0, 0, 1.0, s.stop_ids, s.pad_id)
    rewards, hits, lengths, stopped = [], [], [], []
    for part in chunked(len(prompts), batch_size):
        chunk = prompts[part]
        r = sample_rollout(model, tokenizer, [p.ids for p in chunk], greedy, None)
        rewards += score_completions(reward_fn, chunk, r.completions, reward_name).tolist()
        lengths += r.completion_mask.sum(1).tolist()
        stopped += r.stopped.float().tolist()
        if all("answer" in p.extras for p in chunk):
            hits += [float(exact_match(c, str(p.extras["answer"]))) for c, p in zip(r.completions, chunk)]
    n = max(len(rewards), 1)
    out = {"eval/reward_mean": sum(rewards) / n, "eval/completion_length": sum(lengths) / n,
           "eval/stopped_share": sum(stopped) / n}
    if hits:
        out["eval/exact_match"] = sum(hits) / len(hits)
    return out
