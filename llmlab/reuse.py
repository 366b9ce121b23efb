"""Reusing finished stages: cache keys, integrity checks, and a lock per stage output.

    key = cache_key(spec, "pretrain", inputs)          # config + input fingerprints + code version
    intact = finished_result(spec, "pretrain", inputs)   # StageResult dict if outputs are whole, else None
    with stage_lock(out_dir): ...                        # one writer per stage output, across processes
    message = folder_conflict(spec_file, spec, "pretrain")  # another spec's stage lives there

A stage's cache key is its resolved config, the fingerprints of its inputs and the version of the
code the stage runs (`llmlab.code`: a code change there invalidates it, a comment does not) —
never a path string alone. A cached result is
trusted only while `stage.json` says finished for the same key and the output still has the
fingerprint recorded there; otherwise the stage runs again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from llmlab.checkpoint import fingerprint
from llmlab.code import code_version
from llmlab.errors import UserError
from llmlab.runners.registry import kind_of, resolved_config
from llmlab.spec import Pipeline, config_hash


def cache_key(spec: Pipeline, stage: str, inputs: dict[str, dict]) -> str:
    """What decides whether a finished result can stand in for running the stage again."""
    payload = {"config": config_hash(resolved_config(spec, stage)), "code": code_version(kind_of(spec, stage).name),
               "inputs": {k: v["fingerprint"] for k, v in sorted(inputs.items())}}
    return f"{spec.name}-{stage.replace('/', '_')}-{config_hash(payload)}"  # a file name in Prefect's result storage


def finished_result(spec: Pipeline, stage: str, inputs: dict[str, dict], strict: bool = True) -> dict[str, Any] | None:
    """The recorded result of this stage if it finished with this exact key (any key when not
    `strict`) and its main output still has the recorded fingerprint; None when it must run (again)."""
    record_file = spec.stage_dir(stage) / "stage.json"
    if not record_file.is_file():
        return None
    try:
        record = json.loads(record_file.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("status") != "finished" or (strict and record.get("cache_key") != cache_key(spec, stage, inputs)):
        return None
    main = Path(record["outputs"][kind_of(spec, stage).main_output])
    if not main.exists() or fingerprint(main) != record["fingerprint"]:
        return None
    return record["result"]


@contextlib.contextmanager
def stage_lock(out_dir: Path, label: str) -> Iterator[None]:
    """Hold an exclusive lock on a stage's output folder (waits for another run holding it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[{label}] another run is writing {out_dir}; waiting for it", flush=True)
            started = time.monotonic()
            fcntl.flock(fh, fcntl.LOCK_EX)
            print(f"[{label}] lock acquired after {time.monotonic() - started:.0f}s", flush=True)
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class StageFolderTaken(UserError):
    """Two specs point one stage folder at different configs; the second is refused."""


def folder_conflict(spec_file: str | Path, spec: Pipeline, stage: str) -> str | None:
    """Why this spec must not write `<workdir>/<stage>/`: the folder holds the same stage of
    another spec file with a different config (its checkpoints would be resumed as if they were
    this config's, its results overwritten). None when the folder is free, this spec's own, or
    another spec's with the very same config (then sharing it is reuse)."""
    out_dir = spec.stage_dir(stage)
    try:
        record = json.loads((out_dir / "stage.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    owner, this = record.get("spec_file"), str(Path(spec_file).resolve())
    if not owner or owner == this or record.get("config_hash") == config_hash(resolved_config(spec, stage)):
        return None
    changed = changed_fields(record.get("config") or {}, resolved_config(spec, stage))
    return (f"stage '{stage}': {out_dir}: holds this stage of {owner} ({record.get('status', 'unknown')}), and {this} "
            f"points the same folder at a different config ({changed}): give one of the two pipelines its own `workdir` "
            f"(or delete {out_dir} to hand it over), then run again")


def changed_fields(old: dict, new: dict, prefix: str = "") -> str:
    """The first few fields that differ between two resolved configs, each whole, as `a.b[0].c: old -> new`
    (lists of the same length are compared item by item, so a changed data path is named alone)."""
    diffs: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{path}[{i}]")
        elif a != b:
            diffs.append(f"{path}: {json.dumps(a)} -> {json.dumps(b)}")

    walk(old, new, prefix)
    return "; ".join(diffs[:3]) + (f"; {len(diffs) - 3} more" if len(diffs) > 3 else "") if diffs else "a different config"
