"""Data-pipeline throughput against training throughput: is training ever waiting for data?

    .venv/bin/python bench/data_pipeline.py

Measures, in one run on builtin:stdlib with a 2,048-token tokenizer: tokenizing and packing
(`prepare_pretrain_data`, a cold cache), a cache hit, `BlockSampler.next_batch`, and training
tokens/s of the demo's model (d_model 128, 4 layers) at batch 16 x 128. Results go in
docs/benchmarks.md.
"""

from __future__ import annotations

import os
import tempfile
import time



def main() -> None:
    os.environ.setdefault("LLMLAB_STATE_DIR", tempfile.mkdtemp(prefix="llmlab-bench-data-"))  # before llmlab reads it
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from llmlab.data.pretrain import BlockSampler, prepare_pretrain_data
    from llmlab.data.sources import DataSource, iter_texts
    from llmlab.model import LlmlabConfig, build_model
    from llmlab.tokenizer import train_tokenizer

    tok_dir = os.path.join(os.environ["LLMLAB_STATE_DIR"], "tok")
    list(iter_texts("builtin:stdlib"))  # extract the builtin text once, outside the timings
    tok = train_tokenizer(iter_texts("builtin:stdlib"), 2048, tok_dir)
    source = [DataSource(path="builtin:stdlib")]
    t = time.perf_counter()
    data = prepare_pretrain_data(source, tok_dir, 128, 0, 0.02, None)
    cold = time.perf_counter() - t
    tokens = data.meta["train_tokens"] + data.meta["val_tokens"]
    t = time.perf_counter()
    prepare_pretrain_data(source, tok_dir, 128, 0, 0.02, None)
    hit = time.perf_counter() - t
    sampler = BlockSampler(data.train_path, 128, 16, 0)
    n = 2000
    t = time.perf_counter()
    for _ in range(n):
        sampler.next_batch()
    sample_rate = n * 16 * 128 / (time.perf_counter() - t)
    cfg = LlmlabConfig(d_model=128, n_heads=4, n_kv_heads=2, d_ff=344, n_layers=4, vocab_size=len(tok), max_seq_len=128)
    model = build_model(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps = 12
    for i in range(steps + 2):
        if i == 2:
            t = time.perf_counter()
        x = sampler.next_batch()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    train_rate = steps * 16 * 128 / (time.perf_counter() - t)
    print(f"builtin:stdlib, {tokens:,} tokens, 2,048-token BPE, torch threads {torch.get_num_threads()}\n")
    print("| stage | tokens/s | vs training |")
    print("|---|---|---|")
    print(f"| tokenize + pack (cold cache, {cold:.1f} s) | {tokens / cold:,.0f} | {tokens / cold / train_rate:,.0f}x |")
    print(f"| cache hit ({hit * 1000:.0f} ms) | – | – |")
    print(f"| BlockSampler.next_batch (16 x 128) | {sample_rate:,.0f} | {sample_rate / train_rate:,.0f}x |")
    print(f"| training step, demo model (d_model 128, 4 layers) | {train_rate:,.0f} | 1x |")


if __name__ == "__main__":
    main()
