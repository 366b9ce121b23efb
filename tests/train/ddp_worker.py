"""Run by tests/train/test_distributed.py under torchrun (2 processes, gloo): the loop of
tests/train/test_loop.py under DDP and FSDP, fresh and resumed from a single-process checkpoint."""

import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers

from helpers import CountingBatches as Batches  # noqa: E402
from helpers import Recorder, eval_fn, tiny_model  # noqa: E402
from helpers import train_spec as cfg  # noqa: E402

from llmlab import parallel as distributed  # noqa: E402
from llmlab.train.loop import train  # noqa: E402
from llmlab.train.objectives import LanguageModeling  # noqa: E402


def run(out: Path, strategy: str, start_from: Path | None) -> dict:
    par = distributed.init(strategy, "gloo")
    ckpt = out / f"{strategy}{'-resumed' if start_from else ''}"
    if par.main and start_from is not None:
        shutil.copytree(start_from, ckpt)
    distributed.barrier()
    rec = Recorder()
    rec.on_start = lambda info: setattr(rec, "info", info)
    model = tiny_model()
    # 2 ranks x batch 4 x accumulation 1 = the single-process run's 4 x 2
    train(model, LanguageModeling(), Batches(4), cfg(max_steps=6, gradient_accumulation_steps=1, save_every=3,
                                                     eval_every=3, scheduler="none", warmup_steps=0),
          ckpt, evaluate=eval_fn, callbacks=rec, seed=1)
    if par.main:
        torch.save(model.state_dict(), out / f"{ckpt.name}-final.pt")
    return {"logs": rec.logs, "evals": rec.evals, "ckpt": str(ckpt), "info": rec.info}


if __name__ == "__main__":
    out, single_ckpt = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    results = {name: run(out, strategy, start) for name, strategy, start in
               [("ddp", "ddp", None), ("fsdp", "fsdp", None), ("ddp-resumed", "ddp", single_ckpt),
                ("fsdp-resumed", "fsdp", single_ckpt)]}
    if distributed.current().main:
        (out / "results.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()
