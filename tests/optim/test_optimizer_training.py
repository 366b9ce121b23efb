"""Every optimizer trains (a regression and a tiny LM through the real loop), round-trips its state
exactly, resumes or switches; Sophia's Hessian hook and clipping; Muon's parameter routing."""

import copy
import io

import pytest
import torch

from helpers import OPTIMIZER_LR, Recorder, tiny_model
from helpers import CountingBatches as Batches
from helpers import optimizer_train_spec as cfg
from llmlab.checkpoint import latest_checkpoint, load_checkpoint
from llmlab.optim import SophiaG, build_optimizer, param_groups
from llmlab.optim.sophia import gnb_loss
from llmlab.spec import OPTIMIZER_CLASSES, TrainSpec
from llmlab.train.loop import train
from llmlab.train.objectives import LanguageModeling

NAMES = list(OPTIMIZER_CLASSES)
LR = OPTIMIZER_LR
REGRESSION_LR = {"adamw": 1e-2, "adafactor": 0.1, "lion": 3e-3, "sophia": 0.1, "muon": 0.02, "sgd": 0.05}


def spec_of(name, **fields):
    return TrainSpec(optimizer={"name": name, **fields}).optimizer


@pytest.mark.parametrize("name", NAMES)
def test_reduces_regression_loss(name):
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = torch.sin(x @ torch.randn(8, 1))
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 1))
    opt = build_optimizer(model, spec_of(name, **({"k": 5} if name == "sophia" else {})), REGRESSION_LR[name], 0.0)
    losses = []
    for _ in range(150):
        if isinstance(opt, SophiaG) and opt.hessian_due():
            # Gauss-Newton-Bartlett for squared loss: labels sampled from N(f(x), 1)
            f = model(x)
            y_hat = f.detach() + torch.randn_like(f)
            (0.5 * ((f - y_hat) ** 2).mean()).backward()
            opt.update_hessian(len(x))
            opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("name", NAMES)
def test_reduces_tiny_lm_loss(name, tmp_path):
    rec = Recorder()
    train(tiny_model(), LanguageModeling(), Batches(), cfg(name, max_steps=40), tmp_path, callbacks=rec, seed=1)
    first, last = rec.logs[0][1], sum(l for _, l in rec.logs[-3:]) / 3
    assert last < 0.7 * first, (first, last)


def _step(model, opt, batch):
    obj = LanguageModeling()
    if hasattr(opt, "hessian_due") and opt.hessian_due():
        loss, n = gnb_loss(model, batch)
        loss.backward()
        opt.update_hessian(n)
        opt.zero_grad(set_to_none=True)
    loss_sum, _ = obj(model, batch)
    (loss_sum / obj.count(batch)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trips_exactly(name):
    spec = spec_of(name, **({"k": 2} if name == "sophia" else {}))
    model, data = tiny_model(), Batches()
    opt = build_optimizer(model, spec, LR[name], 0.1)
    torch.manual_seed(0)
    for _ in range(3):
        _step(model, opt, data.next_batch())
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # checkpoints are loaded with weights_only
    twin = copy.deepcopy(model)
    fresh = build_optimizer(twin, spec, LR[name], 0.1)
    fresh.load_state_dict(saved)
    batch = data.next_batch()  # step 4: Sophia refreshes its Hessian here too (k=2)
    for m, o in ((model, opt), (twin, fresh)):
        torch.manual_seed(1)
        _step(m, o, batch)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), tiny_model().parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_resume_with_optimizer_state_matches_uninterrupted(name, tmp_path):
    kw = dict(max_steps=8, scheduler="none", warmup_steps=0, save_every=4, optimizer={"name": name, **({"k": 3} if name == "sophia" else {})})
    full, part = tiny_model(), tiny_model()
    train(full, LanguageModeling(), Batches(), cfg(name, **kw), tmp_path / "a", seed=1)
    train(tiny_model(), LanguageModeling(), Batches(), cfg(name, **{**kw, "max_steps": 4}), tmp_path / "b", seed=1)
    train(part, LanguageModeling(), Batches(), cfg(name, **kw), tmp_path / "b", seed=1)
    for p, q in zip(full.parameters(), part.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_resume_can_switch_optimizer_without_its_state(tmp_path):
    train(tiny_model(), LanguageModeling(), Batches(), cfg("adamw", max_steps=4), tmp_path, seed=1)
    # loading AdamW's moments into Lion would "work" silently in torch: it is refused instead
    with pytest.raises(ValueError, match="load_optimizer: false"):
        train(tiny_model(), LanguageModeling(), Batches(), cfg("lion", max_steps=8), tmp_path, seed=1)
    rec = Recorder()
    result = train(tiny_model(), LanguageModeling(), Batches(), cfg("lion", max_steps=8, load_optimizer=False), tmp_path,
                   callbacks=rec, seed=1)
    assert result.resumed_from == 4 and [s for s, _ in rec.logs] == [5, 6, 7, 8]
    state = load_checkpoint(latest_checkpoint(tmp_path))["optimizer"]
    assert {g["optimizer"] for g in state["param_groups"]} == {"lion"}
    assert all(set(s) == {"exp_avg"} for s in state["state"].values())  # Lion's state, not AdamW's


def test_sophia_refreshes_hessian_every_k_steps_in_the_loop(tmp_path, monkeypatch):
    calls = []
    original = SophiaG.update_hessian

    def spy(self, n):
        calls.append((self.steps_done(), n))
        return original(self, n)

    monkeypatch.setattr(SophiaG, "update_hessian", spy)
    train(tiny_model(), LanguageModeling(), Batches(), cfg("sophia", max_steps=10, optimizer={"name": "sophia", "k": 3}),
          tmp_path, seed=1)
    # before steps 1, 4, 7, 10 (t mod k = 1), each on one micro-batch of 4 x 15 predicted tokens
    assert calls == [(0, 60), (3, 60), (6, 60), (9, 60)]


def test_sophia_updates_are_bounded_by_rho_times_lr(tmp_path, monkeypatch):
    rho, lr = 0.04, LR["sophia"]
    biggest = []
    original = SophiaG.step

    def checked(self, closure=None):
        before = [p.detach().clone() for g in self.param_groups for p in g["params"]]
        out = original(self, closure)
        after = [p.detach() for g in self.param_groups for p in g["params"]]
        step_lr = self.param_groups[0]["lr"]
        biggest.append(max(float((a - b).abs().max()) for a, b in zip(after, before)) / (rho * step_lr))
        return out

    monkeypatch.setattr(SophiaG, "step", checked)
    train(tiny_model(), LanguageModeling(), Batches(), cfg("sophia", lr=lr, max_steps=6, scheduler="none", warmup_steps=0),
          tmp_path, seed=1)
    assert len(biggest) == 6
    assert max(biggest) <= 1 + 1e-4  # never beyond rho * lr per element
    assert min(biggest) > 0.99  # and the clip is active (some coordinate reaches the bound)


def test_gnb_estimate_is_the_gauss_newton_diagonal():
    """Averaged over sampled labels, B * grad^2 equals diag of the Gauss-Newton matrix of the mean
    token loss: for a logit table, (1/N) * count(token) * p_j (1 - p_j). Squared data gradients
    (what Adam keeps) would not match this."""
    torch.manual_seed(0)

    class Table(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(5, 5))

        def forward(self, input_ids):
            return type("Out", (), {"logits": self.w[input_ids]})()

    model = Table()
    x = torch.tensor([[0, 1, 2, 0, 3, 4], [1, 1, 0, 2, 4, 3]])
    batch = {"input_ids": x, "labels": x}
    est = torch.zeros(5, 5)
    samples = 1500
    for _ in range(samples):
        model.zero_grad()
        loss, n = gnb_loss(model, batch)
        loss.backward()
        est += n * model.w.grad ** 2 / samples
    p = torch.softmax(model.w.detach(), dim=-1)
    counts = torch.bincount(x[:, :-1].reshape(-1), minlength=5).float()
    exact = counts[:, None] / n * p * (1 - p)
    assert n == 10
    torch.testing.assert_close(est, exact, atol=0.01, rtol=0.15)


def test_muon_routes_embeddings_head_and_vectors_to_adamw_at_a_tenth():
    model = tiny_model(tie_word_embeddings=False, attention_bias=True)
    opt = build_optimizer(model, spec_of("muon"), 0.02, 0.1)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = by_id[id(p)]
        hidden = p.ndim == 2 and p is not emb and p is not head
        assert g["use_muon"] == hidden, name
        assert g["base_lr"] == pytest.approx(0.02 if hidden else 0.002), name
        # no weight decay on norms, biases and embeddings
        assert g["weight_decay"] == (0.0 if p.ndim < 2 or p is emb else 0.1), name


def test_param_groups_skip_decay_on_norms_biases_embeddings():
    model = tiny_model(attention_bias=True)
    groups = param_groups(model, 0.1)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        no_decay = p.ndim < 2 or "embed" in name
        assert (id(p) not in decayed) == no_decay, name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
