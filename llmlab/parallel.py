"""Training beyond one process, below the loop: the process group, DDP / FSDP2 wrapping, collectives.

The loop (`llmlab.train.loop`) trains through an `Engine`; a stage launched under torchrun by
`llmlab.launch` joins the process group with `init`:

- ddp: `DistributedDataParallel` over the model; gradients are averaged across ranks, and micro-
  batches before the last of a step skip the sync (`no_sync`).
- fsdp: FSDP2 (`fully_shard`) on each transformer block, then on the model: parameters, gradients
  and optimizer state are sharded. The caller's model is parked on the meta device meanwhile and
  gets the trained weights back at the end.
- Data: `ShardedBatches` deals the batch stream out round-robin — micro-batch i goes to rank
  i mod world — so a step's global batch is micro-batch x accumulation x world, no example is seen
  twice, and the run equals one process with accumulation x world. RL rollouts are made per rank
  (`RolloutBatches` takes its share of each rollout's prompts).
- The loss of a step is normalised by the token (or pair) count summed over all ranks, so the
  gradient equals the single-process one, not a mean of per-rank means.
- Checkpoints always hold full, unsharded tensors in the single-process format: a run saved under
  FSDP or DDP resumes in one process, and the other way round.

Single-process runs see rank 0 of 1 everywhere: every collective here is then a no-op.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Parallel:
    """This process's place in a job: its rank among `world` processes and the sharding strategy."""

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
        self.micro_batch, self.unit = inner.micro_batch, inner.unit

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
            device_ids = [par.local_rank] if next(model.parameters()).is_cuda else None
            self.train_model: torch.nn.Module = DistributedDataParallel(model, device_ids=device_ids)
            self.owner = model  # the optimizer's parameters (DDP shares them)
        elif self.strategy == "fsdp":
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
        return get_model_state_dict(self.train_model, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=not everywhere))

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.strategy != "fsdp":
            self.model.load_state_dict(state)
            return
        set_model_state_dict(self.train_model, state, options=StateDictOptions(full_state_dict=True))

    def _order(self, optimizer: torch.optim.Optimizer) -> list[str]:
        names = {id(p): n for n, p in self.owner.named_parameters()}
        return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """Full optimizer state in torch's single-process format (parameters by position)."""
        if self.strategy != "fsdp":
            return optimizer.state_dict()
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


