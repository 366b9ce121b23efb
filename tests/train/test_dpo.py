"""DPO: the loss and its metrics against hand-computed values, label smoothing, the RPO NLL term,
prompt tokens carrying no loss, precomputed vs live reference log-probs, a few real steps."""

import math
import random
from types import SimpleNamespace

import pytest
import torch

from llmlab.data.preference import collate_pairs, eval_batches
from llmlab.model import LlmlabConfig, build_model
from llmlab.train.dpo import (
    DPOObjective,
    attach_reference_logps,
    dpo_loss,
    model_reference,
    precompute_reference_logps,
    sequence_logps,
)
from llmlab.train.objectives import IGNORE_INDEX

IGNORE = IGNORE_INDEX
VOCAB = 40


@pytest.fixture(autouse=True, scope="module")
def _threads():
    torch.set_num_threads(1)


def log_sigmoid(x):
    return -math.log(1 + math.exp(-x))


# ------------------------------------------------------------------------------- pure functions


def test_dpo_loss_hand_computed():
    # pair 1: policy/ref chosen -1.0/-1.5, rejected -2.0/-1.8; pair 2: chosen -3.0/-2.0, rejected -1.0/-1.0
    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-1.8, -1.0])
    beta = 0.5
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta)
    # pair 1: z = (-1.0 + 1.5) - (-2.0 + 1.8) = 0.5 + 0.2 = 0.7 ; pair 2: z = (-1.0) - 0 = -1.0
    expected = [-log_sigmoid(0.5 * 0.7), -log_sigmoid(0.5 * -1.0)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert expected[0] == pytest.approx(math.log(1 + math.exp(-0.35)))
    assert chosen_r.tolist() == pytest.approx([0.5 * 0.5, 0.5 * -1.0])
    assert rejected_r.tolist() == pytest.approx([0.5 * -0.2, 0.0])
    # z = 0 (policy == reference) gives log 2 whatever beta is
    zero, _, _ = dpo_loss(torch.tensor([-4.0]), torch.tensor([-5.0]), torch.tensor([-4.0]),
                          torch.tensor([-5.0]), beta=3.0)
    assert zero.item() == pytest.approx(math.log(2))


def test_dpo_loss_label_smoothing_hand_computed():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.8))
    eps, beta, z = 0.1, 0.5, 0.7
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=eps)
    expected = (1 - eps) * math.log(1 + math.exp(-beta * z)) + eps * math.log(1 + math.exp(beta * z))
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, beta, label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)


def test_dpo_loss_gradient_pushes_chosen_up_and_rejected_down():
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-1.0], requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, torch.tensor([-1.0]), torch.tensor([-1.0]), beta=0.2)
    losses.sum().backward()
    # d/dpc -log σ(β(pc - pr)) = -β σ(-βz) = -0.2 * 0.5 at z = 0
    assert pc.grad.item() == pytest.approx(-0.1) and pr.grad.item() == pytest.approx(0.1)


def test_sequence_logps_hand_computed():
    # logits at positions 0,1,2 (V=3); labels: position 0 never predicted, 1 masked (prompt), 2 and 3 targets
    logits = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.0, math.log(3.0), 0.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[IGNORE, IGNORE, 2, 1]])
    # position 1 predicts label 2: log softmax([1,2,3])[2]; position 2 predicts label 1: log(3/5)
    expected = (3 - math.log(math.exp(1) + math.exp(2) + math.exp(3))) + math.log(3 / 5)
    assert sequence_logps(logits, labels).tolist() == pytest.approx([expected], abs=1e-6)
    assert sequence_logps(logits, torch.full_like(labels, IGNORE)).tolist() == [0.0]


# ---------------------------------------------------------------------------------- objective


class UniformLogits(torch.nn.Module):
    """A 'model' with all-zero logits over V tokens: each labelled token has log-prob -log V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=self.bias * 0 + torch.zeros(*input_ids.shape, self.vocab))


def uniform_batch():
    """B=2 pairs; chosen responses have 2 and 3 tokens, rejected 1 and 2 (prompt of 2 tokens)."""
    def pair(n_chosen, n_rejected):
        prompt = [0, 1]  # token ids < V = 2
        c, r = [1, 0, 1][:n_chosen], [0, 0, 1][:n_rejected]
        return {"chosen_ids": prompt + c, "chosen_labels": [IGNORE] * 2 + c,
                "rejected_ids": prompt + r, "rejected_labels": [IGNORE] * 2 + r}
    return collate_pairs([pair(2, 1), pair(3, 2)], pad_id=0)


def test_objective_hand_computed_loss_metrics_and_sft_term():
    V, beta, w = 2, 0.5, 0.3
    lv = math.log(V)
    batch = uniform_batch()
    # policy: chosen -2 lv and -3 lv; rejected -1 lv and -2 lv
    batch["ref_logps"] = torch.tensor([-2.5, -1.0, -1.5, -2.5])  # chosen 1, chosen 2, rejected 1, rejected 2
    objective = DPOObjective(beta=beta, sft_weight=w)
    assert objective.count(batch) == 2
    loss, metrics = objective(UniformLogits(V), batch)

    c1, c2 = beta * (-2 * lv + 2.5), beta * (-3 * lv + 1.0)    # chosen rewards
    r1, r2 = beta * (-1 * lv + 1.5), beta * (-2 * lv + 2.5)    # rejected rewards
    dpo = -log_sigmoid(c1 - r1) - log_sigmoid(c2 - r2)
    sft = (2 * lv) / 2 + (3 * lv) / 3                          # mean NLL per chosen token, summed
    assert loss.item() == pytest.approx(dpo + w * sft, abs=1e-5)
    assert metrics["rewards/chosen"].item() == pytest.approx(c1 + c2, abs=1e-5)
    assert metrics["rewards/rejected"].item() == pytest.approx(r1 + r2, abs=1e-5)
    assert metrics["dpo/margin"].item() == pytest.approx(c1 - r1 + c2 - r2, abs=1e-5)
    assert c1 > r1 and c2 < r2  # 0.557 > 0.403; -0.540 < 0.557
    assert metrics["dpo/accuracy"].item() == 1

    no_sft, _ = DPOObjective(beta=beta)(UniformLogits(V), batch)
    assert no_sft.item() == pytest.approx(dpo, abs=1e-5)
    smoothed, _ = DPOObjective(beta=beta, label_smoothing=0.2)(UniformLogits(V), batch)
    expected = sum(0.8 * -log_sigmoid(z) + 0.2 * -log_sigmoid(-z) for z in (c1 - r1, c2 - r2))
    assert smoothed.item() == pytest.approx(expected, abs=1e-5)


def test_objective_needs_a_reference_and_even_rows():
    batch = uniform_batch()
    with pytest.raises(ValueError, match="reference"):
        DPOObjective()(UniformLogits(2), batch)
    odd = {k: v[:3] for k, v in batch.items()}
    with pytest.raises(ValueError, match="2B rows"):
        DPOObjective().count(odd)


class PerturbedLogits(torch.nn.Module):
    """A real model whose logits get `delta` added (to test which positions the loss reads)."""

    def __init__(self, model, delta):
        super().__init__()
        self.model, self.delta = model, delta

    def forward(self, **inputs):
        return SimpleNamespace(logits=self.model(**inputs).logits + self.delta)


def tiny_model(seed):
    return build_model(LlmlabConfig(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2,
                                    vocab_size=VOCAB, max_seq_len=64), seed=seed)


def random_pairs(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(3, 7))]
        c = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 5))]
        r = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 5))]
        out.append({"chosen_ids": prompt + c, "chosen_labels": [IGNORE] * len(prompt) + c,
                    "rejected_ids": prompt + r, "rejected_labels": [IGNORE] * len(prompt) + r})
    return out


def test_prompt_tokens_carry_no_loss():
    """Logits at positions that predict prompt (or padding) tokens do not affect the loss and get
    zero gradient; those predicting response tokens do. Counting prompt tokens would fail both."""
    torch.manual_seed(0)
    policy, ref = tiny_model(0), tiny_model(1)
    batch = collate_pairs(random_pairs(3), pad_id=0)
    objective = DPOObjective(beta=0.2, sft_weight=0.5, reference=model_reference(ref))
    predicts_target = torch.zeros(batch["labels"].shape, dtype=torch.bool)
    predicts_target[:, :-1] = batch["labels"][:, 1:] != IGNORE
    # the prompt is there (and unlabelled) in every row
    assert (batch["labels"][:, :3] == IGNORE).all() and (batch["attention_mask"][:, :3] == 1).all()

    delta = torch.zeros(*batch["input_ids"].shape, VOCAB, requires_grad=True)
    loss, _ = objective(PerturbedLogits(policy, delta), batch)
    loss.backward()
    grad_norm = delta.grad.abs().sum(-1)
    assert (grad_norm[~predicts_target] == 0).all()
    assert (grad_norm[predicts_target] > 0).all()

    noise = torch.randn(delta.shape) * 5 * (~predicts_target).unsqueeze(-1)
    perturbed, _ = objective(PerturbedLogits(policy, noise), batch)
    assert perturbed.item() == pytest.approx(loss.item(), abs=1e-6)
    response_noise = torch.randn(delta.shape) * 5 * predicts_target.unsqueeze(-1)
    changed, _ = objective(PerturbedLogits(policy, response_noise), batch)
    assert abs(changed.item() - loss.item()) > 1e-3


def test_precomputed_reference_equals_live_reference():
    policy, ref = tiny_model(0), tiny_model(1)
    pairs = random_pairs(5, seed=1)
    live = DPOObjective(beta=0.3, reference=model_reference(ref))
    batches = eval_batches(pairs, batch_size=2, pad_id=0)
    precomputed = precompute_reference_logps(ref, batches)
    assert [p.shape[0] for p in precomputed] == [4, 4, 2]
    for batch, ref_logps in zip(batches, precomputed):
        assert torch.allclose(ref_logps, live.reference(batch), atol=1e-6)

    attach_reference_logps(ref, pairs, batch_size=3, pad_id=0)  # other batching: same values
    no_ref = DPOObjective(beta=0.3)
    for batch, with_ref in zip(batches, eval_batches(pairs, batch_size=2, pad_id=0)):
        assert "ref_logps" in with_ref and "ref_logps" not in batch
        a, ma = live(policy, batch)
        b, mb = no_ref(policy, with_ref)
        assert a.item() == pytest.approx(b.item(), abs=1e-5)
        for k in ma:
            assert ma[k].item() == pytest.approx(mb[k].item(), abs=1e-5)


def test_reference_gets_no_gradient_and_keeps_its_mode():
    policy, ref = tiny_model(0), tiny_model(1)
    ref.train()
    batch = collate_pairs(random_pairs(2), pad_id=0)
    loss, _ = DPOObjective(reference=model_reference(ref))(policy, batch)
    loss.backward()
    assert all(p.grad is None for p in ref.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    assert ref.training


def test_same_weights_give_log2_and_zero_rewards():
    model = tiny_model(0)
    batch = collate_pairs(random_pairs(4), pad_id=0)
    loss, metrics = DPOObjective(beta=0.2, reference=model)(model, batch)  # a module works too
    assert loss.item() == pytest.approx(4 * math.log(2), abs=1e-5)
    assert metrics["dpo/margin"].item() == pytest.approx(0.0, abs=1e-5)


def test_peft_reference_with_adapters_disabled_is_the_base_model():
    from peft import LoraConfig, get_peft_model

    base_copy = tiny_model(0)
    peft_model = get_peft_model(tiny_model(0), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = collate_pairs(random_pairs(2), pad_id=0)
    disabled = model_reference(peft_model, disable_adapters=True)(batch)
    enabled = model_reference(peft_model)(batch)
    assert torch.allclose(disabled, model_reference(base_copy)(batch), atol=1e-5)
    assert not torch.allclose(disabled, enabled, atol=1e-3)


def test_a_few_steps_raise_the_margin():
    torch.manual_seed(0)
    policy, ref = tiny_model(0), tiny_model(0)
    pairs = random_pairs(4, seed=2)
    attach_reference_logps(ref, pairs, batch_size=4, pad_id=0)
    batch = collate_pairs(pairs, pad_id=0)
    objective = DPOObjective(beta=0.5)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    for _ in range(15):
        loss, metrics = objective(policy, batch)
        opt.zero_grad()
        (loss / objective.count(batch)).backward()
        opt.step()
    loss, metrics = objective(policy, batch)
    assert loss.item() / 4 < math.log(2) - 0.1
    assert metrics["dpo/margin"].item() > 0 and metrics["dpo/accuracy"].item() == 4
