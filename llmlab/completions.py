"""`llmlab generate`: complete every prompt of a file with any model, to JSON lines.

    llmlab generate runs/tiny/dpo/model --prompts prompts.txt --out completions.jsonl
    rows = generate_file(model_dir, read_prompts(Path("prompts.txt")), temperature=0.0, top_p=1.0, max_new_tokens=64)

Prompts are rendered as single-turn chats when the tokenizer has a chat template (plain continuation
otherwise) and completed in batches by the shared KV-cached sampler (`llmlab.generate`).
"""

from __future__ import annotations

import json
from pathlib import Path

from llmlab.models import load_for_generation


def read_prompts(path: Path) -> list[str]:
    """Prompts from a .jsonl (a `prompt` field per line) or a text file (one per line)."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in lines]
        missing = [i + 1 for i, r in enumerate(rows) if "prompt" not in r]
        if missing:
            raise ValueError(f"{path}: lines {missing[:5]} have no 'prompt' field")
        return [r["prompt"] for r in rows]
    return lines


def generate_file(model_dir: Path, prompts: list[str], temperature: float, top_p: float, max_new_tokens: int,
                  batch_size: int = 16) -> list[dict]:
    """Completions of every prompt (batched, KV-cached), rendered as single-turn chats when the
    tokenizer has a chat template."""
    from llmlab.generate import generate

    model, tokenizer = load_for_generation(model_dir)
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                if tokenizer.chat_template else p for p in prompts]
    prefix = None if tokenizer.chat_template else [tokenizer.eos_token_id]
    rows = []
    for i in range(0, len(prompts), batch_size):
        outs = generate(model, tokenizer, rendered[i:i + batch_size], max_new_tokens, temperature, top_p=top_p,
                        prefix_ids=prefix)
        rows += [{"prompt": p, "completion": c} for p, c in zip(prompts[i:i + batch_size], outs)]
    return rows
