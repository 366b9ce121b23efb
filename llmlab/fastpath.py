"""Fast paths that fall back instead of failing, and a record of which path ran.

Two fast paths can fail on a user's card, driver or torch build where the plain path would not:
`compile` (torch.compile of each transformer block, and the first compiled training step, where
compilation happens) and `decode` (the static KV cache's prefill and the first graph-captured decode
step). When one raises, the stage prints one warning naming the path and the cause, goes on along the
plain path with the same results (eager blocks; a growing KV cache), and does not try that path
again in this process. A path the user forced (`compile: true`; `decode: static` or
`LLMLAB_DECODE=static`) fails the stage instead, in one sentence. What each stage ran is `taken()`: the executor writes it to
stage.json (`fast_paths`) and to the stage's MLflow run (`llmlab.fast_path.<path>` tags).
"""

from __future__ import annotations

import threading

from llmlab.errors import UserError

FORCE_HINTS = {  # how to take the plain path when a forced fast path fails
    "compile": "set `compile: auto` (falls back by itself) or `compile: false` in the stage's train block",
    "decode": "set the stage's `decode: auto` (falls back by itself) or `decode: dynamic`, and unset LLMLAB_DECODE",
}

_lock = threading.Lock()
_taken: dict[str, str] = {}  # path -> what ran: "compiled", "eager", "static", "dynamic", or a fallback with its cause
_broken: dict[str, str] = {}  # path -> how it failed in this process (later stages skip it)
_decode = "auto"  # the running stage's `decode` setting


class FastPathFailed(UserError):
    """A fast path the user forced failed; the message names it, the cause and the way around it."""


def record(path: str, how: str) -> None:
    """Note what ran for `path` in this stage (a fallback already noted stays)."""
    with _lock:
        if not _taken.get(path, "").startswith("fell back"):
            _taken[path] = how


def broken(path: str) -> bool:
    """Whether `path` already failed in this process; if so this stage takes the plain path too, and
    its record says why."""
    with _lock:
        if path in _broken:
            _taken[path] = _broken[path]
            return True
    return False


def failed(path: str, where: str, exc: BaseException, forced: bool) -> None:
    """A fast path raised `exc` while `where`: a forced one ends the stage in one sentence; otherwise
    warn once, remember the fallback, and leave the caller to take the plain path."""
    cause = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}".rstrip(": ")
    if forced:
        raise FastPathFailed(f"the forced fast path '{path}' failed while {where} ({cause}): {FORCE_HINTS[path]}") from exc
    with _lock:
        first = path not in _broken
        _broken[path] = _taken[path] = f"fell back to the plain path: {where} raised {cause}"
    if first:
        plain = "eager blocks" if path == "compile" else "the growing KV cache"
        print(f"warning: fast path '{path}' failed while {where} ({cause}); going on with {plain}, same results",
              flush=True)


def taken() -> dict[str, str]:
    with _lock:
        return dict(_taken)


def new_stage(decode: str = "auto") -> None:
    """Start a stage's record (what failed earlier in the process stays failed); `decode` is the
    stage's setting, which `llmlab.generate` follows where its caller asks for "auto"."""
    global _decode
    with _lock:
        _taken.clear()
        _decode = decode


def stage_decode() -> str:
    """The running stage's `decode` setting ("auto" outside a stage)."""
    return _decode


def reset() -> None:
    """Forget what ran and what failed."""
    global _decode
    with _lock:
        _decode = "auto"
        _taken.clear()
        _broken.clear()
