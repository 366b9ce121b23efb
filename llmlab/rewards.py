"""Reward functions for online RL (PPO, GRPO): built-ins, your own functions, reward models.

A reward function is a plain callable, TRL style:

    fn(prompts: list[str], completions: list[str], **kw) -> list[float]

one score per (prompt, completion); `kw` carries the prompt rows' other columns as lists aligned
with the prompts (e.g. `answers=[...]`), and must be accepted even when unused.

A spec names one with a string that `load_reward` resolves, in this order:
- a built-in name from `REWARD_FUNCTIONS`:
    exact_match     1.0 when the completion is the row's answer (kw `answers`), else 0.0, by
                    `llmlab.data.tasks.exact_match` (text from the first end-of-turn marker on and
                    surrounding whitespace ignored).
    partial_match   the share of the answer's characters the completion has right, position by
                    position, over the longer of the two (kw `answers`): 1.0 exactly at an exact
                    match, 0.75 for one wrong digit of four; partial credit for GRPO groups whose
                    answers are all wrong or all near misses.
    format          1.0 when the completion, cut at its first end-of-turn marker ("<|im_end|>" or
                    "<|eos|>"), is non-empty after stripping whitespace and holds no chat special
                    token ("<|im_start|>", "<|im_end|>", "<|bos|>", "<|eos|>", "<|pad|>"), else 0.0.
    length_penalty  −max(0, n − target) / target, n the completion's length in characters (cut at
                    the first end-of-turn marker), target kw `target_length` (int, or one per row;
                    default 64): 0 up to the target, −1 at twice the target, linear in between/after.
    numeric_match   1.0 when the completion's final number equals the answer's (GSM8K's "#### 42"
                    convention, else the last number), else 0.0.
- "module:function": `function` from the importable `module` (e.g. "my_rewards:brevity" for
  my_rewards.py in the project folder);
- otherwise a model folder or hub name: a sequence-classification model with one output
  (`RewardModel`), scoring `prompt + completion`.

    from llmlab.rewards import load_reward
    reward = load_reward("exact_match")
    reward(["2+2="], ["4<|im_end|>"], answers=["4"])        # [1.0]
    rm = load_reward("out/reward-model")                    # RewardModel
    rm(prompts, completions)                                # [float, ...] (single logit each)
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from llmlab.data.tasks import cut_at_end_of_turn, exact_match
from llmlab.errors import UserError
from llmlab.tokenizer import SPECIAL_TOKENS

RewardFn = Callable[..., list[float]]

DEFAULT_TARGET_LENGTH = 64


def _per_row(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"kw {name!r} has {len(value)} values for {n} completions")
        return list(value)
    return [value] * n


def _answers(name: str, answers: Sequence[str] | None, kw: dict, n: int) -> list:
    """The rows' answers (kw `answers`, or `answer` as the column is named), one per completion."""
    if answers is None:
        answers = kw.get("answer")
    if answers is None:
        raise RewardError(f"reward {name!r} needs kw `answers` (one answer per completion); "
                          f"the prompt rows must have an 'answer' column")
    return _per_row(answers, n, "answers")


def exact_match_reward(prompts: list[str], completions: list[str], answers: Sequence[str] | None = None,
                       **kw) -> list[float]:
    """1.0 where the completion is the row's answer (`llmlab.data.tasks.exact_match`), else 0.0."""
    answers = _answers("exact_match", answers, kw, len(completions))
    return [1.0 if exact_match(c, a) else 0.0 for c, a in zip(completions, answers)]


def format_reward(prompts: list[str], completions: list[str], **kw) -> list[float]:
    """1.0 where the completion, cut at its first end-of-turn marker, is non-empty (after strip)
    and has no leftover chat special token in it; else 0.0."""
    out = []
    for c in completions:
        text = cut_at_end_of_turn(c)
        ok = bool(text.strip()) and not any(tok in text for tok in SPECIAL_TOKENS)
        out.append(1.0 if ok else 0.0)
    return out


def length_penalty_reward(prompts: list[str], completions: list[str],
                          target_length: int | Sequence[int] = DEFAULT_TARGET_LENGTH,
                          **kw) -> list[float]:
    """−max(0, n − target) / target with n the completion's character count before its first
    end-of-turn marker: 0 up to `target_length`, then linearly more negative (−1 at twice it)."""
    targets = _per_row(target_length, len(completions), "target_length")
    out = []
    for c, target in zip(completions, targets):
        if target is None or target <= 0:
            raise ValueError(f"reward 'length_penalty': target_length must be > 0, got {target!r}")
        out.append(-max(0, len(cut_at_end_of_turn(c)) - target) / target)
    return out


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The number a text ends its reasoning with: what follows GSM8K's "####" marker when there is
    one, else the last number in it (commas and a leading $ ignored); None when there is none."""
    text = cut_at_end_of_turn(text)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    found = _NUMBER.findall(text.replace("$", ""))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric_match_reward(prompts: list[str], completions: list[str], answers: Sequence[str] | None = None,
                         **kw) -> list[float]:
    """1.0 where the completion's final number equals the answer's (GSM8K: the number after "####";
    otherwise the answer's last number), else 0.0 — the reward for verifiable math prompts."""
    answers = _answers("numeric_match", answers, kw, len(completions))
    out = []
    for c, a in zip(completions, answers):
        want, got = final_number(str(a)), final_number(c)
        out.append(1.0 if want is not None and got is not None and abs(want - got) < 1e-9 else 0.0)
    return out


def partial_match_reward(prompts: list[str], completions: list[str], answers: Sequence[str] | None = None,
                         **kw) -> list[float]:
    """The share of the answer's characters the completion has right, position by position: matches
    over the longer of the two (cut at the first end-of-turn marker, stripped), so a missing or extra
    character counts as a miss; 1.0 exactly when `exact_match` is 1.0."""
    answers = _answers("partial_match", answers, kw, len(completions))
    out = []
    for c, a in zip(completions, answers):
        got, want = cut_at_end_of_turn(c).strip(), str(a).strip()
        longest = max(len(got), len(want))
        out.append(1.0 if longest == 0 else sum(x == y for x, y in zip(got, want)) / longest)
    return out


REWARD_FUNCTIONS: dict[str, RewardFn] = {
    "exact_match": exact_match_reward,
    "partial_match": partial_match_reward,
    "numeric_match": numeric_match_reward,
    "format": format_reward,
    "length_penalty": length_penalty_reward,
}

_SIGNATURE_FIX = "it must accept (prompts, completions, **kwargs) and return a list of floats"


class RewardError(UserError):
    """A reward reference the user can fix (a misspelled name, a module that is not importable, a
    function with the wrong signature); also the ImportError / AttributeError / TypeError below."""


class RewardImportError(RewardError, ImportError):
    pass


class RewardAttributeError(RewardError, AttributeError):
    pass


class RewardSignatureError(RewardError, TypeError):
    pass


def check_reward_signature(fn: Callable, ref: str) -> None:
    """Raise TypeError unless `fn` takes two positional arguments and **kwargs."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise RewardSignatureError(f"reward function {ref!r}: cannot read its signature ({e}); "
                        f"{_SIGNATURE_FIX}") from e
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    has_varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
    has_varkw = any(p.kind == p.VAR_KEYWORD for p in params)
    problems = []
    if len(positional) < 2 and not has_varargs:
        problems.append("it does not take two positional arguments (prompts, completions)")
    if not has_varkw:
        problems.append("it has no **kwargs (extra columns such as answers= are passed by name)")
    if problems:
        raise RewardSignatureError(f"reward function {ref!r} has signature {sig}: {'; '.join(problems)}; "
                        f"{_SIGNATURE_FIX}")


def load_function(ref: str) -> RewardFn:
    """Import "module:function", checking it exists, is callable and has a reward signature."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise RewardError(f"reward function {ref!r}: expected 'module:function', e.g. "
                         f"'my_rewards:brevity'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.split(".")[0] == e.name.split(".")[0] and (
                module_name == e.name or module_name.startswith(e.name + ".")):
            raise RewardImportError(f"reward function {ref!r}: no module named {e.name!r} — is it "
                              f"importable from the project folder? (put {module_name}.py "
                              f"next to the spec or install it)") from e
        raise RewardImportError(f"reward function {ref!r}: importing {module_name!r} failed, it needs "
                          f"module {e.name!r}, which is not installed") from e
    if not hasattr(module, attr):
        public = sorted(n for n, v in vars(module).items()
                        if callable(v) and not n.startswith("_"))
        raise RewardAttributeError(f"reward function {ref!r}: module {module_name!r} has no attribute "
                             f"{attr!r}; callables it has: {', '.join(public) or 'none'}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise RewardSignatureError(f"reward function {ref!r}: {module_name}.{attr} is a "
                        f"{type(fn).__name__}, not a function; {_SIGNATURE_FIX}")
    check_reward_signature(fn, ref)
    return fn


class RewardModel:
    """A frozen sequence-classification model (one output) as a reward function: a reward stage's
    output, any folder, or a hub name (e.g. OpenAssistant/reward-model-deberta-v3-large-v2).

    Each (prompt, completion) is scored the way the reward model reads text: when the caller passes
    the prompt's conversation (`prompt_messages`, as RL and eval do) and the reward model's tokenizer
    has a chat template, the conversation plus the completion as the assistant's turn (cut at the
    policy's end-of-turn marker) is rendered with *its* template and tokenizer, and the score is read
    at the end of that turn (what the template adds after it is dropped, as the reward stage
    trains); otherwise `prompt + completion` text. Batches of `batch_size`, right-padded (the
    model's last-token pooling finds the end), cut from the left to `max_length` tokens (the
    completion is kept); the model runs in `dtype`. Returns the single logit per completion."""

    def __init__(self, name_or_path: str, batch_size: int = 16, max_length: int = 1024,
                 device: str | None = None, tokenizer: str | None = None, dtype=None):
        import torch

        from llmlab.models import ModelLoadError, load_sequence_classifier
        from llmlab.tokenizer import load_tokenizer

        self.name = str(name_or_path)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.tokenizer = load_tokenizer(str(tokenizer or name_or_path))
        try:
            model = load_sequence_classifier(self.name, dtype or torch.float32)
        except ModelLoadError as e:
            raise OSError(f"reward model {self.name!r}: {e}") from e
        if model.config.num_labels != 1:
            raise RewardError(f"reward model {self.name!r} has num_labels="
                             f"{model.config.num_labels}; a reward model has one output "
                             f"(num_labels=1)")
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        model.requires_grad_(False)
        model.eval()
        self.device = torch.device(device) if device else torch.device("cpu")
        self.model = model.to(self.device)

    def encode(self, prompt: str, completion: str, messages: list[dict] | None) -> list[int]:
        """Token ids of one (prompt, completion) as this reward model reads it (see the class doc)."""
        from llmlab.data.sft import assistant_mask

        tok = self.tokenizer
        if messages and tok.chat_template:
            conversation = [*messages, {"role": "assistant", "content": cut_at_end_of_turn(completion).strip()}]
            ids, mask = assistant_mask(tok, conversation)
            end = max((i for i, m in enumerate(mask) if m), default=len(ids) - 1)
            ids = ids[: end + 1]  # through the turn's end-of-turn token
        else:
            ids = tok(prompt + completion, add_special_tokens=True)["input_ids"]
        return ids[-self.max_length:]

    def __call__(self, prompts: list[str], completions: list[str], prompt_messages: list[list[dict]] | None = None,
                 **kw) -> list[float]:
        import torch

        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        messages = prompt_messages or [None] * len(prompts)
        encoded = [self.encode(p, c, m) for p, c, m in zip(prompts, completions, messages)]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        scores: list[float] = []
        with torch.no_grad():
            for i in range(0, len(encoded), self.batch_size):
                chunk = encoded[i:i + self.batch_size]
                width = max(len(e) for e in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, e in enumerate(chunk):  # right padding: positions as in the unpadded text
                    ids[row, :len(e)] = torch.tensor(e, dtype=torch.long)
                    mask[row, :len(e)] = 1
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                scores.extend(logits[:, 0].float().cpu().tolist())
        return scores

    def __repr__(self) -> str:
        return f"RewardModel({self.name!r})"


def load_reward(ref: str, device: str | None = None) -> RewardFn:
    """Resolve a reward reference: a built-in name, "module:function", or a reward model folder /
    hub name (see the module docstring); a reward model runs on `device` (default CPU)."""
    if not isinstance(ref, str) or not ref.strip():
        raise RewardError(f"reward reference must be a non-empty string, got {ref!r}")
    ref = ref.strip()
    if ref in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[ref]
    local = Path(ref).expanduser()
    if ":" in ref and not local.exists():
        return load_function(ref)
    if local.exists():
        if not local.is_dir() or not (local / "config.json").exists():
            raise RewardError(f"reward {ref!r}: {str(local)!r} is not a model folder (no "
                             f"config.json); expected a built-in ({', '.join(REWARD_FUNCTIONS)}), "
                             f"'module:function', or a reward model folder")
        return RewardModel(str(local), device=device)
    try:
        return RewardModel(ref, device=device)
    except OSError as e:
        raise RewardError(f"unknown reward {ref!r}: not a built-in ({', '.join(REWARD_FUNCTIONS)}), "
                         f"not 'module:function', not a local folder, and loading it from the "
                         f"Hugging Face hub failed ({e})") from e
