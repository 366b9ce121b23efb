"""Each optimizer's update on hand-sized tensors equals the paper's formula, written out here in
float64 numpy (never by calling the implementation); Muon's and Sophia's defining properties. Every
optimizer is built the way a stage builds it: from its spec block, through `llmlab.optim.build_optimizer`."""

import math

import numpy as np
import pytest
import torch

from llmlab.optim import Muon, build_optimizer
from llmlab.spec import TrainSpec

W0 = np.array([[0.5, -1.0, 0.25], [1.5, 0.0, -0.75]])
GRADS = [np.array([[0.1, -0.2, 0.3], [-0.4, 0.5, 0.05]]), np.array([[-0.3, 0.1, 0.2], [0.2, -0.1, 0.6]])]


def run_steps(opt_factory, w0=W0, grads=GRADS):
    """Apply `grads` one per step to a parameter starting at w0; return the weights after each."""
    p = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float32))
    opt = opt_factory([p])
    out = []
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
        out.append(p.detach().double().numpy().copy())
    return out


def built(name: str, lr: float, weight_decay: float = 0.0, **fields):
    """A factory of llmlab's optimizer `name` (its spec block with `fields`) over the given parameters."""
    spec = TrainSpec(optimizer={"name": name, **fields}).optimizer
    return lambda params: build_optimizer(torch.nn.ParameterList(params), spec, lr, weight_decay)


def test_adamw_update_matches_formula():
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.999, 1e-8, 0.1
    got = run_steps(built("adamw", lr, wd, beta1=b1, beta2=b2, eps=eps))
    w, m, v = W0.copy(), 0 * W0, 0 * W0
    for t, g in enumerate(GRADS, 1):  # Loshchilov & Hutter, Algorithm 2 (decoupled decay)
        w = w - lr * wd * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        np.testing.assert_allclose(got[t - 1], w, atol=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_update_matches_formula(nesterov):
    """llmlab's sgd is heavy-ball momentum: b = mu b + g; w -= lr (g + mu b if Nesterov else b)."""
    lr, mu = 0.1, 0.9
    got = run_steps(built("sgd", lr, momentum=mu, nesterov=nesterov))
    w, b = W0.copy(), 0 * W0
    for t, g in enumerate(GRADS, 1):
        b = mu * b + g
        w = w - lr * (g + mu * b if nesterov else b)
        np.testing.assert_allclose(got[t - 1], w, atol=1e-6)


def test_lion_update_matches_paper():
    lr, b1, b2, wd = 0.01, 0.9, 0.99, 0.5
    got = run_steps(built("lion", lr, wd, beta1=b1, beta2=b2))
    w, m = W0.copy(), 0 * W0
    for t, g in enumerate(GRADS):  # Chen et al. 2023, Algorithm 2
        c = b1 * m + (1 - b1) * g
        w = w - lr * (np.sign(c) + wd * w)
        m = b2 * m + (1 - b2) * g
        np.testing.assert_allclose(got[t], w, atol=1e-7)
    # every coordinate moved by exactly lr in the first step (sign update, no decay term here)
    first = run_steps(built("lion", lr, beta1=b1, beta2=b2), grads=GRADS[:1])[0]
    np.testing.assert_allclose(np.abs(first - W0), lr, atol=1e-7)


def test_adafactor_update_matches_formula():
    lr, decay, eps1, eps2, d = 0.01, -0.8, 1e-30, 1e-3, 1.0
    got = run_steps(built("adafactor", lr, beta2_decay=decay, eps1=eps1, eps2=eps2, d=d))
    w = W0.copy()
    r, c = np.zeros((2, 1)), np.zeros((1, 3))
    for t, g in enumerate(GRADS, 1):  # Shazeer & Stern 2018, Algorithm 4, as torch documents it
        beta2 = 1 - t ** decay
        rho = min(lr, 1 / math.sqrt(t))
        alpha = max(eps2, np.sqrt(np.mean(w * w))) * rho
        r = beta2 * r + (1 - beta2) * np.mean(g * g, axis=1, keepdims=True)
        c = beta2 * c + (1 - beta2) * np.mean(g * g, axis=0, keepdims=True)
        v = (r @ c) / np.mean(r)
        u = g / np.sqrt(np.maximum(v, eps1 * eps1))
        u = u / max(1.0, np.sqrt(np.mean(u * u)) / d)
        w = w - alpha * u
        np.testing.assert_allclose(got[t - 1], w, atol=1e-6)


def test_sophia_update_matches_paper():
    lr, b1, b2, rho, eps, wd, B = 0.1, 0.965, 0.99, 0.04, 1e-12, 0.1, 7
    hess_grads = [np.array([[0.3, 0.01, -0.2], [0.05, 2.0, 0.001]])]  # gradients of the GNB loss
    p = torch.nn.Parameter(torch.tensor(W0, dtype=torch.float32))
    opt = built("sophia", lr, wd, beta1=b1, beta2=b2, rho=rho, k=2, eps=eps)([p])
    w, m, h = W0.copy(), 0 * W0, 0 * W0
    for t, g in enumerate(GRADS * 2, 1):  # Liu et al. 2023, Algorithms 2 and 3
        if t % 2 == 1:  # t mod k = 1: refresh the estimate with h_hat = B * grad^2
            assert opt.hessian_due()
            gh = hess_grads[0] * t
            p.grad = torch.tensor(gh, dtype=torch.float32)
            opt.update_hessian(B)
            h = b2 * h + (1 - b2) * B * gh * gh
        else:
            assert not opt.hessian_due()
        p.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
        m = b1 * m + (1 - b1) * g
        w = w - lr * wd * w
        w = w - lr * np.clip(m / np.maximum(h, eps), -rho, rho)
        np.testing.assert_allclose(p.detach().double().numpy(), w, atol=1e-6)
    # some coordinates were clipped and some not, so both branches of the formula were checked
    ratio = np.abs(m / np.maximum(h, eps))
    assert (ratio > rho).any() and (ratio < rho).any()


def newton_schulz_reference(g, steps=5):
    """Jordan et al.'s quintic iteration X <- aX + (bA + cA^2)X, A = XX^T, in float64."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / np.linalg.norm(x)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if g.shape[0] > g.shape[1] else x


def test_muon_update_matches_formula():
    lr, mu, wd = 0.02, 0.95, 0.1
    w0 = W0.T.copy()  # 3 x 2: a tall matrix, so the sqrt(rows / cols) scale matters
    grads = [g.T.copy() for g in GRADS]
    got = run_steps(built("muon", lr, wd, momentum=mu), w0, grads)
    w, buf = w0.copy(), 0 * w0
    for t, g in enumerate(grads):
        buf = mu * buf + (1 - mu) * g
        u = (1 - mu) * g + mu * buf  # nesterov: g.lerp(buf, mu)
        w = w - lr * wd * w - lr * math.sqrt(3 / 2) * newton_schulz_reference(u)
        np.testing.assert_allclose(got[t], w, atol=1e-5)


def test_muon_hidden_updates_are_orthogonal():
    torch.manual_seed(0)
    # a gradient with widely spread singular values (condition number 100)
    u, _ = torch.linalg.qr(torch.randn(32, 32))
    v, _ = torch.linalg.qr(torch.randn(16, 16))
    g = u[:, :16] @ torch.diag(torch.logspace(0, -2, 16)) @ v.T
    p = torch.nn.Parameter(torch.zeros(32, 16))
    opt = Muon([{"params": [p], "use_muon": True}], lr=1.0, nesterov=False, momentum=0.0)
    p.grad = g
    opt.step()
    update = -p.detach() / math.sqrt(32 / 16)
    sv = torch.linalg.svdvals(update)
    # the quintic leaves singular values in roughly [0.7, 1.2] instead of [0.01, 1]
    assert sv.min() > 0.5 and sv.max() < 1.3, sv
    # and keeps the singular vectors: close to U V^T of the gradient's SVD
    U, _, Vh = torch.linalg.svd(g, full_matrices=False)
    cos = torch.nn.functional.cosine_similarity(update.flatten(), (U @ Vh).flatten(), dim=0)
    assert cos > 0.95


def test_muon_gives_one_dim_params_adamw():
    torch.manual_seed(0)
    vec = torch.randn(5)
    ours = torch.nn.Parameter(vec.clone())
    ref = torch.nn.Parameter(vec.clone())
    mat = torch.nn.Parameter(torch.randn(4, 3))
    opt = Muon([{"params": [mat], "use_muon": True}, {"params": [ours], "use_muon": False, "lr": 0.003,
                                                     "weight_decay": 0.1}], lr=0.03)
    adamw = torch.optim.AdamW([ref], lr=0.003, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    for _ in range(4):
        g = torch.randn(5)
        ours.grad, ref.grad, mat.grad = g.clone(), g.clone(), torch.randn(4, 3)
        opt.step()
        adamw.step()
    torch.testing.assert_close(ours.detach(), ref.detach(), atol=1e-7, rtol=0)
    assert not torch.equal(ours.detach(), vec)


def test_muon_refuses_non_matrix_in_muon_group():
    with pytest.raises(ValueError, match="2-D"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(3))], "use_muon": True}])
