"""SFT throughput with and without packing: real tokens and supervised (answer) tokens per second.

    .venv/bin/python bench/packing.py [--steps 30] [--repeats 3]

The demo's model shape (d_model 128, 4 layers, vocab 2,048, context 128) and data (builtin:tasks,
short conversations), full fine-tuning with AdamW in fp32. Unpacked, a step is 32 conversations
right-padded to the longest; packed, a step is 4 rows of exactly 128 tokens each holding as many
whole conversations as fit, kept apart by segment ids (attention within a conversation only,
positions restarting: `llmlab.data.sft.pack_rows`). Interleaved repeats, median kept; prints a
Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time



def main() -> int:
    import torch

    from llmlab.data.formats import TEXT
    from llmlab.data.reader import stream
    from llmlab.data.sft import SFTBatches, prepare_sft_data
    from llmlab.data.sources import DataSource
    from llmlab.model import LlmlabConfig, build_model
    from llmlab.tokenizer import load_tokenizer, train_tokenizer
    from llmlab.train.objectives import token_nll_sum

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        texts = []
        for _, _, text in stream([DataSource(path="builtin:stdlib")], TEXT, seed=0, val_fraction=0.0):
            texts.append(text)
            if len(texts) == 3000:
                break
        train_tokenizer(texts, 2048, tmp)
        tok = load_tokenizer(tmp)
    data = prepare_sft_data([DataSource(path="builtin:tasks")], tok, max_seq_len=128, seed=0, val_fraction=0.0)
    cfg = dict(d_model=128, n_heads=4, n_kv_heads=2, d_ff=344, n_layers=4, vocab_size=len(tok), max_seq_len=128)
    settings = {"unpacked, 32 conversations per step": dict(batch_size=32, packing=False),
                "packed, 4 rows x 128 tokens per step": dict(batch_size=4, packing=True)}
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in settings}
    for _ in range(args.repeats):
        for label, kw in settings.items():
            model = build_model(LlmlabConfig(**cfg), seed=0)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            batches = SFTBatches(data.train, seed=0, max_seq_len=128, pad_id=tok.pad_token_id, **kw)
            real = answer = 0
            for step in range(args.warmup + args.steps):
                if step == args.warmup:
                    start, real, answer = time.perf_counter(), 0, 0
                batch = batches.next_batch()
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                loss = token_nll_sum(model(**inputs).logits, batch["labels"]) / (batch["labels"][:, 1:] != -100).sum()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                real += int(batch["attention_mask"].sum())
                answer += int((batch["labels"][:, 1:] != -100).sum())
            seconds = time.perf_counter() - start
            results[label].append((real / seconds, answer / seconds, batch["input_ids"].numel() / batch["input_ids"].size(0)))
    print(f"SFT, demo shape, builtin:tasks, {args.steps} steps x {args.repeats} interleaved repeats (median), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| batches | real tokens/s | answer tokens/s | row length |")
    print("|---|---:|---:|---:|")
    base = None
    for label, runs in results.items():
        real = statistics.median(r[0] for r in runs)
        answer = statistics.median(r[1] for r in runs)
        base = base or answer
        print(f"| {label} | {real:,.0f} | {answer:,.0f} ({answer / base:.2f}x) | {runs[-1][2]:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
