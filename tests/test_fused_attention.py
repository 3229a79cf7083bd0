"""The fused (flash) attention for every shape class it takes (kernels/attention.wgsl on wgpu): heads of 4 to 128,
any T, causal, dropout, grouped-query attention (query head h reading key-value head h // G, the key-value heads
never repeated); equal to the composed path and to PyTorch, memory linear in T, and a Llama training step the same
with it on and off. Tiny shapes: lavapipe is slow."""
import numpy as np
import pytest

import lab
from lab.engine import ops as F

from attention_runs import attention_run

# (B, T, H, Hkv, D, dropout): T below, at and past a block (no block's multiple), heads 4 to 128 wide, G = 1, 2, 3, 4
CASES = [(1, 1, 2, 1, 8, 0.0), (1, 5, 2, 2, 16, 0.0), (1, 37, 2, 2, 32, 0.0), (2, 33, 2, 1, 64, 0.2),
         (1, 20, 3, 1, 80, 0.0), (1, 18, 4, 1, 32, 0.25), (1, 24, 6, 2, 16, 0.1), (1, 17, 2, 2, 128, 0.0),
         (1, 64, 2, 2, 64, 0.0)]


def _tables(P, D):
    """Llama's rotary tables (P, D): rotate-half form, the frequencies duplicated across the halves."""
    inv = 1.0 / 10000 ** (np.arange(0, D, 2) / D)
    ang = np.outer(np.arange(P), inv)
    ang = np.concatenate([ang, ang], axis=1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
@pytest.mark.parametrize("B,T,H,Hkv,D,p", CASES, ids=lambda v: str(v))
def test_fused_attention_equals_the_composed_path_for_every_shape_class(wgpu_backend, numpy_backend, monkeypatch,
                                                                        B, T, H, Hkv, D, p, rotary):
    """wgpu's fused kernels, wgpu's composed path and numpy's (the reference) give one output and one qkv gradient
    (dq, and dk, dv summed over the query heads sharing a key-value head), with dropout the same decisions, with
    rotary q and k (tables longer than T) too; the fused path runs nothing but its own kernels (no repeat of the
    key-value heads, no head copies; with rotary its one rotation pass a direction, rotate_main)."""
    if rotary and D % 8:
        pytest.skip("rotary halves of whole vec4s: heads a multiple of 8")
    rng = np.random.default_rng(T * 131 + D)
    qkv_np = rng.standard_normal((B, T, (H + 2 * Hkv) * D)).astype(np.float32)
    g_np = rng.standard_normal((B, T, H * D)).astype(np.float32)
    rope = _tables(T + 3, D) if rotary else None
    monkeypatch.setattr(wgpu_backend, "FLASH_ATTENTION", True)
    assert wgpu_backend.flash_attention_fits(qkv_np.shape, H, Hkv, rotary)
    fused, names = attention_run(wgpu_backend, qkv_np, g_np, H, Hkv, p, rope)
    assert set(names) == {"attention:fwd_main", "attention:delta_main", "attention:bwd_kv_main", "attention:bwd_q_main"} | (
        {"attention:rotate_main"} if rotary else set())
    monkeypatch.setattr(wgpu_backend, "FLASH_ATTENTION", False)
    composed, names = attention_run(wgpu_backend, qkv_np, g_np, H, Hkv, p, rope)
    assert not any(n.startswith("attention:") for n in names)
    reference, _ = attention_run(numpy_backend, qkv_np, g_np, H, Hkv, p, rope)
    for got in (fused, composed):
        for a, b in zip(got, reference):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("H,Hkv,p,rotary", [(2, 2, 0.0, False), (4, 2, 0.0, False), (3, 1, 0.0, True),
                                             (6, 2, 0.0, False), (4, 1, 0.3, True), (2, 2, 0.0, True)])
def test_grouped_query_attention_equals_torch(any_backend, monkeypatch, H, Hkv, p, rotary):
    """causal_self_attention with n_kv_head (and rotary tables) against PyTorch: transformers' rotate_half rotation
    and attention over repeated key-value heads, forward and every gradient (each backend's default path; wgpu's
    fused one too); with dropout, the kept weights are read back from the composed path's mask and handed to
    PyTorch."""
    import torch
    B, T, D = 2, 11, 8
    rng = np.random.default_rng(H * 10 + Hkv)
    qkv_np = rng.standard_normal((B, T, (H + 2 * Hkv) * D)).astype(np.float32)
    g_np = rng.standard_normal((B, T, H * D)).astype(np.float32)
    rope = _tables(T, D) if rotary else None
    qkv_t = torch.tensor(qkv_np, dtype=torch.float64, requires_grad=True)
    q, k, v = torch.split(qkv_t, [H * D, Hkv * D, Hkv * D], dim=2)
    q, k = q.reshape(B, T, H, D).transpose(1, 2), k.reshape(B, T, Hkv, D).transpose(1, 2)
    if rotary:
        cos, sin = (torch.tensor(t, dtype=torch.float64) for t in rope)
        q, k = ((x * cos + torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1) * sin) for x in (q, k))
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.reshape(B, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    mask = None
    if p:   # the same decisions: dropout(ones) on the (B, H, T, T) weights' layout, from the same seed
        lab.manual_seed(7)
        mask = F.dropout(lab.tensor(np.ones((B, H, T, T), np.float32), backend=any_backend), p).numpy()
    att = torch.softmax((q @ k.transpose(-1, -2)) / D ** 0.5 + torch.triu(torch.full((T, T), -torch.inf), 1), -1)
    if mask is not None:
        att = att * torch.tensor(mask, dtype=torch.float64)
    want = (att @ v).transpose(1, 2).reshape(B, T, H * D)
    want.backward(torch.tensor(g_np, dtype=torch.float64))
    for flash in (False, True) if any_backend.name == "wgpu" else (None,):
        if flash is not None:
            monkeypatch.setattr(any_backend, "FLASH_ATTENTION", flash)
        (y, dqkv), names = attention_run(any_backend, qkv_np, g_np, H, Hkv, p, rope)
        assert bool(flash) == ("attention:fwd_main" in names)
        np.testing.assert_allclose(y, want.detach().numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dqkv, qkv_t.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_grouped_query_attention_refuses_bad_heads_with_one_clear_error(numpy_backend):
    qkv = lab.tensor(np.zeros((1, 4, 64), np.float32), backend=numpy_backend)
    for kwargs, match in [(dict(n_head=4, n_kv_head=3), r"\(n_head \+ 2 n_kv_head\) D\) with n_kv_head dividing "
                                                        r"n_head, got \(1, 4, 64\) for n_head=4, n_kv_head=3"),
                          (dict(n_head=5, n_kv_head=1), r"got \(1, 4, 64\) for n_head=5, n_kv_head=1"),
                          (dict(n_head=2, n_kv_head=0), "n_kv_head must be a positive integer, got 0"),
                          (dict(n_head=2, n_kv_head=True), "n_kv_head must be a positive integer, got True"),
                          (dict(n_head=2.0), "n_head must be a positive integer, got 2.0"),
                          (dict(n_head=3), r"\(B, T, 3C\) with C divisible by n_head, got \(1, 4, 64\) for n_head=3"),
                          (dict(n_head=6, n_kv_head=1, dropout_p="0.1"), r"dropout_p must be a number in \[0, 1\), got '0.1'"),
                          (dict(n_head=6, n_kv_head=1, dropout_p=True), r"dropout_p must be a number in \[0, 1\), got True"),
                          (dict(n_head=6, n_kv_head=1, dropout_p=1.0), r"dropout_p must be a number in \[0, 1\), got 1.0")]:
        with pytest.raises(ValueError, match=match):
            F.causal_self_attention(qkv, **kwargs)
    y = F.causal_self_attention(qkv, 6, n_kv_head=1)       # 6 + 2 heads of 8: fine
    assert y.shape == (1, 4, 48)
    cos, sin = (lab.tensor(t, backend=numpy_backend) for t in _tables(4, 8))
    for rope, match in [(cos, "rope must be the rotary tables \\(cos, sin\\), got"),
                        ((cos.numpy(), sin.numpy()), "rope must be the rotary tables"),
                        ((cos[:3], sin[:3]), r"\(P, D\) with P >= T = 4 and D = 8 even, on qkv's numpy backend, got "
                                             r"cos \(3, 8\), sin \(3, 8\)"),
                        ((cos, sin[:, :4]), r"got cos \(4, 8\), sin \(4, 4\)")]:
        with pytest.raises(ValueError, match=match):
            F.causal_self_attention(qkv, 6, n_kv_head=1, rope=rope)


def test_rotary_q_and_k_are_rotated_once_a_pass_not_as_each_block_is_staged(wgpu_backend, monkeypatch):
    """With rotary the forward and the backward each rotate q and k in one pass (rotate_main) before their kernels,
    which read the rotated copy as they read a plain qkv: rotated as the blocks were staged, every key row was
    rotated again by each query block and head that read it, and each prefetch waited on its rotation (the fused
    path slowed a whole smollm2-135m step on the H200). Several blocks over T, GQA."""
    monkeypatch.setattr(wgpu_backend, "FLASH_ATTENTION", True)
    rng = np.random.default_rng(5)
    H, Hkv, D, T = 4, 2, 16, 70
    qkv = lab.tensor(rng.standard_normal((2, T, (H + 2 * Hkv) * D)).astype(np.float32), requires_grad=True,
                     backend=wgpu_backend)
    tables = tuple(lab.tensor(t, backend=wgpu_backend) for t in _tables(T, D))
    with lab.profile(wgpu_backend) as prof:
        F.causal_self_attention(qkv, H, n_kv_head=Hkv, rope=tables).sum().backward()
    calls = [n for n, _, _ in prof.records if n.startswith("attention:")]
    assert sorted(calls) == sorted(["attention:rotate_main", "attention:fwd_main", "attention:rotate_main",
                                    "attention:delta_main", "attention:bwd_kv_main", "attention:bwd_q_main"])


def test_rotary_tables_that_want_a_gradient_take_the_composed_path(wgpu_backend, numpy_backend, monkeypatch):
    """The fused kernels give no gradient to the rotary tables: tables that ask for one run the composed path (as
    F.rotary does), which gives it, the same on both backends."""
    monkeypatch.setattr(wgpu_backend, "FLASH_ATTENTION", True)
    rng = np.random.default_rng(3)
    qkv_np = rng.standard_normal((1, 6, 4 * 8)).astype(np.float32)
    got = []
    for backend in (wgpu_backend, numpy_backend):
        qkv = lab.tensor(qkv_np, requires_grad=True, backend=backend)
        cos, sin = (lab.tensor(t, requires_grad=True, backend=backend) for t in _tables(6, 8))
        with lab.profile(backend) as prof:
            F.causal_self_attention(qkv, 2, n_kv_head=1, rope=(cos, sin)).sum().backward()
        assert not any(n.startswith("attention:") for n, _, _ in prof.records)
        got.append((qkv.grad.numpy(), cos.grad.numpy(), sin.grad.numpy()))
    for a, b in zip(*got):
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("H,Hkv", [(2, 2), (4, 2)])
def test_fused_attention_memory_grows_linearly_in_t(wgpu_backend, monkeypatch, H, Hkv):
    """The fused forward and backward hold no (T, T) buffer, their temporaries included (log-sum-exps, the backward's
    row sums, dqkv): the peak above the inputs at 4 T is at most 4.5 times that at T (the composed path's weights
    make it about 16 times), and below the (B, H, T, T) weights' bytes at the larger T."""
    monkeypatch.setattr(wgpu_backend, "FLASH_ATTENTION", True)
    D, peaks = 16, {}
    for T in (64, 256):
        rng = np.random.default_rng(T)
        qkv = lab.tensor(rng.standard_normal((1, T, (H + 2 * Hkv) * D)).astype(np.float32), requires_grad=True,
                         backend=wgpu_backend)
        g = lab.tensor(rng.standard_normal((1, T, H * D)).astype(np.float32), backend=wgpu_backend)
        wgpu_backend.sync(wait=True)
        base = wgpu_backend.stats()["bytes_in_use"]
        wgpu_backend.reset_peak()
        y = F.causal_self_attention(qkv, H, n_kv_head=Hkv)
        y.backward(g)
        wgpu_backend.sync(wait=True)
        peaks[T] = wgpu_backend.stats()["peak_bytes_in_use"] - base
        del y, qkv, g
    assert peaks[256] <= 4.5 * peaks[64], peaks
    assert peaks[256] < H * 256 * 256 * 4, peaks


def _llama_step(backend, flash, dropout, monkeypatch):
    from lab.engine.backend import using_backend
    from lab.models.llama import LlamaConfig, LlamaLM
    from lab.train.optim import SGD
    monkeypatch.setattr(backend, "FLASH_ATTENTION", flash)
    lab.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, dropout=dropout)
    with using_backend(backend):
        model = LlamaLM(cfg)
        model.train()
        opt = SGD(model.parameters(), lr=0.1)
        idx = np.random.default_rng(1).integers(0, 40, (2, 19))
        lab.manual_seed(5)
        with lab.profile(backend) as prof:
            loss = model(lab.tensor(idx[:, :-1]), lab.tensor(idx[:, 1:]))[1]
            loss.backward()
        grads = [p.grad.numpy().copy() for p in model.parameters()]
        opt.step()
        return (loss.item(), grads, [p.numpy().copy() for p in model.parameters()],
                {n for n, _, _ in prof.records})


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_a_llama_training_step_is_the_same_with_the_fused_attention_on_and_off(wgpu_backend, monkeypatch, dropout):
    """A 2-layer, 32-wide Llama (4 query heads on 2 key-value heads, heads of 8, T = 18): one SGD step with the
    fused kernels and one with the composed path give the same loss, gradients (each within 1e-5 of its norm:
    float32 sums in another order) and weights within 1e-5 relative."""
    on = _llama_step(wgpu_backend, True, dropout, monkeypatch)
    off = _llama_step(wgpu_backend, False, dropout, monkeypatch)
    assert "attention:bwd_kv_main" in on[3] and not any(n.startswith("attention:") for n in off[3])
    assert on[0] == pytest.approx(off[0], rel=1e-5)
    for a, b in zip(on[1], off[1]):
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)
    for a, b in zip(on[2], off[2]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_fused_path_takes_only_shapes_its_kernels_read(wgpu_backend, monkeypatch):
    """flash_attention_fits: heads a multiple of 4 (of 8 with rotary: halves of whole vec4s) up to what the blocks
    fit, key-value heads that divide the query heads, at least one token and at most 65535 heads in all."""
    monkeypatch.setattr(wgpu_backend, "FLASH_ATTENTION", True)
    fits = wgpu_backend.flash_attention_fits
    assert fits((1, 8, 8 * 8), 4, 2) and fits((1, 8, 8 * 16), 4, 2, True) and fits((1, 3, 3 * 4), 1)
    assert not fits((1, 8, 10 * 8), 4, 3)            # 3 key-value heads for 4 query heads
    assert not fits((1, 8, 4 * 8), 4, 0)
    assert not fits((1, 8, 8 * 12), 4, 2, True)      # rotary halves of 6 floats
    assert not fits((1, 8, 3 * 6), 1)                # heads of 6: no vec4 rows
    assert not fits((1, 8, 3 * 260), 1)
    assert not fits((1, 0, 3 * 8), 1)
    assert not fits((65536, 2, 3 * 8), 1)


def test_llama_attention_weights_above_the_binding_limit_are_planned_on_the_fused_kernels(monkeypatch):
    """Where a Llama layer's (B, H, T, T) weights exceed the device's binding limit and the heads take the fused
    kernels (a multiple of 8: rotary halves of whole vec4s), the engine runs those (flash_attention_fits), even with
    LAB_FLASH_ATTENTION=0 (set here: by default Llama runs fused anyway): the plan then counts a log-sum-exp per row
    instead of the weights, and they are not the buffer that stops it; heads of 12 keep the weights, and the plan
    says they do not fit."""
    from dataclasses import replace

    from lab import plan
    from lab.engine.wgpu import nn
    monkeypatch.setattr(nn.NNOps, "FLASH_ATTENTION", False)
    from lab.models.llama import LlamaConfig
    cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)
    prof = plan.PROFILES["rtx4090"]
    tight = plan.DeviceProfile(**{**prof.to_dict(), "max_binding_size": 32 << 20})   # weights: 64 MiB a layer
    roomy, fused = plan.estimate(cfg, batch=8, device=prof), plan.estimate(cfg, batch=8, device=tight)
    assert roomy.largest_buffer == ("attention weights (B, H, T, T)", 8 * 2 * 1024 * 1024 * 4)
    assert fused.fits and fused.largest_buffer[0] != roomy.largest_buffer[0]
    # per layer and token 2.75 H T floats of scores, weights and their gradient become H log-sum-exps
    saved = 2 * 8 * 1024 * (2.75 * 2 * 1024 - 2) * 4
    assert roomy.memory["activations"] - fused.memory["activations"] == pytest.approx(saved, abs=64)
    narrow = replace(cfg, hidden_size=24, head_dim=12)
    assert not plan.estimate(narrow, batch=8, device=tight).fits


@pytest.mark.parametrize("device,fused", [("h200", True), ("m1", True), ("default-16k", True), ("cpu-2core", False),
                                          ("lavapipe", True)])
def test_the_plan_counts_llamas_fused_attention_by_default_where_the_device_takes_it(wgpu_backend, monkeypatch,
                                                                                    device, fused):
    """Llama's attention runs fused by default on wgpu (AttentionTuning.FLASH_DEFAULT_ROTARY), not only where the
    weights exceed a buffer: the plan counts it (a log-sum-exp per row instead of 2.75 H T floats a token) on every
    wgpu profile whose workgroup memory takes smollm2's heads of 64 (16 KiB does, in smaller blocks), and the
    composed path on numpy's profile and with LAB_FLASH_ATTENTION=0; GPT-2's stays composed (FLASH_DEFAULT)."""
    from lab import plan
    from lab.engine.wgpu import nn
    from lab.plan.profiles import limits_profile
    prof = {"default-16k": plan.DeviceProfile(**{**plan.PROFILES["rtx4090"].to_dict(), "workgroup_storage": 16384}),
            "lavapipe": limits_profile(wgpu_backend)}.get(device, device)
    L, B, T, H = 30, 1, 256, 9
    default = plan.estimate("smollm2-135m", batch=B, seq=T, device=prof)
    gpt2 = plan.estimate("gpt2-small", batch=B, seq=T, device=prof)
    monkeypatch.setattr(nn.NNOps, "FLASH_ATTENTION", False)
    composed = plan.estimate("smollm2-135m", batch=B, seq=T, device=prof)
    saved = L * B * T * (2.75 * H * T - H) * 4
    assert composed.memory["activations"] - default.memory["activations"] == pytest.approx(saved if fused else 0,
                                                                                           abs=64 * L)
    if device != "lavapipe":   # (a limits profile times nothing)
        assert (default.step_time_s < composed.step_time_s) == fused   # fewer dispatches and activations
    assert plan.estimate("gpt2-small", batch=B, seq=T, device=prof).memory == gpt2.memory   # composed either way


def test_llama_attention_runs_fused_by_default_and_gpt2s_composed(wgpu_backend, monkeypatch):
    """With LAB_FLASH_ATTENTION unset, attention with rotary tables (Llama's call) takes the fused kernels and
    attention without (GPT-2's) the composed path; 0 turns the fused path off for both (below the binding limit),
    1 on for both."""
    shape = (2, 16, (4 + 2 * 2) * 8)
    for flash, rotary, plain in ((None, True, False), (False, False, False), (True, True, True)):
        monkeypatch.setattr(wgpu_backend, "FLASH_ATTENTION", flash)
        assert wgpu_backend.flash_attention_fits(shape, 4, 2, rotary=True) == rotary, flash
        assert wgpu_backend.flash_attention_fits(shape, 4, 2) == plain, flash


@pytest.mark.parametrize("what", ["qkv", "cos"])
@pytest.mark.parametrize("dtype", ["int32", "float16"])
def test_attention_inputs_that_are_not_float32_are_one_clear_error(any_backend, monkeypatch, what, dtype):
    """An int32 qkv or table went into the fused kernels as float bits (wgpu: NaN or wrong rotations, no error); a
    float16 one failed at a kernel binding (wgpu) or inside rotary (numpy): one error naming the argument."""
    monkeypatch.setattr(any_backend, "FLASH_ATTENTION", True, raising=False)
    rng = np.random.default_rng(0)
    qkv = lab.tensor(rng.standard_normal((1, 6, 4 * 8)).astype(np.float32), backend=any_backend,
                     dtype=dtype if what == "qkv" else "float32")
    cos, sin = (lab.tensor(t, backend=any_backend, dtype=dtype if what == "cos" else "float32")
                for t in _tables(6, 8))
    name = "qkv" if what == "qkv" else "rotary table cos"
    with pytest.raises(ValueError, match=f"^causal_self_attention: {name}: (expected a floating-point tensor, got "
                                         f"dtype int32|float16 tensors are storage)"):
        F.causal_self_attention(qkv, 2, n_kv_head=1, rope=(cos, sin))


def test_numpy_integer_head_counts_run_like_python_ints(any_backend, monkeypatch):
    """n_head, n_kv_head as numpy integers (a config read with numpy) passed the checks and then failed on wgpu in
    the kernels' block choice ('head_dim must be a multiple of 4 ..., got np.int64(8)')."""
    monkeypatch.setattr(any_backend, "FLASH_ATTENTION", True, raising=False)
    qkv_np = np.random.default_rng(1).standard_normal((1, 5, 4 * 8)).astype(np.float32)
    want, _ = attention_run(any_backend, qkv_np, np.ones((1, 5, 16), np.float32), 2, 1, 0.0)
    got, names = attention_run(any_backend, qkv_np, np.ones((1, 5, 16), np.float32), np.int64(2), np.int32(1), 0.0)
    assert (any_backend.name == "wgpu") == ("attention:fwd_main" in names)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("head_dim,storage,fused", [(128, 16384, False), (64, 16384, True), (128, 32768, True),
                                                    (160, 32768, True), (168, 32768, False), (232, 49152, True)])
def test_the_plan_counts_the_fused_attention_only_for_heads_the_devices_workgroup_memory_takes(head_dim, storage,
                                                                                              fused):
    """The plan took heads up to 128 as fused on every device: on WebGPU's guaranteed 16 KiB the kernels' blocks do
    not fit heads of 128 (the engine runs the composed path, whose weights then exceed the binding: the plan said
    such a step fits), and 32 KiB (lavapipe) runs up to 160, 48 KiB (the H200) up to 244, which it counted as
    weights. The plan asks attention_plan.kernels_take, as flash_attention_fits does (Llama and GPT-2)."""
    from lab import plan
    from lab.models import PRESETS
    from lab.models.llama import LlamaConfig
    prof = plan.DeviceProfile(**{**plan.PROFILES["rtx4090"].to_dict(), "max_binding_size": 16 << 20,
                                 "workgroup_storage": storage})
    llama = LlamaConfig(vocab_size=64, hidden_size=2 * head_dim, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048)
    gpt2 = PRESETS["tiny"].__class__(**{**PRESETS["tiny"].__dict__, "n_embd": 2 * head_dim, "n_head": 2,
                                        "block_size": 2048})
    for cfg in (llama, gpt2):   # weights (1, 2, 2048, 2048): 32 MiB a layer; every other buffer within 16 MiB
        p = plan.estimate(cfg, batch=1, device=prof)
        assert (p.largest_buffer[0] != "attention weights (B, H, T, T)") == fused, (cfg, p.largest_buffer)
        assert p.fits == fused


def test_scores_far_below_zero_keep_the_fused_attention_causal(wgpu_backend, numpy_backend, monkeypatch):
    """The forward masked future keys with a score of -1e30 and let exp(-1e30 - max) weigh them: where every visible
    score was below -1e30 (q, k of 1e17), the masked keys took the weights (row 0 read the last rows' values, the last
    row none). Masked weights are now 0 by selection: each row averages the values it sees (its scores all equal),
    as the composed path and numpy do. (The backward recomputes the weights from m + log(l), whose log(l) is lost at
    such scores: the backward of flash attention's log-sum-exp form, not checked here.)"""
    T, H, D = 37, 2, 8     # (two query heads on one key-value head; T past a block)
    rng = np.random.default_rng(4)
    qkv_np = np.zeros((1, T, (H + 2) * D), np.float32)
    qkv_np[..., :H * D], qkv_np[..., H * D:(H + 1) * D] = 1e17, -1e17       # every score -1.4e34 * 2 ...
    qkv_np[..., (H + 1) * D:] = rng.standard_normal((1, T, D))
    v = qkv_np[0, :, (H + 1) * D:]
    want = np.tile(np.cumsum(v, 0) / np.arange(1, T + 1)[:, None], H)   # ... so each row's mean of its values
    monkeypatch.setattr(wgpu_backend, "FLASH_ATTENTION", True)
    for backend in (wgpu_backend, numpy_backend):
        with lab.no_grad(), lab.profile(backend) as prof:
            y = F.causal_self_attention(lab.tensor(qkv_np, backend=backend), H, n_kv_head=1).numpy()
        assert (backend is wgpu_backend) == any(n == "attention:fwd_main" for n, _, _ in prof.records)
        np.testing.assert_allclose(y[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["subclass", "patched"])
def test_a_projection_with_a_forward_of_its_own_is_not_bypassed_by_the_fused_path(any_backend, monkeypatch, how):
    """Llama's fused path multiplies q, k, v's weights side by side where the layers are plain: a q_proj whose forward
    is its own (a subclass's, one patched on the instance) was taken as plain and its forward skipped (wgpu, fused:
    logits 3.7e-3 from the composed path's). Linear.plain asks nn.own_forward; logits as the composed path's and as
    a model whose q_proj weights carry the same change."""
    from lab import nn
    from lab.engine.backend import using_backend
    from lab.models.llama import LlamaConfig, LlamaLM

    class Tripled(nn.Linear):
        def forward(self, x, activation=None, residual=None):
            return super().forward(x, activation, residual) * 3.0
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    idx = np.random.default_rng(1).integers(0, 40, (2, 20))
    out = {}
    with using_backend(any_backend):
        for flash in (True, False):
            monkeypatch.setattr(any_backend, "FLASH_ATTENTION", flash, raising=False)
            for changed in ("forward", "weights"):
                lab.manual_seed(0)
                model = LlamaLM(cfg)
                att = model.model.layers[0].self_attn
                if changed == "weights":
                    att.q_proj.weight.data = any_backend.from_numpy(att.q_proj.weight.numpy() * 3)
                elif how == "subclass":
                    base, att.q_proj = att.q_proj, Tripled.__new__(Tripled)
                    att.q_proj.__dict__.update(vars(base))
                else:
                    base = att.q_proj.forward
                    att.q_proj.forward = lambda x, activation=None, residual=None: base(x, activation, residual) * 3.0
                assert att.q_proj.plain == (changed == "weights")
                with lab.no_grad():
                    y = model(lab.tensor(idx))
                out[flash, changed] = (y[0] if isinstance(y, tuple) else y).numpy()
    for key, y in out.items():
        np.testing.assert_allclose(y, out[False, "weights"], rtol=1e-5, atol=1e-6, err_msg=str(key))
