"""A Linear layer's bias gradient taken with its weight gradient (Backend.matmul_column_sums): on wgpu the whole-tile
kernel that computes x^T g also sums g's columns as it stages g (matmul_aligned.wgsl's SUMS), and a split product's
chunks are summed with their column sums by one pass; elsewhere the sums are a reduction of their own. Gradients
against PyTorch (float64) on both backends, the dispatches they take on wgpu, and a training step's gradients
against the composed path."""
from dataclasses import replace

import numpy as np
import pytest
import torch

import lab
from lab.data import CharTokenizer
from lab.engine import ops as F
from lab.engine.backend import Backend, using_backend
from lab.models import PRESETS, TransformerLM

# (K inputs, N outputs, rows, tuning changes, passes that sum the split's chunks): the weight gradient is the
# (K, rows) x (rows, N) product; 32 chunks of 64 x 64 take two passes, the column sums split off in the last
SHAPES = {"64-tiles": (64, 128, 48, {}, 0), "64-tiles-split": (64, 64, 512, {}, 1),
          "64-tiles-split-two-passes": (64, 64, 4096, {}, 2),
          "128-row-tiles": (128, 64, 48, {"ROW128_MIN_TILES": 0}, 0),
          "128x128-tiles": (128, 128, 48, {"WIDE_MIN_TILES": 0}, 0),
          "128x128-tiles-split": (128, 128, 512, {"WIDE_MIN_TILES": 0}, 1),
          "ragged": (33, 70, 300, {}, 1), "one-row": (64, 64, 1, {}, 0)}
KINDS = ["bias", "no-bias", "gelu", "frozen-weight", "frozen-bias"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_linears_bias_gradient_comes_from_its_weight_gradients_pass(any_backend, monkeypatch, shape, kind):
    K, N, rows, tuning, passes = SHAPES[shape]
    if any_backend.name == "wgpu":
        monkeypatch.setattr(any_backend, "matmul_tuning", replace(any_backend.matmul_tuning, **tuning))
    rng = np.random.default_rng(K + N + rows)
    x_np, w_np, b_np, g_np = (rng.standard_normal(s).astype(np.float32) for s in ((rows, K), (K, N), (N,), (rows, N)))
    bias = kind != "no-bias"
    x = lab.tensor(x_np, requires_grad=True, backend=any_backend)
    w = lab.tensor(w_np, requires_grad=kind != "frozen-weight", backend=any_backend)
    b = lab.tensor(b_np, requires_grad=kind != "frozen-bias", backend=any_backend) if bias else None
    y = F.linear(x, w, b, activation="gelu" if kind == "gelu" else None)
    with lab.profile(any_backend) as prof:
        (y * lab.tensor(g_np, backend=any_backend)).sum().backward()

    xt, wt = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (x_np, w_np))
    bt = torch.tensor(b_np, dtype=torch.float64, requires_grad=True)
    yt = xt @ wt + (bt if bias else 0)
    yt = torch.nn.functional.gelu(yt, approximate="tanh") if kind == "gelu" else yt
    (yt * torch.tensor(g_np, dtype=torch.float64)).sum().backward()
    pairs = [(y, yt), (x.grad, xt.grad)] + [(t.grad, tt.grad) for t, tt in ((w, wt), (b, bt))
                                             if t is not None and t.requires_grad]
    for got, want in pairs:
        want = want.detach().numpy()
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert w.grad is None if kind == "frozen-weight" else w.grad.shape == (K, N)
    assert not bias or (b.grad is None if kind == "frozen-bias" else b.grad.shape == (N,))
    if any_backend.name == "wgpu" and shape not in ("ragged", "one-row"):
        labels = [label for _, label, _ in prof.records]
        folded = kind in ("bias", "gelu")
        assert sum("+column sums" in label for label in labels) == folded, labels
        # the bias gradient takes no pass of its own; a split product's chunks and their sums one pass together
        # (before: the split's pass plus two passes of the bias's column sums)
        columns = [name for name, _, _ in prof.records if name == "reduce:columns_main"]
        assert kind == "frozen-weight" or len(columns) == passes, labels


def _tiny_gpt(backend, text):
    tok = CharTokenizer.from_text(text)
    lab.manual_seed(0)
    cfg = replace(PRESETS["tiny"], vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=1, n_embd=64,
                  dropout=0.0)
    with using_backend(backend):
        return TransformerLM(cfg), np.array(tok.encode(text)[:4 * 65]).reshape(4, 65)


def _step_grads(backend, text):
    model, ids = _tiny_gpt(backend, text)
    with using_backend(backend):
        x, t = lab.tensor(ids[:, :-1], backend=backend), lab.tensor(ids[:, 1:], backend=backend)
        with lab.profile(backend) as prof:
            F.cross_entropy(model(x), t).backward()
    return {k: p.grad.numpy() for k, p in model.named_parameters()}, prof


def test_a_training_steps_gradients_equal_the_composed_passes(wgpu_backend, numpy_backend, monkeypatch):
    """A 2-layer 64-wide GPT's step on 4 x 64 tokens (every linear on whole tiles, the weight gradients split in
    two): the same gradients within 1e-6 relative (the same sums and products, some in another order) as with the
    bias gradients summed and gelu's derivative applied by passes of their own (Backend's composed
    matmul_column_sums and matmul_gelu_grad), and as numpy's; in fewer dispatches."""
    text = "It was the best of times, it was the worst of times, it was the age of wisdom.\n" * 8
    monkeypatch.setattr(wgpu_backend, "matmul_tuning", replace(wgpu_backend.matmul_tuning, GELU_GRAD_FUSED=True))
    folded, prof = _step_grads(wgpu_backend, text)
    monkeypatch.setattr(wgpu_backend, "matmul_column_sums",
                        lambda a, b, trans_a=False: Backend.matmul_column_sums(wgpu_backend, a, b, trans_a))
    monkeypatch.setattr(wgpu_backend, "matmul_gelu_grad",
                        lambda g, w, pre: Backend.matmul_gelu_grad(wgpu_backend, g, w, pre))
    composed, prof_composed = _step_grads(wgpu_backend, text)
    reference, _ = _step_grads(numpy_backend, text)
    assert len(folded) == 28
    for k in folded:
        assert np.abs(folded[k] - composed[k]).max() <= 1e-6 * np.abs(composed[k]).max(), k
        np.testing.assert_allclose(folded[k], reference[k], rtol=1e-4, atol=1e-4 * np.abs(reference[k]).max(),
                                   err_msg=k)
    labels = [label for _, label, _ in prof.records]
    assert sum("+column sums" in label for label in labels) == 8, labels
    assert sum("+gelu grad" in label for label in labels) == 2, labels
    names = [name for name, _, _ in prof.records]
    composed_names = [name for name, _, _ in prof_composed.records]
    assert names.count("elementwise:binary_main") == composed_names.count("elementwise:binary_main") - 2
    assert len(names) < len(composed_names)


@pytest.mark.parametrize("rows,n,passes", [(1, 37, 0), (16, 64, 0), (300, 37, 2), (4096, 64, 2)])
def test_layer_norms_weight_and_bias_gradients_share_one_reduction(any_backend, rows, n, passes):
    """LayerNorm's dw and db are column sums over the rows, taken in row chunks: the chunks' partials of both lie
    side by side, so one reduction's passes sum them (before: two reductions, twice the passes); a single chunk
    (rows <= 16) is written directly. Against PyTorch (float64) on both backends."""
    rng = np.random.default_rng(rows + n)
    x_np, g_np = (rng.standard_normal((rows, n)).astype(np.float32) for _ in range(2))
    w_np, b_np = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
    x, w, b = (lab.tensor(v, requires_grad=True, backend=any_backend) for v in (x_np, w_np, b_np))
    y = F.layer_norm(x, w, b)
    with lab.profile(any_backend) as prof:
        (y * lab.tensor(g_np, backend=any_backend)).sum().backward()
    xt, wt, bt = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (x_np, w_np, b_np))
    yt = torch.nn.functional.layer_norm(xt, (n,), wt, bt, eps=1e-5)
    (yt * torch.tensor(g_np, dtype=torch.float64)).sum().backward()
    for got, want in ((y, yt), (x.grad, xt.grad), (w.grad, wt.grad), (b.grad, bt.grad)):
        want = want.detach().numpy()
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    if any_backend.name == "wgpu":
        assert [name for name, _, _ in prof.records].count("reduce:columns_main") == passes, prof.records


def test_column_sums_of_a_product_without_rows_or_of_operands_that_do_not_fit(any_backend):
    """A Linear layer with no inputs (weight (0, N)): its weight gradient is empty and runs no workgroup, its bias
    gradient still sums g (not whatever a pooled buffer held before); operands that are not one product each are
    one error naming the shapes."""
    rng = np.random.default_rng(3)
    for _ in range(3):   # (leave freed buffers of the sums' size in the pool)
        lab.tensor(np.full(128, 7.0, np.float32), backend=any_backend).numpy()
    x = lab.tensor(np.zeros((48, 0), np.float32), requires_grad=True, backend=any_backend)
    w = lab.tensor(np.zeros((0, 128), np.float32), requires_grad=True, backend=any_backend)
    b = lab.tensor(rng.standard_normal(128).astype(np.float32), requires_grad=True, backend=any_backend)
    g = rng.standard_normal((48, 128)).astype(np.float32)
    (F.linear(x, w, b) * lab.tensor(g, backend=any_backend)).sum().backward()
    np.testing.assert_allclose(b.grad.numpy(), g.sum(0), rtol=1e-5, atol=1e-5)
    assert w.grad.shape == (0, 128) and x.grad.shape == (48, 0)
    up = any_backend.from_numpy
    for a_shape, b_shape in (((1, 8, 4), (2, 8, 3)), ((1, 8, 4), (1, 7, 3)), ((8, 4), (1, 8, 3))):
        with pytest.raises(ValueError, match=r"matmul_column_sums: a .* do not fit: want a \(1, K, M\) and b \(1, K, N\)"):
            any_backend.matmul_column_sums(up(np.ones(a_shape, np.float32)), up(np.ones(b_shape, np.float32)), True)


# (rows, C, hidden, tuning changes, fused): the second layer's input gradient is the (rows, C) x (C, hidden) product
MLP_SHAPES = {"64-tiles": (64, 64, 128, {}, True), "128x128-tiles": (128, 64, 128, {"WIDE_MIN_TILES": 0}, True),
              "128-row-tiles": (128, 64, 64, {"ROW128_MIN_TILES": 0}, True),
              "ragged": (50, 40, 70, {}, False), "few-rows": (8, 64, 64, {}, False),
              "split": (64, 256, 64, {}, False)}


@pytest.mark.parametrize("other_use", [False, True], ids=["plain", "hidden-used-twice"])
@pytest.mark.parametrize("shape", list(MLP_SHAPES))
def test_a_gelu_layers_derivative_is_applied_by_the_next_linears_product(any_backend, monkeypatch, shape, other_use):
    """linear(gelu) then linear (an MLP): the second layer's backward takes its input's gradient through gelu's
    derivative as its product g W^T is stored (wgpu, whole tiles in one piece: no gelu_bwd pass), else by a pass;
    a hidden activation also used elsewhere gets that use's gradient through its own node. Against PyTorch."""
    rows, C, H, tuning, fused = MLP_SHAPES[shape]
    if any_backend.name == "wgpu":   # (the fused epilogue is off by default: Tuning.GELU_GRAD_FUSED says why)
        monkeypatch.setattr(any_backend, "matmul_tuning", replace(any_backend.matmul_tuning, GELU_GRAD_FUSED=True,
                                                                  **tuning))
    rng = np.random.default_rng(rows + C + H)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in ((rows, C), (C, H), (H,), (H, C), (C,), (rows, C),
                                                                  (rows, H))]
    x, w1, b1, w2, b2 = (lab.tensor(a, requires_grad=True, backend=any_backend) for a in arrays[:5])
    g, g2 = (lab.tensor(a, backend=any_backend) for a in arrays[5:])
    h = F.linear(x, w1, b1, activation="gelu")
    loss = (F.linear(h, w2, b2) * g).sum() + ((h * g2).sum() if other_use else 0.0)
    with lab.profile(any_backend) as prof:
        loss.backward()
    xt, w1t, b1t, w2t, b2t = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays[:5])
    gt, g2t = (torch.tensor(a, dtype=torch.float64) for a in arrays[5:])
    ht = torch.nn.functional.gelu(xt @ w1t + b1t, approximate="tanh")
    (((ht @ w2t + b2t) * gt).sum() + ((ht * g2t).sum() if other_use else 0.0)).backward()
    for got, want in zip((x, w1, b1, w2, b2), (xt, w1t, b1t, w2t, b2t)):
        want = want.grad.numpy()
        np.testing.assert_allclose(got.grad.numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    if any_backend.name == "wgpu":
        labels = [label for _, label, _ in prof.records]
        assert sum("+gelu grad" in label for label in labels) == fused, labels
        if not other_use:   # the loss's mul, and gelu_bwd unless the product applied it
            assert [n for n, _, _ in prof.records].count("elementwise:binary_main") == 2 - fused, labels


def test_gelu_grad_operands_that_do_not_fit_are_one_clear_error(any_backend):
    """pre must have the product's shape (the kernel reads it where it stores the product: a smaller one would be
    read past its end); g and w must share N."""
    up = any_backend.from_numpy
    cases = (((1, 64, 32), (1, 64, 32), (1, 64, 63)), ((1, 64, 32), (1, 64, 31), (1, 64, 64)),
             ((2, 64, 32), (1, 64, 32), (1, 64, 64)))
    for g, w, pre in cases:
        with pytest.raises(ValueError, match=r"matmul_gelu_grad: g .* do not fit: want g \(1, M, N\), w \(1, K, N\) "
                                             r"and pre \(1, M, K\)"):
            any_backend.matmul_gelu_grad(*(up(np.ones(s, np.float32)) for s in (g, w, pre)))


def test_gelus_derivative_takes_a_pass_of_its_own_by_default(wgpu_backend):
    """Tuning.GELU_GRAD_FUSED is off (measured slower on the H200): an MLP's backward applies gelu' by gelu_bwd."""
    rng = np.random.default_rng(3)
    x, w1, w2 = (lab.tensor(rng.standard_normal(s).astype(np.float32), requires_grad=True, backend=wgpu_backend)
                 for s in ((64, 64), (64, 128), (128, 64)))
    loss = F.linear(F.linear(x, w1, activation="gelu"), w2).sum()
    with lab.profile(wgpu_backend) as prof:
        loss.backward()
    assert not any("+gelu grad" in label for _, label, _ in prof.records)
    assert any(label.startswith("elementwise:binary_main") or name == "elementwise:binary_main"
               for name, label, _ in prof.records)
