"""GPU speed: llmlab's training loop (eager, compiled, chunked loss) and sampler against transformers.

    python bench/gpu.py                  # on a CUDA machine: GPT-2-small shape, bf16
    python bench/gpu.py --small          # any machine (CPU too): tiny shapes, to check the script runs
    PYTHONPATH=. python bench/gpu.py     # from a checkout where llmlab is not installed

Training — llmlab's decoder at GPT-2-small shape (d_model 768, 12 layers, 12 heads MHA, d_ff 3072,
vocab 50,304 tied; seq 1,024, batch 16, bf16 autocast on CUDA, AdamW) through llmlab's own
`Trainer`, in four variants, and transformers' `LlamaForCausalLM` of the same shapes through the
same loop, eager: tokens/s, MFU (PaLM FLOPs per token over the card's dense bf16 peak, from
`llmlab.train.speed`) and peak CUDA memory. Plus the card's measured bf16 matmul ceiling (8192^3).
Decoding — 64 prompts x 32 tokens, 128 new tokens, greedy: `llmlab.generate.sample` against
transformers' `generate(do_sample=False)` on the same weights, tokens/s and the ratio.

Each measurement skips `--warmup` steps (compilation happens there) and times `--steps`. Prints a
Markdown table for docs/benchmarks.md; `--json` keeps the numbers. Torch only needs a CUDA build;
no pydantic/prefect/mlflow are imported (the TrainSpec is a plain namespace here).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch


FULL = dict(d_model=768, n_layers=12, n_heads=12, d_ff=3072, vocab=50_304, seq=1024, batch=16, prompts=64,
            prompt_len=32, new_tokens=128)
SMALL = dict(d_model=64, n_layers=2, n_heads=4, d_ff=128, vocab=512, seq=64, batch=4, prompts=8, prompt_len=8,
             new_tokens=16)


def loop_cfg(steps: int, compile_: bool, chunked: str, precision: str):
    optimizer = SimpleNamespace(name="adamw", beta1=0.9, beta2=0.95, eps=1e-8, fused="auto")
    return SimpleNamespace(max_steps=steps, lr=3e-4, weight_decay=0.1, scheduler="none", warmup_steps=0, min_lr_ratio=0.0,
                           power=1.0, gradient_accumulation_steps=1, grad_clip=1.0, eval_every=10**9, eval_steps=1,
                           save_every=10**9, save_best_only=False, log_every=10**9, precision=precision,
                           gradient_checkpointing=False, load_optimizer=True, optimizer=optimizer, compile=compile_,
                           chunked_loss=chunked, loss_chunk_tokens=4096, max_nonfinite_steps=3, batch_sequences=1)


class RandomTokens:
    unit = "sequences"

    def __init__(self, batch: int, seq: int, vocab: int, device: torch.device):
        self.micro_batch, self.shape, self.vocab, self.device = batch, (batch, seq), vocab, device
        self.g = torch.Generator(device="cpu").manual_seed(0)

    def next_batch(self) -> dict[str, torch.Tensor]:
        x = torch.randint(0, self.vocab, self.shape, generator=self.g)
        return {"input_ids": x, "labels": x}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build(kind: str, s: dict, device: torch.device) -> torch.nn.Module:
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(hidden_size=s["d_model"], num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"],
                          num_key_value_heads=s["n_heads"], intermediate_size=s["d_ff"], vocab_size=s["vocab"],
                          max_position_embeddings=s["seq"] + s["new_tokens"] + s["prompt_len"], tie_word_embeddings=True)
        cfg._attn_implementation = "sdpa"
        return LlamaForCausalLM(cfg).to(device)
    from llmlab.model import LlmlabConfig, build_model

    cfg = LlmlabConfig(vocab_size=s["vocab"], d_model=s["d_model"], n_layers=s["n_layers"], n_heads=s["n_heads"],
                       n_kv_heads=s["n_heads"], d_ff=s["d_ff"], max_seq_len=s["seq"] + s["new_tokens"] + s["prompt_len"],
                       positional_encoding="rope", attention_type="mha", norm_type="rmsnorm", activation="swiglu")
    return build_model(cfg, seed=0).to(device)


def measure_training(kind: str, s: dict, device: torch.device, steps: int, warmup: int, compile_: bool,
                     chunked: str) -> dict:
    from llmlab.train.loop import Trainer
    from llmlab.train.objectives import LanguageModeling
    from llmlab.train.speed import flops_per_token, peak_flops

    model = build(kind, s, device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    trainer = Trainer(model, LanguageModeling(chunked), RandomTokens(s["batch"], s["seq"], s["vocab"], device),
                      loop_cfg(warmup + steps, compile_, chunked, precision), Path("/tmp/llmlab-gpu-bench-ckpt"))
    trainer.engine.train_model.train()
    for _ in range(warmup):
        trainer.train_step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    sync(device)
    seconds = time.perf_counter() - start
    tokens_per_sec = steps * s["batch"] * s["seq"] / seconds
    peak = peak_flops(device)
    out = {"tokens_per_sec": tokens_per_sec, "step_ms": 1000 * seconds / steps,
           "mfu": tokens_per_sec * flops_per_token(model, s["seq"]) / peak if peak else None,
           "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    del trainer, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    sync(device)
    return 2 * 8192**3 * n / (time.perf_counter() - start)


def measure_decoding(s: dict, device: torch.device, repeats: int) -> dict:
    from llmlab.generate import sample

    model = build("llmlab", s, device).eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(5, s["vocab"], (s["prompts"], s["prompt_len"]), generator=g)
    mask = torch.ones_like(ids)
    for b in range(s["prompts"]):  # unequal prompt lengths, left-padded
        cut = b % (s["prompt_len"] // 2)
        ids[b, :cut], mask[b, :cut] = 0, 0
    ids, mask = ids.to(device), mask.to(device)
    results = {}
    with torch.no_grad():
        for name in ("llmlab dynamic", "llmlab static", "transformers"):
            best = float("inf")
            for _ in range(repeats + 1):  # the first is warm-up (and, static on CUDA, the graph capture)
                sync(device)
                start = time.perf_counter()
                if name.startswith("llmlab"):
                    out = sample(model, ids, mask, s["new_tokens"], eos_token_id=None, pad_token_id=0, temperature=0.0,
                                 decode=name.split()[1])
                    new = out.tokens
                else:
                    new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=s["new_tokens"],
                                         min_new_tokens=s["new_tokens"], do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
                sync(device)
                best = min(best, time.perf_counter() - start)
            results[name] = {"tokens_per_sec": new.numel() / best, "tokens": new}
    base = results["transformers"]["tokens_per_sec"]
    return {"llmlab_tokens_per_sec": results["llmlab dynamic"]["tokens_per_sec"],
            "llmlab_static_tokens_per_sec": results["llmlab static"]["tokens_per_sec"],
            "transformers_tokens_per_sec": base,
            "ratio": results["llmlab dynamic"]["tokens_per_sec"] / base,
            "static_ratio": results["llmlab static"]["tokens_per_sec"] / base,
            "greedy_outputs_equal": torch.equal(results["llmlab dynamic"]["tokens"], results["transformers"]["tokens"]),
            "static_equals_dynamic": torch.equal(results["llmlab static"]["tokens"], results["llmlab dynamic"]["tokens"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny shapes (runs anywhere, numbers mean nothing)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="decoding repeats (best kept)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = SMALL if args.small or device.type != "cuda" else FULL
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = {}
    variants = [("llmlab, eager", "llmlab", False, "off"), ("llmlab, chunked loss", "llmlab", False, "on"),
                ("llmlab, compiled blocks", "llmlab", True, "off"), ("llmlab, compiled + chunked loss", "llmlab", True, "on"),
                ("transformers Llama, eager", "llama", False, "off")]
    for label, kind, compile_, chunked in variants:
        print(f"[gpu bench] {label} ...", file=sys.stderr, flush=True)
        rows[label] = measure_training(kind, s, device, args.steps, args.warmup, compile_, chunked)
    ceiling = matmul_ceiling(device)
    decoding = measure_decoding(s, device, args.repeats)
    print(f"Card: {card}; torch {torch.__version__}; shape {s}.\n")
    if ceiling:
        print(f"bf16 matmul 8192^3: {ceiling / 1e12:.0f} TFLOP/s measured.\n")
    print("| training loop | tokens/s | MFU | peak memory | vs transformers |")
    print("|---|---:|---:|---:|---:|")
    base = rows["transformers Llama, eager"]["tokens_per_sec"]
    for label, r in rows.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "–"
        mem = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else "–"
        print(f"| {label} | {r['tokens_per_sec']:,.0f} | {mfu} | {mem} | {r['tokens_per_sec'] / base:.2f}x |")
    print(f"\nDecoding {s['prompts']} prompts x {s['prompt_len']} tokens, {s['new_tokens']} new, greedy: llmlab dynamic "
          f"cache {decoding['llmlab_tokens_per_sec']:,.0f} tokens/s ({decoding['ratio']:.2f}x), llmlab static cache"
          f"{' + CUDA graph' if device.type == 'cuda' else ''} {decoding['llmlab_static_tokens_per_sec']:,.0f} "
          f"({decoding['static_ratio']:.2f}x), transformers generate() {decoding['transformers_tokens_per_sec']:,.0f}; "
          f"greedy outputs equal to transformers: {decoding['greedy_outputs_equal']}, static equal to dynamic: "
          f"{decoding['static_equals_dynamic']}.")
    if args.json:
        args.json.write_text(json.dumps({"card": card, "shape": s, "training": rows, "matmul_flops": ceiling,
                                         "decoding": decoding}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
