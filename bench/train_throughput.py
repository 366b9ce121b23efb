"""Training throughput and peak memory: llmlab's model vs transformers' LlamaForCausalLM.

Both models have the same shapes (RoPE, GQA, RMSNorm, SwiGLU; d_model 256, 8 heads, 2 KV heads,
d_ff 688, 4 layers, vocab 4096, tied embeddings), train in fp32 with AdamW (lr 3e-4) on random
tokens, batch 8 x 256. Each measurement runs in its own subprocess so peak RSS values do not mix;
runs are interleaved (ours, llama, ours, llama, ...) so machine noise hits both alike.

Run:  .venv/bin/python bench/train_throughput.py [--repeats 3] [--steps 5] [--warmup 2]
Prints a Markdown table (median over repeats) and the throughput ratio ours / llama.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


SHAPES = dict(d_model=256, n_heads=8, n_kv_heads=2, d_ff=688, n_layers=4, vocab_size=4096, seq_len=256, batch=8)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _build(kind: str):
    s = SHAPES
    if kind == "llmlab":
        from llmlab.model import LlmlabConfig, build_model

        config = LlmlabConfig(d_model=s["d_model"], n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"], d_ff=s["d_ff"],
                              n_layers=s["n_layers"], vocab_size=s["vocab_size"], max_seq_len=s["seq_len"])
        return build_model(config, seed=0)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["d_model"], intermediate_size=s["d_ff"],
                         num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"],
                         num_key_value_heads=s["n_kv_heads"], max_position_embeddings=s["seq_len"],
                         rms_norm_eps=1e-6, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).float()


def worker(kind: str, steps: int, warmup: int) -> dict:
    """One measurement in this (fresh) process; prints a JSON line."""
    import resource

    import torch
    import transformers  # noqa: F401  (imported before the baseline RSS, like llmlab.model)

    import llmlab.model  # noqa: F401

    torch.manual_seed(0)
    rss_before = _rss_kib()
    model = _build(kind).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    batch = torch.randint(0, SHAPES["vocab_size"], (SHAPES["batch"], SHAPES["seq_len"]))
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    tokens = SHAPES["batch"] * SHAPES["seq_len"]
    return {
        "kind": kind,
        "params": sum(p.numel() for p in model.parameters()),
        "tokens_per_s": tokens * len(times) / sum(times),
        "step_s": statistics.median(times),
        "peak_rss_mib": peak_kib / 1024,
        "peak_delta_mib": (peak_kib - rss_before) / 1024,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worker", choices=["llmlab", "llama"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup)))
        return

    load_before = os.getloadavg()[0]  # another job on the machine skews both models' numbers
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    results: dict[str, list[dict]] = {"llmlab": [], "llama": []}
    for r in range(args.repeats):
        for kind in ("llmlab", "llama"):
            cmd = [sys.executable, __file__, "--worker", kind, "--steps", str(args.steps), "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            results[kind].append(result)
            print(f"repeat {r + 1} {kind}: {result['tokens_per_s']:.0f} tokens/s, "
                  f"peak RSS {result['peak_rss_mib']:.0f} MiB", file=sys.stderr)

    from llmlab.model import LlmlabConfig, estimate_training_memory

    s = SHAPES
    estimate = estimate_training_memory(
        LlmlabConfig(d_model=s["d_model"], n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"], d_ff=s["d_ff"],
                     n_layers=s["n_layers"], vocab_size=s["vocab_size"], max_seq_len=s["seq_len"]),
        s["batch"], s["seq_len"])
    first = results["llmlab"][0]
    print(f"\nCPU: {cpu_model()}, {os.cpu_count()} logical cores, torch {first['torch']}, "
          f"{first['threads']} threads; batch {s['batch']} x seq {s['seq_len']}, fp32, AdamW; "
          f"median of {args.repeats} interleaved runs x {args.steps} steps ({args.warmup} warm-up); "
          f"1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after\n")
    print("| model | params | tokens/s | step (s) | peak RSS (MiB) | peak RSS - RSS after imports (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    medians = {}
    for kind, label in (("llmlab", "llmlab LlmlabForCausalLM"), ("llama", "transformers LlamaForCausalLM")):
        runs = results[kind]
        med = {k: statistics.median(r[k] for r in runs) for k in ("tokens_per_s", "step_s", "peak_rss_mib",
                                                                   "peak_delta_mib")}
        medians[kind] = med
        print(f"| {label} | {runs[0]['params']:,} | {med['tokens_per_s']:,.0f} | {med['step_s']:.3f} | "
              f"{med['peak_rss_mib']:,.0f} | {med['peak_delta_mib']:,.0f} |")
    ratio = medians["llmlab"]["tokens_per_s"] / medians["llama"]["tokens_per_s"]
    print(f"\nthroughput ratio llmlab / llama: {ratio:.2f}")
    print(f"estimate_training_memory (rule of thumb): {estimate['total_bytes'] / 2**20:,.0f} MiB "
          f"(activations {estimate['activations_bytes'] / 2**20:,.0f} MiB)")


if __name__ == "__main__":
    main()
