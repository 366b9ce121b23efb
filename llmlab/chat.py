"""Talk to any stage's model.

    llmlab chat runs/tiny/dpo                  # a stage output, a model dir, or SPEC:STAGE
    llmlab chat pipelines/tiny.yaml:dpo --temperature 0.7 --top-p 0.9 --max-new-tokens 256

Instruction-tuned models (a tokenizer with a chat template) get the conversation rendered with the
template; base models get plain continuation. Tokens stream as they are sampled (the shared
KV-cached sampler); `/reset` clears the conversation; Ctrl+C or Ctrl+D leaves cleanly.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, TextIO

from llmlab.models import load_for_generation


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
    model, tokenizer = load_for_generation(model_dir)
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
