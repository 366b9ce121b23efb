"""Training throughput on 1 process versus 2 (torchrun, DDP and FSDP2), same global batch, one run.

    .venv/bin/python bench/ddp.py [--d-model 256] [--layers 4] [--seq 128] [--batch 8] [--steps 30]

- 1 process, all cores' threads, batch B x accumulation 2
- 2 processes DDP (gloo on CPU / nccl on GPU), half the threads each, batch B x accumulation 1
- 2 processes FSDP2, the same

Tokens/s is the loop's own `train/tokens_per_sec` (all ranks' tokens), the median of the logged
windows after the first. On a CPU machine the processes share the same cores, so this measures the
overhead of the distributed engine, not a speed-up; on a multi-GPU machine each process has its
own GPU. With `--mfu` (GPU only) it also reports the model FLOPs utilisation of a 124M-parameter
pretrain step (6·N·tokens + attention, against the GPU's bf16 peak given with --peak-tflops).
Results go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, statistics, sys, tempfile, torch
from llmlab import parallel as distributed
from llmlab.model import LlmlabConfig, build_model
from llmlab.spec import TrainSpec
from llmlab.train.loop import Callbacks, train
from llmlab.train.objectives import LanguageModeling
strategy, d, layers, seq, batch, accum, steps, vocab, precision = sys.argv[1], *map(int, sys.argv[2:9]), sys.argv[9]
par = distributed.init(strategy)
heads = max(d // 64, 1)
cfg = LlmlabConfig(d_model=d, n_heads=heads, n_kv_heads=heads, d_ff=4 * d, n_layers=layers, vocab_size=vocab, max_seq_len=seq)
device = "cuda" if torch.cuda.is_available() else "cpu"
model = build_model(cfg, seed=0).to(device)

class Batches:
    def __init__(self): self.i = 0
    def next_batch(self):
        g = torch.Generator().manual_seed(self.i); self.i += 1
        x = torch.randint(0, vocab, (batch, seq), generator=g)
        return {"input_ids": x, "labels": x}
    def state_dict(self): return {"i": self.i}
    def load_state_dict(self, s): self.i = s["i"]

class Rec(Callbacks):
    def __init__(self): self.rates = []
    def on_log(self, step, m): self.rates.append(m["train/tokens_per_sec"])

rec = Rec()
spec = TrainSpec(max_steps=steps, lr=1e-4, warmup_steps=0, batch_sequences=batch, gradient_accumulation_steps=accum,
                 eval_every=10**6, save_every=10**6, log_every=5, precision=precision)
train(model, LanguageModeling(), Batches(), spec, tempfile.mkdtemp(), callbacks=rec, seed=0, label="bench")
if par.main:
    n = sum(p.numel() for p in model.parameters())
    print("RESULT " + json.dumps({"tok_s": statistics.median(rec.rates[1:] or rec.rates), "params": n}))
if par.active:
    torch.distributed.destroy_process_group()
"""


def run(procs: int, strategy: str, args, accum: int, threads: int) -> dict:
    script = os.path.join(tempfile.mkdtemp(), "child.py")
    with open(script, "w") as f:
        f.write(CHILD)
    argv = [strategy, args.d_model, args.layers, args.seq, args.batch, accum, args.steps, args.vocab, args.precision]
    argv = [str(a) for a in argv]
    cmd = [sys.executable, script, *argv] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", script, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--mfu", action="store_true", help="GPU: MFU of a 124M-parameter step (d 768, 12 layers, seq 1024)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100 SXM: 989)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    rows = [("1 process", run(1, "ddp", args, 2, cores)),
            ("2 processes, DDP", run(2, "ddp", args, 1, max(cores // 2, 1))),
            ("2 processes, FSDP2", run(2, "fsdp", args, 1, max(cores // 2, 1)))]
    base = rows[0][1]["tok_s"]
    print(f"d_model {args.d_model}, {args.layers} layers, vocab {args.vocab} ({rows[0][1]['params'] / 1e6:.1f}M parameters), "
          f"global batch {2 * args.batch} x {args.seq} tokens, {cores} cores\n")
    print("| run | tokens/s | vs 1 process |")
    print("|---|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r['tok_s']:,.0f} | {r['tok_s'] / base:.2f}x |")
    if args.mfu:
        args.d_model, args.layers, args.seq, args.vocab, args.batch, args.precision = 768, 12, 1024, 50304, 8, "bf16"
        r = run(1, "ddp", args, 1, cores)
        n, tokens = r["params"], r["tok_s"]
        flops_per_token = 6 * n + 12 * args.layers * args.d_model * args.seq  # weights + attention (PaLM appendix B)
        print(f"\n124M pretrain step ({n / 1e6:.0f}M parameters, seq {args.seq}, batch {args.batch}, bf16): "
              f"{tokens:,.0f} tokens/s, MFU {tokens * flops_per_token / (args.peak_tflops * 1e12):.1%}")


if __name__ == "__main__":
    main()
