"""Per-block compilation and model FLOPs utilisation."""

import pytest
import torch

from helpers import CountingBatches, Recorder, tiny_model, train_spec
from llmlab.model import LlmlabConfig, build_model
from llmlab.train import loop
from llmlab.train.loop import train
from llmlab.train.objectives import LanguageModeling
from llmlab.train.speed import flops_per_token, peak_flops, should_compile


def test_flops_per_token_counts_matmul_weights_six_times_plus_attention():
    cfg = dict(vocab_size=300, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2, max_seq_len=16)
    tied = build_model(LlmlabConfig(**cfg))
    n = sum(p.numel() for p in tied.parameters())  # the tied embedding is the head's matmul: counted once
    assert flops_per_token(tied, 16) == 6 * n + 12 * 2 * 32 * 16
    untied = build_model(LlmlabConfig(**cfg, tie_word_embeddings=False))
    n = sum(p.numel() for p in untied.parameters()) - 300 * 32  # the lookup table does no matmul
    assert flops_per_token(untied, 16) == 6 * n + 12 * 2 * 32 * 16


def test_the_peak_comes_from_the_card_name_and_cpus_have_none(monkeypatch):
    assert peak_flops(torch.device("cpu")) is None
    for name, tflops in (("NVIDIA H200", 989), ("NVIDIA L40S", 362), ("NVIDIA L40", 181), ("NVIDIA A10G", 125)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_flops(torch.device("cuda")) == tflops * 1e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_flops(torch.device("cuda")) is None


def test_compile_auto_means_cuda_only():
    assert should_compile("auto", torch.device("cuda")) and not should_compile("auto", torch.device("cpu"))
    assert should_compile(True, torch.device("cpu")) and not should_compile(False, torch.device("cuda"))


def test_mfu_is_logged_from_throughput_flops_and_peak(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "peak_flops", lambda device: 1e12)  # as if on a known card
    seen = Recorder()
    model = tiny_model()
    train(model, LanguageModeling(), CountingBatches(4), train_spec(max_steps=4, log_every=2), tmp_path, callbacks=seen)
    step, metrics = seen.metrics[-1]
    seq = CountingBatches(4).next_batch()["input_ids"].shape[-1]
    expected = metrics["train/tokens_per_sec"] * flops_per_token(model, seq) / 1e12
    assert metrics["train/mfu"] == pytest.approx(expected) and metrics["train/mfu"] > 0


def test_no_mfu_without_a_known_peak(tmp_path):
    seen = Recorder()
    train(tiny_model(), LanguageModeling(), CountingBatches(4), train_spec(max_steps=2), tmp_path, callbacks=seen)
    assert all("train/mfu" not in m for _, m in seen.metrics)


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones(tmp_path):
    runs = {}
    for setting in (False, True):
        seen = Recorder()
        model = tiny_model()
        train(model, LanguageModeling(), CountingBatches(4), train_spec(max_steps=4, compile=setting), tmp_path / str(setting),
              callbacks=seen, seed=1)
        runs[setting] = seen
        compiled = [layer._compiled_call_impl is not None for layer in model.model.layers]
        assert all(compiled) if setting else not any(compiled)
    assert [l for _, l in runs[True].logs] == pytest.approx([l for _, l in runs[False].logs], rel=1e-4)
    assert "train/compile_seconds" in runs[True].metrics[0][1] and "train/compile_seconds" not in runs[False].metrics[0][1]
