"""Data: the sources a spec names (`llmlab.data.sources`), the one reader every kind goes through
(`llmlab.data.reader`), the kinds — SFT conversations (`sft`), preference pairs (`preference`), RL
prompts (`prompts`), pretraining text (`pretrain`) — and built-in corpora and tasks (`builtin`,
`tasks`).

Importing this package stays light: `datasets` is imported only when a source needs it, and torch
only by the kind modules (`from llmlab.data.sft import ...`).

    from llmlab.data.sources import DataSource, iter_rows
    from llmlab.data.reader import read, stream
"""

from __future__ import annotations

from llmlab.data.builtin import BUILTIN_SOURCES
from llmlab.data.sources import DataSource, DataSourceError, iter_rows, iter_texts

__all__ = ["BUILTIN_SOURCES", "DataSource", "DataSourceError", "iter_rows", "iter_texts"]
