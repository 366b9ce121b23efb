"""Failures a user can fix, told as one sentence; everything else keeps its traceback.

    raise UserError(f"stage '{name}': {path} has no rows; add rows or remove the source")
    message = expected_failure(exc)      # the sentence for an expected failure, None for a bug

Expected failures: a `UserError` (bad data, a bad model folder, a failed gate, a missing upstream
output, ...: its message names the stage, the cause and the fix), running out of memory, and a disk
that is full or cannot be written. The console shows their sentence only; the traceback goes to
the stage's log file and MLflow run. `LLMLAB_DEBUG=1` (or `llmlab run --debug`) shows tracebacks
for these too. Nothing here imports torch or prefect.
"""

from __future__ import annotations

import errno
import os
import traceback

DEBUG_ENV = "LLMLAB_DEBUG"


class UserError(ValueError):
    """A failure whose cause and fix are in its message; shown without a traceback."""


class StageFailed(UserError):
    """An expected failure of one stage, as the sentence the console shows."""


DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    # torch.OutOfMemoryError (CUDA, MPS) without importing torch; CPU allocation failures are
    # RuntimeErrors that say so
    name = type(exc).__name__
    return name == "OutOfMemoryError" or (isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory"
                                           in str(exc))


def expected_failure(exc: BaseException, stage: str | None = None) -> str | None:
    """One sentence (cause and fix) for an expected failure; None for anything else (a bug)."""
    where = f"stage '{stage}': " if stage else ""
    if isinstance(exc, UserError):
        text = str(exc)
        return text if not stage or text.startswith(f"stage '{stage}'") else where + text
    if type(exc).__name__ == "GateFailed":  # llmlab.gates (imports nothing heavy, but keep this module leaf)
        return str(exc)
    if type(exc).__name__ == "TrainingInterrupted":  # llmlab.train.signals: Ctrl+C or SIGTERM, checkpoint saved
        return where + str(exc)
    if _is_out_of_memory(exc):
        return (f"{where}ran out of memory ({str(exc).splitlines()[0][:160]}); lower the stage's batch size "
                f"(batch_sequences, batch_pairs or batch_prompts) and raise gradient_accumulation_steps, or turn on "
                f"gradient_checkpointing — `llmlab inspect --detail` estimates the peak")
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        path = exc.filename or "the workdir"
        return f"{where}the disk is full writing {path}; free space there or point `workdir` at a larger disk, then run again"
    if isinstance(exc, OSError) and exc.errno in NOT_WRITABLE:
        path = exc.filename or "the workdir"
        return (f"{where}cannot write {path} ({exc.strerror}); make it writable or point `workdir` somewhere writable, "
                f"then run again")
    return None


def debug_enabled() -> bool:
    """Whether expected failures should keep their tracebacks too (LLMLAB_DEBUG=1)."""
    return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def format_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
