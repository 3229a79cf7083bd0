"""Products of a few rows (a decode step's linears, matmul_rows.wgsl): one dispatch each with bias, GELU and the
residual add fused, equal to numpy; F.linear's residual argument on both backends (values and gradients against
PyTorch), through LoRA and quantized layers; and what a decode step of each family dispatches."""
from dataclasses import replace

import numpy as np
import pytest
import torch

import lab
from lab import lora
from lab.engine import ops as F
from lab.engine.tensor import Tensor, no_grad
from lab.models import MODELS, PRESETS
from lab.nn import Linear, QuantizedLinear

rng = np.random.default_rng(0)


def _gelu(v):
    return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))


@pytest.mark.parametrize("M", [1, 2, 5, 16])
@pytest.mark.parametrize("K", [32, 100, 776])
def test_few_row_products_equal_numpy_in_one_dispatch_with_every_epilogue(wgpu_backend, M, K):
    """Both weight layouts (a Linear's (K, N), the tied head's (N, K)), float32 and float16 weights, N a
    non-multiple of the 32- and 8-column tiles, and every combination of bias, GELU (with and without the
    pre-activation kept) and residual: one matmul_rows dispatch each, equal to the float64 reference."""
    B = wgpu_backend
    for N in (1, 45):
        x = rng.standard_normal((M, K)).astype(np.float32)
        w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
        bias, res = rng.standard_normal(N).astype(np.float32), rng.standard_normal((M, N)).astype(np.float32)
        a = B.from_numpy(x[None])
        cases = []
        for trans_b, dtype in ((False, np.float32), (True, np.float32), (False, np.float16), (True, np.float16)):
            stored = (w.T if trans_b else w).astype(dtype)
            cases.append((B.from_numpy(np.ascontiguousarray(stored)[None]), trans_b, w.astype(dtype).astype(np.float64)))
        for wd, trans_b, wref in cases:
            for has_bias, gelu, has_res in [(0, None, 0), (1, None, 0), (0, None, 1), (1, None, 1), (1, "keep", 0),
                                            (1, "drop", 1), (0, "keep", 1)]:
                if gelu and trans_b:
                    continue   # (matmul_gelu takes a Linear's layout only)
                b_arr = B.from_numpy(bias) if has_bias else None
                r_arr = B.from_numpy(res[None]) if has_res else None
                pre_ref = x.astype(np.float64) @ wref + (bias if has_bias else 0)
                want = (_gelu(pre_ref) if gelu else pre_ref) + (res if has_res else 0)
                with lab.profile(B) as prof:
                    if gelu:
                        out, pre = B.matmul_gelu(a, wd, b_arr, keep_pre=gelu == "keep", residual=r_arr)
                    else:
                        out, pre = B.matmul(a, wd, False, trans_b, bias=b_arr, residual=r_arr), None
                    got = B.to_numpy(out).reshape(M, N)
                assert [name for name, _, _ in prof.records] == [f"matmul_rows:{'nt' if trans_b else 'nn'}"]
                # (float32 sums of up to 776 products of order one: a few 1e-6 off the float64 reference)
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
                assert (pre is None) == (gelu != "keep")
                if pre is not None:
                    np.testing.assert_allclose(B.to_numpy(pre).reshape(M, N), pre_ref, rtol=1e-5, atol=2e-5)


def test_a_residual_of_the_wrong_size_is_refused_by_the_backend(wgpu_backend):
    B = wgpu_backend
    a, w = B.from_numpy(np.ones((1, 2, 8), np.float32)), B.from_numpy(np.ones((1, 8, 5), np.float32))
    with pytest.raises(ValueError, match=r"matmul: residual of shape \(1, 5\) for a product of 2 x 5"):
        B.matmul(a, w, residual=B.from_numpy(np.ones((1, 5), np.float32)))


@pytest.mark.parametrize("lead", [(2, 3), (4, 8)])   # 6 rows (one rows dispatch on wgpu), 32 (the tiled path)
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_linear_residual_matches_torch_values_and_gradients(use_backend, lead, activation):
    K, N = 12, 12
    x, r = rng.standard_normal(lead + (K,)), rng.standard_normal(lead + (N,))
    w, b = rng.standard_normal((K, N)) * 0.3, rng.standard_normal(N)
    g = rng.standard_normal(lead + (N,))
    tx, tr, tw, tb = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (x, r, w, b))
    ty = tx @ tw + tb
    ty = (torch.nn.functional.gelu(ty, approximate="tanh") if activation else ty) + tr
    ty.backward(torch.tensor(g))
    lx, lr, lw, lb = (lab.tensor(v.astype(np.float32), requires_grad=True) for v in (x, r, w, b))
    y = F.linear(lx, lw, lb, activation=activation, residual=lr)
    (y * lab.tensor(g.astype(np.float32))).sum().backward()
    np.testing.assert_allclose(y.numpy(), ty.detach().numpy(), rtol=1e-5, atol=1e-5)
    for mine, theirs in ((lx, tx), (lr, tr), (lw, tw), (lb, tb)):
        np.testing.assert_allclose(mine.grad.numpy(), theirs.grad.numpy(), rtol=1e-4, atol=1e-4)
    # the input itself as the residual (x + layer(x)): both of its uses reach its gradient
    lx.grad = None
    F.linear(lx, lw, lb, residual=lx).sum().backward()
    np.testing.assert_allclose(lx.grad.numpy(), np.ones(lead + (K,)) @ w.T + 1, rtol=1e-4, atol=1e-4)


def test_linear_residual_of_another_shape_is_one_clear_error(use_backend):
    x, w = lab.tensor(np.ones((2, 3, 4), np.float32)), lab.tensor(np.ones((4, 5), np.float32))
    for bad in (np.ones((2, 3, 4), np.float32), np.ones((5,), np.float32), np.ones((6, 5), np.float32)):
        with pytest.raises(ValueError, match=r"linear: residual \(.*\) must have the output's shape \(2, 3, 5\) "
                                             r"\(input \(2, 3, 4\), 5 outputs\)"):
            F.linear(x, w, residual=lab.tensor(bad))
    with pytest.raises(ValueError, match="linear"):
        F.linear(x, w, residual=lab.tensor(np.ones((2, 3, 5), np.int32)))


def test_lora_and_quantized_layers_add_the_residual_after_their_output(use_backend):
    """A LoRA layer's adapter and activation land before the residual (enabled, disabled, merged), and a q4_0
    layer adds it after its dequantizing product: each equals its layer's output plus the residual."""
    lab.manual_seed(0)
    x = lab.tensor(rng.standard_normal((1, 3, 32)).astype(np.float32))
    r = lab.tensor(rng.standard_normal((1, 3, 64)).astype(np.float32))
    base = Linear(32, 64)
    layer = lora.LoRALinear(base, 4, 8, 0.0)
    layer.lora_B.data = layer.lora_B.backend.from_numpy(rng.standard_normal((64, 4)).astype(np.float32))
    with no_grad():
        for enabled in (True, False):
            layer.enabled = enabled
            for activation in (None, "gelu"):
                want = layer(x, activation).numpy() + r.numpy()
                np.testing.assert_allclose(layer(x, activation, residual=r).numpy(), want, rtol=1e-5, atol=1e-5)
        layer.enabled = True
        assert not np.allclose(layer(x).numpy(), base(x).numpy(), atol=1e-3)   # (the adapter counts)
        q = QuantizedLinear.from_linear(base, "q4_0")
        np.testing.assert_allclose(q(x, "gelu", residual=r).numpy(), q(x, "gelu").numpy() + r.numpy(),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset, per_layer", [
    ("tiny", {"matmul_rows:nn": 4}),
    ("llama-tiny", {"matmul_rows:nn": 2, "matmul_rows_multi:concat": 1, "matmul_rows_multi:swiglu": 1})])
def test_a_decode_step_runs_each_linear_as_one_dispatch(wgpu_backend, preset, per_layer):
    """One token's step, profiled: every linear and the tied head is one matmul_rows dispatch (no split-K
    summing pass), Llama's q, k, v one and its gate, up and SwiGLU one, and no bias, GELU, SwiGLU or residual add
    runs as a pass of its own (GPT-2's only elementwise pass adds the position embedding). The counts cannot
    silently grow back."""
    from lab.decode import DecodeRunner
    from lab.engine import backend as Bk
    prev = dict(Bk._state)
    Bk._state["backend"], Bk._state["reason"] = wgpu_backend, "test"
    try:
        cfg = PRESETS[preset]
        cfg = replace(cfg, n_layer=2) if hasattr(cfg, "n_layer") else replace(cfg, num_hidden_layers=2)
        model = MODELS[type(cfg)](cfg)
        model.eval()
        with no_grad(), DecodeRunner(model, 1) as runner:
            model.forward_cached(np.ones((1, 4), np.int32), runner.cache, 0)
            for layer in runner.cache:
                layer.window = 16
            with lab.profile(wgpu_backend) as prof:
                model.forward_cached(np.ones((1, 1), np.int32), runner.cache, 4)
    finally:
        Bk._state.update(prev)
    names = [name for name, _, _ in prof.records]
    for name, count in per_layer.items():
        assert names.count(name) == 2 * count, names
    assert names.count("matmul_rows:nt") == 1, names   # the tied head
    assert not [n for n in names if n.startswith(("reduce:", "matmul:", "matmul_thin:", "elementwise:unary",
                                                  "swiglu:"))], names
    assert names.count("elementwise:binary_main") == (preset == "tiny"), names


@pytest.mark.parametrize("M", [1, 5, 16, 17])
def test_linears_equal_the_layers_one_by_one_in_one_dispatch(use_backend, M):
    """F.linears (Llama's q, k, v side by side; gate and up through SwiGLU) equals each linear then concat /
    swiglu: widths off the 32-column tile, biases on some weights only, float16 weights; one dispatch on wgpu for
    up to 16 rows (17 rows compose), one primitive on numpy."""
    K = 40
    x = lab.tensor(rng.standard_normal((1, M, K)).astype(np.float32))
    for dtype in (np.float32, np.float16):
        def t(*shape, kind=dtype):
            return lab.tensor((rng.standard_normal(shape) / np.sqrt(K)).astype(kind))
        for how, weights, biases in (("concat", [t(K, 48), t(K, 20), t(K, 20)], [None, t(20, kind=np.float32), None]),
                                     ("concat", [t(K, 33)], [t(33, kind=np.float32)]),
                                     ("swiglu", [t(K, 70), t(K, 70)], [t(70, kind=np.float32), None]),
                                     ("swiglu", [t(K, 9), t(K, 9)], [None, None]),
                                     ("concat", [t(K, 48), t(K, 20), t(K, 20)],
                                      [t(48, kind=np.float32), None, t(20, kind=np.float32)]),
                                     ("swiglu", [t(K, 9), t(K, 9)], [None, t(9, kind=np.float32)])):
            outs = [F.linear(x, w, b) for w, b in zip(weights, biases)]
            want = (F.concat(outs, axis=-1) if how == "concat" else F.swiglu(*outs)).numpy()
            with no_grad(), lab.profile() as prof:
                got = F.linears(x, weights, biases, how).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            names = [name for name, _, _ in prof.records]
            if use_backend.name == "numpy":   # one primitive at any M: no op per layer, no concat copy
                assert names == ["linears", "to_numpy"], names
            else:
                assert (names == [f"matmul_rows_multi:{how}"]) == (M <= 16), names


def test_linears_wanting_a_gradient_are_one_product_of_the_weights_side_by_side(use_backend):
    """Training's F.linears "concat" (Llama's q, k, v for the fused attention): one product of the weights side by
    side, not a product per layer whose outputs are copied together (and their gradient split, x's summed); the
    output and every gradient as PyTorch's. Fewer rows than the input width: the layers one by one (copying the
    weights would cost more than the outputs)."""
    for M, products in ((40, 1), (4, 3)):
        xs = rng.standard_normal((2, M // 2, 8)).astype(np.float32)
        ws = [rng.standard_normal((8, n)).astype(np.float32) for n in (12, 4, 4)]
        bs = [rng.standard_normal(n).astype(np.float32) for n in (12, 4, 4)]
        x = lab.tensor(xs, requires_grad=True)
        w, b = ([lab.tensor(a, requires_grad=True) for a in arrays] for arrays in (ws, bs))
        with lab.profile() as prof:
            y = F.linears(x, w, b)
        assert sum("matmul" in n for n, _, _ in prof.records) == products, prof.records
        g = rng.standard_normal(y.shape).astype(np.float32)
        y.backward(lab.tensor(g))
        tx = torch.tensor(xs, requires_grad=True)
        tw, tb = ([torch.tensor(a, requires_grad=True) for a in arrays] for arrays in (ws, bs))
        ty = torch.cat([tx @ a + c for a, c in zip(tw, tb)], dim=-1)
        ty.backward(torch.tensor(g))
        for got, want in zip([y, x.grad] + [t.grad for t in w + b], [ty, tx.grad] + [t.grad for t in tw + tb]):
            np.testing.assert_allclose(got.numpy(), want.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_linears_refuse_a_bad_group_in_one_error_and_compose_when_a_gradient_is_wanted(use_backend):
    x = lab.tensor(rng.standard_normal((1, 2, 8)).astype(np.float32))
    w = [lab.tensor(rng.standard_normal((8, 4)).astype(np.float32), requires_grad=True) for _ in range(3)]
    for how, weights, biases in (("sum", w, None), ("swiglu", w, None), ("concat", [], None), ("concat", w, [None])):
        with pytest.raises(ValueError, match="linears: how must be 'concat' .* or 'swiglu' .*, with a bias or None"):
            F.linears(x, weights, biases, how)
    with pytest.raises(ValueError, match=r"linear: input \(1, 2, 8\), weight \(7, 4\)"):
        F.linears(x, [w[0], lab.tensor(np.ones((7, 4), np.float32))])
    y = F.linears(x, w[:2], how="swiglu")   # a gradient wanted: the composed layers carry it
    y.sum().backward()
    assert y.shape == (1, 2, 4) and w[0].grad is not None and w[1].grad is not None


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_decode_steps_with_lora_adapters_give_the_logits_of_the_full_forward(use_backend, family):
    """The fused epilogues with adapters on (their low-rank path lands before the residual and the activation;
    Llama's projections then run one by one) and off (the base layers fused): each one-token step's logits equal
    the full forward's at that position (computed without the few-row kernels)."""
    from lab.models import LlamaConfig, LlamaLM, TransformerLM
    lab.manual_seed(0)
    if family == "gpt":
        model = TransformerLM(replace(PRESETS["tiny"], vocab_size=30, n_layer=2, n_embd=32, n_head=4, block_size=16))
    else:
        model = LlamaLM(LlamaConfig(vocab_size=30, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16))
    lora.apply(model, r=2, alpha=4, targets="all-linear")
    for module in model.modules():
        if isinstance(module, lora.LoRALinear):
            module.lora_B.backend.write(module.lora_B.data, rng.normal(0, 0.5, module.lora_B.shape).astype(np.float32))
    model.eval()
    ids = np.array([[3, 5, 7, 1, 2, 9]], np.int32)
    with no_grad():
        for enabled in (True, False):
            model.use_adapter(enabled)
            full = model(np.repeat(ids, 3, 0)).numpy()[0]   # (18 rows: the tiled products, layers one by one)
            cache = model.new_cache(1)
            model.forward_cached(ids[:, :3], cache, 0)
            steps = [model.forward_cached(ids[:, i:i + 1], cache, i).numpy()[0, -1] for i in range(3, 6)]
            np.testing.assert_allclose(np.stack(steps), full[3:], rtol=1e-4, atol=1e-4)
        model.use_adapter(True)
        assert not np.allclose(full, model(ids).numpy()[0], atol=1e-3)   # (the adapters count)


@pytest.mark.parametrize("cols", [4, 8, 16, 64])
def test_every_column_count_of_the_row_kernels_gives_the_same_products(wgpu_backend, monkeypatch, cols):
    """Tuning.ROWS_COLS_NN (columns per workgroup of a (K, N) weight; the rest of the 256 threads slice K) changes
    only how the work is spread: matmul_rows and matmul_rows_multi equal the float64 reference for each allowed
    count (the many-rows count, from 8 rows, here), with N off every tile."""
    B = wgpu_backend
    monkeypatch.setattr(B, "matmul_tuning", replace(B.matmul_tuning, ROWS_COLS_NN=cols, ROWS_COLS_NN_MANY=cols))
    M, K, N = 9, 300, 45
    x = rng.standard_normal((M, K)).astype(np.float32)
    ws = [(rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32) for _ in range(3)]
    bias, res = rng.standard_normal(N).astype(np.float32), rng.standard_normal((M, N)).astype(np.float32)
    a = B.from_numpy(x[None])
    with lab.profile(B) as prof:
        got = B.to_numpy(B.matmul_gelu(a, B.from_numpy(ws[0][None]), B.from_numpy(bias), keep_pre=False,
                                       residual=B.from_numpy(res[None]))[0]).reshape(M, N)
        cat = B.to_numpy(B.linears(a, [B.from_numpy(w) for w in ws], [B.from_numpy(bias), None, None], "concat"))
        glu = B.to_numpy(B.linears(a, [B.from_numpy(w) for w in ws[:2]], [None, None], "swiglu"))
    assert [name for name, _, _ in prof.records] == ["matmul_rows:nn", "matmul_rows_multi:concat",
                                                     "matmul_rows_multi:swiglu"]
    xd = x.astype(np.float64)
    np.testing.assert_allclose(got, _gelu(xd @ ws[0] + bias) + res, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(cat.reshape(M, 3 * N), np.concatenate([xd @ ws[0] + bias, xd @ ws[1], xd @ ws[2]], 1),
                               rtol=1e-5, atol=2e-5)
    g, u = xd @ ws[0], xd @ ws[1]
    np.testing.assert_allclose(glu.reshape(M, N), g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=2e-5)


def test_a_column_count_the_row_kernels_cannot_take_is_refused():
    from lab.checks import InputError
    from lab.engine.wgpu.matmul_plan import Tuning
    for bad in (0, 3, 128, 32.5, "32"):
        for field in ("ROWS_COLS_NN", "ROWS_COLS_NN_MANY"):
            with pytest.raises(InputError, match=field + r" must be one of \(4, 8, 16, 32, 64\)"):
                Tuning(**{field: bad})
