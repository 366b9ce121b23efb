"""Batched, KV-cached sampling for any causal LM — llmlab's own or a stock transformers model (Llama,
Qwen2, Mistral, GPT-2, ..., with or without peft adapters) — shared by chat, generate, eval and RL.

    texts = generate(model, tokenizer, ["The", "def "], max_new_tokens=32, temperature=0.0)
    out = sample(model, input_ids, attention_mask, max_new_tokens=32, eos_token_id=eos)
    out.tokens, out.lengths, out.logprobs     # (B, N), (B,), (B, N) of the sampling distribution

Models are driven through transformers' cache protocol: a `DynamicCache` passed as `cache=`, the
2-D attention mask over past and new tokens, and explicit `position_ids`. Prompts are left-padded so
every row's next token is at the same column; positions count real tokens only (the first real token
of every row is position 0, as `generate()` does), so a padded batch gives each row the output it
would have alone. A row stops at its first stop id; its later positions hold the pad id and are
masked. Temperature 0 is greedy. Only the last position's logits are computed (`logits_to_keep=1`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from llmlab import fastpath
from llmlab.model.positions import positions_from_mask

__all__ = ["Sampled", "decode_mode", "generate", "iter_sample", "positions_from_mask", "sample", "stop_token_ids"]


@dataclass
class Sampled:
    tokens: torch.Tensor  # (B, N) new token ids, pad after a row's stop token
    lengths: torch.Tensor  # (B,) new tokens per row, stop token included
    logprobs: torch.Tensor  # (B, N) log-prob of each new token under the (tempered) sampling distribution; 0 after a stop


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask all but the top-k tokens and the smallest set reaching probability top_p."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def decode_mode(model: torch.nn.Module, requested: str = "auto") -> str:
    """"static" (a static KV cache and, on CUDA, a CUDA-graph step: `llmlab.model.static_decode`) or
    "dynamic" (a growing `DynamicCache`). `LLMLAB_DECODE=static|dynamic` overrides `requested`, and
    `requested` "auto" follows the running stage's `decode` setting; "auto" there too is static on CUDA
    for models that support it, dynamic otherwise (no gain on CPUs)."""
    from llmlab.model.static_decode import StaticDecoder

    mode = _wanted(requested)
    if mode not in ("auto", "static", "dynamic"):
        raise ValueError(f"decode mode must be auto, static or dynamic, not {mode!r}")
    if not StaticDecoder.supports(model):
        return "dynamic"
    if mode == "auto":
        return "static" if next(model.parameters()).device.type == "cuda" else "dynamic"
    return mode


def _wanted(requested: str) -> str:
    """The decoder asked for: LLMLAB_DECODE, else the caller's `requested`, else the running stage's
    `decode` setting (`llmlab.fastpath.stage_decode`)."""
    return os.environ.get("LLMLAB_DECODE") or (requested if requested != "auto" else fastpath.stage_decode())


def _static(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
            running: Callable[[], torch.Tensor], dynamic: Callable, forced: bool
            ) -> tuple[torch.Tensor | None, Callable[[torch.Tensor], torch.Tensor] | None]:
    """The static-cache decoder's first logits and step, each failure of which falls back to the
    dynamic path (`llmlab.fastpath`): a failed prefill returns (None, None); a failed first step (where
    a CUDA graph is captured) re-runs the prompts through `dynamic()` and goes on there, with the same
    tokens, since both paths compute the same logits."""
    from llmlab.model.static_decode import StaticDecoder

    try:
        decoder = StaticDecoder.for_model(model)
        logits = decoder.prefill(input_ids, attention_mask, max_new_tokens).float()
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001  a fast path that fails falls back
        fastpath.failed("decode", "filling the static KV cache with the prompts", exc, forced)
        return None, None
    state: dict[str, Any] = {"step": None}

    def advance(nxt: torch.Tensor) -> torch.Tensor:
        if state["step"] is not None:
            return state["step"](nxt)
        try:
            logits = decoder.step(nxt, running()).float()
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001  the first step compiles and captures: it may fail where eager would not
            fastpath.failed("decode", "capturing the static decode step", exc, forced)
            _, state["step"] = dynamic()
            return state["step"](nxt)
        state["step"] = lambda token: decoder.step(token, running()).float()
        return logits

    return logits, advance


def iter_sample(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None,
    pad_token_id: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    decode: str = "auto",
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (next tokens (B,), rows still running before this token (B,), their log-probs (B,))
    step by step from left-padded prompts (B, T), one KV cache for the whole batch. A row stops at
    the first of its stop ids (`eos_token_id`: one id or several); stopped rows get `pad_token_id`.
    Log-probs are of the distribution sampled from: logits / temperature, before top-k/top-p (the
    same ones a full forward pass gives, see `llmlab.train.rollout.policy_logps`); greedy: T = 1.
    `decode`: see `decode_mode`; both paths give the same tokens."""
    B = input_ids.size(0)
    device = input_ids.device
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stop_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                            dtype=torch.long, device=device)
    with torch.no_grad():
        if max_new_tokens <= 0:
            return

        def dynamic() -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
            """The prompts through a growing `DynamicCache`: the last logits, and the step that appends a token."""
            cache = DynamicCache()
            state = {"mask": attention_mask.long().clone()}
            positions = positions_from_mask(state["mask"])
            out = model(input_ids=input_ids, attention_mask=state["mask"], position_ids=positions, cache=cache,
                        use_cache=True, logits_to_keep=1)
            cache = getattr(out, "cache", None) or cache
            state["positions"] = positions[:, -1:]

            def step(nxt: torch.Tensor) -> torch.Tensor:
                state["mask"] = torch.cat([state["mask"], (~done).long()[:, None]], dim=1)  # finished rows: masked
                state["positions"] = state["positions"] + 1
                out = model(input_ids=nxt[:, None], attention_mask=state["mask"], position_ids=state["positions"],
                            cache=cache, use_cache=True, logits_to_keep=1)
                return out.logits[:, -1, :].float()

            return out.logits[:, -1, :].float(), step

        logits, advance = None, None
        mode = decode_mode(model, decode)
        if mode == "static" and not fastpath.broken("decode"):
            logits, advance = _static(model, input_ids, attention_mask, max_new_tokens, lambda: ~done, dynamic,
                                      forced=_wanted(decode) == "static")
        if logits is None:
            logits, advance = dynamic()
        fastpath.record("decode", "static" if mode == "static" and not fastpath.broken("decode") else "dynamic")

        for step in range(max_new_tokens):
            logp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
            if temperature == 0.0:
                nxt = logits.argmax(-1)
            else:
                probs = _filter_logits(logits / temperature, top_k, top_p).softmax(-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            running = ~done
            token_logp = torch.where(done, torch.zeros(B, device=device), logp.gather(-1, nxt[:, None]).squeeze(-1))
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            yield nxt, running, token_logp
            if stop_ids.numel():
                done = done | torch.isin(nxt, stop_ids)
            if bool(done.all()) or step == max_new_tokens - 1:
                return
            logits = advance(nxt)


def sample(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None,
    pad_token_id: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    decode: str = "auto",
) -> Sampled:
    """All of `iter_sample` at once: (B, N) new tokens, each row's length (stop token included) and
    the new tokens' log-probs."""
    was_training = model.training
    model.eval()
    tokens, logprobs = [], []
    lengths = torch.zeros(input_ids.size(0), dtype=torch.long, device=input_ids.device)
    for nxt, running, logp in iter_sample(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id,
                                          temperature, top_k, top_p, generator, decode):
        tokens.append(nxt)
        logprobs.append(logp)
        lengths += running.long()
    if was_training:
        model.train()
    empty = input_ids.new_zeros((input_ids.size(0), 0))
    return Sampled(torch.stack(tokens, dim=1) if tokens else empty, lengths,
                   torch.stack(logprobs, dim=1) if logprobs else empty.float())


END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def stop_token_ids(tokenizer, model: torch.nn.Module | None = None) -> list[int]:
    """Where a reply ends: the tokenizer's EOS, its chat template's end-of-turn token when it has one
    (ChatML's <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>, ...), and the model's own
    generation config's EOS ids when given."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        tid = vocab.get(token)
        if tid is not None and tid not in ids:
            ids.append(tid)
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    for tid in ([eos] if isinstance(eos, int) else list(eos or [])):
        if tid not in ids:
            ids.append(tid)
    return ids


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    prefix_ids: list[int] | None = None,
    keep_stop: bool = False,
) -> list[str]:
    """Complete each prompt; returns the new text only (the stop token not included unless
    `keep_stop`: then a completion that stopped ends with its stop token's text).

    `prefix_ids` is put before every prompt (e.g. EOS: our pretraining separates documents with
    EOS, so a plain-text prompt after EOS reads as the start of a document)."""
    device = next(model.parameters()).device
    encoded = [list(prefix_ids or []) + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, e in enumerate(encoded):  # left padding
        ids[i, width - len(e):] = torch.tensor(e, dtype=torch.long)
        mask[i, width - len(e):] = 1
    gen = torch.Generator(device=device).manual_seed(seed)
    stops = stop_token_ids(tokenizer, model)
    result = sample(model, ids.to(device), mask.to(device), max_new_tokens, stops, pad,
                    temperature, top_k, top_p, gen)
    texts = []
    for row, n in zip(result.tokens.tolist(), result.lengths.tolist()):
        row = row[:n]
        if row and row[-1] in stops and not keep_stop:
            row = row[:-1]
        texts.append(tokenizer.decode(row, skip_special_tokens=False))
    return texts
