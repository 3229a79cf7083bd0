"""The Llama family's fused ops (RMSNorm with the residual add, SwiGLU, rotary embeddings): against PyTorch and
against the composed ops they replace, on both backends, at odd shapes; and the dispatches of a training step."""
from dataclasses import replace

import numpy as np
import pytest
import torch

import lab
from lab.engine import ops as F

FLAGS = ("fused_rms_norm", "fused_swiglu", "fused_rotary")


def _t(a, grad=True):
    return lab.tensor(np.asarray(a, np.float32), requires_grad=grad)


def _torch(a):
    return torch.tensor(np.asarray(a, np.float32), requires_grad=True)


def _torch_rms(x, w, eps):   # transformers' LlamaRMSNorm
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _torch_rotary(x, cos, sin):   # transformers' apply_rotary_pos_emb
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin


def _close(ours, theirs, tol=1e-5):
    theirs = theirs.detach().numpy()
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=tol, atol=tol * max(1.0, float(np.abs(theirs).max())))


@pytest.mark.parametrize("shape", [(1, 1, 6), (2, 3, 10), (5, 13), (2, 1, 1000)])
def test_add_rms_norm_matches_torch_values_and_gradients(use_backend, shape):
    """x + r, and RMSNorm of it, with gradients reaching x, r and the weight through both outputs (the sum
    carries on as the residual stream, the norm feeds the MLP)."""
    rng = np.random.default_rng(sum(shape))
    x, r, R1, R2 = (rng.standard_normal(shape) for _ in range(4))
    w = rng.standard_normal(shape[-1])
    ours = [_t(a) for a in (x, r, w)]
    s, h = F.add_rms_norm(*ours, eps=1e-5)
    ((s * _t(R1, False)).sum() + (h * _t(R2, False)).sum()).backward()
    theirs = [_torch(a) for a in (x, r, w)]
    ts = theirs[0] + theirs[1]
    th = _torch_rms(ts, theirs[2], 1e-5)
    ((ts * _torch(R1)).sum() + (th * _torch(R2)).sum()).backward()
    _close(s, ts)
    _close(h, th)
    for a, b in zip(ours, theirs):
        _close(a.grad, b.grad, 1e-4)


@pytest.mark.parametrize("shape", [(1, 6), (3, 1, 10), (2, 7, 11)])
def test_rms_norm_matches_torch_when_its_input_has_other_uses(use_backend, shape):
    rng = np.random.default_rng(len(shape))
    x, w, R = rng.standard_normal(shape), rng.standard_normal(shape[-1]), rng.standard_normal(shape)
    xt, wt = _t(x), _t(w)
    (((F.rms_norm(xt, wt, 1e-6) + xt * 2.0) * _t(R, False)).sum()).backward()   # x's other use: absorbed into dx
    xs, ws = _torch(x), _torch(w)
    ((_torch_rms(xs, ws, 1e-6) + xs * 2.0) * _torch(R)).sum().backward()
    _close(xt.grad, xs.grad, 1e-4)
    _close(wt.grad, ws.grad, 1e-4)


@pytest.mark.parametrize("shape", [(1,), (3, 7), (2, 5, 11)])
def test_swiglu_matches_torch_silu_times_up(use_backend, shape):
    rng = np.random.default_rng(len(shape))
    g, u, R = (rng.standard_normal(shape) * 3 for _ in range(3))
    gt, ut = _t(g), _t(u)
    y = F.swiglu(gt, ut)
    (y * _t(R, False)).sum().backward()
    gs, us = _torch(g), _torch(u)
    ys = torch.nn.functional.silu(gs) * us
    (ys * _torch(R)).sum().backward()
    _close(y, ys)
    _close(gt.grad, gs.grad)
    _close(ut.grad, us.grad)


def test_swiglu_is_finite_at_the_ends_of_float32(use_backend):
    g = np.array([-3e38, -1e4, -100.0, -88.5, 0.0, 88.5, 100.0, 1e4, 3e38], np.float32)
    u = np.full_like(g, 0.5)
    gt, ut = _t(g), _t(u)
    y = F.swiglu(gt, ut)
    y.sum().backward()
    gs, us = _torch(g), _torch(u)
    (torch.nn.functional.silu(gs) * us).sum().backward()
    for ours, theirs in ((y, torch.nn.functional.silu(gs) * us), (gt.grad, gs.grad), (ut.grad, us.grad)):
        assert np.all(np.isfinite(ours.numpy()))
        np.testing.assert_allclose(ours.numpy(), theirs.detach().numpy(), rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("shape,pos", [((2, 2, 3, 5, 6), 0), ((1, 3, 1, 1, 10), 7), ((2, 4, 1, 6), 3), ((1, 2), 0)])
def test_rotary_matches_torch_at_a_cache_offset(use_backend, shape, pos):
    """Rows t of x (..., T, D), the grouped (B, Hkv, G, T, D) view included, take rows pos + t of the tables; the
    gradient is the rotation's transpose. Random tables (not cos/sin pairs) check the transpose for any table."""
    from lab.models.llama import rope_tables
    rng = np.random.default_rng(pos + len(shape))
    T, D = shape[-2:]
    x, R = rng.standard_normal(shape), rng.standard_normal(shape)
    tables = [rng.standard_normal((pos + T + 2, D)) for _ in range(2)]
    if pos == 7:   # and Llama's own tables
        tables = list(rope_tables(lab.LlamaConfig(hidden_size=20, num_attention_heads=2), pos + T + 2))
    xt = _t(x)
    y = F.rotary(xt, _t(tables[0], False), _t(tables[1], False), pos)
    (y * _t(R, False)).sum().backward()
    xs = _torch(x)
    ys = _torch_rotary(xs, *(torch.tensor(np.float32(t[pos:pos + T])) for t in tables))
    (ys * _torch(R)).sum().backward()
    _close(y, ys)
    _close(xt.grad, xs.grad)


@pytest.mark.parametrize("B,T,heads,D,pos", [(2, 5, 3, 6, 0), (1, 1, 2, 10, 4), (3, 2, 1, 2, 1)])
def test_rotary_splits_the_heads_of_a_packed_projection(use_backend, B, T, heads, D, pos):
    """heads=: x (B, T, heads * D) in, its heads (B, heads, T, D) rotated out, as permuting then rotating gives;
    the gradient goes back to the packed layout."""
    rng = np.random.default_rng(T + heads)
    x, R = rng.standard_normal((B, T, heads * D)), rng.standard_normal((B, heads, T, D))
    tables = [rng.standard_normal((pos + T + 1, D)) for _ in range(2)]
    xt = _t(x)
    y = F.rotary(xt, _t(tables[0], False), _t(tables[1], False), pos, heads=heads)
    (y * _t(R, False)).sum().backward()
    xs = _torch(x)
    ys = _torch_rotary(xs.reshape(B, T, heads, D).permute(0, 2, 1, 3),
                       *(torch.tensor(np.float32(t[pos:pos + T])) for t in tables))
    (ys * _torch(R)).sum().backward()
    assert y.shape == (B, heads, T, D)
    _close(y, ys)
    _close(xt.grad, xs.grad)


def test_rotary_gives_its_tables_gradients_through_the_composed_path(use_backend):
    rng = np.random.default_rng(0)
    x, c, s = rng.standard_normal((2, 3, 4)), rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    ours = [_t(a) for a in (x, c, s)]
    F.rotary(*ours, pos=2).sum().backward()
    theirs = [_torch(a) for a in (x, c, s)]
    _torch_rotary(theirs[0], theirs[1][2:5], theirs[2][2:5]).sum().backward()
    for a, b in zip(ours, theirs):
        _close(a.grad, b.grad)


def test_fused_ops_equal_the_composed_ops_they_replace(use_backend, monkeypatch):
    """With the backend's fused capabilities switched off (Backend's declared defaults) the composed ops give the
    same values and gradients."""
    rng = np.random.default_rng(3)
    x, r, up = (rng.standard_normal((2, 3, 10)) for _ in range(3))
    w = rng.standard_normal(10)
    cos, sin = (rng.standard_normal((5, 10)) for _ in range(2))
    results = []
    for fused in (True, False):
        for flag in FLAGS:
            monkeypatch.setattr(use_backend, flag, fused)
        ts = [_t(a) for a in (x, r, up, w)]
        s, h = F.add_rms_norm(ts[0], ts[1], ts[3])
        q = F.rotary(h, _t(cos, False), _t(sin, False), 2, heads=1).reshape(2, 3, 10)
        y = F.swiglu(F.rotary(q, _t(cos, False), _t(sin, False), 2), ts[2]) + F.rms_norm(s, ts[3])
        y.sum().backward()
        results.append([y.numpy()] + [t.grad.numpy() for t in ts])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_fused_ops_refuse_bad_input_naming_it(use_backend):
    ones = lambda *s: lab.tensor(np.ones(s, np.float32))
    with pytest.raises(ValueError, match=r"swiglu: gate and up must have the same shape, got \(2, 3\) and \(3,\)"):
        F.swiglu(ones(2, 3), ones(3))
    with pytest.raises(ValueError, match=r"add_rms_norm: x and y must have the same shape, got \(2, 4\) and \(1, 4\)"):
        F.add_rms_norm(ones(2, 4), ones(1, 4), ones(4))
    with pytest.raises(ValueError, match=r"add_rms_norm: weight/bias must have shape \(4,\) for input \(2, 4\), got "
                                         r"\(5,\)"):
        F.add_rms_norm(ones(2, 4), ones(2, 4), ones(5))
    with pytest.raises(ValueError, match=r"rotary: x must be \(..., T, D\) with D even and cos, sin \(P, D\) with "
                                         r"P >= pos \+ T = 6, got x \(3, 4\), cos \(5, 4\), sin \(5, 4\)"):
        F.rotary(ones(3, 4), ones(5, 4), ones(5, 4), pos=3)
    with pytest.raises(ValueError, match=r"rotary: with heads=3, x must be \(B, T, heads \* D\) = \(B, T, 12\) for "
                                         r"tables of D=4 columns, got x \(2, 3, 8\)"):
        F.rotary(ones(2, 3, 8), ones(3, 4), ones(3, 4), heads=3)
    with pytest.raises(ValueError, match=r"rotary: pos must be"):
        F.rotary(ones(3, 4), ones(5, 4), ones(5, 4), pos=-1)
    with pytest.raises(ValueError, match=r"swiglu: expected a floating-point tensor, got dtype int32"):
        F.swiglu(lab.tensor(np.ones(3, np.int32)), ones(3))


def test_fused_ops_refuse_tensors_of_another_backend(numpy_backend, wgpu_backend):
    """A weight, residual or table on the other backend is one clear error, not a failure inside a kernel."""
    ones = lambda backend, *s: lab.tensor(np.ones(s, np.float32), backend=backend)
    for here, there in ((numpy_backend, wgpu_backend), (wgpu_backend, numpy_backend)):
        x = ones(here, 2, 4)
        for call in (lambda: F.rms_norm(x, ones(there, 4)), lambda: F.add_rms_norm(x, ones(there, 2, 4), ones(here, 4)),
                     lambda: F.add_rms_norm(x, x, ones(there, 4)), lambda: F.add_layer_norm(x, ones(there, 2, 4), ones(here, 4)),
                     lambda: F.rotary(x, ones(there, 2, 4), ones(here, 2, 4)), lambda: F.swiglu(x, ones(there, 2, 4))):
            with pytest.raises(ValueError, match="tensors live on different backends"):
                call()


def test_rms_norm_with_a_forward_of_its_own_is_not_bypassed_by_the_fused_residual(use_backend):
    from lab.models.llama import RMSNorm
    norm = RMSNorm(4, 1e-6)
    norm.forward = lambda x: x * 3.0
    s, h = norm.residual_forward(_t(np.ones((2, 4))), _t(np.ones((2, 4))))
    np.testing.assert_array_equal(h.numpy(), np.full((2, 4), 6.0))


def _llama_step(backend, monkeypatch, fused):
    """Two eager training steps of llama-tiny (16 positions); the second's dispatches per kernel:entry, and the
    losses."""
    from lab.engine import backend as B
    from lab.models.llama import PRESETS
    from lab.train import TrainConfig, Trainer
    for flag in FLAGS:
        monkeypatch.setattr(backend, flag, fused)
    monkeypatch.setitem(B._state, "backend", backend)
    lab.manual_seed(0)
    ids = np.random.default_rng(0).integers(0, 256, 4000)
    model = lab.LlamaLM(replace(PRESETS["llama-tiny"], max_position_embeddings=16))
    trainer = Trainer(model, ids[:3000], ids[3000:], TrainConfig(steps=10, batch_size=2, replay_steps=False))
    first, _ = trainer.train_step()
    lab.sync()
    with lab.profile(backend) as prof:
        second, _ = trainer.train_step()
        lab.sync()
    counts = {}
    for r in prof.by_kernel():   # (the products together: which matmul kernel takes each is the planner's choice)
        name = "matmul (any kernel)" if r["name"].startswith("matmul") else r["name"]
        counts[name] = counts.get(name, 0) + r["calls"]
    return counts, (first.item(), second.item())


# A llama-tiny training step on wgpu (2 layers), recorded with the fused kernels: 121 dispatches. Its attention is
# attention.wgsl's (the Llama default, AttentionTuning.FLASH_DEFAULT_ROTARY): per layer rotate_main twice (forward,
# and again in the backward), fwd_main, delta_main, bwd_kv_main, bwd_q_main in place of 2 rotary passes each way, 2
# softmaxes and the scores' 6 products; q|k|v packed side by side (copy_main 2 more: 32 rows are fewer than the
# width, so F.linears copies the outputs together) (LAB_FLASH_ATTENTION=0: 129, the same losses). The chunked loss:
# backward_inplace_main, fill_main 3, binary_main 13 (as test_layer_fusion's GPT-2 counts).
LLAMA_FUSED = {
    'attention:bwd_kv_main': 2, 'attention:bwd_q_main': 2, 'attention:delta_main': 2, 'attention:fwd_main': 2,
    'attention:rotate_main': 4, 'copy:copy_main': 12, 'copy:fill_main': 3, 'cross_entropy:rows_main': 1,
    'cross_entropy_reduce:backward_inplace_main': 1, 'cross_entropy_reduce:mean_main': 1,
    'elementwise:binary_main': 13, 'elementwise:unary_main': 1, 'embedding:backward_vocab_main': 1,
    'embedding:forward_main': 1, 'matmul (any kernel)': 45, 'optim_many:adamw_many_main': 3,
    'reduce:columns_main': 6, 'reduce:rows_main': 1, 'rmsnorm:forward_main': 5, 'rmsnorm_backward:backward_w_main': 5,
    'rmsnorm_backward:backward_x_main': 5, 'sumsq_many:sumsq_many_main': 1, 'swiglu:backward_main': 2,
    'swiglu:forward_main': 2,
}


def test_llama_training_step_dispatches_fused_kernels(wgpu_backend, monkeypatch):
    fused, losses = _llama_step(wgpu_backend, monkeypatch, True)
    composed, composed_losses = _llama_step(wgpu_backend, monkeypatch, False)
    assert fused == LLAMA_FUSED
    assert sum(composed.values()) >= 2 * sum(fused.values())   # 324 vs 123 when recorded
    np.testing.assert_allclose(losses, composed_losses, rtol=1e-5)
