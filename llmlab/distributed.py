"""Training beyond one process, on torch's own engine: torchrun, DDP, FSDP2.

A stage with `distributed: {nproc_per_node: 2}` is launched by `execute_stage` (inside the Prefect
task) as a torchrun subprocess running this module on every rank:

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m llmlab.distributed \\
        SPEC STAGE INPUTS.json RUN_ID RESULT.json

Every rank runs the stage's runner. Rank 0 writes the stage's outputs, checkpoints and MLflow
metrics (to the run the parent opened); the other ranks write their copies to a scratch folder
and log nothing. The loop (`llmlab.train.loop`) trains through an `Engine`:

- ddp: `DistributedDataParallel` over the model; gradients are averaged across ranks, and micro-
  batches before the last of a step skip the sync (`no_sync`).
- fsdp: FSDP2 (`fully_shard`) on each transformer block, then on the model: parameters, gradients
  and optimizer state are sharded. The caller's model is parked on the meta device meanwhile and
  gets the trained weights back at the end.
- Data: `ShardedBatches` deals the batch stream out round-robin — micro-batch i goes to rank
  i mod world — so a step's global batch is batch_size x accumulation x world, no example is seen
  twice, and the run equals one process with accumulation x world. RL rollouts are made per rank
  (`RolloutBatches` takes its share of each rollout's prompts).
- The loss of a step is normalised by the token (or pair) count summed over all ranks, so the
  gradient equals the single-process one, not a mean of per-rank means.
- Checkpoints always hold full, unsharded tensors in the single-process format: a run saved under
  FSDP or DDP resumes in one process, and the other way round.

Multi-node: `nnodes > 1` uses c10d rendezvous at `rdzv_endpoint` (or $LLMLAB_RDZV_ENDPOINT); every
machine runs the same command (`llmlab` prints it) — see docs/scaling.md.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

ENV_RDZV = "LLMLAB_RDZV_ENDPOINT"


@dataclass
class Parallel:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "ddp"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


_CURRENT = Parallel()


def current() -> Parallel:
    """This process's place in the job (rank 0 of 1 when not launched by torchrun)."""
    return _CURRENT


def init(strategy: str = "ddp", backend: str = "auto") -> Parallel:
    """Join the process group torchrun set up (no-op for a single process)."""
    global _CURRENT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        torch.distributed.init_process_group(backend)
    _CURRENT = Parallel(rank, world, local, strategy)
    return _CURRENT


def barrier() -> None:
    if current().active:
        torch.distributed.barrier()


def _collective_device() -> torch.device:
    """Where a collective's tensors must live: the rank's GPU under nccl, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (picklable objects; e.g. evaluation metrics, so every rank
    makes the same best-model decision)."""
    if not current().active:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not current().active:
        return [obj]
    out: list[Any] = [None] * current().world
    torch.distributed.all_gather_object(out, obj)
    return out


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over ranks (a new tensor; `x` itself when single-process)."""
    if not current().active:
        return x
    y = x.detach().to(_collective_device(), copy=True)
    torch.distributed.all_reduce(y)
    return y.to(x.device)


def mean_float(value: float) -> float:
    """The mean of a Python float over ranks."""
    if not current().active:
        return value
    return float(all_sum(torch.tensor(float(value), dtype=torch.float64))) / current().world


def any_rank(flag: bool) -> bool:
    """True when `flag` is set on any rank (e.g. a stop signal that reached one worker first)."""
    if not current().active:
        return flag
    return bool(all_sum(torch.tensor(1.0 if flag else 0.0)) > 0)


class ShardedBatches:
    """Deal a batch source out round-robin: rank r keeps micro-batches r, r + world, ... of the one
    stream every rank builds from the same seed. State is the inner source's (identical on all
    ranks), so a checkpoint resumes under any world size."""

    def __init__(self, inner: Any, rank: int, world: int):
        self.inner, self.rank, self.world = inner, rank, world

    def next_batch(self) -> dict[str, torch.Tensor]:
        mine = None
        for i in range(self.world):
            batch = self.inner.next_batch()
            if i == self.rank:
                mine = batch
        return mine

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP shards one by one: the transformer blocks (`_no_split_modules` classes)."""
    names = set(getattr(model, "_no_split_modules", None) or ["Block"])
    return [m for m in model.modules() if type(m).__name__ in names]


class Engine:
    """How the loop trains `model` across ranks: which module runs forward, whose parameters the
    optimizer holds, and how to read and write full (unsharded) model and optimizer state."""

    def __init__(self, model: torch.nn.Module, par: Parallel):
        self.model, self.par = model, par
        self.strategy = par.strategy if par.active else "single"
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [par.local_rank] if next(model.parameters()).is_cuda else None
            self.train_model: torch.nn.Module = DistributedDataParallel(model, device_ids=device_ids)
            self.owner = model  # the optimizer's parameters (DDP shares them)
        elif self.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            sharded = copy.deepcopy(model)
            for block in _blocks(sharded):
                fully_shard(block)
            fully_shard(sharded)
            self.device = next(model.parameters()).device
            model.to("meta")  # the caller's copy holds no memory while the shards train
            self.train_model = self.owner = sharded
        else:
            self.train_model = self.owner = model

    @property
    def eval_model(self) -> torch.nn.Module:
        """The module evaluation runs (every rank runs it on the same data)."""
        return self.train_model if self.strategy == "fsdp" else self.model

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on micro-batches before a step's last."""
        if last or self.strategy == "single":
            return contextlib.nullcontext()
        if self.strategy == "ddp":
            return self.train_model.no_sync()
        return _fsdp_no_sync(self.train_model)

    def model_state(self, everywhere: bool = False) -> dict[str, torch.Tensor]:
        """Full model state (plain tensors). Under FSDP a collective: call on every rank; the
        result is complete on rank 0 (on every rank with `everywhere`)."""
        if self.strategy != "fsdp":
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.train_model, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=not everywhere))

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.strategy != "fsdp":
            self.model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.train_model, state, options=StateDictOptions(full_state_dict=True))

    def _order(self, optimizer: torch.optim.Optimizer) -> list[str]:
        names = {id(p): n for n, p in self.owner.named_parameters()}
        return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """Full optimizer state in torch's single-process format (parameters by position)."""
        if self.strategy != "fsdp":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = get_optimizer_state_dict(self.train_model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not full:
            return {}
        index = {n: i for i, n in enumerate(self._order(optimizer))}
        return {"state": {index[n]: v for n, v in full["state"].items()},
                "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if self.strategy != "fsdp":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        saved = {g.get("optimizer") for g in state.get("param_groups", [])} - {None}
        mine = {g.get("optimizer") for g in optimizer.param_groups} - {None}
        if saved and saved != mine:
            raise ValueError(f"the checkpoint holds {', '.join(sorted(saved))} optimizer state but this run uses "
                             f"{', '.join(sorted(mine))}: resume with `load_optimizer: false` to switch optimizers")
        order = self._order(optimizer)
        by_name = {"state": {order[i]: v for i, v in state["state"].items()},
                   "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
        set_optimizer_state_dict(self.train_model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))

    def finish(self) -> None:
        """Give the caller's model the trained weights (FSDP: it was parked on the meta device)."""
        if self.strategy != "fsdp":
            return
        state = {k: v.to(self.device) for k, v in self.model_state(everywhere=True).items()}
        self.model.to_empty(device=self.device)
        self.model.load_state_dict(state)


@contextlib.contextmanager
def _fsdp_no_sync(model: Any) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# ----------------------------------------------------------------------------------- launching


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
    return cmd + ["-m", "llmlab.distributed", spec_file, stage, inputs_file, run_id, result_file]


def run_under_torchrun(spec_file: str, stage: str, dist_spec: Any, inputs: dict[str, dict], run_id: str,
                       out_dir: Path) -> tuple[dict[str, str], dict[str, float]]:
    """Launch the stage on `world_size` processes and wait; rank 0's (outputs, metrics)."""
    from llmlab.train.loop import TrainingInterrupted

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
        return result["outputs"], result["metrics"]
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _waiting_through_ctrl_c() -> Iterator[None]:
    """While the workers run, a Ctrl+C reaches them too (the same terminal): they save a checkpoint
    and stop, and rank 0 reports it. The launching process keeps waiting for that report instead of
    dying on KeyboardInterrupt (main thread only; elsewhere signals are not ours to handle)."""
    import signal
    import threading

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
    from llmlab.checkpoint import atomic_write_json
    from llmlab.paths import configure_environment
    from llmlab.spec import load_spec
    from llmlab.stages import StageContext, StageResult, runner, stage_block
    from llmlab.train.loop import TrainingInterrupted

    configure_environment()
    spec = load_spec(spec_file)
    block = stage_block(spec, stage)
    par = init(block.distributed.strategy, block.distributed.backend)
    inputs = {k: StageResult.from_dict(v) for k, v in json.loads(Path(inputs_file).read_text()).items()}
    stage_dir = Path(spec.output_root) / stage
    if par.main:
        from llmlab.tracking import Tracker

        run: Any = Tracker(spec.tracking.uri, spec.tracking.experiment or spec.name).run(run_id)
        out_dir = stage_dir
    else:
        run, out_dir = _NoRun(run_id), Path(tempfile.mkdtemp(prefix=f"llmlab-{stage}-rank{par.rank}-"))
        sys.stdout = open(os.devnull, "w")  # rank 0 reports progress; errors still reach stderr
    ctx = StageContext(spec, stage, block, out_dir, inputs, run, stage_dir=stage_dir)
    status: dict[str, Any]
    try:
        outputs, metrics = runner(block.kind)(ctx)
        status = {"status": "finished", "outputs": outputs, "metrics": metrics}
        code = 0
    except TrainingInterrupted as e:
        status, code = {"status": "interrupted", "step": e.step}, 3
    except Exception as e:
        status, code = {"status": "failed", "error": f"{type(e).__name__}: {e}"}, 1
        import traceback

        traceback.print_exc()
        # the first failing rank's error: torchrun stops the others before rank 0 can report
        Path(result_file).with_name(f"error-rank{par.rank}.txt").write_text(status["error"])
    if par.main:
        if run is not None and hasattr(run, "flush"):
            run.flush()
        atomic_write_json(result_file, status)
    if not par.main:
        shutil.rmtree(out_dir, ignore_errors=True)
    if par.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    # run as `-m llmlab.distributed`, this file is __main__; the loop imports llmlab.distributed, so
    # the worker must run in (and set the rank state of) that module, not this copy of it
    from llmlab import distributed as _module

    sys.exit(_module.worker(*sys.argv[1:6]))
