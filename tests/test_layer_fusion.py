"""Fusion as a layer capability: the fused kernels a training step dispatches, and its losses, stay as they were
when the choice moved from type inspection in the blocks onto the layers and the backend's declared capabilities."""
from dataclasses import replace

import numpy as np
import pytest

import lab
from lab import lora
from lab.data import CharTokenizer, load_corpus, train_val_split
from lab.models import PRESETS, TransformerLM
from lab.train import TrainConfig, Trainer


def _step(backend, adapters):
    """Two eager training steps of a one-layer TransformerLM (no replay: every dispatch is recorded anew);
    the kernels of the second, per kernel:entry, and both losses."""
    from lab.engine import backend as B
    prev = dict(B._state)
    B._state["backend"], B._state["reason"] = backend, "test"
    try:
        lab.manual_seed(0)
        text = load_corpus()
        tok = CharTokenizer.from_text(text)
        train_ids, val_ids = train_val_split(tok.encode(text))
        cfg = replace(PRESETS["tiny"], vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2, block_size=16)
        model = TransformerLM(cfg)
        if adapters:
            lora.apply(model, r=4, alpha=8, targets=["c_attn", "c_proj", "c_fc"])
        trainer = Trainer(model, train_ids, val_ids, TrainConfig(steps=10, batch_size=2, replay_steps=False))
        first, _ = trainer.train_step()
        lab.sync()
        with lab.profile(backend) as prof:
            second, _ = trainer.train_step()
            lab.sync()
        counts = {r["name"]: r["calls"] for r in prof.by_kernel()}
        return counts, (first.item(), second.item())
    finally:
        B._state.update(prev)


# Recorded from the code before fusion moved onto the layers (commit 1cf3ab7: MLP and Block chose the fused
# kernels by `type(fc) is nn.Linear`, ops found matmul_gelu with hasattr), on lavapipe; reduce:columns_main since
# LayerNorm's dw and db share one reduction (one pass of two for each of these norms' 32 rows); the head's loss by
# F.linear_cross_entropy (743884c, 0c2e80d) since: its logits' gradient in place (backward_inplace_main), two
# constant fills, its count's floor and the backward's scalings (4 binary passes, 3 with LoRA's frozen head), and
# otherwise the composed loss's kernels (the same losses to the bit: the composed loss gives these counts less those)
DISPATCHES = {
    False: {
        'copy:copy_main': 10, 'copy:fill_main': 4, 'cross_entropy:rows_main': 1,
        'cross_entropy_reduce:backward_inplace_main': 1, 'cross_entropy_reduce:mean_main': 1,
        'elementwise:binary_main': 12,
        'elementwise:unary_main': 2, 'embedding:backward_vocab_main': 1, 'embedding:forward_main': 1,
        'layernorm:forward_main': 3, 'layernorm_backward:backward_wb_main': 3, 'layernorm_backward:backward_x_main': 3,
        'matmul:main': 7, 'matmul:main_rows': 14, 'optim_many:adamw_many_main': 3,
        'reduce:columns_main': 12, 'reduce:rows_main': 1, 'softmax:softmax_bwd_main': 1,
        'softmax:softmax_main': 1, 'sumsq_many:sumsq_many_main': 1,
    },
    True: {
        'copy:copy_main': 13, 'copy:fill_main': 3, 'cross_entropy:rows_main': 1,
        'cross_entropy_reduce:backward_inplace_main': 1, 'cross_entropy_reduce:mean_main': 1,
        'elementwise:binary_main': 13,
        'elementwise:scalar_main': 8, 'elementwise:unary_main': 2, 'embedding:forward_main': 1,
        'layernorm:forward_main': 3, 'layernorm_backward:backward_wb_main': 2, 'layernorm_backward:backward_x_main': 2,
        'lora:up_add_t_main': 4, 'matmul:main': 10, 'matmul:main_rows': 24,
        'optim_many:adamw_many_main': 2, 'reduce:columns_main': 2, 'reduce:rows_main': 1,
        'softmax:softmax_bwd_main': 1, 'softmax:softmax_main': 1, 'sumsq_many:sumsq_many_main': 1,
    },
}
LOSSES_WGPU = {False: (4.298948287963867, 4.289337158203125), True: (4.313163757324219, 4.275586128234863)}
LOSSES_NUMPY = {False: (4.298948287963867, 4.289337158203125), True: (4.313163757324219, 4.275586128234863)}


@pytest.mark.parametrize("adapters", [False, True], ids=["plain", "lora"])
def test_training_step_dispatch_counts_unchanged(wgpu_backend, adapters):
    counts, losses = _step(wgpu_backend, adapters)
    assert counts == DISPATCHES[adapters]
    # the same kernels in the same order give the same floats
    assert losses == LOSSES_WGPU[adapters]


@pytest.mark.parametrize("adapters", [False, True], ids=["plain", "lora"])
def test_training_step_losses_unchanged_on_numpy(numpy_backend, adapters, monkeypatch):
    # recorded with numpy's own BLAS (OpenBLAS): MKL's products (lab.engine.blas) round differently in the last bit
    from lab.engine import blas
    monkeypatch.setitem(blas._state, "mkl", None)
    assert _step(numpy_backend, adapters)[1] == LOSSES_NUMPY[adapters]


def test_optional_backend_capabilities_fall_back_to_composed_primitives(use_backend, monkeypatch):
    """A backend without a fused capability (Backend's declared defaults) gives the fused one's results."""
    from lab.engine.backend import Backend
    b = use_backend
    rng = np.random.default_rng(7)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in [(3,), (5, 7), (300,)]]
    fused = b.to_numpy(b.sumsq_many([b.from_numpy(a) for a in arrays]))
    composed = b.to_numpy(Backend.sumsq_many(b, [b.from_numpy(a) for a in arrays]))
    np.testing.assert_allclose(composed, fused, rtol=1e-5)   # (summation order differs)
    np.testing.assert_allclose(fused, [sum(float((a.astype(np.float64) ** 2).sum()) for a in arrays)], rtol=1e-5)
    x = lab.tensor(rng.standard_normal((3, 5)).astype(np.float32), requires_grad=True)
    w = lab.tensor(rng.standard_normal((5, 4)).astype(np.float32), requires_grad=True)
    from lab.engine import ops as F
    results = []
    for fused_gelu, keeps in ((b.fused_matmul_gelu, b.gelu_keeps_grad), (False, False)):
        monkeypatch.setattr(b, "fused_matmul_gelu", fused_gelu)
        monkeypatch.setattr(b, "gelu_keeps_grad", keeps)
        x.grad = w.grad = None
        y = F.linear(x, w, activation="gelu")
        y.sum().backward()
        results.append((y.numpy(), x.grad.numpy(), w.grad.numpy()))
    for a, c in zip(*results):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)


def test_no_backend_capability_is_probed_with_hasattr():
    """Optional capabilities are declared on Backend (lab/engine/backend.py), never discovered by probing."""
    import pathlib
    import re
    target = r"(B|b|Bk|backend|self\.backend)\s*,"
    probe = re.compile(rf"\bhasattr\({target}|\bgetattr\({target}\s*[^,()]+,")   # (getattr with a default)
    root = pathlib.Path(lab.__file__).parent
    found = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if probe.search(line)]
    assert not found, found


def _torch_gelu(t):
    import torch
    return torch.nn.functional.gelu(t, approximate="tanh")


@pytest.mark.parametrize("enabled", [True, False], ids=["adapter", "base"])
def test_lora_linear_applies_activation_after_the_adapter(use_backend, enabled):
    """LoRALinear(x, activation="gelu") is gelu(base(x) + adapter(x)) (the base alone when the adapter is off),
    with PyTorch's gradients."""
    import torch
    from lab import nn
    rng = np.random.default_rng(3)
    base = nn.Linear(5, 6)
    layer = lora.LoRALinear(base, r=2, alpha=4, dropout=0.0)
    layer.lora_B = nn.parameter(rng.standard_normal((6, 2)))   # (zeros at init would hide the adapter)
    layer.enabled = enabled
    xn = rng.standard_normal((3, 5)).astype(np.float32)
    x = lab.tensor(xn, requires_grad=True)
    y = layer(x, activation="gelu")
    (y * y).sum().backward()
    tx = torch.tensor(xn, requires_grad=True)
    ta, tb = (torch.tensor(p.numpy(), requires_grad=True) for p in (layer.lora_A, layer.lora_B))
    pre = tx @ torch.tensor(base.weight.numpy()) + torch.tensor(base.bias.numpy())
    if enabled:
        pre = pre + layer.scale * (tx @ ta.T) @ tb.T
    ty = _torch_gelu(pre)
    (ty * ty).sum().backward()
    np.testing.assert_allclose(y.numpy(), ty.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x.grad.numpy(), tx.grad.numpy(), rtol=1e-4, atol=1e-5)
    if enabled:
        np.testing.assert_allclose(layer.lora_B.grad.numpy(), tb.grad.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(layer.lora_A.grad.numpy(), ta.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_layer_norm_residual_forward_is_add_then_norm(use_backend):
    import torch
    from lab import nn
    rng = np.random.default_rng(5)
    ln = nn.LayerNorm(7)
    ln.weight = nn.parameter(rng.standard_normal(7))
    ln.bias = nn.parameter(rng.standard_normal(7))
    xn, rn = (rng.standard_normal((2, 3, 7)).astype(np.float32) for _ in range(2))
    x, r = lab.tensor(xn, requires_grad=True), lab.tensor(rn, requires_grad=True)
    s, h = ln.residual_forward(x, r)
    ((s * s).sum() + (h * h * h).sum()).backward()
    tx, tr = torch.tensor(xn, requires_grad=True), torch.tensor(rn, requires_grad=True)
    tw, tb = torch.tensor(ln.weight.numpy(), requires_grad=True), torch.tensor(ln.bias.numpy(), requires_grad=True)
    ts = tx + tr
    th = torch.nn.functional.layer_norm(ts, (7,), tw, tb, 1e-5)
    ((ts * ts).sum() + (th ** 3).sum()).backward()
    for ours, theirs in ((s, ts), (h, th), (x.grad, tx.grad), (r.grad, tr.grad), (ln.weight.grad, tw.grad),
                         (ln.bias.grad, tb.grad)):
        np.testing.assert_allclose(ours.numpy(), theirs.detach().numpy(), rtol=1e-4, atol=1e-4)


def test_linear_layers_refuse_an_unknown_activation(use_backend):
    from lab import nn
    x = lab.tensor(np.ones((2, 4), np.float32))
    for layer in (nn.Linear(4, 3), lora.LoRALinear(nn.Linear(4, 3), r=2, alpha=2, dropout=0.0)):
        with pytest.raises(ValueError, match=r"linear: activation must be None or 'gelu', got 'relu'"):
            layer(x, activation="relu")


def test_residual_forward_keeps_a_replaced_norm_forward(use_backend):
    """A LayerNorm whose forward was replaced (a patch, a subclass) still runs it after the residual add: the
    fused kernel must not bypass it."""
    from lab import nn

    class Doubled(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2.0
    x, r = (lab.tensor(np.random.default_rng(i).standard_normal((2, 5)).astype(np.float32)) for i in (1, 2))
    plain = nn.LayerNorm(5).residual_forward(x, r)[1].numpy()
    np.testing.assert_allclose(Doubled(5).residual_forward(x, r)[1].numpy(), 2 * plain, rtol=1e-5, atol=1e-6)
    patched = nn.LayerNorm(5)
    object.__setattr__(patched, "forward", lambda t: nn.LayerNorm.forward(patched, t) * 3.0)
    s, h = patched.residual_forward(x, r)
    np.testing.assert_allclose(h.numpy(), 3 * plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.numpy(), x.numpy() + r.numpy(), rtol=1e-6)
