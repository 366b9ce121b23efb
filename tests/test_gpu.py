"""On a CUDA card (skipped without one; `pytest -m gpu`): the paths `auto` takes there run, match the
plain path, and are recorded. The CPU suite checks their fallbacks (tests/test_fastpath.py)."""

import pytest
import torch
from helpers import CountingBatches, Recorder, eval_fn, tiny_model
from helpers import train_spec as cfg

import llmlab.train.loop as loop
from llmlab import fastpath
from llmlab.train.objectives import LanguageModeling

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def fresh_record():
    fastpath.reset()
    yield
    fastpath.reset()


def run(tmp, **changes) -> Recorder:
    rec = Recorder()
    loop.train(tiny_model(), LanguageModeling(), CountingBatches(4), cfg(**changes), tmp, evaluate=eval_fn, callbacks=rec,
               seed=1)
    return rec


def test_compiled_blocks_train_on_the_card_with_the_eager_losses(tmp_path):
    eager = run(tmp_path / "eager", compile=False, precision="bf16")
    fastpath.reset()
    compiled = run(tmp_path / "compiled", compile=True, precision="bf16")
    assert fastpath.taken()["compile"] == "compiled"
    for (step, a), (_, b) in zip(eager.logs, compiled.logs):
        assert abs(a - b) <= 0.02 * abs(a) + 1e-3, (step, a, b)  # bf16: kernels fused differently
    metrics = dict(compiled.metrics)
    first = min(metrics)
    assert metrics[first]["train/compile_seconds"] > 0 and all(m["train/peak_memory_gib"] > 0 for m in metrics.values())


def test_auto_decodes_on_the_captured_static_path_on_the_card_and_says_so():
    from llmlab.generate import sample

    model = tiny_model(seed=2).eval().cuda()
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]], device="cuda")
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], device="cuda")
    dynamic = sample(model, ids, mask, 10, None, 0, 0.0, decode="dynamic").tokens
    fastpath.new_stage()
    assert torch.equal(sample(model, ids, mask, 10, None, 0, 0.0).tokens, dynamic)
    assert fastpath.taken() == {"decode": "static"}


def test_the_probe_finds_both_fast_paths_working_on_the_card():
    from llmlab.environment import collect

    info = collect(probe=True)
    assert info["devices"][0]["device"] == "cuda:0" and info["auto"]["compile"] == "on"
    assert info["probe"]["compile"]["works"], info["probe"]
    assert info["probe"]["decode"]["works"] and info["probe"]["decode"]["graph_captured"], info["probe"]
