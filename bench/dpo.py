"""DPO step time and peak memory for the three reference strategies, same model and batch, one run.

    .venv/bin/python bench/dpo.py [--d-model 512] [--layers 8] [--pairs 8] [--seq 128] [--repeats 2]

- frozen:      full fine-tuning, the reference a frozen deep copy (two models in memory)
- lora:        LoRA (r=16, all projections), the reference = the same model with adapters disabled
- precomputed: full fine-tuning, reference log-probs scored once up front, no reference model

Each mode runs in its own subprocess so peak RSS does not mix; medians of interleaved repeats.
Results go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import copy, json, resource, sys, time, torch
from llmlab.model import LlmlabConfig, build_model
from llmlab.lora import apply_lora, resolve_targets
from llmlab.train.dpo import DPOObjective, model_reference, precompute_reference_logps
mode, d, layers, pairs, seq, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
cfg = LlmlabConfig(d_model=d, n_heads=8, n_kv_heads=2, d_ff=int(d * 8 / 3) // 8 * 8, n_layers=layers, vocab_size=8192, max_seq_len=seq)
model = build_model(cfg, seed=0)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 8192, (2 * pairs, seq), generator=g)
labels = ids.clone(); labels[:, : seq // 2] = -100
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if mode == "frozen":
    reference = model_reference(copy.deepcopy(model).eval().requires_grad_(False))
elif mode == "lora":
    model = apply_lora(model, 16, 32, 0.0, resolve_targets(model, "all"))
    reference = model_reference(model, disable_adapters=True)
else:
    batch["ref_logps"] = precompute_reference_logps(model_reference(model), [batch])[0]
    reference = None
objective = DPOObjective(beta=0.2, reference=reference)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
times = []
for i in range(steps + 2):
    t = time.perf_counter()
    loss, _ = objective(model, batch)
    (loss / pairs).backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    if i >= 2:
        times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"mode": mode, "step_s": sorted(times)[len(times) // 2], "peak_mib": peak / 1024,
                  "added_mib": (peak - baseline) / 1024}))
"""

MODES = ["frozen", "lora", "precomputed"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    rows: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            out = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.d_model), str(args.layers), str(args.pairs),
                                  str(args.seq), str(args.steps)], capture_output=True, text=True, check=True)
            rows[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    base_step = statistics.median(r["step_s"] for r in rows["frozen"])
    base_added = statistics.median(r["added_mib"] for r in rows["frozen"])
    print(f"d_model {args.d_model}, {args.layers} layers, vocab 8192, {args.pairs} pairs x {args.seq} tokens, "
          f"AdamW; medians of {args.repeats}\n")
    print("| reference | step s | vs frozen copy | peak RSS MiB | training adds MiB | vs frozen copy |")
    print("|---|---|---|---|---|---|")
    for mode, rs in rows.items():
        step = statistics.median(r["step_s"] for r in rs)
        added = statistics.median(r["added_mib"] for r in rs)
        peak = statistics.median(r["peak_mib"] for r in rs)
        print(f"| {mode} | {step:.3f} | {step / base_step:.2f}x | {peak:,.0f} | {added:,.0f} | {added / base_added:.2f}x |")


if __name__ == "__main__":
    main()
