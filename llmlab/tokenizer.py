"""Tokenizers: train a byte-level BPE tokenizer, load one, fingerprint one.

Our tokenizers are byte-level BPE (any unicode text round-trips exactly) with every digit its own
token (so numbers are spelled digit by digit, which tiny models learn arithmetic from far more
easily), five special tokens, and a ChatML chat template whose assistant turns are marked for
`apply_chat_template(..., return_assistant_tokens_mask=True, return_dict=True)`.

Usage:
    from llmlab.tokenizer import train_tokenizer, load_tokenizer, tokenizer_fingerprint
    tok = train_tokenizer(texts, vocab_size=2048, out_dir="out/tok")
    tok = load_tokenizer("out/tok")            # or a hub name such as "gpt2"
    vocab_size_for_model = len(tok)            # counts the added special tokens

Training reads the texts once (streamed); the result is saved with `save_pretrained(out_dir)`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from llmlab.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN]

# transformers renders templates with trim_blocks/lstrip_blocks, so a newline written right after a
# block tag would vanish: every newline that must survive is emitted as an expression `{{ '\n' }}`.
# The assistant's content and its <|im_end|> sit inside {% generation %} so the assistant-token mask
# covers exactly what the model must learn to produce, end-of-turn included; the newline after
# <|im_end|> stays outside (the model stops at <|im_end|>).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{%- else -%}"
    "{{ message['content'] + '<|im_end|>' }}"
    "{%- endif -%}"
    "{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- endif -%}"
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")


class TokenizerMissing(UserError, FileNotFoundError):
    """A tokenizer path that does not exist or has no tokenizer files."""


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path,
                    min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer of `vocab_size` tokens (special tokens included), save it to
    `out_dir` and return it wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(byte_alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level tokenizer needs at "
                         f"least {len(byte_alphabet) + len(SPECIAL_TOKENS)} "
                         f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps character offsets exact; assistant masks are computed from them.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        # All 256 bytes up front, so text unseen in training still encodes (no unknown token).
        initial_alphabet=byte_alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out))
    return wrapped


def _looks_local(name_or_path: str) -> bool:
    return (Path(name_or_path).expanduser().exists()
            or name_or_path.startswith(("/", "./", "../", "~", "."))
            or name_or_path.count("/") > 1)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder or the Hugging Face hub, ready for training: a pad
    token (the EOS token when it has none), left padding, and our chat template when the tokenizer
    has none but carries our chat special tokens."""
    from transformers import AutoTokenizer

    if _looks_local(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise TokenizerMissing(f"tokenizer path {str(path)!r} does not exist")
        if not path.is_dir() or not any((path / f).exists() for f in
                                        ("tokenizer.json", "tokenizer_config.json")):
            raise UserError(f"{str(path)!r} is not a tokenizer folder (no tokenizer.json or "
                             f"tokenizer_config.json in it)")
        tok = AutoTokenizer.from_pretrained(str(path))
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name_or_path)
        except OSError as e:
            raise OSError(f"could not load tokenizer {name_or_path!r}: not a local folder, and the "
                          f"Hugging Face hub failed (offline? HF_HUB_OFFLINE may be set): {e}") from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"tokenizer {name_or_path!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if not tok.chat_template:
        vocab = tok.get_vocab()
        if IM_START_TOKEN in vocab and IM_END_TOKEN in vocab:
            tok.chat_template = CHAT_TEMPLATE
    return tok


def ensure_chat_template(tok) -> list[int]:
    """Give a tokenizer without a chat template llmlab's ChatML one (`CHAT_TEMPLATE`), adding the
    <|im_start|> / <|im_end|> special tokens it lacks; returns the ids of the tokens it added (their
    embedding rows are new: `llmlab.models.fit_embeddings` makes them, and they must train). A
    tokenizer with a template of its own keeps it (its assistant masks come from the template's
    markers, or from the rendered text's offsets)."""
    if tok.chat_template:
        return []
    vocab = tok.get_vocab()
    missing = [t for t in (IM_START_TOKEN, IM_END_TOKEN) if t not in vocab]
    if missing:  # added to the tokenizer's own extra special tokens, not in place of them
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    tok.chat_template = CHAT_TEMPLATE
    return [tok.convert_tokens_to_ids(t) for t in missing]


def tokenizer_file_vocab(folder: str | Path) -> int | None:
    """How many tokens a saved fast tokenizer has (the highest id in tokenizer.json + 1), read from
    the file alone (no transformers import); None when there is no readable tokenizer.json."""
    try:
        data = json.loads((Path(folder).expanduser() / "tokenizer.json").read_text())
        ids = list(data["model"]["vocab"].values()) + [t["id"] for t in data.get("added_tokens", [])]
        return max(ids) + 1
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def tokenizer_fingerprint(tok_dir: str | Path) -> str:
    """A short sha256 over the tokenizer's files (those present among TOKENIZER_FILES)."""
    tok_dir = Path(tok_dir)
    digest = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        path = tok_dir / name
        if path.is_file():
            found = True
            digest.update(name.encode() + b"\0")
            digest.update(path.read_bytes())
            digest.update(b"\0")
    if not found:
        raise TokenizerMissing(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {str(tok_dir)!r}")
    return digest.hexdigest()[:16]
