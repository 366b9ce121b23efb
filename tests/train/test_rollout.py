"""Rollouts: log-probs on exactly the sampled ids from the sampling distribution, batched equals
one by one, the PPO/GRPO batch source (epochs, shuffles, resume), a ratio of exactly 1 on the
first epoch, and reward-function output checks."""

import pytest
import torch

from llmlab.data.prompts import Prompt
from llmlab.generate import stop_token_ids
from llmlab.model import LlmlabConfig, build_model
from llmlab.tokenizer import train_tokenizer
from llmlab.train.grpo import GRPOObjective, GRPOPrepare
from llmlab.train.ppo import PolicyWithValue, PPOObjective, PPOPrepare
from llmlab.train.rl import AdaptiveKL
from llmlab.train.rollout import (RolloutBatches, Sampling, disable_dropout, policy_logps, rollout_logps, sample_rollout,
                                  score_completions)


@pytest.fixture(autouse=True, scope="module")
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"{i}+1={i + 1} rev a b c sort 321" for i in range(200)]
    return train_tokenizer(texts, 300, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model(tok):
    cfg = LlmlabConfig(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2, vocab_size=len(tok), max_seq_len=64,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, dropout=0.1)
    m = build_model(cfg, seed=0)
    disable_dropout(m)
    return m.eval()


def prompts_of(tok, texts, **extras):
    return [Prompt(tok(t, add_special_tokens=False)["input_ids"], t, {k: v[i] for k, v in extras.items()})
            for i, t in enumerate(texts)]


def sampling(tok, temperature=1.0, n=8):
    return Sampling(n, temperature, 0, 1.0, stop_token_ids(tok), tok.pad_token_id)


TEXTS = ["12+1=", "rev a b c", "sort 321 and 7+1=", "3"]


def test_disable_dropout_zeroes_every_dropout(model):
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    train_mode = build_model(model.config, seed=0).train()
    disable_dropout(train_mode)
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    assert torch.equal(train_mode(x).logits, train_mode(x).logits)  # attention dropout included


def test_logps_are_the_tempered_sampling_distribution_at_the_sampled_ids(model, tok):
    """Recompute each step's distribution without a cache, row by row, from the sampled ids: the
    rollout log-probs equal log softmax(logits / T) at the token that was drawn."""
    prompts = prompts_of(tok, TEXTS)
    T = 0.7
    r = sample_rollout(model, tok, [p.ids for p in prompts], sampling(tok, T), torch.Generator().manual_seed(0))
    _, logps, _, _ = policy_logps(model, r.input_ids, r.attention_mask, r.prompt_width, T)
    for i, p in enumerate(prompts):
        n = int(r.completion_mask[i].sum())
        completion = r.input_ids[i, r.prompt_width:r.prompt_width + n].tolist()
        assert tok.decode(completion, skip_special_tokens=False) == r.completions[i]  # no re-tokenising
        seq = list(p.ids)
        for t, token in enumerate(completion):
            logits = model(torch.tensor([seq])).logits[0, -1].float() / T
            expected = torch.log_softmax(logits, -1)[token]
            assert logps[i, t].item() == pytest.approx(expected.item(), abs=1e-4)
            seq.append(token)
        assert (r.completion_mask[i, n:] == 0).all()


def test_completion_mask_ends_at_the_stop_token(model, tok):
    prompts = prompts_of(tok, TEXTS * 4)
    r = sample_rollout(model, tok, [p.ids for p in prompts], sampling(tok, 1.5, 12), torch.Generator().manual_seed(1))
    stops = set(stop_token_ids(tok))
    for i in range(len(prompts)):
        n = int(r.completion_mask[i].sum())
        tokens = r.input_ids[i, r.prompt_width:].tolist()
        ended = tokens[n - 1] in stops
        assert bool(r.stopped[i]) == ended
        assert not any(t in stops for t in tokens[:n - 1])  # nothing after the first stop counts
        assert ended or n == 12


def test_batched_left_padded_logps_equal_one_by_one(model, tok):
    prompts = prompts_of(tok, TEXTS)
    r = sample_rollout(model, tok, [p.ids for p in prompts], sampling(tok), torch.Generator().manual_seed(2))
    _, batched, _, _ = policy_logps(model, r.input_ids, r.attention_mask, r.prompt_width, 1.0)
    for i, p in enumerate(prompts):
        n = int(r.completion_mask[i].sum())
        completion = r.input_ids[i, r.prompt_width:r.prompt_width + n]
        ids = torch.cat([torch.tensor(p.ids), completion])[None]
        _, alone, _, _ = policy_logps(model, ids, torch.ones_like(ids), len(p.ids), 1.0)
        assert torch.allclose(batched[i, :n], alone[0], atol=1e-5)


def test_score_completions_checks_what_the_function_returns(tok):
    prompts = prompts_of(tok, ["a", "b"], answer=["1", "2"])
    seen = {}

    def fn(prompts, completions, **kw):
        seen.update(kw)
        return [1, 0.5]

    assert score_completions(fn, prompts, ["x", "y"], "fn").tolist() == [1.0, 0.5]
    assert seen == {"answer": ["1", "2"]}  # the prompt rows' columns, by name
    with pytest.raises(ValueError, match="returned 1 scores for 2 completions"):
        score_completions(lambda p, c, **kw: [1.0], prompts, ["x", "y"], "short")
    with pytest.raises(TypeError, match="must return a list of numbers"):
        score_completions(lambda p, c, **kw: ["good", "bad"], prompts, ["x", "y"], "words")
    with pytest.raises(ValueError, match="non-finite"):
        score_completions(lambda p, c, **kw: [float("nan"), 1.0], prompts, ["x", "y"], "nan")


def count_a(prompts, completions, **kw):
    return [float(c.count("a")) for c in completions]


def grpo_source(model, tok, epochs=2, seed=0):
    ref_model = build_model(model.config, seed=0)
    disable_dropout(ref_model)
    reference = lambda r: rollout_logps(ref_model, r, 1.0, 8)[0]  # noqa: E731
    prepare = GRPOPrepare(model, reference, tok, count_a, "count_a", sampling(tok), group_size=4, chunk=8, seed=seed)
    return RolloutBatches(prompts_of(tok, TEXTS * 3), prepare, prompts_per_rollout=4, mini_batch_size=8,
                          micro_batches=2, ppo_epochs=epochs, seed=seed)


def test_rollout_batches_cover_every_completion_once_per_epoch(model, tok):
    src = grpo_source(model, tok, epochs=2)
    batches = [src.next_batch() for _ in range(8)]  # 16 completions / 4 per micro-batch x 2 epochs
    assert src.rollouts == 1 and not src.queue
    assert all(b["input_ids"].size(0) == 4 for b in batches)
    for epoch in (batches[:4], batches[4:]):
        rows = sorted(tuple(r.tolist()) for b in epoch for r in b["input_ids"])
        assert len(set(rows)) >= 4  # distinct samples...
        assert len(rows) == 16  # ...and every completion once
    first = [tuple(r.tolist()) for b in batches[:4] for r in b["input_ids"]]
    second = [tuple(r.tolist()) for b in batches[4:] for r in b["input_ids"]]
    assert sorted(first) == sorted(second) and first != second  # the same rows, reshuffled
    assert "stats/rl/reward_mean" in batches[0] and "stats/rl/zero_variance_share" in batches[0]
    assert "ref_logps" in batches[0]


def test_rollout_batches_resume_exactly(model, tok):
    src = grpo_source(model, tok)
    for _ in range(3):
        src.next_batch()
    state = src.state_dict()
    after = [src.next_batch() for _ in range(10)]
    other = grpo_source(model, tok)
    other.load_state_dict(state)
    again = [other.next_batch() for _ in range(10)]
    for a, b in zip(after, again):
        assert a.keys() == b.keys()
        for key in a:
            if key not in ("stats/rl/generation_share", "stats/rl/rollout_tokens_per_sec"):  # timings differ
                assert torch.equal(a[key], b[key]), key


def test_grpo_first_epoch_ratio_is_exactly_one_and_the_loss_is_minus_the_mean_advantage(model, tok):
    src = grpo_source(model, tok)
    batch = src.next_batch()
    objective = GRPOObjective(clip_range=0.2, kl_coef=0.0, temperature=1.0)
    loss, metrics = objective(model, batch)
    n = batch["input_ids"].size(0)
    assert metrics["rl/ratio_mean"].item() / n == pytest.approx(1.0, abs=1e-6)
    assert metrics["rl/clip_fraction"].item() == 0.0
    assert metrics["rl/approx_kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert loss.item() / n == pytest.approx(-batch["advantages"].mean().item(), abs=1e-5)


def test_ppo_prepare_and_first_epoch(model, tok):
    policy = PolicyWithValue(build_model(model.config, seed=0), model.config.d_model)
    disable_dropout(policy)
    ref = build_model(model.config, seed=0)
    disable_dropout(ref)
    reference = lambda r: rollout_logps(ref, r, 1.0, 8)[0]  # noqa: E731
    prepare = PPOPrepare(policy, reference, tok, count_a, "count_a", sampling(tok), AdaptiveKL(0.1, None, 100),
                         gamma=1.0, lam=1.0, chunk=8, seed=0)
    rows, stats = prepare(prompts_of(tok, TEXTS * 2), 0)
    mask = rows["completion_mask"]
    # policy == reference: no KL penalty; value head starts at 0; gamma = lambda = 1: every
    # token's return is the row's score
    assert stats["rl/kl"] == pytest.approx(0.0, abs=1e-6)
    assert torch.all(rows["old_values"] == 0)
    scores = torch.tensor(count_a(None, _completions(rows, tok, mask)))
    assert torch.allclose(rows["returns"], scores[:, None] * mask, atol=1e-5)
    batch = {k: v for k, v in rows.items()}
    loss, metrics = PPOObjective(0.2, 0.2, 0.1, 1.0)(policy, {**batch, "stats/rl/reward_mean": torch.tensor(1.0)})
    n = mask.size(0)
    assert metrics["rl/ratio_mean"].item() / n == pytest.approx(1.0, abs=1e-6)
    assert metrics["rl/clip_fraction"].item() == 0.0
    assert metrics["rl/reward_mean"].item() == n  # rollout statistics pass through, scaled by rows


def _completions(rows, tok, mask):
    P = int(rows["prompt_width"])
    out = []
    for ids, m in zip(rows["input_ids"], mask):
        out.append(tok.decode(ids[P:P + int(m.sum())].tolist(), skip_special_tokens=False))
    return out


def test_a_few_grpo_updates_raise_the_reward(model, tok):
    """Reward = number of 'a' characters: a handful of GRPO steps make the policy write more of them."""
    policy = build_model(model.config, seed=0)
    disable_dropout(policy)
    src = RolloutBatches(prompts_of(tok, TEXTS * 8), GRPOPrepare(policy, None, tok, count_a, "count_a", sampling(tok, 1.0, 6),
                                                                 group_size=8, chunk=32, seed=0),
                         prompts_per_rollout=4, mini_batch_size=32, micro_batches=1, ppo_epochs=1, seed=0)
    objective = GRPOObjective(clip_range=0.2, kl_coef=0.0, temperature=1.0)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    means = []
    for _ in range(25):
        batch = src.next_batch()
        means.append(batch["stats/rl/reward_mean"].item())
        loss, _ = objective(policy, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sum(means[-5:]) / 5 > 2 * max(sum(means[:5]) / 5, 0.05)


def test_a_queue_saved_on_another_number_of_processes_is_dropped_not_duplicated(model, tok):
    src = grpo_source(model, tok)
    src.next_batch()
    state = src.state_dict()
    assert len(state["queues"]) == 1 and len(state["queues"][0]) == 7  # this process's pending micro-batches
    other = grpo_source(model, tok)
    other.rank, other.world = 0, 2  # resumed as rank 0 of 2
    other.load_state_dict(state)
    assert other.queue == [] and other.walk.state_dict() == src.walk.state_dict() and other.rollouts == 1


def test_selected_rows_of_several_rollouts_score_as_they_did(model, tok):
    """Rows taken from rollouts of different widths and re-padded give the same tokens and the same
    log-probs as in their own rollout."""
    from llmlab.train.rollout import select_rollouts

    s = sampling(tok)
    a = sample_rollout(model, tok, [p.ids for p in prompts_of(tok, TEXTS)], s, torch.Generator().manual_seed(1))
    b = sample_rollout(model, tok, [p.ids for p in prompts_of(tok, ["7", "rev x y z w v"])], s, torch.Generator().manual_seed(2))
    merged = select_rollouts([(a, [0, 2]), (b, [1])], tok.pad_token_id)
    assert merged.completions == [a.completions[0], a.completions[2], b.completions[1]]
    own = [rollout_logps(model, r, 1.0, 8)[0] for r in (a, b)]
    got, _ = rollout_logps(model, merged, 1.0, 8)
    for row, (logps, mask, i) in enumerate([(own[0], a.completion_mask, 0), (own[0], a.completion_mask, 2),
                                            (own[1], b.completion_mask, 1)]):
        n = int(mask[i].sum())
        assert int(merged.completion_mask[row].sum()) == n
        torch.testing.assert_close(got[row, :n], logps[i, :n], atol=1e-5, rtol=0)


def test_dynamic_sampling_replaces_groups_whose_rewards_are_all_equal(model, tok):
    """Prompts starting with "flat" get the same reward for every sample; with dynamic sampling the
    rollout draws more prompts and trains only on groups with a spread."""
    def reward(prompts, completions, **kw):
        return [0.0 if p.startswith("flat") else float(len(c) % 3) for p, c in zip(prompts, completions)]

    stream = iter(prompts_of(tok, [f"rev {c} b a" for c in "abcdefgh"]))
    flat = prompts_of(tok, ["flat 1", "flat 2", "rev q r s", "flat 3"])
    plain = GRPOPrepare(model, None, tok, reward, "toy", sampling(tok), 4, 8, seed=0)
    rows, stats = plain(flat, 0)
    assert stats["rl/zero_variance_share"] >= 0.75 and rows["input_ids"].size(0) == 16
    dynamic = GRPOPrepare(model, None, tok, reward, "toy", sampling(tok), 4, 8, seed=0, dynamic_sampling=True)
    rows, stats = dynamic(flat, 0, draw=lambda n: [next(stream) for _ in range(n)])
    assert rows["input_ids"].size(0) == 16  # the same number of groups
    advantages = rows["advantages"].view(-1, 4)
    assert stats["rl/resampled_prompts"] >= 3 and stats["rl/trained_zero_variance_share"] < stats["rl/zero_variance_share"]
    assert (advantages.abs().sum(dim=1) > 0).float().mean() >= 0.75  # groups that teach something


def test_dynamic_sampling_keeps_what_wanted_groups_asks_for(model, tok):
    """`wanted_groups` is the one rule dynamic sampling applies: a subclass that wants only groups
    whose best reward is below 2 (the "hard" prompts here, rewards 0 or 1) gets a rollout of those,
    where the plain rule keeps the "easy" prompts' groups too (their rewards, 1 or 2, spread as well)."""
    def reward(prompts, completions, **kw):
        return [(1.0 if p.startswith("easy") else 0.0) + float(len(c) % 2) for p, c in zip(prompts, completions)]

    class HardOnly(GRPOPrepare):
        def wanted_groups(self, scores):
            return super().wanted_groups(scores) & (scores.view(-1, self.group_size).max(dim=1).values < 2)

    easy = prompts_of(tok, ["easy a b", "easy c d", "easy e f", "easy g h"])
    stream = iter(prompts_of(tok, [f"hard {c} {d}" for c in "abcdefgh" for d in "xyz"]))
    plain = GRPOPrepare(model, None, tok, reward, "toy", sampling(tok), 4, 8, seed=0, dynamic_sampling=True)
    _, stats = plain(easy, 0, draw=lambda n: [next(stream) for _ in range(n)])
    assert stats["rl/reward_mean"] >= 1.0 and stats["rl/resampled_prompts"] == 0
    hard = HardOnly(model, None, tok, reward, "toy", sampling(tok), 4, 8, seed=0, dynamic_sampling=True, max_rounds=6)
    rows, stats = hard(easy, 0, draw=lambda n: [next(stream) for _ in range(n)])
    assert rows["input_ids"].size(0) == 16 and stats["rl/resampled_prompts"] >= 4
    assert stats["rl/reward_mean"] < 1.0  # only the hard prompts' groups (rewards 0 or 1) were kept
