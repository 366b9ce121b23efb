"""Atomic files and folders, and resumable trainer checkpoints.

Nothing half-written is ever visible under its final name: files and folders are written to a
temporary sibling, flushed to disk, then renamed (`os.replace` is atomic on POSIX). A power cut
leaves either the previous state or the new one.

    with atomic_dir(out / "model") as tmp:      # tmp is empty; renamed to out/model on success
        model.save_pretrained(tmp)
    save_checkpoint(ckpt_dir, step, {"model": model, "optimizer": opt, ...})
    state = load_checkpoint(latest_checkpoint(ckpt_dir))

Everything checkpointed has `state_dict` / `load_state_dict`; a checkpoint holds tensors and plain
Python values only (no pickled configs), loaded with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

from llmlab.errors import UserError

KEEP_CHECKPOINTS = 2  # resumable checkpoints kept per stage; older ones are deleted


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `path` whole, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fingerprint(path: str | Path) -> str:
    """sha256 over a file, or over every file of a folder (relative names and bytes, sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- trainer checkpoints


class CheckpointWriteFailed(UserError):
    """A checkpoint could not be written (disk full, not writable, a failing disk); the previous
    checkpoint stays `latest`, so a rerun resumes from it."""

    def __init__(self, target: Path, cause: BaseException, kept: Path | None):
        first = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else type(cause).__name__
        left = f"{kept.name} stays latest and a rerun resumes from it" if kept else "no earlier checkpoint exists"
        super().__init__(f"could not write checkpoint {target} ({first}); {left}: free space on that disk and check "
                         f"it is writable (or point `workdir` elsewhere), then run again")
        self.path, self.kept = target, kept


def _name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(ckpt_dir: str | Path, step: int, state: dict[str, Any]) -> Path:
    """Save `state` (objects with state_dict(), or plain values) as checkpoint `step`, atomically.

    Writes `<ckpt_dir>/step-NNNNNNNN/state.pt`, then points `<ckpt_dir>/latest` at it, then prunes
    all but the newest KEEP_CHECKPOINTS.
    """
    import torch

    ckpt_dir = Path(ckpt_dir)
    blob = {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in state.items()}
    target = ckpt_dir / _name(step)
    try:
        with atomic_dir(target) as tmp:
            with open(tmp / "state.pt", "wb") as f:
                torch.save(blob, f)
        atomic_write_text(ckpt_dir / "latest", target.name + "\n")
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a failed write as a RuntimeError
        if isinstance(exc, RuntimeError) and "write" not in str(exc).lower():
            raise
        pointer = ckpt_dir / "latest"
        if not (pointer.is_file() and pointer.read_text().strip() == target.name):
            shutil.rmtree(target, ignore_errors=True)  # written but never made latest: not a checkpoint
        raise CheckpointWriteFailed(target, exc, latest_checkpoint(ckpt_dir)) from exc
    for old in sorted(ckpt_dir.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / "latest"
    if pointer.is_file():
        target = ckpt_dir / pointer.read_text().strip()
        if (target / "state.pt").is_file():
            return target
    complete = sorted(p for p in ckpt_dir.glob("step-*") if (p / "state.pt").is_file())
    return complete[-1] if complete else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The saved dict of state dicts and values (tensors on CPU)."""
    import torch

    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
