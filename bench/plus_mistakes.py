"""What kind of wrong answer a model gives on the held-out plus prompts (`347+5=` -> `352`).

    .venv/bin/python bench/plus_mistakes.py MODEL_DIR [MODEL_DIR ...] [--limit 500]

Takes the plus prompts among the first `--limit` rows of `builtin:tasks-prompts`' test split (the
prompts the demo's eval stage scores, in its order), answers them greedily with llmlab's own
`task_completions` (as the eval stage does), and counts each answer as right, one off, off by ten,
the carry forgotten (`forgotten_carry`: 347+5 -> 342; checked first, it is also ten off), another
wrong last digit (the rest of the number right), or other. This is what says whether a
preference pair's rejected answer (one off, or the carry forgotten) is a mistake the model makes.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmlab.data.tasks import cut_at_end_of_turn, forgotten_carry, prompt_rows  # noqa: E402
from llmlab.evaluate import task_completions  # noqa: E402
from llmlab.models import load_causal_lm  # noqa: E402
from llmlab.tokenizer import load_tokenizer  # noqa: E402

KINDS = ("right", "one off", "off by ten", "carry forgotten", "last digit else", "other")


def kind(prompt: str, answer: str, given: str) -> str:
    if given == answer:
        return "right"
    if given == forgotten_carry(prompt):
        return "carry forgotten"
    if not given.isdigit():
        return "other"
    gap = abs(int(given) - int(answer))
    if gap in (1, 10):
        return "one off" if gap == 1 else "off by ten"
    return "last digit else" if len(given) == len(answer) and given[:-1] == answer[:-1] else "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model folders (e.g. runs/tiny/sft/model runs/tiny/dpo/model)")
    parser.add_argument("--limit", type=int, default=500, help="test rows read (the demo's tasks_limit)")
    args = parser.parse_args()
    rows = [r for r in list(prompt_rows("test"))[:args.limit] if r["task"] == "plus"]
    print(f"{len(rows)} held-out plus prompts, greedy\n")
    print("| model | " + " | ".join(KINDS) + " |")
    print("|---|" + "---|" * len(KINDS))
    for folder in args.models:
        tok = load_tokenizer(folder)
        model = load_causal_lm(folder).eval()
        with torch.no_grad():
            completions = task_completions(model, tok, [r["prompt"] for r in rows])
        counts = Counter(kind(r["prompt"], r["answer"], cut_at_end_of_turn(c).strip()) for r, c in zip(rows, completions))
        print(f"| {folder} | " + " | ".join(str(counts[k]) for k in KINDS) + " |")


if __name__ == "__main__":
    main()
