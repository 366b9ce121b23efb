"""llmlab's lm-evaluation-harness runs against lm-eval's own Hugging Face backend, on one model.

    .venv/bin/python bench/benchmarks.py [--model runs/tiny/grpo/model] [--limit 200] [--repeats 2]

For each of llmlab's built-in tasks (`llmlab_tasks_gen` by greedy generation, `llmlab_tasks_mc` and
`llmlab_stdlib_mc` by log-likelihood), the same model, documents (`--limit`), prompts (chat template
as the eval stage uses it) go through `llmlab.benchmarks.adapter.LlmlabLM` (batch 64) and through
`lm_eval.models.huggingface.HFLM` at its default batch size (1, what `lm_eval --model hf` runs with)
and at 64, alternating, `--repeats` times each in this process. It counts the documents on which each
HF run gives llmlab's answer (generated text) or choice (multiple choice), and reports each backend's
median wall time and its ratio to llmlab's. The default model is
the demo's final one (`make demo` first). Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

TASKS = ("llmlab_tasks_gen", "llmlab_tasks_mc", "llmlab_stdlib_mc")
BATCH = 64


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def answers(raw: dict, task: str) -> list:
    """Each document's answer: the generated text after the task's filter, or the highest-scored choice."""
    out = []
    for sample in raw["samples"][task]:
        resp = sample["filtered_resps"]
        if resp and isinstance(resp[0], (list, tuple)):
            lls = [float(r[0]) for r in resp]
            out.append(lls.index(max(lls)))
        else:
            out.append(resp[0] if isinstance(resp, list) else resp)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/tiny/grpo/model")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1",
                       "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}.items():
        os.environ.setdefault(key, value)
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"{args.model} is not a model folder: run `make demo` first, or pass --model")
    import torch
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    import llmlab.model  # noqa: F401  (registers llmlab's architecture with transformers, for HFLM)
    from llmlab.benchmarks.adapter import LlmlabLM
    from llmlab.benchmarks.builtin import CHAT_TASKS, end_of_turn
    from llmlab.benchmarks.run import quiet_lm_eval, task_manager
    from llmlab.models import load_for_generation
    from llmlab.spec import Benchmark

    quiet_lm_eval()
    model, tok = load_for_generation(args.model)
    backends = {"llmlab": LlmlabLM(model, tok, batch_size=BATCH),
                "hf, batch 1": HFLM(pretrained=args.model, device="cpu", dtype="float32", batch_size=1),
                f"hf, batch {BATCH}": HFLM(pretrained=args.model, device="cpu", dtype="float32", batch_size=BATCH)}
    tm = task_manager([Benchmark(task=t) for t in TASKS], end_of_turn(tok))
    rows = []
    for task in TASKS:
        times: dict[str, list[float]] = {name: [] for name in backends}
        got: dict[str, list] = {}
        for _ in range(args.repeats):
            for name, lm in backends.items():
                loaded = tm.load([task])
                for t in loaded["tasks"].values():
                    t.set_config(key="num_fewshot", value=0)
                started = time.perf_counter()
                raw = evaluate(lm=lm, task_dict=loaded, limit=args.limit, bootstrap_iters=0, log_samples=True,
                               apply_chat_template=task in CHAT_TASKS, fewshot_as_multiturn=task in CHAT_TASKS,
                               verbosity="WARNING")
                times[name].append(time.perf_counter() - started)
                got[name] = answers(raw, task)
        ours = got["llmlab"]
        for name in backends:
            same = sum(a == b for a, b in zip(ours, got[name]))
            rows.append((task, name, len(ours), same, statistics.median(times[name]), statistics.median(times["llmlab"])))
    print(f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads). "
          f"Model {args.model}; {args.limit} documents per task, batch {BATCH}, median of {args.repeats} runs each, "
          f"alternating.\n")
    print("| task | backend | documents | llmlab's answer / choice | seconds | time / llmlab's |")
    print("|---|---|---:|---:|---:|---:|")
    for task, name, n, same, seconds, ours in rows:
        print(f"| {task} | {name} | {n} | {same}/{n} | {seconds:.2f} | {seconds / ours:.2f}x |")


if __name__ == "__main__":
    main()
