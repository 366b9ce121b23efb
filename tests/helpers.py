"""What several test modules share: tiny models, batch streams and recorders for the loop, a toy
reward, and shrunk copies of the shipped pipelines. Tests import it as `helpers` (tests/conftest.py
puts this folder on sys.path); no test module imports another test module."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml

from llmlab.model import LlmlabConfig, build_model
from llmlab.spec import TrainSpec
from llmlab.train.loop import Callbacks

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ = 64, 16

# per-optimizer learning rates in each method's usual range (Lion ~3x below AdamW; Sophia's
# updates are bounded by rho * lr, so its lr is ~1/rho larger; Adafactor's lr is relative)
OPTIMIZER_LR = {"adamw": 1e-2, "adafactor": 0.1, "lion": 3e-3, "sophia": 0.15, "muon": 0.04, "sgd": 0.3}


def tiny_model(seed: int = 0, **config) -> torch.nn.Module:
    """A 2-layer llmlab decoder over a 64-token vocabulary (e.g. dropout=0.1 as a keyword)."""
    cfg = LlmlabConfig(**{"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "n_layers": 2, "vocab_size": VOCAB,
                          "max_seq_len": SEQ, **config})
    return build_model(cfg, seed=seed)


class CountingBatches:
    """A deterministic, resumable stream of learnable token batches: a random start, then counting
    up (mod VOCAB)."""

    unit = "sequences"

    def __init__(self, batch_size: int = 4, seed: int = 0):
        self.batch_size = self.micro_batch = batch_size
        self.seed, self.i = seed, 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.i)
        self.i += 1
        start = torch.randint(0, VOCAB, (self.batch_size, 1), generator=g)
        x = (start + torch.arange(SEQ)) % VOCAB
        return {"input_ids": x, "labels": x}

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


class Recorder(Callbacks):
    """What the loop reported: (step, train loss), (step, lr), (step, eval loss) and (step, all metrics) in order."""

    def __init__(self):
        self.logs, self.lrs, self.evals, self.metrics = [], [], [], []

    def on_log(self, step, metrics):
        self.metrics.append((step, metrics))
        if "train/loss" in metrics:  # absent when every step of the window was skipped
            self.logs.append((step, metrics["train/loss"]))
        self.lrs.append((step, metrics["train/lr"]))

    def on_eval(self, step, metrics):
        self.evals.append((step, metrics["eval/loss"]))


def train_spec(**changes) -> TrainSpec:
    """A short fp32 schedule for loop tests: 12 steps of 4 x 2 sequences, evaluation and
    checkpoints every 4 steps."""
    base = dict(max_steps=12, lr=3e-3, warmup_steps=2, batch_sequences=4, gradient_accumulation_steps=2, eval_every=4,
                eval_steps=1, save_every=4, log_every=1, precision="fp32", scheduler="cosine")
    return TrainSpec(**{**base, **changes})


def optimizer_train_spec(name: str, **changes) -> TrainSpec:
    """25 steps with optimizer `name` at its usual learning rate (OPTIMIZER_LR)."""
    base = dict(max_steps=25, lr=OPTIMIZER_LR[name], warmup_steps=2, batch_sequences=4, gradient_accumulation_steps=1,
                eval_every=1000, save_every=1000, log_every=1, precision="fp32", scheduler="cosine",
                weight_decay=0.0, optimizer={"name": name})
    return TrainSpec(**{**base, **changes})


def eval_fn(model) -> dict[str, float]:
    """Held-out loss on a fixed batch the training stream never draws."""
    x = CountingBatches(4, seed=99).next_batch()["input_ids"]
    with torch.no_grad():
        out = model(input_ids=x, labels=x)
    return {"eval/loss": float(out.loss)}


TOY_REWARDS = '''
def readable(prompts, completions, **kw):
    """Share of the completion's characters that are ASCII letters, digits or spaces (a random
    model writes about half stray bytes, so the reward has room and spread)."""
    out = []
    for c in completions:
        out.append(sum(ch.isascii() and (ch.isalnum() or ch == " ") for ch in c) / max(len(c), 1))
    return out
'''


def half_broken_text(path: Path, good: int, bad: int) -> Path:
    """JSONL text whose first `good` rows read (what validation samples) and the rest do not."""
    rows = [json.dumps({"text": f"Paragraph {i}: the quick brown fox returns the value {i}."}) for i in range(good)]
    path.write_text("\n".join(rows + ["{not json"] * bad) + "\n")
    return path


def cli_env(state: Path, api: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of an `llmlab` subprocess: its own state dir, and the test server's API when
    given (so it starts no temporary Prefect server of its own)."""
    env = {**os.environ, "LLMLAB_STATE_DIR": str(state), "PYTHONUNBUFFERED": "1", **extra}
    if api:
        env["PREFECT_API_URL"] = api
    return env


def shrunk_tiny(tmp_path: Path, name: str = "tiny-test", pipeline: str = "tiny.yaml", workdir: str | None = None,
                **stage_updates) -> Path:
    """pipelines/tiny.yaml (or another shipped pipeline) with the same stages and data, a small
    model and a few steps, written to `tmp_path`. Its workdir is `tmp_path/runs`, or `workdir` as
    given (a relative one is relative to the folder the pipeline runs from)."""
    raw = yaml.safe_load((ROOT / "pipelines" / pipeline).read_text())
    raw["name"] = name
    raw["workdir"] = workdir or str(tmp_path / "runs")
    raw["tokenizer"]["train"].update(vocab_size=512, max_documents=1500)
    raw["model"].update(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2, max_seq_len=32)
    raw["stages"]["pretrain"]["train"].update(max_steps=12, warmup_steps=2, batch_sequences=4, eval_every=6, eval_steps=4,
                                              save_every=6, log_every=3)
    if "sft" in raw["stages"]:
        raw["stages"]["sft"]["train"].update(max_steps=6, warmup_steps=1, batch_sequences=4, eval_every=3, eval_steps=2,
                                             save_every=3, log_every=3)
        raw["stages"]["sft"]["max_examples"] = 200
    if "dpo" in raw["stages"]:
        raw["stages"]["dpo"]["train"].update(max_steps=4, warmup_steps=1, batch_pairs=4, gradient_accumulation_steps=2, eval_every=2,
                                             eval_steps=2, save_every=2, log_every=2)
        raw["stages"]["dpo"]["max_examples"] = 64
    if "reward" in raw["stages"]:
        raw["stages"]["reward"]["train"].update(max_steps=4, warmup_steps=1, batch_pairs=4, gradient_accumulation_steps=2, eval_every=2,
                                                eval_steps=2, save_every=2, log_every=2)
        raw["stages"]["reward"]["max_examples"] = 64
    for rl in ("grpo", "ppo"):
        if rl in raw["stages"]:
            group = raw["stages"][rl].get("group_size", 1)  # 16 completions per rollout, 8 per step
            raw["stages"][rl]["train"].update(max_steps=2, warmup_steps=0, rollout_prompts=16 // group,
                                              batch_prompts=8 // group, eval_every=2, save_every=2, log_every=1)
            raw["stages"][rl].update(max_new_tokens=6, eval_prompts=8, max_prompts=64)
    raw["stages"]["eval"].update(batch_sequences=4, batches=4, max_new_tokens=8, tasks_limit=8, preferences_limit=8)
    for benchmark in raw["stages"]["eval"].get("benchmarks", []):
        benchmark["limit"] = 8
    for stage, changes in stage_updates.items():
        raw["stages"][stage].update(changes)
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    return spec


class PeakMemory:
    """The peak bytes of live CPU tensor storage allocated inside a `with` block (a measurement,
    unlike `llmlab.estimate`'s rule of thumb):

        with PeakMemory() as pm:
            train_a_few_steps()
        pm.peak      # bytes; tensors that existed before the block (e.g. a model's weights) are not counted

    A `TorchDispatchMode` sees every aten op, forward and backward alike (the autograd engine carries
    the mode to the thread that runs the backward pass). Each storage an op creates (an output's
    untyped storage that is no input's: views and in-place results are not new) is counted by its
    `nbytes` until the storage object is finalised (`weakref.finalize`, which fires when the C++
    storage dies: torch keeps one Python object per storage). A storage made inside the block without
    an aten op (safetensors loading a model, `torch.from_numpy`) is counted from the first op that
    reads it: storages alive at the start are listed first (tensors `gc` finds, and their `.grad`),
    so those stay uncounted. Not seen: scratch memory inside a kernel, allocator overhead; and counted
    by mistake: tensors that only C++ held at the start (an unfinished autograd graph's saved
    tensors) once an op reads them. `peak_op` names the op whose output set the peak."""

    def __init__(self):
        self.live: dict[int, int] = {}  # storage data_ptr -> bytes
        self.before: set[int] = set()  # storages alive when the block started
        self.current = 0
        self.peak = 0
        self.peak_op = ""
        self._mode = None

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def _track(self, t) -> None:
        import weakref

        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type != "cpu":
            return
        try:
            storage = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # tensor subclasses without a plain storage
            return
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.live or key in self.before:
            return
        self.live[key] = size
        self.current += size
        weakref.finalize(storage, self._free, key).atexit = False

    def _existing(self, t) -> None:
        """List a storage alive at the start; it leaves the list when freed (its address may be reused)."""
        import weakref

        if t.layout != torch.strided or t.device.type != "cpu":
            return
        try:
            storage = t.untyped_storage()
            pointer = storage.data_ptr()
        except (NotImplementedError, RuntimeError):  # no memory of its own (e.g. a FakeTensor torch.compile keeps)
            return
        if pointer not in self.before:
            self.before.add(pointer)
            weakref.finalize(storage, self.before.discard, pointer).atexit = False

    def _record(self, func, args, kwargs, out) -> None:
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten((args, kwargs))[0]:  # inputs made without an aten op
            self._track(t)
        for t in tree_flatten(out)[0]:
            self._track(t)
        if self.current > self.peak:
            self.peak, self.peak_op = self.current, str(func)

    def __enter__(self) -> "PeakMemory":
        import gc

        from torch.utils._python_dispatch import TorchDispatchMode

        for o in gc.get_objects():
            if issubclass(type(o), torch.Tensor):
                self._existing(o)
                if o.is_leaf and o.requires_grad and o.grad is not None:  # made in C++: no Python object until asked
                    self._existing(o.grad)
        meter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                meter._record(func, args, kwargs or {}, out)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
