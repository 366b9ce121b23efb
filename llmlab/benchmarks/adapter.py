"""Any causal LM llmlab loads, as an lm-evaluation-harness model: `LlmlabLM(model, tokenizer)`.

    lm = LlmlabLM(model, tokenizer)                          # llmlab's own model or a stock transformers one
    lm_eval.simple_evaluate(model=lm, tasks=[...], ...)      # what llmlab.benchmarks.run does

- Log-likelihoods (multiple choice, `loglikelihood_rolling` perplexities) are scored in batches of
  `batch_size` sequences of similar length (longest first, so little is padding), right-padded, one
  forward pass each; a continuation's log-probability is the sum over its tokens, and `is_greedy`
  says whether greedy decoding would produce it. Results come back in the requests' order.
- Generation (`generate_until`) goes through llmlab's batched, KV-cached sampler (`llmlab.generate`),
  the same path llmlab's own eval takes: prompts left-padded in batches, greedy unless the task asks
  for sampling, stopped at the model's stop tokens and cut at the task's `until` texts.
- Chat templates: `apply_chat_template` renders with the tokenizer's own template, as llmlab's eval does.

Requests are scored in the order lm-eval gives them (document order), so a task's answers are the
ones llmlab's own eval gets for the same prompts.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM

from llmlab.models import model_context


class LlmlabLM(TemplateLM):
    """An lm-eval model over a loaded causal LM and its tokenizer; see the module docstring."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, batch_size: int = 64):
        super().__init__()
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self._device = next(model.parameters()).device
        self.max_length = model_context(model)

    # -- what lm-eval asks of a model
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "llmlab")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    # -- scoring
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """Each (context ids, continuation ids) pair: the continuation's summed log-probability given the
        context and whether it is the greedy one. A pair longer than the model's context is cut from the
        left, and a continuation longer than the context is scored on its last tokens that fit."""
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            batch = [requests[i] for i in chunk]
            rows, spans = [], []
            for _, context, continuation in batch:
                whole = (list(context) + list(continuation))[-(self.max_length + 1):]
                rows.append(whole[:-1])  # position i predicts token i + 1
                kept = min(len(continuation), len(whole) - 1)
                spans.append((len(whole) - 1 - kept, list(continuation)[len(continuation) - kept:]))
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, :len(r)] = 1
            logits = self.model(input_ids=ids.to(self._device), attention_mask=mask.to(self._device)).logits
            logps = F.log_softmax(logits.float(), dim=-1)
            for i, (first, target) in enumerate(spans):
                scored = logps[i, first:first + len(target)]
                wanted = torch.tensor(target, device=scored.device)
                total = float(scored.gather(-1, wanted[:, None]).sum())
                greedy = bool((scored.argmax(-1) == wanted).all())
                out[chunk[i]] = (total, greedy)
                self.cache_hook.add_partial("loglikelihood", batch[i][0], (total, greedy))
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each string's whole log-likelihood, in windows of the model's context (lm-eval's rolling scheme)."""
        from lm_eval import utils

        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += logp
        return totals

    # -- generation
    @torch.no_grad()
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Completions of each context, batched among consecutive requests with the same settings."""
        from llmlab.generate import generate

        out: list[str] = []
        i = 0
        while i < len(requests):
            kwargs = requests[i].args[1]
            j = i
            while j < len(requests) and j - i < self.batch_size and requests[j].args[1] == kwargs:
                j += 1
            contexts = [r.args[0] for r in requests[i:j]]
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sampled = bool(kwargs.get("do_sample", False)) and float(kwargs.get("temperature", 1.0)) > 0
            texts = generate(self.model, self.tokenizer, contexts, int(kwargs.get("max_gen_toks", 256)),
                             temperature=float(kwargs.get("temperature", 1.0)) if sampled else 0.0,
                             top_p=float(kwargs.get("top_p", 1.0)))
            for context, text in zip(contexts, texts):
                for stop in until:
                    if stop:
                        text = text.split(stop, 1)[0]
                out.append(text)
                self.cache_hook.add_partial("generate_until", (context, kwargs), text)
            i = j
        return out
