"""The same tiny pretrain run under each optimizer: final validation loss, step time and
optimizer-state memory, in one run.

A 2,048-token BPE tokenizer is trained on builtin:stdlib (the standard library's docstrings); each
optimizer then trains the same model (same init, same batches, same cosine schedule with warmup,
weight decay 0.1, grad clip 1.0) through llmlab's own training loop, and is scored by
`llmlab.evaluate.perplexity` on the same held-out batches. Learning rates are each method's usual
range, not tuned per run: Lion ~1/4 of AdamW's (the paper's advice), Sophia's lr * rho equals AdamW's
lr (its per-element step bound), Adafactor's lr is relative to each parameter's RMS, Muon's 0.02 is
Jordan et al.'s default (its AdamW part runs at 0.1x). Step time is training wall time per optimizer
step between the first and last log (start-up and evaluation excluded; Sophia's extra Hessian pass
every k steps included). State memory is the
bytes of the tensors in the optimizer's state_dict at the end.

Run:  .venv/bin/python bench/optimizers.py [--steps 200] [--only adamw,lion]
Prints a Markdown table. State (tokenizer, token cache, checkpoints) goes to a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path


SHAPES = dict(d_model=128, n_heads=4, n_kv_heads=2, d_ff=344, n_layers=4, vocab_size=2048, max_seq_len=128)
BATCH = 16
LR = {"adamw": 2e-3, "adafactor": 1e-2, "lion": 5e-4, "sophia": 0.05, "muon": 0.02}


class LMBatches:
    """A BlockSampler as the loop's batch dicts (labels = inputs; the model shifts)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def next_batch(self):
        x = self.sampler.next_batch()
        return {"input_ids": x, "labels": x}

    def state_dict(self):
        return self.sampler.state_dict()

    def load_state_dict(self, state):
        self.sampler.load_state_dict(state)


class Clock:
    """Times optimizer steps between the first and the last log: start-up, evaluation and the final
    checkpoint (which all happen outside that window) are excluded."""

    def __init__(self):
        self.marks = []

    def on_start(self, info): ...
    def on_eval(self, step, metrics): ...
    def on_checkpoint(self, step, path): ...

    def on_log(self, step, metrics):
        self.marks.append((step, time.perf_counter()))

    def step_time(self) -> float:
        (s0, t0), (s1, t1) = self.marks[0], self.marks[-1]
        return (t1 - t0) / max(1, s1 - s0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--only", default=",".join(LR), help="comma-separated optimizer names")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llmlab-bench-opt-"))
    os.environ.setdefault("LLMLAB_STATE_DIR", str(work / "state"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    import torch

    from llmlab.checkpoint import latest_checkpoint, load_checkpoint
    from llmlab.data.pretrain import BlockSampler, eval_batches, prepare_pretrain_data
    from llmlab.data.sources import DataSource, iter_texts
    from llmlab.evaluate import perplexity
    from llmlab.model import LlmlabConfig, build_model
    from llmlab.spec import TrainSpec
    from llmlab.tokenizer import train_tokenizer
    from llmlab.train.loop import train
    from llmlab.train.objectives import LanguageModeling

    seq = SHAPES["max_seq_len"]
    start = time.perf_counter()
    train_tokenizer(iter_texts("builtin:stdlib"), SHAPES["vocab_size"], work / "tok")
    data = prepare_pretrain_data([DataSource(path="builtin:stdlib")], str(work / "tok"), seq, seed=0, val_fraction=0.02, max_tokens=None)
    val = eval_batches(data.val_path, seq, BATCH, max_batches=8)
    print(f"data ready in {time.perf_counter() - start:.0f} s: {data.meta.get('train_tokens', '?')} training tokens; "
          f"{args.steps} steps x {BATCH} x {seq} tokens per optimizer; torch threads {torch.get_num_threads()}", file=sys.stderr)

    rows = []
    for name in args.only.split(","):
        model = build_model(LlmlabConfig(**SHAPES), seed=0)
        cfg = TrainSpec(max_steps=args.steps, lr=LR[name], warmup_steps=args.steps // 10, min_lr_ratio=0.1,
                        batch_sequences=BATCH, gradient_accumulation_steps=1, eval_every=args.steps, eval_steps=len(val),
                        save_every=args.steps, log_every=max(1, args.steps // 5), precision="fp32",
                        optimizer={"name": name})
        clock = Clock()
        with contextlib.redirect_stdout(io.StringIO()):
            result = train(model, LanguageModeling(), LMBatches(BlockSampler(data.train_path, seq, BATCH, seed=0)), cfg,
                           work / "ckpt" / name, evaluate=lambda m: perplexity(m, val), callbacks=clock, seed=0)
        step_s = clock.step_time()
        state = load_checkpoint(latest_checkpoint(work / "ckpt" / name))["optimizer"]["state"]
        state_bytes = sum(t.numel() * t.element_size() for s in state.values() for t in s.values() if torch.is_tensor(t))
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        rows.append((name, LR[name], result.last_metrics["eval/loss"], result.last_metrics["train/loss"], step_s,
                     state_bytes / 2**20, state_bytes / params))
        print(f"{name}: val loss {rows[-1][2]:.4f}, {step_s:.3f} s/step", file=sys.stderr)

    print(f"\n{sum(p.numel() for p in model.parameters()):,} parameters; {args.steps} steps of {BATCH} x {seq} tokens\n")
    print("| optimizer | lr | final val loss | final train loss | step time (s) | optimizer state (MiB) | state / params |")
    print("|---|---|---|---|---|---|---|")
    for name, lr, vl, tl, st, mib, ratio in rows:
        print(f"| {name} | {lr:g} | {vl:.4f} | {tl:.4f} | {st:.3f} | {mib:.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
