import numpy as np
import pytest

import lab


def test_readme_example_runs_and_matches_manual_gradient(use_backend):
    rng = np.random.default_rng(0)
    xv, wv = rng.standard_normal((4, 8)).astype("float32"), rng.standard_normal((8, 3)).astype("float32")
    x = lab.tensor(xv, requires_grad=True)
    w = lab.tensor(wv, requires_grad=True)
    loss = (x @ w).gelu().sum()
    loss.backward()
    h = xv.astype(np.float64) @ wv
    t = np.tanh(0.7978845608028654 * (h + 0.044715 * h ** 3))
    dgelu = 0.5 * (1 + t) + 0.5 * h * (1 - t * t) * 0.7978845608028654 * (1 + 3 * 0.044715 * h * h)
    np.testing.assert_allclose(w.grad.numpy(), xv.T @ dgelu, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(loss.item(), (0.5 * h * (1 + t)).sum(), rtol=1e-5)


def test_gradients_accumulate_across_backward_calls(use_backend):
    x = lab.tensor([1.0, 2.0, 3.0], requires_grad=True)
    (x * x).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [2 + 3, 4 + 3, 6 + 3])


def test_shared_subexpression_gets_both_paths(use_backend):
    x = lab.tensor([0.5, -1.5], requires_grad=True)
    y = x * x
    (y + y * x).sum().backward()  # d/dx (x^2 + x^3) = 2x + 3x^2
    xv = np.array([0.5, -1.5])
    np.testing.assert_allclose(x.grad.numpy(), 2 * xv + 3 * xv ** 2, rtol=1e-6)


def test_no_grad_records_nothing_and_detach_cuts_the_graph(use_backend):
    x = lab.tensor([1.0, 2.0], requires_grad=True)
    with lab.no_grad():
        y = x * 2.0
    assert not y.requires_grad
    z = (x.detach() * x).sum()
    z.backward()
    np.testing.assert_allclose(x.grad.numpy(), [1.0, 2.0])  # only the non-detached factor contributes


def test_backward_needs_a_scalar_or_a_gradient(use_backend):
    x = lab.tensor(np.ones((2, 3)), requires_grad=True)
    y = x * 2.0
    with pytest.raises(RuntimeError, match="one-element"):
        y.backward()
    y.backward(lab.tensor(np.full((2, 3), 0.5)))
    np.testing.assert_allclose(x.grad.numpy(), np.ones((2, 3)))
    with pytest.raises(RuntimeError, match="does not require grad"):
        lab.tensor([1.0]).backward()


def test_deep_graph_does_not_hit_recursion_limit(use_backend):
    x = lab.tensor([1.0], requires_grad=True)
    y = x
    for _ in range(3000):
        y = y * 1.0
    y.sum().backward()
    assert x.grad.item() == 1.0
