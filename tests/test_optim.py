"""Optimizer kernels against the update rules written out in numpy (float64), over several steps."""
import numpy as np
import pytest

import lab
from lab.train import SGD, AdamW, clip_grad_norm_


def _grads(rng, shape, steps):
    return [rng.standard_normal(shape) for _ in range(steps)]


def test_adamw_matches_reference_formula(use_backend):
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((3, 5))
    grads = _grads(rng, (3, 5), 4)
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.95, 1e-8, 0.1
    p = lab.tensor(p0, requires_grad=True)
    opt = AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    ref, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for t, g in enumerate(grads, start=1):
        p.grad = lab.tensor(g)
        opt.step()
        ref -= lr * wd * ref
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        ref -= lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    np.testing.assert_allclose(p.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert opt.state_bytes() == 2 * p0.size * 4


def test_adamw_groups_apply_their_own_weight_decay(use_backend):
    a = lab.tensor(np.ones(4), requires_grad=True)
    b = lab.tensor(np.ones(4), requires_grad=True)
    opt = AdamW([{"params": [a], "weight_decay": 0.5}, {"params": [b], "weight_decay": 0.0}], lr=0.1)
    a.grad, b.grad = lab.tensor(np.zeros(4)), lab.tensor(np.zeros(4))
    opt.step()
    np.testing.assert_allclose(a.numpy(), 1 - 0.1 * 0.5, rtol=1e-6)  # zero gradient: decay alone moves a
    np.testing.assert_allclose(b.numpy(), 1.0)


def test_sgd_momentum_matches_reference(use_backend):
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(7)
    grads = _grads(rng, (7,), 3)
    p = lab.tensor(p0, requires_grad=True)
    opt = SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    ref, buf = p0.copy(), np.zeros_like(p0)
    for g in grads:
        p.grad = lab.tensor(g)
        opt.step()
        d = g + 0.01 * ref
        buf = 0.9 * buf + d
        ref -= 0.1 * buf
    np.testing.assert_allclose(p.numpy(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_grad_norm_scales_to_the_global_norm(use_backend, max_norm):
    rng = np.random.default_rng(2)
    gs = [rng.standard_normal((4, 3)), rng.standard_normal(5), rng.standard_normal((1,))]
    ps = [lab.tensor(np.zeros_like(g), requires_grad=True) for g in gs]
    for p, g in zip(ps, gs):
        p.grad = lab.tensor(g)
    total = np.sqrt(sum((g ** 2).sum() for g in gs))
    norm = clip_grad_norm_(ps, max_norm)
    np.testing.assert_allclose(norm.item(), total, rtol=1e-5)
    coef = min(1.0, max_norm / (total + 1e-6))
    for p, g in zip(ps, gs):
        np.testing.assert_allclose(p.grad.numpy(), g * coef, rtol=1e-5, atol=1e-7)
