"""Optimizer kernels against the update rules written out in numpy (float64), over several steps."""
import numpy as np
import pytest

import lab
from lab.checks import InputError
from lab.train import SGD, AdamW, clip_grad_norm_

from adamw_reference import adamw_reference, check_numpy_adamw


def _grads(rng, shape, steps):
    return [rng.standard_normal(shape) for _ in range(steps)]


def _adamw_steps_match_the_formula(p0, grads, lr=0.01, b1=0.9, b2=0.95, eps=1e-8, wd=0.1):
    """AdamW's steps on a parameter p0 with these gradients, checked against the update rule in float64; the
    optimizer."""
    p = lab.tensor(p0, requires_grad=True)
    opt = AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    ref, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for t, g in enumerate(grads, start=1):
        p.grad = lab.tensor(g)
        opt.step()
        ref, m, v = adamw_reference(ref, g, m, v, lr, b1, b2, eps, wd, t)
    np.testing.assert_allclose(p.numpy(), ref, rtol=1e-5, atol=1e-6)
    return opt


def test_adamw_matches_reference_formula(use_backend):
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((3, 5))
    opt = _adamw_steps_match_the_formula(p0, _grads(rng, (3, 5), 4))
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


@pytest.mark.parametrize("opt_cls", [AdamW, SGD])
@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_step_with_max_norm_equals_clip_then_step(use_backend, opt_cls, max_norm):
    """The trainer's path: grad_norm, then a step that clips inside the update's kernel. The same weights, and the
    same (clipped) gradients left in .grad, as clip_grad_norm_ followed by a plain step."""
    from lab.train import grad_norm
    rng = np.random.default_rng(3)
    values = [rng.standard_normal(s).astype(np.float32) for s in ((5, 7), (7,), (300,))]
    grads = [rng.standard_normal(v.shape).astype(np.float32) for v in values]
    results = []
    for fused in (False, True):
        params = [lab.tensor(v.copy(), requires_grad=True) for v in values]
        opt = opt_cls(params, lr=0.1, weight_decay=0.01)
        for _ in range(2):
            for p, g in zip(params, grads):
                p.grad = lab.tensor(g.copy())
            if fused:
                norm = grad_norm(params)
                opt.step(guard=norm, max_norm=max_norm)
            else:
                norm = clip_grad_norm_(params, max_norm)
                opt.step(guard=norm)
        results.append(([p.numpy() for p in params], [p.grad.numpy() for p in params], norm.item()))
    (w0, g0, n0), (w1, g1, n1) = results
    assert n0 == pytest.approx(n1, rel=1e-6)
    for a, b in zip(w0 + g0, w1 + g1):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    if max_norm < 1.0:  # the clip did something: the kept gradients have the clipped norm
        assert np.sqrt(sum((g ** 2).sum() for g in g1)) == pytest.approx(max_norm, rel=1e-4)


def test_step_with_max_norm_needs_the_norm(use_backend):
    p = lab.tensor(np.ones(3, np.float32), requires_grad=True)
    p.grad = lab.tensor(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="guard"):
        AdamW([p]).step(max_norm=1.0)


@pytest.mark.parametrize("max_norm", [0.0, 0.5])
def test_adamw_in_few_dispatches_equals_one_per_parameter(wgpu_backend, monkeypatch, max_norm):
    """wgpu's AdamW over many parameters (optim_many.wgsl: several parameters per dispatch, as many as the
    device's bindings allow; 3 per dispatch here so that 11 parameters take 4, the last part-full) against the
    one-per-parameter kernel: the same weights, moments and clipped gradients, over two steps with different
    weight decays and sizes (1 element to several workgroups); a NaN norm leaves everything as it was."""
    from lab.engine.backend import Backend, using_backend
    from lab.train import grad_norm
    rng = np.random.default_rng(4)
    shapes = [(1,), (3, 5), (700,), (2, 257), (64,), (5,), (1000,), (9, 9), (256,), (2,), (513,)]
    values = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(2)]
    monkeypatch.setattr(type(wgpu_backend), "MAX_OPTIMIZER_SLOTS", 3)
    results = []
    for many in (True, False):
        if not many:
            monkeypatch.setattr(type(wgpu_backend), "adamw_many_", Backend.adamw_many_)  # the composed fallback
        with using_backend(wgpu_backend):
            ps = [lab.tensor(v, requires_grad=True) for v in values]
            opt = AdamW([{"params": ps[:6], "weight_decay": 0.1}, {"params": ps[6:], "weight_decay": 0.0}], lr=0.01)
            with lab.profile(wgpu_backend) as prof:
                for step_grads in grads:
                    for p, g in zip(ps, step_grads):
                        p.grad = lab.tensor(g)
                    opt.step(guard=grad_norm(ps), max_norm=max_norm)
            names = [n for n, _, _ in prof.records if n.startswith("optim")]
            assert names == (["optim_many:adamw_many_main"] * 8 if many else ["optim:adamw_main"] * 22), names
            clipped = [p.grad.numpy() for p in ps]    # the update leaves the clipped gradients in .grad
            for p in ps:
                p.grad = lab.tensor(np.full(p.shape, np.nan, np.float32))
            before = [p.numpy() for p in ps]
            opt.step(guard=grad_norm(ps), max_norm=max_norm)   # a NaN norm: skipped on the device
            for p, b in zip(ps, before):
                np.testing.assert_array_equal(p.numpy(), b)
            results.append([p.numpy() for p in ps] + clipped + [wgpu_backend.to_numpy(a)
                                                              for a in opt.state_arrays().values()])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("slots", [1, 128], ids=["4-per-dispatch", "all-in-one"])
def test_grad_norm_in_few_dispatches_matches_numpy(wgpu_backend, monkeypatch, slots):
    """wgpu's gradient norm (sumsq_many.wgsl: per-workgroup partial sums of many arrays in one dispatch, or of 4
    per dispatch here, the partials then summed) against float64 numpy, on sizes around its 4096-element
    workgroups."""
    from lab.engine.backend import using_backend
    from lab.train import grad_norm
    monkeypatch.setattr(type(wgpu_backend), "MAX_OPTIMIZER_SLOTS", slots)
    rng = np.random.default_rng(5)
    shapes = [(1,), (4095,), (4096,), (4097,), (3, 7), (70000,), (2,), (8192,), (5, 5), (1,), (12289,)]
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    with using_backend(wgpu_backend):
        ps = [lab.tensor(np.zeros(s, np.float32), requires_grad=True) for s in shapes]
        for p, g in zip(ps, grads):
            p.grad = lab.tensor(g)
        with lab.profile(wgpu_backend) as prof:
            norm = grad_norm(ps).item()
    dispatches = [n for n, _, _ in prof.records if n.startswith("sumsq_many")]
    assert len(dispatches) == (3 if slots == 1 else 1), dispatches
    want = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads))
    assert norm == pytest.approx(want, rel=1e-5)


def test_adamw_updates_every_chunk_of_a_parameter_larger_than_one_pass(use_backend):
    """numpy's adamw_ runs its passes a chunk (GELU_CHUNK elements) at a time: a parameter of two chunks and a
    ragged end gets the formula's update in every element, over steps, as on wgpu."""
    from lab.engine.numpy_backend import GELU_CHUNK
    rng = np.random.default_rng(1)
    shape = (3, (2 * GELU_CHUNK + 101) // 3)
    p0 = rng.standard_normal(shape)
    _adamw_steps_match_the_formula(p0, _grads(rng, shape, 3))


def test_numpy_adamw_updates_views_that_are_not_contiguous(numpy_backend):
    """Arrays with no flat view (transposed, strided) are updated whole, in place, by the same formula."""
    from lab.engine.numpy_backend import GELU_CHUNK
    rng = np.random.default_rng(2)
    n = GELU_CHUNK + 7
    p, g, m, v = (rng.standard_normal((2, n)).T for _ in range(4))
    check_numpy_adamw(numpy_backend, p, g, m, np.abs(v), step=4)


@pytest.mark.parametrize("make", [lambda ps: SGD(ps, lr=0.1), lambda ps: AdamW(ps, lr=0.1),
                                  lambda ps: AdamW([{"params": ps[:1]}, {"params": ps[1:], "weight_decay": 0.0}])])
def test_a_tensor_listed_twice_is_refused_not_stepped_twice(use_backend, make):
    """SGD([w, w]) moved w by 2 lr g a step, silently (each listing got its own update)."""
    w = lab.tensor(np.ones(3, np.float32), requires_grad=True)
    with pytest.raises(InputError, match=r"same tensor twice, as '0' and '1'"):
        make([w, w])
    named = [("a.weight", w), ("b.weight", w)]
    with pytest.raises(InputError, match=r"same tensor twice, as 'a.weight' and 'b.weight'"):
        SGD(named, lr=0.1)
