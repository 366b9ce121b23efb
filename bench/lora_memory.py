"""Peak memory and step time of full fine-tuning against each LoRA preset, one run.

    .venv/bin/python bench/lora_memory.py [--d-model 512] [--layers 8] [--steps 8] [--repeats 2]

Every configuration trains the same llmlab model (SwiGLU, GQA) on the same batch with AdamW, in its
own subprocess so peak RSS (ru_maxrss) does not mix; "peak - baseline" subtracts the RSS after
imports and model construction, leaving what training adds (gradients, optimizer state,
activations). Results go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
from llmlab.model import LlmlabConfig, build_model
from llmlab.lora import apply_lora, resolve_targets, trainable_share
mode, d, layers, steps, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
cfg = LlmlabConfig(d_model=d, n_heads=8, n_kv_heads=2, d_ff=int(d * 8 / 3) // 8 * 8, n_layers=layers, vocab_size=8192, max_seq_len=seq)
model = build_model(cfg, seed=0)
if mode != "full":
    model = apply_lora(model, r=16, alpha=32, dropout=0.0, targets=resolve_targets(model, mode))
trainable, total = trainable_share(model)
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
g = torch.Generator().manual_seed(0)
x = torch.randint(0, 8192, (batch, seq), generator=g)
labels = x.clone(); labels[:, : seq // 2] = -100   # loss on the second half, like an answer
times = []
for i in range(steps + 2):
    t = time.perf_counter()
    model(input_ids=x, labels=labels).loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    if i >= 2:
        times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"mode": mode, "trainable": trainable, "total": total, "step_s": sorted(times)[len(times) // 2],
                  "peak_mib": peak / 1024, "added_mib": (peak - baseline) / 1024}))
"""

MODES = ["full", "minimal", "attention_only", "ffn_only", "all"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    rows: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(args.repeats):  # interleaved, so drift hits every mode alike
        for mode in MODES:
            out = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.d_model), str(args.layers), str(args.steps),
                                  str(args.batch), str(args.seq)], capture_output=True, text=True, check=True)
            rows[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    full = rows["full"]
    full_added = statistics.median(r["added_mib"] for r in full)
    full_step = statistics.median(r["step_s"] for r in full)
    print(f"d_model {args.d_model}, {args.layers} layers, batch {args.batch} x {args.seq}, AdamW, LoRA r=16; "
          f"medians of {args.repeats}\n")
    print("| mode | trainable params | share | step s | vs full | peak RSS MiB | training adds MiB | vs full |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, rs in rows.items():
        added = statistics.median(r["added_mib"] for r in rs)
        step = statistics.median(r["step_s"] for r in rs)
        peak = statistics.median(r["peak_mib"] for r in rs)
        print(f"| {mode} | {rs[0]['trainable']:,} | {100 * rs[0]['trainable'] / rs[0]['total']:.2f}% | {step:.3f} | "
              f"{step / full_step:.2f}x | {peak:,.0f} | {added:,.0f} | {added / full_added:.2f}x |")


if __name__ == "__main__":
    main()
