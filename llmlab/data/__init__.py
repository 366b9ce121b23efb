"""Data: reading sources (`llmlab.data.sources`), built-in corpora (`llmlab.data.builtin`) and
tokenized, packed pretraining data (`llmlab.data.pretrain`).

Importing this package stays light: `datasets` is imported only when a source needs it, and torch
only when `llmlab.data.pretrain` (or one of its names below) is first used.

Usage:
    from llmlab.data import iter_texts, interleave, BUILTIN_SOURCES
    from llmlab.data import prepare_pretrain_data, BlockSampler   # imports torch on first use
"""

from __future__ import annotations

from llmlab.data.builtin import BUILTIN_SOURCES
from llmlab.data.sources import DataSourceError, interleave, iter_rows, iter_texts

_PRETRAIN_NAMES = ("PretrainData", "prepare_pretrain_data", "BlockSampler", "eval_batches",
                   "is_validation")

__all__ = ["BUILTIN_SOURCES", "DataSourceError", "interleave", "iter_rows", "iter_texts",
           *_PRETRAIN_NAMES]


def __getattr__(name: str):
    # Lazy so that `import llmlab.data` (e.g. from `llmlab validate`) does not pull in torch.
    if name in _PRETRAIN_NAMES:
        from llmlab.data import pretrain

        return getattr(pretrain, name)
    raise AttributeError(f"module 'llmlab.data' has no attribute {name!r}")
