"""Talk to any stage's model, or complete a file of prompts.

    llmlab chat runs/tiny/dpo                  # a stage output, a model dir, or SPEC:STAGE
    llmlab chat pipelines/tiny.yaml:dpo --temperature 0.7 --top-p 0.9 --max-new-tokens 256
    llmlab generate runs/tiny/dpo/model --prompts prompts.txt --out completions.jsonl

Instruction-tuned models (a tokenizer with a chat template) get the conversation rendered with the
template; base models get plain continuation. Tokens stream as they are sampled (the shared
KV-cached sampler); `/reset` clears the conversation; Ctrl+C or Ctrl+D leaves cleanly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, TextIO

from llmlab.errors import UserError


class ModelNotFound(UserError):
    """The argument names no model: the message says what was looked for."""


def resolve_model_dir(target: str) -> Path:
    """A model folder from: a model dir, a stage output dir (its model/), or `SPEC.yaml:STAGE`."""
    if ":" in target and target.split(":", 1)[0].endswith((".yaml", ".yml")):
        from llmlab.spec import load_spec

        spec_file, stage = target.split(":", 1)
        spec = load_spec(spec_file)
        if stage not in spec.stage_names():
            raise ModelNotFound(f"{spec_file} has no stage '{stage}' (stages: {', '.join(spec.stage_names())})")
        target = str(spec.stage_dir(stage))
    path = Path(target).expanduser()
    for candidate in (path / "model", path):  # a stage folder's own config.json is the stage config
        config = candidate / "config.json"
        if config.is_file() and "model_type" in json.loads(config.read_text()):
            return candidate
    record = path / "stage.json"
    if record.is_file():
        outputs = json.loads(record.read_text()).get("outputs") or {}
        if "model" in outputs:
            return Path(outputs["model"])
        raise ModelNotFound(f"stage output {path} has no model/ (adapters only? merge it first: llmlab merge {path} OUT)")
    raise ModelNotFound(f"no model at {path}: give a model folder (with config.json), a stage output folder, "
                        f"or SPEC.yaml:STAGE after running the pipeline")


def load(model_dir: Path):
    from llmlab.device import pick_device
    from llmlab.models import load_causal_lm
    from llmlab.tokenizer import load_tokenizer

    return load_causal_lm(model_dir).to(pick_device()).eval(), load_tokenizer(str(model_dir))


def _prompt_ids(tokenizer, conversation: list[dict], text: str) -> list[int]:
    if tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    prefix = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []  # a document starts after EOS
    return prefix + tokenizer(text, add_special_tokens=False)["input_ids"]


def reply(model, tokenizer, ids: list[int], temperature: float, top_p: float, max_new_tokens: int,
          on_text: Callable[[str], None], seed: int = 0) -> str:
    """Sample a reply to prompt ids, calling `on_text` with each newly decoded piece; returns it all."""
    import torch

    from llmlab.generate import iter_sample, stop_token_ids

    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer, model)
    x = torch.tensor([ids], device=device)
    new: list[int] = []
    shown = ""
    gen = torch.Generator(device=device).manual_seed(seed)
    for nxt, _, _ in iter_sample(model, x, torch.ones_like(x), max_new_tokens, stops, tokenizer.pad_token_id or 0,
                              temperature, 0, top_p, gen):
        token = int(nxt[0])
        if token in stops:
            break
        new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=False)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            on_text(text[len(shown):])
            shown = text
    return tokenizer.decode(new, skip_special_tokens=False)


def read_line(prompt: str) -> str:
    """`input()` that a Ctrl+C always interrupts. The kernel may deliver SIGINT to any thread (torch's
    OpenMP workers included); Python then only raises KeyboardInterrupt when the main thread runs,
    and `input()` can sit in a blocking select() forever. Waiting in short slices keeps the main
    thread running. (Line editing is the terminal's own: backspace, Ctrl+U; no history.)"""
    import select

    sys.stdout.write(prompt)
    sys.stdout.flush()
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], 0.2)
        if ready:
            line = sys.stdin.readline()
            if not line:
                raise EOFError
            return line.rstrip("\r\n")


def chat_loop(model_dir: Path, temperature: float, top_p: float, max_new_tokens: int,
              read: Callable[[str], str] = read_line, out: TextIO = sys.stdout) -> None:
    model, tokenizer = load(model_dir)
    mode = "chat" if tokenizer.chat_template else "plain continuation (base model)"
    out.write(f"{model_dir} — {mode}; /reset clears the conversation, Ctrl+C or Ctrl+D quits\n")
    conversation: list[dict] = []
    while True:
        try:
            text = read("> ")
        except (KeyboardInterrupt, EOFError):
            out.write("\nbye\n")
            return
        if text.strip() == "/reset":
            conversation = []
            out.write("conversation cleared\n")
            continue
        if not text.strip():
            continue
        conversation.append({"role": "user", "content": text})
        try:
            answer = reply(model, tokenizer, _prompt_ids(tokenizer, conversation, text), temperature, top_p,
                           max_new_tokens, lambda piece: (out.write(piece), out.flush()))
        except KeyboardInterrupt:  # stop this answer, keep the session
            out.write(" [stopped]\n")
            conversation.pop()
            continue
        out.write("\n")
        conversation.append({"role": "assistant", "content": answer})


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

    model, tokenizer = load(model_dir)
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                if tokenizer.chat_template else p for p in prompts]
    prefix = None if tokenizer.chat_template else [tokenizer.eos_token_id]
    rows = []
    for i in range(0, len(prompts), batch_size):
        outs = generate(model, tokenizer, rendered[i:i + batch_size], max_new_tokens, temperature, top_p=top_p,
                        prefix_ids=prefix)
        rows += [{"prompt": p, "completion": c} for p, c in zip(prompts[i:i + batch_size], outs)]
    return rows
