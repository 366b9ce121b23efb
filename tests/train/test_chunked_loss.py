"""The chunked loss equals the plain one (value and gradients) without building full logits."""

import pytest
import torch

from helpers import PeakMemory
from llmlab.model import LlmlabConfig, build_model
from llmlab.model.loss import chunked_nll_sum
from llmlab.train.objectives import IGNORE_INDEX, LanguageModeling, token_nll_sum


def model_and_batch(vocab=512, T=24, B=3):
    torch.manual_seed(0)
    model = build_model(LlmlabConfig(vocab_size=vocab, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2,
                                     max_seq_len=T))
    ids = torch.randint(0, vocab, (B, T))
    labels = ids.clone()
    labels[:, :7] = IGNORE_INDEX  # a masked prompt, as in SFT
    labels[1, 15:] = IGNORE_INDEX  # padding
    return model, {"input_ids": ids, "labels": labels}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_chunked_loss_and_gradients_equal_the_plain_loss_in_fp32(chunk):
    model, batch = model_and_batch()
    plain = token_nll_sum(model(input_ids=batch["input_ids"]).logits, batch["labels"])
    plain.backward()
    expected = grads(model)
    model.zero_grad()
    chunked = model(input_ids=batch["input_ids"], labels=batch["labels"], loss_chunk_tokens=chunk).loss
    chunked.backward()
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    got = grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_the_objective_takes_the_chunked_path_as_configured_and_gives_the_same_loss():
    model, batch = model_and_batch()
    on, off = LanguageModeling("on", 8), LanguageModeling("off")
    assert on.use_chunks(model, batch) and not off.use_chunks(model, batch)
    assert not LanguageModeling("auto").use_chunks(model, batch)  # 3 x 24 x 512 fp32 logits: tiny
    assert on(model, batch)[0].item() == pytest.approx(off(model, batch)[0].item(), rel=1e-5)


def test_the_chunked_loss_never_holds_the_full_logits():
    model, batch = model_and_batch(vocab=8192, T=64, B=8)
    full_logits = 8 * 64 * 8192 * 4  # bytes of fp32 logits for every position
    for chunk, objective in ((None, LanguageModeling("off")), (16, LanguageModeling("on", 16))):
        model.zero_grad()
        with PeakMemory() as pm:
            loss, _ = objective(model, batch)
            loss.backward()
        if chunk is None:
            plain_peak = pm.peak
        else:
            chunked_peak = pm.peak
    assert plain_peak > full_logits  # the plain path materialises them (and more)
    assert chunked_peak < full_logits / 2 and chunked_peak < plain_peak / 4


def test_chunked_nll_sum_scores_only_positions_with_a_target():
    hidden = torch.randn(2, 5, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    labels = torch.full((2, 5), IGNORE_INDEX)
    assert chunked_nll_sum(hidden, head, labels, 3).item() == 0.0
    labels[0, 2] = 7  # the target of position 1
    expected = torch.nn.functional.cross_entropy(head(hidden[0, 1:2]), torch.tensor([7]), reduction="sum")
    assert chunked_nll_sum(hidden, head, labels, 3).item() == pytest.approx(expected.item())


def test_dpo_log_probs_through_the_head_in_chunks_equal_the_plain_ones_with_their_gradients():
    from llmlab.train.dpo import DPOObjective

    model, batch = model_and_batch(B=4)
    batch["ref_logps"] = torch.linspace(-80.0, -60.0, 4)
    results = {}
    for mode in ("off", "on"):
        model.zero_grad()
        loss, metrics = DPOObjective(beta=0.3, sft_weight=0.5, chunked=mode, chunk_tokens=7)(model, batch)
        loss.backward()
        results[mode] = (loss.item(), {k: v.item() for k, v in metrics.items()}, grads(model))
    assert results["on"][0] == pytest.approx(results["off"][0], rel=1e-5)
    assert results["on"][1] == pytest.approx(results["off"][1], rel=1e-5, abs=1e-6)
    for name, g in results["off"][2].items():
        torch.testing.assert_close(results["on"][2][name], g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_value_head", [False, True])
def test_rl_token_log_probs_entropies_and_values_in_chunks_equal_the_plain_ones(with_value_head):
    from llmlab.train.rollout import policy_logps

    model, batch = model_and_batch(B=3)
    mask = torch.ones_like(batch["input_ids"])
    mask[0, :3] = 0  # a left-padded prompt
    head = torch.nn.Linear(32, 1) if with_value_head else None
    out = {}
    for mode in ("off", "on"):
        model.zero_grad()
        logits, logps, values, entropy = policy_logps(model, batch["input_ids"], mask, 10, 0.7, head, chunked=mode,
                                                      chunk_tokens=5)
        assert (logits is None) == (mode == "on")
        (logps.sum() + (values.sum() if values is not None else 0)).backward()
        out[mode] = (logps.detach(), entropy, values.detach() if values is not None else None, grads(model))
    torch.testing.assert_close(out["on"][0], out["off"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["on"][1], out["off"][1], rtol=1e-5, atol=1e-5)
    if with_value_head:
        torch.testing.assert_close(out["on"][2], out["off"][2], rtol=1e-5, atol=1e-6)
    for name, g in out["off"][3].items():
        torch.testing.assert_close(out["on"][3][name], g, rtol=1e-5, atol=1e-6)


def test_chunked_dpo_and_grpo_log_probs_never_hold_the_full_logits():
    from llmlab.train.dpo import DPOObjective
    from llmlab.train.rollout import policy_logps

    model, batch = model_and_batch(vocab=8192, T=64, B=8)
    batch["ref_logps"] = torch.zeros(8)
    full_logits = 8 * 64 * 8192 * 4
    mask = torch.ones_like(batch["input_ids"])
    peaks = {}
    for mode in ("off", "on"):
        for what in ("dpo", "grpo"):
            model.zero_grad()
            with PeakMemory() as pm:
                if what == "dpo":
                    loss, _ = DPOObjective(beta=0.1, chunked=mode, chunk_tokens=16)(model, batch)
                else:
                    loss = policy_logps(model, batch["input_ids"], mask, 32, 1.0, chunked=mode, chunk_tokens=16)[1].sum()
                loss.backward()
            peaks[mode, what] = pm.peak
    for what in ("dpo", "grpo"):
        assert peaks["off", what] > full_logits * 0.9  # the plain path builds them
        assert peaks["on", what] < full_logits / 2 and peaks["on", what] < peaks["off", what] / 4, (what, peaks)
