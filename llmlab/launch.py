"""Above the stages: run one stage under torchrun, and the worker every rank runs.

A stage with `distributed: {nproc_per_node: 2}` is launched by `execute_stage` (inside the Prefect
task) as a torchrun subprocess running this module on every rank:

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m llmlab.launch \\
        SPEC STAGE INPUTS.json RUN_ID RESULT.json

Every rank runs the stage's runner (`llmlab.runners.registry`). Rank 0 writes the stage's outputs,
checkpoints and MLflow metrics (to the run the parent opened); the other ranks write their copies to
a scratch folder and log nothing. How ranks train together is `llmlab.parallel`'s business.

Multi-node: `nnodes > 1` uses c10d rendezvous at `rdzv_endpoint` (or $LLMLAB_RDZV_ENDPOINT); every
machine runs the same command (`llmlab` prints it) — see docs/scaling.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any, Iterator

import torch

from llmlab import fastpath, parallel
from llmlab.checkpoint import atomic_write_json
from llmlab.runners.context import StageContext, StageResult, stage_block
from llmlab.runners.registry import KINDS, resolved_config, runner
from llmlab.serve import configure_environment
from llmlab.spec import load_spec
from llmlab.tracking import Tracker
from llmlab.train.signals import TrainingInterrupted

ENV_RDZV = "LLMLAB_RDZV_ENDPOINT"


def launch_command(dist_spec: Any, spec_file: str, stage: str, inputs_file: str, run_id: str,
                   result_file: str) -> list[str]:
    """The torchrun command line for a stage (the same on every machine of a multi-node job)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={dist_spec.nproc_per_node}",
           f"--nnodes={dist_spec.nnodes}"]
    if dist_spec.nnodes > 1:
        endpoint = dist_spec.rdzv_endpoint or os.environ.get(ENV_RDZV)
        if not endpoint:
            raise ValueError(f"stage '{stage}': distributed.nnodes is {dist_spec.nnodes}, so the machines need a "
                             f"rendezvous: set distributed.rdzv_endpoint: host:port (or ${ENV_RDZV})")
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "llmlab.launch", spec_file, stage, inputs_file, run_id, result_file]


def run_under_torchrun(spec_file: str, stage: str, dist_spec: Any, inputs: dict[str, dict], run_id: str,
                       out_dir: Path) -> tuple[dict[str, str], dict[str, float]]:
    """Launch the stage on `world_size` processes and wait; rank 0's (outputs, metrics)."""
    work = Path(tempfile.mkdtemp(prefix=f".torchrun-{stage}-", dir=out_dir))
    inputs_file, result_file = work / "inputs.json", work / "result.json"
    inputs_file.write_text(json.dumps(inputs))
    cmd = launch_command(dist_spec, spec_file, stage, str(inputs_file), run_id, str(result_file))
    print(f"[{stage}] launching {dist_spec.world_size} processes ({dist_spec.strategy}): {' '.join(cmd)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(
        (os.cpu_count() or 1) // dist_spec.nproc_per_node, 1)))}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    tail: list[str] = []
    assert proc.stdout is not None
    with _waiting_through_ctrl_c():
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail = (tail + [line])[-40:]
        rc = proc.wait()
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    try:
        if result.get("status") == "interrupted":
            raise TrainingInterrupted(int(result["step"]))
        if rc != 0 or result.get("status") != "finished":
            errors = [f"rank {f.stem.split('rank')[-1]}: {f.read_text()}" for f in sorted(work.glob("error-rank*.txt"))]
            raise RuntimeError(f"stage '{stage}' failed under torchrun (exit {rc}): "
                               f"{result.get('error') or '; '.join(errors) or ''.join(tail[-15:])}")
        for path, how in result.get("fast_paths", {}).items():  # what rank 0 ran, for the stage's record
            fastpath.record(path, how)
        return result["outputs"], result["metrics"]
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _waiting_through_ctrl_c() -> Iterator[None]:
    """While the workers run, a Ctrl+C reaches them too (the same terminal): they save a checkpoint
    and stop, and rank 0 reports it. The launching process keeps waiting for that report instead of
    dying on KeyboardInterrupt (main thread only; elsewhere signals are not ours to handle)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, lambda signum, frame: print("\nstopping the workers at the end of this step",
                                                                   file=sys.stderr))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


class _NoRun:
    """What ranks other than 0 log to: nothing."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


def worker(spec_file: str, stage: str, inputs_file: str, run_id: str, result_file: str) -> int:
    """One rank of a distributed stage; see the module docstring."""
    configure_environment()
    spec = load_spec(spec_file)
    block = stage_block(spec, stage)
    par = parallel.init(block.distributed.strategy, block.distributed.backend)
    inputs = {k: StageResult.from_dict(v) for k, v in json.loads(Path(inputs_file).read_text()).items()}
    stage_dir = spec.stage_dir(stage)
    if par.main:
        run: Any = Tracker(spec.tracking.uri, spec.tracking.experiment or spec.name, spec.tracking.wait_seconds).run(run_id)
        out_dir = stage_dir
    else:
        run, out_dir = _NoRun(run_id), Path(tempfile.mkdtemp(prefix=f"llmlab-{stage}-rank{par.rank}-"))
        sys.stdout = open(os.devnull, "w")  # rank 0 reports progress; errors still reach stderr
    ctx = StageContext(spec, stage, block, out_dir, inputs, run, stage_dir=stage_dir, resolved=resolved_config(spec, stage),
                       kinds=KINDS)
    status: dict[str, Any]
    fastpath.new_stage(decode=getattr(ctx.config, "decode", "auto"))
    try:
        outputs, metrics = runner(block.kind)(ctx)
        status = {"status": "finished", "outputs": outputs, "metrics": metrics, "fast_paths": fastpath.taken()}
        code = 0
    except TrainingInterrupted as e:
        status, code = {"status": "interrupted", "step": e.step}, 3
    except Exception as e:
        status, code = {"status": "failed", "error": f"{type(e).__name__}: {e}"}, 1
        traceback.print_exc()
        # the first failing rank's error: torchrun stops the others before rank 0 can report
        Path(result_file).with_name(f"error-rank{par.rank}.txt").write_text(status["error"])
    if par.main:
        if run is not None and hasattr(run, "drain"):
            run.drain()  # the parent ends the run; what MLflow did not take yet is sent now
        atomic_write_json(result_file, status)
    if not par.main:
        shutil.rmtree(out_dir, ignore_errors=True)
    if par.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    # run as `-m llmlab.launch`; the rank state lives in llmlab.parallel, which the loop reads
    sys.exit(worker(*sys.argv[1:6]))
