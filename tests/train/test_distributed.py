"""Training on 2 processes (torchrun, gloo, CPU): DDP and FSDP2 give the single-process run's losses
and weights for the same global batch; checkpoints move between 1 and 2 processes both ways; the
batch stream is dealt out so each example is seen once."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import CountingBatches as Batches
from helpers import Recorder, eval_fn, tiny_model
from helpers import train_spec as cfg
from llmlab.checkpoint import latest_checkpoint
from llmlab.launch import launch_command
from llmlab.parallel import ShardedBatches
from llmlab.spec import DistributedSpec
from llmlab.train.loop import train
from llmlab.train.objectives import LanguageModeling

HERE = Path(__file__).parent


def single(ckpt: Path, **kw):
    rec = Recorder()
    model = tiny_model()
    train(model, LanguageModeling(), Batches(4), cfg(max_steps=6, gradient_accumulation_steps=2, save_every=3,
                                                     eval_every=3, scheduler="none", warmup_steps=0, **kw),
          ckpt, evaluate=eval_fn, callbacks=rec, seed=1)
    return model, rec


def keep_only_step(ckpt: Path, step: int, dest: Path) -> Path:
    """A copy of a checkpoint folder as if the run had stopped after saving `step`."""
    shutil.copytree(ckpt, dest)
    for d in dest.iterdir():
        if d.name.startswith("step") and int(d.name.split("-")[-1]) > step:
            shutil.rmtree(d)
    assert int(latest_checkpoint(dest).name.split("-")[-1]) == step
    return dest


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    torch.set_num_threads(1)
    model, rec = single(tmp / "single")
    keep_only_step(tmp / "single", 3, tmp / "single-at-3")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(HERE / "ddp_worker.py"), str(tmp), str(tmp / "single-at-3")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return {"tmp": tmp, "single_model": model, "single": rec, "runs": json.loads((tmp / "results.json").read_text()),
            "stdout": out.stdout}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_same_global_batch(two_process_runs, strategy):
    run, ref = two_process_runs["runs"][strategy], two_process_runs["single"]
    info = run["info"]
    assert (info["world_size"], info["strategy"]) == (2, strategy)
    if strategy == "fsdp":  # parameters really are sharded: each rank holds about half
        assert info["parameters_on_this_rank"] < 0.6 * info["total_params"]
    else:
        assert info["parameters_on_this_rank"] == info["total_params"]
    assert [s for s, _ in run["logs"]] == [1, 2, 3, 4, 5, 6]
    assert [loss for _, loss in run["logs"]] == pytest.approx([loss for _, loss in ref.logs], abs=1e-5)
    assert [loss for _, loss in run["evals"]] == pytest.approx([loss for _, loss in ref.evals], abs=1e-5)
    final = torch.load(two_process_runs["tmp"] / f"{strategy}-final.pt", weights_only=True)
    for name, value in two_process_runs["single_model"].state_dict().items():
        assert torch.allclose(final[name], value, atol=1e-5), name
    assert "global batch per step = 4 sequences x accumulation 1 x world size 2 = 8 sequences" in two_process_runs["stdout"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_two_process_checkpoint_resumes_in_one_process(two_process_runs, strategy, tmp_path):
    tmp = two_process_runs["tmp"]
    ckpt = keep_only_step(tmp / strategy, 3, tmp_path / "from-2")
    _, rec = single(ckpt)
    assert [s for s, _ in rec.logs] == [4, 5, 6]
    two = dict(two_process_runs["runs"][strategy]["logs"])
    assert [loss for _, loss in rec.logs] == pytest.approx([two[s] for s in (4, 5, 6)], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_one_process_checkpoint_resumes_on_two(two_process_runs, strategy):
    resumed = two_process_runs["runs"][f"{strategy}-resumed"]["logs"]
    ref = dict(two_process_runs["single"].logs)
    assert [s for s, _ in resumed] == [4, 5, 6]
    assert [loss for _, loss in resumed] == pytest.approx([ref[s] for s in (4, 5, 6)], abs=1e-5)


def test_sharded_batches_deal_each_batch_to_exactly_one_rank():
    ranks = [ShardedBatches(Batches(2, seed=3), r, 3) for r in range(3)]
    dealt = [tuple(map(tuple, ranks[r].next_batch()["input_ids"].tolist())) for _ in range(4) for r in range(3)]
    stream = Batches(2, seed=3)
    expected = [tuple(map(tuple, stream.next_batch()["input_ids"].tolist())) for _ in range(12)]
    assert sorted(dealt) == sorted(expected) and len(set(dealt)) == 12
    assert ranks[1].state_dict() == {"i": 12}  # the shared stream's position: resumable at any world size


def test_launch_command_single_and_multi_node(monkeypatch):
    cmd = launch_command(DistributedSpec(nproc_per_node=2), "s.yaml", "pretrain", "in.json", "run1", "out.json")
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in cmd and "--nproc_per_node=2" in cmd
    assert cmd[-7:] == ["-m", "llmlab.launch", "s.yaml", "pretrain", "in.json", "run1", "out.json"]
    monkeypatch.delenv("LLMLAB_RDZV_ENDPOINT", raising=False)
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        launch_command(DistributedSpec(nnodes=2), "s.yaml", "pretrain", "in.json", "run1", "out.json")
    monkeypatch.setenv("LLMLAB_RDZV_ENDPOINT", "head:29500")
    cmd = launch_command(DistributedSpec(nnodes=2, nproc_per_node=8), "s.yaml", "pretrain", "in.json", "run1", "out.json")
    assert {"--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=head:29500", "--rdzv-id=run1"} <= set(cmd)
