"""Rollout throughput and a GRPO step-time breakdown, one run.

    .venv/bin/python bench/rollout.py [--d-model 256] [--layers 4] [--prompts 64] [--new 32] [--repeats 3]

Generation, every way producing exactly `--new` tokens per prompt (stop tokens ignored, so the
work is equal) from the same weights and the same prompts (built-in task prompts, chat-rendered):

- ours:          llmlab.generate.sample — batched, left-padded, one KV cache for the batch
- transformers:  LlamaForCausalLM.generate() (its KV cache, batched, left-padded) on our model
                 exported to stock Llama (`llmlab export --format llama`: same logits)
- ours on stock: llmlab.generate.sample driving that stock LlamaForCausalLM (the sampler every
                 stage uses for any transformers model): against its own generate(), same weights
- one by one:    one prompt at a time, no cache (a full forward over the whole sequence per token)

Then one GRPO step of the tiny demo's shape (group 8, batch = prompts x 8 completions,
mini-batch 64, one epoch): time spent generating, scoring, computing old and reference
log-probs, and in the updates. Medians of interleaved repeats; results go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def build(d_model: int, layers: int, vocab: int, seq: int):
    from llmlab.model import LlmlabConfig, build_model

    cfg = LlmlabConfig(d_model=d_model, n_heads=d_model // 64, n_kv_heads=max(d_model // 128, 1),
                       d_ff=int(d_model * 8 / 3) // 8 * 8, n_layers=layers, vocab_size=vocab, max_seq_len=seq,
                       positional_encoding="rope", attention_type="gqa", norm_type="rmsnorm", activation="swiglu")
    return build_model(cfg, seed=0).eval()


def task_prompts(tok, n: int) -> list[list[int]]:
    from llmlab.data.tasks import prompt_rows

    rows = list(prompt_rows("train", size=n))
    texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                     add_generation_prompt=True) for r in rows]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def ours(model, prompts, new: int) -> float:
    from llmlab.generate import sample
    from llmlab.train.rollout import left_pad

    ids, mask = left_pad(prompts, 0)
    t = time.perf_counter()
    out = sample(model, ids, mask, new, None, 0, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (len(prompts), new)
    return time.perf_counter() - t


def transformers_generate(llama, prompts, new: int) -> float:
    from llmlab.train.rollout import left_pad

    ids, mask = left_pad(prompts, 0)
    t = time.perf_counter()
    with torch.no_grad():
        out = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=True,
                             temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=None)
    assert out.shape[1] == ids.shape[1] + new
    return time.perf_counter() - t


def one_by_one_uncached(model, prompts, new: int) -> float:
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    with torch.no_grad():
        for p in prompts:
            seq = torch.tensor([p])
            for _ in range(new):
                logits = model(seq).logits[:, -1].float()
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=g)
                seq = torch.cat([seq, nxt], dim=1)
    return time.perf_counter() - t


def grpo_breakdown(model, tok, prompts_ids, new: int, group: int = 8, mini: int = 64) -> dict[str, float]:
    import copy

    from llmlab.data.prompts import Prompt
    from llmlab.rewards import load_reward
    from llmlab.train.grpo import GRPOObjective
    from llmlab.train.rl import group_advantages
    from llmlab.train.rollout import Sampling, rollout_logps, sample_rollout, score_completions

    policy = copy.deepcopy(model).train()
    ref = copy.deepcopy(model).eval()
    prompts = [Prompt(ids, tok.decode(ids), {"answer": "1"}) for ids in prompts_ids]
    repeated = [p for p in prompts for _ in range(group)]
    s = Sampling(new, 1.0, 0, 1.0, [], 0)
    reward = load_reward("exact_match")
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    t0 = time.perf_counter()
    r = sample_rollout(policy, tok, [p.ids for p in repeated], s, torch.Generator().manual_seed(0))
    t1 = time.perf_counter()
    scores = score_completions(reward, repeated, r.completions, "exact_match")
    adv = group_advantages(scores + torch.rand(scores.shape), group)
    t2 = time.perf_counter()
    old, _ = rollout_logps(policy, r, 1.0, mini)
    t3 = time.perf_counter()
    ref_logps, _ = rollout_logps(ref, r, 1.0, mini)
    t4 = time.perf_counter()
    objective = GRPOObjective(0.2, 0.04, 1.0)
    B = len(repeated)
    for i in range(0, B, mini):
        sl = slice(i, i + mini)
        batch = {"input_ids": r.input_ids[sl], "attention_mask": r.attention_mask[sl], "completion_mask": r.completion_mask[sl],
                 "old_logps": old[sl], "ref_logps": ref_logps[sl], "advantages": adv[sl],
                 "prompt_width": torch.tensor(r.prompt_width)}
        loss, _ = objective(policy, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    t5 = time.perf_counter()
    return {"generate": t1 - t0, "score": t2 - t1, "old logps": t3 - t2, "reference logps": t4 - t3,
            "updates": t5 - t4, "total": t5 - t0, "tokens": float(r.completion_mask.sum())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    from transformers import LlamaForCausalLM

    from llmlab.export import export_model
    from llmlab.tokenizer import train_tokenizer

    tmp = tempfile.mkdtemp()
    from itertools import islice

    from llmlab.data.sources import iter_texts
    from llmlab.data.tasks import sft_rows

    texts = list(islice(iter_texts("builtin:stdlib"), 3000))  # English docstrings, as the demo's tokenizer
    texts += [m["content"] for r in sft_rows("train", size=2000) for m in r["messages"]]
    tok = train_tokenizer(texts, args.vocab, f"{tmp}/tok")
    model = build(args.d_model, args.layers, len(tok), 256)
    model.save_pretrained(f"{tmp}/model")
    tok.save_pretrained(f"{tmp}/model")
    export_model(f"{tmp}/model", f"{tmp}/llama", "llama")
    llama = LlamaForCausalLM.from_pretrained(f"{tmp}/llama", dtype=torch.float32).eval()
    prompts = task_prompts(tok, args.prompts)
    ways = {"ours (batched, KV cache)": lambda: ours(model, prompts, args.new),
            "transformers generate() (batched, KV cache)": lambda: transformers_generate(llama, prompts, args.new),
            "ours on the stock LlamaForCausalLM": lambda: ours(llama, prompts, args.new),
            "one prompt at a time, no cache": lambda: one_by_one_uncached(model, prompts, args.new)}
    times: dict[str, list[float]] = {k: [] for k in ways}
    ours(model, prompts[:2], 2)  # warm-up
    transformers_generate(llama, prompts[:2], 2)
    for _ in range(args.repeats):
        for name, fn in ways.items():
            times[name].append(fn())
    tokens = args.prompts * args.new
    n_params = sum(p.numel() for p in model.parameters())
    print(f"d_model {args.d_model}, {args.layers} layers, vocab {len(tok)} ({n_params / 1e6:.1f}M parameters); "
          f"{args.prompts} prompts x {args.new} new tokens; {torch.get_num_threads()} threads; medians of {args.repeats}\n")
    print("| generation | seconds | tokens/s | vs ours |")
    print("|---|---:|---:|---:|")
    base = statistics.median(times["ours (batched, KV cache)"])
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t:.2f} | {tokens / t:,.0f} | {t / base:.2f}x time |")
    stock = statistics.median(times["ours on the stock LlamaForCausalLM"])
    print(f"\nOn the stock model, our sampler vs its own generate(): "
          f"{statistics.median(times['transformers generate() (batched, KV cache)']) / stock:.2f}x its speed")
    parts = [grpo_breakdown(model, tok, prompts[: max(args.prompts // 2, 1)], args.new) for _ in range(args.repeats)]
    med = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    print(f"\nGRPO step: {max(args.prompts // 2, 1)} prompts x group 8 = {max(args.prompts // 2, 1) * 8} completions, "
          f"{args.new} tokens each, mini-batch 64, one epoch\n")
    print("| part | seconds | share |")
    print("|---|---:|---:|")
    for k in ("generate", "score", "old logps", "reference logps", "updates"):
        print(f"| {k} | {med[k]:.2f} | {med[k] / med['total']:.0%} |")
    print(f"| total | {med['total']:.2f} | rollout {med['tokens'] / med['generate']:,.0f} tok/s |")


if __name__ == "__main__":
    main()
