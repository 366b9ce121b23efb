"""RL math: GAE, PPO policy/value losses, KL-shaped rewards, adaptive KL, GRPO group advantages and
loss, the k3 KL estimator and entropy, against hand-computed values on tiny tensors."""

import math

import pytest
import torch

from llmlab.train.rl import (
    AdaptiveKL,
    entropy_from_logits,
    gae,
    group_advantages,
    grpo_loss,
    k3_kl,
    kl_penalty_rewards,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    value_loss,
    zero_variance_share,
)


@pytest.fixture(autouse=True, scope="module")
def _threads():
    torch.set_num_threads(1)


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_gae_hand_computed_three_steps():
    gamma, lam = 0.9, 0.8
    # Row 0: three valid steps then one padded step (its reward/value must be ignored).
    # Row 1: the same three steps left-padded by one position: same numbers, shifted.
    rewards = t([[1.0, 0.0, 2.0, 9.0], [9.0, 1.0, 0.0, 2.0]])
    values = t([[0.5, 1.0, 1.5, 7.0], [7.0, 0.5, 1.0, 1.5]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    # By hand, backwards; the last valid step bootstraps with V = 0, A = 0:
    # t=2: δ2 = 2 + 0.9*0   - 1.5 = 0.5                 A2 = 0.5
    # t=1: δ1 = 0 + 0.9*1.5 - 1.0 = 0.35                A1 = 0.35 + 0.72*0.5  = 0.71
    # t=0: δ0 = 1 + 0.9*1.0 - 0.5 = 1.4                 A0 = 1.4  + 0.72*0.71 = 1.9112
    # returns R = A + V: 2.4112, 1.71, 2.0
    expected_adv = [1.9112, 0.71, 0.5]
    expected_ret = [2.4112, 1.71, 2.0]
    torch.testing.assert_close(adv[0], t(expected_adv + [0.0]))
    torch.testing.assert_close(ret[0], t(expected_ret + [0.0]))
    torch.testing.assert_close(adv[1], t([0.0] + expected_adv))
    torch.testing.assert_close(ret[1], t([0.0] + expected_ret))


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    rewards = t([[0.0, 0.0, 1.0]])
    values = t([[0.2, 0.4, 0.6]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, t([[1.0, 1.0, 1.0]]))
    torch.testing.assert_close(adv, t([[0.8, 0.6, 0.4]]))


def test_ppo_policy_loss_hand_computed():
    eps = 0.2
    ratios = t([[1.5, 0.5, 0.5, 3.0]])
    adv = t([[1.0, 2.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    logp_old = t([[-1.0, -2.0, -0.5, -1.0]])
    logp_new = logp_old + ratios.log()
    loss, clip_frac, approx_kl = ppo_policy_loss(logp_new, logp_old, adv, mask, eps)
    # token 0: r=1.5, A=1:  max(-1.5, -1.2) = -1.2  (clipped term active)
    # token 1: r=0.5, A=2:  max(-1.0, -1.6) = -1.0
    # token 2: r=0.5, A=-1: max( 0.5,  0.8) =  0.8  (clipped term active)
    # token 3: masked
    assert loss.item() == pytest.approx((-1.2 - 1.0 + 0.8) / 3, abs=1e-6)
    assert clip_frac.item() == pytest.approx(2 / 3, abs=1e-6)

    def k(r):
        return (r - 1) - math.log(r)

    assert approx_kl.item() == pytest.approx((k(1.5) + k(0.5) + k(0.5)) / 3, abs=1e-6)


def test_ratio_one_gives_no_clipping_and_minus_mean_advantage():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 5, generator=g)
    adv = torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0]])
    logp_new = logp.clone().requires_grad_(True)
    loss, clip_frac, approx_kl = ppo_policy_loss(logp_new, logp, adv, mask, 0.2)
    assert clip_frac.item() == 0.0
    assert approx_kl.item() == pytest.approx(0.0, abs=1e-7)
    assert loss.item() == pytest.approx(-masked_mean(adv, mask).item(), abs=1e-6)
    loss.backward()  # d loss / d logp_new = -A / n on valid tokens (r = 1), 0 elsewhere
    torch.testing.assert_close(logp_new.grad, -adv * mask / mask.sum())

    # GRPO with a per-row advantage and no KL: minus the mean advantage over rows.
    seq_adv = t([0.5, -2.0, 1.0])
    gl, metrics = grpo_loss(logp, logp, None, seq_adv, mask, 0.2, kl_coef=0.0)
    assert gl.item() == pytest.approx(-seq_adv.mean().item(), abs=1e-6)
    assert float(metrics["clip_fraction"]) == 0.0 and float(metrics["kl"]) == 0.0
    assert float(metrics["ratio_mean"]) == pytest.approx(1.0)


def test_value_loss_hand_computed():
    values = t([[1.0, 2.0, 5.0]])
    old = t([[0.5, 2.0, 0.0]])
    returns = t([[2.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    # token 0: (1-2)^2 = 1, clipped v = 0.5 + 0.2 = 0.7 -> (0.7-2)^2 = 1.69; max 1.69
    # token 1: v = old = 2 -> (2-1)^2 = 1 both ways
    loss = value_loss(values, old, returns, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2, abs=1e-6)


def test_kl_penalty_rewards_puts_score_on_last_valid_token():
    scores = t([3.0, -1.0])
    logp = t([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = t([[-1.5, -2.0, -2.0], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    r = kl_penalty_rewards(scores, logp, ref, mask, kl_coef=0.1)
    # row 0: -0.1*(−1 − −1.5) = -0.05; token 1: 0 + score 3; token 2 masked
    # row 1: token 0 masked; token 1: 0; token 2: 0 + score -1
    torch.testing.assert_close(r, t([[-0.05, 3.0, 0.0], [0.0, 0.0, -1.0]]))
    with pytest.raises(ValueError, match="no valid"):
        kl_penalty_rewards(scores, logp, ref, torch.tensor([[1, 0, 0], [0, 0, 0]]), 0.1)


def test_adaptive_kl():
    ctl = AdaptiveKL(0.1, target=6.0, horizon=10_000)
    # KL 9 vs target 6: error 0.5 clipped to 0.2 -> 0.1 * (1 + 0.2 * 256/10000)
    assert ctl.update(9.0, 256) == pytest.approx(0.1 * 1.00512)
    before = ctl.value
    # KL 3: error -0.5 clipped to -0.2
    assert ctl.update(3.0, 256) == pytest.approx(before * (1 - 0.00512))
    state = ctl.state_dict()
    other = AdaptiveKL(1.0, target=1.0, horizon=1)
    other.load_state_dict(state)
    assert other.state_dict() == state
    fixed = AdaptiveKL(0.05, target=None, horizon=1)
    assert fixed.update(100.0, 1000) == 0.05


def test_group_advantages_and_zero_variance_share():
    rewards = t([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, group_size=4)
    std = math.sqrt((4 * 0.25) / 3)  # sample std of {1, 0, 0, 1}
    a = 0.5 / (std + 1e-4)
    torch.testing.assert_close(adv, t([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]))
    assert zero_variance_share(rewards, 4) == 0.5
    assert zero_variance_share(t([0.0, 1.0, 2.0, 2.0]), 2) == 0.5
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(t([1.0, 2.0, 3.0]), 2)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(t([1.0, 2.0]), 1)


def test_grpo_loss_hand_computed():
    eps, beta = 0.2, 0.1
    logp_old = t([[-1.0, -2.0], [-0.7, -0.3]])
    logp_new = logp_old + t([[1.5, 1.0], [0.5, 4.0]]).log()
    ref = logp_new + t([[0.0, math.log(2.0)], [0.0, 0.0]])  # d = ref - logp
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = t([1.0, -1.0])
    loss, metrics = grpo_loss(logp_new, logp_old, ref, adv, mask, eps, beta)
    k3 = 2.0 - math.log(2.0) - 1.0  # exp(d) - d - 1 at d = ln 2
    # row 0 (A=1): r=1.5 -> max(-1.5, -1.2) = -1.2; r=1 -> -1; KL terms 0 and k3
    row0 = (-1.2 + (-1.0 + beta * k3)) / 2
    # row 1 (A=-1): r=0.5 -> max(0.5, 0.8) = 0.8; second token masked
    row1 = 0.8
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-6)
    assert float(metrics["kl"]) == pytest.approx((k3 / 2 + 0.0) / 2, abs=1e-6)
    assert float(metrics["policy_loss"]) == pytest.approx(((-1.2 - 1.0) / 2 + 0.8) / 2, abs=1e-6)
    assert float(metrics["clip_fraction"]) == pytest.approx(2 / 3, abs=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp_new, logp_old, None, adv, mask, eps, beta)


def test_k3_non_negative_and_unbiased():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    assert (k3_kl(a, b) >= 0).all()
    assert k3_kl(a, a).abs().max().item() == 0.0
    # Monte-Carlo on a small categorical: tokens from p, E_p[k3] = KL(p || q).
    p = torch.softmax(torch.randn(6, generator=g), dim=0)
    q = torch.softmax(torch.randn(6, generator=g), dim=0)
    exact = (p * (p.log() - q.log())).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    est = k3_kl(p.log()[x], q.log()[x])
    stderr = est.std().item() / math.sqrt(x.numel())
    assert abs(est.mean().item() - exact) < 4 * stderr + 1e-6


def test_entropy_from_logits():
    logits = torch.zeros(2, 3, 5)
    logits[1, 2] = torch.tensor([100.0, 0, 0, 0, 0])  # ~0 entropy, but masked out
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert entropy_from_logits(logits, mask).item() == pytest.approx(math.log(5), abs=1e-6)
    logits[0, 0] = torch.tensor([100.0, 0, 0, 0, 0])
    assert entropy_from_logits(logits, mask).item() == pytest.approx(4 * math.log(5) / 5, abs=1e-5)


def test_masked_whiten():
    x = t([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    w = masked_whiten(x, mask)
    assert w[0, 3].item() == 0.0
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_mean(w ** 2, mask).item() == pytest.approx(1.0, abs=1e-5)


def test_reward_pair_scores_mask_and_pad_what_follows_the_response():
    from llmlab.train.objectives import IGNORE_INDEX
    from llmlab.train.reward import pair_scores, response_end_mask

    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    labels = torch.tensor([[IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX]])
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]), "labels": labels}
    assert response_end_mask(batch).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    seen = {}

    class Scorer(torch.nn.Module):
        config = type("C", (), {"pad_token_id": 0})()

        def forward(self, input_ids, attention_mask):
            seen["ids"] = input_ids
            return type("O", (), {"logits": input_ids.sum(1, keepdim=True).float()})()

    chosen, rejected = pair_scores(Scorer(), batch)
    assert seen["ids"].tolist() == [[5, 6, 7, 0, 0], [5, 6, 7, 0, 0]]  # a pad-id classifier reads the same token
    assert chosen.tolist() == rejected.tolist() == [18.0]
