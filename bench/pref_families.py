"""Preference accuracy per task family on the demo's held-out pairs, for any model folders.

    .venv/bin/python bench/pref_families.py MODEL_DIR [MODEL_DIR ...] [--limit 500]

Scores the first `--limit` pairs of `builtin:tasks-preference`'s test split (the pairs the demo's eval
stage reads, in its order) with llmlab's own `preference_wins` (summed log-probabilities of chosen vs
rejected) and prints, per model, the share won overall and per family; plus pairs are split by their
rejected answer: the carry forgotten (347+5 -> 342) or one off (351). This is where a preference
gain can come from: families whose pairs a model already ranks right ~100% of the time leave none.
(The eval stage's report has preference accuracy per family too, for the models of a run; this script
scores any model folders and splits the plus pairs by their rejected answer, which the report does not.)
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmlab.data.preference import preference_pairs  # noqa: E402
from llmlab.data.sources import DataSource  # noqa: E402
from llmlab.data.tasks import forgotten_carry, preference_rows  # noqa: E402
from llmlab.evaluate import preference_wins  # noqa: E402
from llmlab.models import load_causal_lm, model_context  # noqa: E402
from llmlab.tokenizer import load_tokenizer  # noqa: E402


def family(row: dict) -> str:
    if row["task"] != "plus":
        return row["task"]
    return "plus (carry forgotten)" if row["rejected"] == forgotten_carry(row["prompt"]) else "plus (one off)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model folders (e.g. runs/tiny/sft/model runs/tiny/dpo/model)")
    parser.add_argument("--limit", type=int, default=500, help="held-out pairs scored (the demo's preferences_limit)")
    args = parser.parse_args()
    rows = list(preference_rows("test"))[:args.limit]
    print("| model | all | " + " | ".join(sorted({family(r) for r in rows})) + " |")
    print("|---|---|" + "---|" * len({family(r) for r in rows}))
    for folder in args.models:
        tok = load_tokenizer(folder)
        model = load_causal_lm(folder).eval()
        pairs = preference_pairs([DataSource(path="builtin:tasks-preference", split="test")], tok, model_context(model),
                                 args.limit)
        if len(pairs) != len(rows):
            sys.exit(f"{folder}: {len(pairs)} pairs tokenized for {len(rows)} rows (some were dropped); cannot match families")
        with torch.no_grad():
            wins = preference_wins(model, pairs, tok.pad_token_id if tok.pad_token_id is not None else 0)
        by: dict[str, list[bool]] = defaultdict(list)
        for row, won in zip(rows, wins):
            by[family(row)].append(won)
        cells = [f"{sum(v) / len(v):.3f} (n={len(v)})" for _, v in sorted(by.items())]
        print(f"| {folder} | {sum(wins) / len(wins):.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
