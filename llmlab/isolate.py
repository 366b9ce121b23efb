"""One stage in a process of its own, for branches of a sweep that run side by side.

    result = execute_stage_isolated("pipelines/tiny-sweep.yaml", "dpo[beta=0.1]", inputs, parent_run_id,
                                    slot=0, slots=2)

Branches running at once must not share a process: seeding, the RNG and torch's thread pool are
process-wide, so two branches in threads of one process would change each other's numbers. Each
gets a child `python -m llmlab.isolate` that runs `llmlab.execute.execute_stage` exactly as the
flow's own process would (same lock, cache check, MLflow run, stage.json), on GPU `slot` of the
visible ones, or on CPU with its share of the cores (cores / slots threads). Its console output
streams through. An expected failure comes back as a `StageFailed` with the child's sentence; a bug
as a RuntimeError carrying the child's traceback. Imports neither torch nor prefect at module level.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from llmlab.errors import StageFailed

THREADS_ENV = "LLMLAB_THREADS"


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES entries (none without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given:
        return [d.strip() for d in given.split(",") if d.strip()][: torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


def default_parallel(requested: int | None) -> int:
    """How many branches run at once: the spec's `max_parallel`, else one per visible GPU, else 1."""
    if requested is not None:
        return requested
    return max(1, len(visible_gpus()))


def child_env(slot: int, slots: int) -> dict[str, str]:
    env = dict(os.environ)
    gpus = visible_gpus()
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    threads = str(max(1, (os.cpu_count() or 1) // max(1, slots)))
    env.update({THREADS_ENV: threads, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
    return env


def execute_stage_isolated(spec_file: str, stage: str, inputs: dict[str, dict], parent_run_id: str | None,
                           force: bool = False, slot: int = 0, slots: int = 1) -> dict[str, Any]:
    """`execute_stage` in a child process on its slot; see the module docstring."""
    with tempfile.TemporaryDirectory(prefix="llmlab-branch-") as tmp:
        request, answer = Path(tmp) / "request.json", Path(tmp) / "answer.json"
        request.write_text(json.dumps({"spec": spec_file, "stage": stage, "inputs": inputs,
                                       "parent_run_id": parent_run_id, "force": force}))
        proc = subprocess.run([sys.executable, "-m", "llmlab.isolate", str(request), str(answer)],
                              env=child_env(slot, slots))
        if not answer.is_file():
            raise RuntimeError(f"stage '{stage}': its process ended with code {proc.returncode} and no result")
        reply = json.loads(answer.read_text())
    if "result" in reply:
        return reply["result"]
    if reply.get("sentence"):
        error = StageFailed(reply["sentence"])
        error.stage_log = reply.get("log")  # type: ignore[attr-defined]
        raise error
    raise RuntimeError(f"stage '{stage}' failed in its own process:\n{reply.get('traceback', '')}")


def _child(request_file: str, answer_file: str) -> int:
    from llmlab.checkpoint import atomic_write_json
    from llmlab.errors import expected_failure, format_traceback
    from llmlab.execute import execute_stage
    from llmlab.serve import configure_environment

    configure_environment()
    if os.environ.get(THREADS_ENV):
        import torch

        torch.set_num_threads(int(os.environ[THREADS_ENV]))
    req = json.loads(Path(request_file).read_text())
    try:
        result = execute_stage(req["spec"], req["stage"], req["inputs"], req["parent_run_id"], force=req["force"])
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        log = getattr(exc, "stage_log", None)
        atomic_write_json(Path(answer_file), {"sentence": expected_failure(exc, req["stage"]), "log": str(log) if log else None,
                                              "traceback": format_traceback(exc)})
        return 1
    atomic_write_json(Path(answer_file), {"result": result})
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2]))
