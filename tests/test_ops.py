"""Every op on the wgpu backend against the numpy reference, forward and backward, and the reference's own
gradients against float64 central finite differences. The cases (shapes: odd sizes, size 1, shapes beyond one
64x64 matmul tile, K > 1024, rows longer than a workgroup) live in lab/engine/opcheck.py so that
lab.selftest() runs exactly the same checks."""
import dataclasses

import numpy as np
import pytest

from lab.engine.opcheck import CASES, check_case

from adamw_reference import check_numpy_adamw
from attention_runs import attention_run

CASE_SPECS = [(c, k) for c in CASES for k in range(len(c.shapes))]


def _tune(monkeypatch, backend, **changes):
    """Change the wgpu backend's matmul tuning (lab.engine.wgpu.matmul_plan.Tuning) for one test."""
    monkeypatch.setattr(backend, "matmul_tuning", dataclasses.replace(backend.matmul_tuning, **changes))


@pytest.mark.parametrize("case,spec", CASE_SPECS, ids=[f"{c.name}-{k}" for c, k in CASE_SPECS])
def test_wgpu_matches_numpy(case, spec, wgpu_backend):
    r = check_case(case, wgpu_backend, spec_index=spec)
    # forward: 1e-5 of the output's scale (1e-4 for long reductions and K > 1024); gradients: 1e-3
    assert r["fwd"] <= case.fwd_tol, f"{case.name} {case.shapes[spec]}: forward error {r['fwd']:.2e}"
    assert r["bwd"] <= case.bwd_tol, f"{case.name} {case.shapes[spec]}: gradient error {r['bwd']:.2e}"


@pytest.mark.parametrize("case", [c for c in CASES if c.fd], ids=[c.name for c in CASES if c.fd])
def test_reference_gradients_match_finite_differences(case, numpy_backend):
    r = check_case(case, numpy_backend, spec_index=0)
    assert r["fd"] <= 1e-3, f"{case.name}: analytic vs finite-difference gradient error {r['fd']:.2e}"


def test_a_wrong_kernel_would_be_caught(wgpu_backend, monkeypatch):
    """The check itself must fail when a backend computes the wrong thing (here: gelu swapped for relu)."""
    case = next(c for c in CASES if c.name == "gelu")
    real = wgpu_backend.unary
    monkeypatch.setattr(wgpu_backend, "unary", lambda op, a: real("relu" if op == "gelu" else op, a))
    assert not check_case(case, wgpu_backend, spec_index=0)["ok"]


def test_dropout_mask_is_identical_on_both_backends_and_has_rate_p(wgpu_backend, numpy_backend):
    import lab
    x = np.ones(100_000, dtype=np.float32)
    outs = [lab.functional.dropout(lab.tensor(x, backend=b), 0.25, seed=7).numpy() for b in (wgpu_backend, numpy_backend)]
    np.testing.assert_array_equal(outs[0], outs[1])
    kept = outs[0] != 0
    assert abs(kept.mean() - 0.75) < 0.01                      # 100k Bernoulli draws: std of the mean ~0.0014
    np.testing.assert_allclose(outs[0][kept], 1 / 0.75, rtol=1e-6)
    other = lab.functional.dropout(lab.tensor(x, backend=numpy_backend), 0.25, seed=8).numpy()
    assert (other != outs[1]).any(), "a different seed must give a different mask"


def test_dropout_keeps_the_same_elements_in_every_dtype_and_zeroes_dropped_nan(numpy_backend):
    """The numpy backend selects float32 through a bitwise and, other dtypes through copyto: the same mask (across
    its in-cache chunks) and dropout.wgsl's select, +0 for a dropped NaN or -0."""
    x = np.random.default_rng(3).standard_normal(70_001)
    x[:4] = [np.nan, -np.inf, -0.0, np.nan]
    outs = [numpy_backend.dropout(x.astype(dt), 0.3, 11) for dt in (np.float16, np.float32, np.float64)]
    kept = [o != 0 for o in outs]
    np.testing.assert_array_equal(kept[0] | np.isnan(x), kept[1] | np.isnan(x))
    np.testing.assert_array_equal(kept[1], kept[2])
    for o, dt in zip(outs, (np.float16, np.float32, np.float64)):
        assert o.dtype == dt
        dropped = ~kept[1] & ~np.isnan(o)
        assert not np.signbit(o[dropped]).any()   # +0, not x * 0
        np.testing.assert_array_equal(o[kept[1]], (x[kept[1]].astype(dt) * dt(1 / 0.7)))


@pytest.mark.parametrize("causal,shape", [(False, (5, 256, 256)), (True, (5, 256, 256)), (True, (3, 301, 301))])
def test_softmax_with_dropout_in_cache_blocks_equals_the_wgpu_kernels(wgpu_backend, numpy_backend, causal, shape):
    """Attention weights over 2^18 elements: the numpy backend takes them a block of matrices (rows) at a time, the
    dropout mask counting on across blocks (301: blocks and mask chunks starting off the chunk grid). The weights,
    their dropped copy and the backward equal wgpu's."""
    rng = np.random.default_rng(4)
    a, g = (rng.standard_normal(shape).astype(np.float32) * 3 for _ in range(2))
    a[0, 7, 0] = 1000.0   # a block whose range needs the row max (exp(125) overflows float32)
    got = {}
    for b in (numpy_backend, wgpu_backend):
        y, yd = b.softmax(b.from_numpy(a), 0.125, causal, dropout=(0.2, 9))
        d = b.softmax_bwd(y, b.from_numpy(g), 0.125, dropout=(0.2, 9))
        got[b.name] = [b.to_numpy(t) for t in (y, yd, d)]
    for n, w in zip(got["numpy"], got["wgpu"]):
        np.testing.assert_array_equal(n == 0, w == 0)
        np.testing.assert_allclose(n, w, rtol=2e-5, atol=1e-7)
    y = got["numpy"][0]
    np.testing.assert_allclose(got["numpy"][1], numpy_backend.dropout(y, 0.2, 9), rtol=0, atol=0)


@pytest.mark.parametrize("causal,shape", [(True, (3, 5, 7)), (False, (2, 9, 33)), (True, (5, 256, 256))])
def test_softmax_backward_from_the_dropped_weights_equals_the_one_through_the_mask(any_backend, causal, shape):
    """Given the dropped weights (attention holds them for v's gradient), softmax_bwd needs no mask: g dropout(y)
    is all it reads of it. Equal to softmax's backward through dropout's mask in float64 (wgpu's kernel makes the
    mask whatever it is given) and to the backward that makes the mask again, zeros where they are, over cache
    blocks of rows too (5 x 256 x 256 > 2^18 elements)."""
    from lab.engine.numpy_backend import dropout_keep_mask
    if any_backend.name == "wgpu" and shape[-1] > 64:
        pytest.skip("the blocks are the numpy backend's; lavapipe is slow")
    rng = np.random.default_rng(12)
    a, g = (rng.standard_normal(shape).astype(np.float32) * 3 for _ in range(2))
    B, up = any_backend, any_backend.from_numpy
    y, yd = B.softmax(up(a), 0.3, causal, dropout=(0.25, 21))
    through_mask = B.to_numpy(B.softmax_bwd(y, up(g), 0.3, dropout=(0.25, 21)))
    from_dropped = B.to_numpy(B.softmax_bwd(y, up(g), 0.3, dropout=(0.25, 21), dropped=yd))
    keep = dropout_keep_mask(g.size, 0.25, 21).reshape(shape)
    y64, gm = B.to_numpy(y).astype(np.float64), g.astype(np.float64) * keep / 0.75
    want = 0.3 * y64 * (gm - (gm * y64).sum(-1, keepdims=True))
    np.testing.assert_allclose(from_dropped, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    np.testing.assert_array_equal(from_dropped == 0, through_mask == 0)
    np.testing.assert_allclose(from_dropped, through_mask, rtol=2e-5, atol=1e-7)


def test_softmax_backward_from_the_dropped_weights_drops_an_inf_gradient_where_dropout_dropped(any_backend):
    """An inf in g where dropout dropped the weight is dropped with it (dropout's select, as the kernel's): g z
    would be inf * 0 = NaN over the row, so such a block goes through the mask. Where kept it makes the row NaN
    either way."""
    rng = np.random.default_rng(13)
    a, g = (rng.standard_normal((2, 8, 8)).astype(np.float32) for _ in range(2))
    B, up = any_backend, any_backend.from_numpy
    y, yd = B.softmax(up(a), 0.5, True, dropout=(0.4, 3))
    w, wd = B.to_numpy(y), B.to_numpy(yd)
    dropped, kept = np.argwhere((wd == 0) & (w > 0)), np.argwhere(wd > 0)
    g[tuple(dropped[0])], g[tuple(kept[-1])] = np.inf, np.inf
    d = B.to_numpy(B.softmax_bwd(y, up(g), 0.5, dropout=(0.4, 3), dropped=yd))
    nan_rows = {tuple(kept[-1][:2])}
    for i, j in np.ndindex(2, 8):
        assert np.isnan(d[i, j]).any() == ((i, j) in nan_rows), (i, j)
    np.testing.assert_allclose(d, B.to_numpy(B.softmax_bwd(y, up(g), 0.5, dropout=(0.4, 3))), rtol=2e-5, atol=1e-7)


def test_softmax_backward_refuses_dropped_weights_of_another_shape(numpy_backend):
    y, yd = numpy_backend.softmax(np.zeros((2, 4, 4), np.float32), 1.0, True, dropout=(0.5, 1))
    with pytest.raises(ValueError, match=r"dropped has shape \(4, 4\), y \(2, 4, 4\)"):
        numpy_backend.softmax_bwd(y, np.ones_like(y), 1.0, dropout=(0.5, 1), dropped=yd[0])


@pytest.mark.parametrize("shape", [(2, 64, 4, 32), (8, 256, 6, 64)], ids=["keys-copied", "keys-strided"])
def test_products_with_transposed_head_views_equal_the_plain_products(any_backend, shape):
    """q k^T and g v^T read from inside the packed projection (HeadViews): the numpy backend copies a small
    transposed operand plainly first, reads a large one where it lies; both equal the plain product."""
    from lab.engine.backend import HeadView
    Bsz, T, H, D = shape
    if any_backend.name == "wgpu" and T > 64:
        pytest.skip("the large shape is the numpy backend's strided path; lavapipe is slow")
    rng = np.random.default_rng(6)
    qkv = rng.standard_normal((Bsz, T, 3 * H * D)).astype(np.float32)
    q, k = (qkv[..., i * H * D:(i + 1) * H * D].reshape(Bsz, T, H, D).transpose(0, 2, 1, 3) for i in range(2))
    want = np.einsum("bhtd,bhsd->bhts", q.astype(np.float64), k.astype(np.float64)).reshape(Bsz * H, T, T)
    data = any_backend.from_numpy(qkv)
    got = any_backend.matmul(HeadView(data, 0, H, D), HeadView(data, H * D, H, D), False, True, triangle="out")
    got = any_backend.to_numpy(got)
    low = np.tril(np.ones((T, T), bool))   # (the hint lets a backend leave the upper triangle zero)
    np.testing.assert_allclose(got[:, low], want[:, low], rtol=1e-4, atol=1e-4)


def test_large_index_space_uses_2d_grid(wgpu_backend):
    """More than 65535 workgroups of 256 threads: the flat kernels must cover every element."""
    import lab
    n = 65535 * 256 + 1000
    x = np.arange(n, dtype=np.float32) % 97
    y = (lab.tensor(x, backend=wgpu_backend) * 2.0).numpy()
    np.testing.assert_array_equal(y, x * 2)


# Shapes large enough to take the chunked, multi-pass paths of the reduction kernels (the op cases above are
# small and take the single-pass paths).
@pytest.mark.parametrize("op", ["sum", "max", "sumsq"])
@pytest.mark.parametrize("shape,axis", [((3, 70000), 1), ((2, 40000, 5), 1), ((20000, 70), 0), ((1000000,), 0)])
def test_chunked_reductions_match_numpy(wgpu_backend, numpy_backend, op, shape, axis):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    got = wgpu_backend.to_numpy(wgpu_backend.reduce(op, wgpu_backend.from_numpy(x), axis))
    want = numpy_backend.reduce(op, x, axis)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-3)


def test_layernorm_backward_over_many_rows_matches_numpy(wgpu_backend, numpy_backend):
    rng = np.random.default_rng(2)
    x, g = rng.standard_normal((2, 9000, 48)).astype(np.float32), rng.standard_normal((2, 9000, 48)).astype(np.float32)
    w = rng.standard_normal(48).astype(np.float32)
    b = np.zeros(48, np.float32)
    _, mean, rstd = numpy_backend.layernorm(x, w, b, 1e-5)
    want = numpy_backend.layernorm_bwd(x, w, mean, rstd, g)
    up = wgpu_backend.from_numpy
    got = wgpu_backend.layernorm_bwd(up(x), up(w), up(mean), up(rstd), up(g))
    for name, a, e in zip(("dx", "dw", "db"), got, want):
        np.testing.assert_allclose(wgpu_backend.to_numpy(a), e, rtol=1e-4, atol=2e-3, err_msg=name)


def test_layernorm_over_cache_blocks_of_rows_equals_pytorch_with_residual_and_accumulated_gradient(any_backend):
    """2100 rows of 130 (over 2^18 elements): the numpy backend takes them a block of rows at a time, the last
    block short; the residual's sum, mean, rstd, output and every gradient are PyTorch's (float64)."""
    import torch
    rng = np.random.default_rng(5)
    x, res, g, acc = (rng.standard_normal((3, 700, 130)).astype(np.float32) + 2 for _ in range(4))
    w, b = rng.standard_normal(130).astype(np.float32), rng.standard_normal(130).astype(np.float32)
    B, up = any_backend, any_backend.from_numpy
    y, mean, rstd, total = (B.to_numpy(a) for a in B.layernorm(up(x), up(w), up(b), 1e-5, residual=up(res)))
    dx, dw, db = (B.to_numpy(a) for a in B.layernorm_bwd(up(total), up(w), up(mean), up(rstd), up(g), up(acc)))
    tt = torch.tensor(x, dtype=torch.float64) + torch.tensor(res, dtype=torch.float64)
    tt.requires_grad_()
    tw, tb = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (w, b))
    ty = torch.nn.functional.layer_norm(tt, (130,), tw, tb, 1e-5)
    ty.backward(torch.tensor(g, dtype=torch.float64))
    var, m = torch.var_mean(tt.detach(), -1, unbiased=False)
    for name, got, want in (("total", total, tt.detach()), ("mean", mean, m), ("rstd", rstd, (var + 1e-5) ** -0.5),
                            ("y", y, ty.detach()), ("dx", dx, tt.grad + torch.tensor(acc, dtype=torch.float64)),
                            ("dw", dw, tw.grad), ("db", db, tb.grad)):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=2e-4 * max(1, float(want.abs().max())),
                                   err_msg=name)


def test_layernorm_of_no_rows_is_empty_with_zero_parameter_gradients(any_backend):
    import lab
    x = lab.tensor(np.zeros((0, 5), np.float32), backend=any_backend, requires_grad=True)
    w, b = (lab.tensor(np.full(5, v, np.float32), backend=any_backend, requires_grad=True) for v in (1, 0))
    y = lab.functional.layer_norm(x, w, b)
    y.sum().backward()
    assert y.shape == (0, 5) and x.grad.shape == (0, 5)
    np.testing.assert_array_equal(w.grad.numpy(), 0)
    np.testing.assert_array_equal(b.grad.numpy(), 0)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e6, 1e15])
def test_layernorm_backward_of_rows_of_any_scale_equals_pytorch(any_backend, scale):
    """Rows of scale 1e15 (variance 1e30, within float32): dx's term in x - mean carries rstd^3 (1e-45, below
    float32's smallest normal); taken a factor at a time it stays in range. Rows far from zero (mean 100x std)
    are centred before anything else."""
    import torch
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((6, 33)) * scale).astype(np.float32)
    x[:2] += np.float32(100 * scale)
    w, b, g = (rng.standard_normal(s).astype(np.float32) for s in (33, 33, (6, 33)))
    B, up = any_backend, any_backend.from_numpy
    y, mean, rstd = B.layernorm(up(x), up(w), up(b), 1e-5)
    dx, dw, db = (B.to_numpy(a) for a in B.layernorm_bwd(up(x), up(w), mean, rstd, up(g)))
    tx, tw, tb = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, w, b))
    ty = torch.nn.functional.layer_norm(tx, (33,), tw, tb, 1e-5)
    ty.backward(torch.tensor(g, dtype=torch.float64))
    for name, got, want in (("y", B.to_numpy(y), ty), ("dx", dx, tx.grad), ("dw", dw, tw.grad), ("db", db, tb.grad)):
        want = want.detach().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()), err_msg=name)


def test_layernorm_backward_of_a_single_column_is_exactly_zero(any_backend):
    """Over one feature x - mean is 0 whatever x: the input's gradient is exactly 0 on numpy (the row mean
    subtracted is the mean of the very terms it is subtracted from), while w's is 0 and b's is g's sum."""
    rng = np.random.default_rng(9)
    x, g = (rng.standard_normal((7, 1)).astype(np.float32) * 50 for _ in range(2))
    w, b = np.float32([[-3.7]]).reshape(1), np.float32([0.5])
    B, up = any_backend, any_backend.from_numpy
    y, mean, rstd = B.layernorm(up(x), up(w), up(b), 1e-5)
    dx, dw, db = (B.to_numpy(a) for a in B.layernorm_bwd(up(x), up(w), mean, rstd, up(g)))
    np.testing.assert_array_equal(B.to_numpy(y), np.full((7, 1), 0.5, np.float32))
    if B.name == "numpy":
        np.testing.assert_array_equal(dx, 0)
    else:
        # a GPU's compiler may fuse g w - mean(g w) into one multiply-add (NVIDIA's does: WGSL cannot forbid it),
        # which leaves the product's rounding error (half an ulp of g w), times rstd = 1/sqrt(eps) here
        gw = np.abs(g * w).astype(np.float64)
        # (and a second half ulp for the last product's own rounding)
        bound = B.to_numpy(rstd).astype(np.float64).reshape(7, 1) * gw * 2.0 ** -23
        assert (np.abs(dx) <= bound).all(), (dx, bound)
    np.testing.assert_array_equal(dw, 0)
    np.testing.assert_allclose(db, g.sum(0), rtol=1e-6)


@pytest.mark.parametrize("V,C,N", [(73, 384, 5000), (1100, 1000, 300)], ids=["small-vocab", "large-vocab"])
def test_embedding_backward_paths_match_numpy(wgpu_backend, numpy_backend, V, C, N):
    rng = np.random.default_rng(3)
    idx = rng.integers(0, V, size=(N,)).astype(np.int32)
    idx[:7] = 5  # repeated rows must accumulate
    g = rng.standard_normal((N, C)).astype(np.float32)
    got = wgpu_backend.to_numpy(wgpu_backend.embedding_bwd(wgpu_backend.from_numpy(idx), wgpu_backend.from_numpy(g), V))
    np.testing.assert_allclose(got, numpy_backend.embedding_bwd(idx, g, V), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("M, N", [(0, 64), (64, 0), (0, 0)])
def test_a_product_with_no_rows_or_columns_is_empty_and_so_are_its_gradients(use_backend, M, N):
    # a K long enough to split was planned with a division by the (zero) count of output tiles
    import lab
    a = lab.tensor(np.ones((M, 512), np.float32), requires_grad=True)
    b = lab.tensor(np.ones((512, N), np.float32), requires_grad=True)
    y = a @ b
    assert y.numpy().shape == (M, N)
    y.sum().backward()
    np.testing.assert_array_equal(a.grad.numpy(), np.zeros((M, 512)))
    np.testing.assert_array_equal(b.grad.numpy(), np.zeros((512, N)))


@pytest.mark.parametrize("trans_a,trans_b", [(False, True), (True, False)])
@pytest.mark.parametrize("batch_a,batch_b", [(7, 7), (7, 1), (1, 7)])
def test_a_batch_of_more_products_than_the_grid_has_workgroups_runs_in_chunks(wgpu_backend, numpy_backend, monkeypatch,
                                                                              trans_a, trans_b, batch_a, batch_b):
    """A batch beyond max-compute-workgroups-per-dimension (grid z) was one error (70,000 products of 2 x 2); it runs
    in chunks of that many, here 3 (a limit lowered so that tiny shapes reach it), with and without a bias, split
    along K too (K = 300)."""
    from lab.engine.wgpu.matmul_plan import Limits
    monkeypatch.setitem(wgpu_backend.__dict__, "_matmul_limits", Limits(max_workgroups=3))
    rng = np.random.default_rng(7)
    for M, N, K in ((2, 3, 5), (5, 2, 300)):
        a = rng.standard_normal((batch_a,) + ((K, M) if trans_a else (M, K))).astype(np.float32)
        b = rng.standard_normal((batch_b,) + ((N, K) if trans_b else (K, N))).astype(np.float32)
        bias = rng.standard_normal(N).astype(np.float32)
        up, down = wgpu_backend.from_numpy, wgpu_backend.to_numpy
        want = numpy_backend.matmul(a, b, trans_a, trans_b)
        np.testing.assert_allclose(down(wgpu_backend.matmul(up(a), up(b), trans_a, trans_b)), want, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(down(wgpu_backend.matmul(up(a), up(b), trans_a, trans_b, bias=up(bias))),
                                   want + bias, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("batch_a,batch_b", [(1, 1), (3, 1), (3, 3)])
def test_split_k_matmul_matches_numpy(wgpu_backend, numpy_backend, trans_a, trans_b, batch_a, batch_b):
    """Small outputs with a long K take the split-K path (partial products summed on the device); K = 3000 is
    not a multiple of the chunk, so the last chunk is partial."""
    rng = np.random.default_rng(4)
    M, N, K = 70, 40, 3000
    a = rng.standard_normal((batch_a,) + ((K, M) if trans_a else (M, K))).astype(np.float32)
    b = rng.standard_normal((batch_b,) + ((N, K) if trans_b else (K, N))).astype(np.float32)
    up = wgpu_backend.from_numpy
    got = wgpu_backend.to_numpy(wgpu_backend.matmul(up(a), up(b), trans_a, trans_b))
    want = numpy_backend.matmul(a, b, trans_a, trans_b)
    assert got.shape == want.shape == (max(batch_a, batch_b), M, N)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-3)


def test_kernels_compile_without_runtime_checks_unless_asked(wgpu_backend, monkeypatch):
    """The kernels are compiled through wgpu-native's trusted entry point (naga's index clamps and loop counters
    cost the matmuls 15-25% on the H200); a wgpu that stops exposing it would silently lose that, so the entry
    point must be there. LAB_SHADER_CHECKS=1 (SHADER_CHECKS) compiles them with the checks."""
    from lab.engine.kernels import source
    made = []
    trusted = wgpu_backend._trusted_module
    monkeypatch.setattr(wgpu_backend, "_trusted_module", lambda *a: made.append(a[1]) or trusted(*a))
    assert wgpu_backend._shader_module(source("copy"), "copy") is not None and made == ["copy"]
    assert trusted(source("copy"), "copy").__class__.__name__ == "GPUShaderModule"
    monkeypatch.setattr(wgpu_backend, "SHADER_CHECKS", True)
    assert wgpu_backend._shader_module(source("copy"), "copy") is not None and made == ["copy"]
    # a kernel that does not compile says why, as through the checked entry point
    with pytest.raises(Exception, match="parsing error"):
        trusted("@compute @workgroup_size(1) fn main() { let x: u32 = 1.5; }", "broken")


def test_profile_times_every_dispatch(wgpu_backend):
    import lab
    x = lab.tensor(np.ones((64, 3000), np.float32), backend=wgpu_backend)
    with lab.profile(wgpu_backend) as prof:
        y = lab.matmul(x, x, transpose_b=True)
    np.testing.assert_allclose(y.numpy(), 3000.0)
    rows = prof.by_kernel(detail=True)
    assert any(r["name"].startswith("matmul NT 1x64x64x3000 split") for r in rows), rows
    # the split product, then the sum of its slices (one or two passes)
    assert sum(r["calls"] for r in rows if r["name"].startswith("matmul")) == 1
    assert all(r["name"].startswith(("matmul", "reduce")) for r in rows) and len(rows) >= 2
    assert all(r["total_ms"] >= 0 for r in rows) and prof.total_ms > 0
    assert "matmul:main" in prof.table()


def test_numpy_profile_times_primitives(numpy_backend):
    import lab
    x = lab.tensor(np.ones((8, 16), np.float32), backend=numpy_backend, requires_grad=True)
    with lab.profile(numpy_backend) as prof:
        (lab.matmul(x, x, transpose_b=True).relu().sum()).backward()
    names = {r["name"] for r in prof.by_kernel()}
    assert "matmul" in names and "unary:relu" in names, names
    assert "matmul" not in numpy_backend.__dict__, "profiling must restore the backend's methods"


@pytest.mark.parametrize("rows", [False, True], ids=["main", "main_rows"])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul_entry_points_match_numpy(wgpu_backend, numpy_backend, monkeypatch, rows, trans_a, trans_b):
    """Both A-staging variants on ragged shapes (no dimension a multiple of the tile)."""
    _tune(monkeypatch, wgpu_backend, MATMUL_ROWS=rows)
    rng = np.random.default_rng(5)
    M, N, K = 139, 71, 53
    a = rng.standard_normal((2,) + ((K, M) if trans_a else (M, K))).astype(np.float32)
    b = rng.standard_normal((2,) + ((N, K) if trans_b else (K, N))).astype(np.float32)
    up = wgpu_backend.from_numpy
    got = wgpu_backend.to_numpy(wgpu_backend.matmul(up(a), up(b), trans_a, trans_b))
    np.testing.assert_allclose(got, numpy_backend.matmul(a, b, trans_a, trans_b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("batch_a,batch_b,K", [(1, 1, 48), (2, 2, 32), (3, 1, 16), (1, 1, 2064)],
                         ids=["single", "batched", "broadcast", "split-k"])
@pytest.mark.parametrize("M,N,tiles", [(256, 128, "_wide"), (128, 64, "128"), (192, 128, "")],
                         ids=["128x128-tiles", "128-row-tiles", "64-row-tiles"])
def test_aligned_matmul_matches_numpy(wgpu_backend, numpy_backend, trans_a, trans_b, batch_a, batch_b, K, M, N,
                                      tiles, monkeypatch):
    """Whole-tile shapes take the unchecked vec4 kernels (matmul_aligned.wgsl): 128 x 128 or 128-row tiles where M
    and N allow (and, on a GPU, the product is large), else 64; a long K also splits; a bias is added as tiles are
    stored; a transposed B is staged transposed by the 128 x 128 kernels, copied transposed for the others."""
    _tune(monkeypatch, wgpu_backend, ROW128_MIN_TILES=0, WIDE_MIN_TILES=0 if tiles == "_wide" else 1 << 30)
    got, want, prof = _matmul_with_bias(wgpu_backend, numpy_backend, 7, trans_a, trans_b, batch_a, batch_b, M, N, K)
    # the 128 x 128 kernels stage a transposed B themselves; the others take a transposed copy of it
    entry = ("t" if trans_a else "n") + ("t" if trans_b and tiles == "_wide" else "n") + tiles
    assert any(name == f"matmul_aligned:{entry}" for name, _, _ in prof.records), [n for n, _, _ in prof.records]
    copies = [name for name, _, _ in prof.records if name.startswith("copy")]
    assert len(copies) == (trans_b and tiles != "_wide"), copies
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-3)


def _matmul_with_bias(wgpu_backend, numpy_backend, seed, trans_a, trans_b, batch_a, batch_b, M, N, K,
                      dtypes=(np.float32, np.float32)):
    """(wgpu's a @ b + bias, numpy's, the profile of wgpu's) for random operands stored as the flags say."""
    import lab
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((batch_a,) + ((K, M) if trans_a else (M, K))).astype(dtypes[0])
    b = rng.standard_normal((batch_b,) + ((N, K) if trans_b else (K, N))).astype(dtypes[1])
    bias = rng.standard_normal(N).astype(np.float32)
    up = wgpu_backend.from_numpy
    with lab.profile(wgpu_backend) as prof:
        got = wgpu_backend.to_numpy(wgpu_backend.matmul(up(a), up(b), trans_a, trans_b, bias=up(bias)))
    return got, numpy_backend.matmul(a, b, trans_a, trans_b, bias=bias), prof


@pytest.mark.parametrize("path,trans_a,trans_b,M,N,K,direct", [
    ("128x128-tiles", False, False, 256, 128, 48, True), ("128x128-tiles", False, True, 256, 128, 48, True),
    ("128x128-tiles", True, False, 256, 128, 48, True), ("128-row-tiles", False, False, 128, 64, 32, True),
    ("64-row-tiles-split-k", True, False, 192, 64, 2064, True),
    ("transposed-copy", False, True, 128, 64, 32, False), ("bounds-checked", False, True, 70, 50, 33, False),
    ("thin", False, False, 4096, 8, 64, False), ("padded", False, True, 250, 130, 70, False)])
@pytest.mark.parametrize("half", ["b", "a-and-b"])
def test_f16_storage_matmul_matches_numpy(wgpu_backend, numpy_backend, monkeypatch, path, trans_a, trans_b, M, N, K,
                                          direct, half):
    """float16 operands (frozen weights stored at half the memory) multiply in float32 arithmetic: the whole-tile
    kernels read them as they are (matmul_aligned.wgsl with f16 A_ELEM / B_ELEM), every other path through a
    widened float32 copy (cast.wgsl); numpy's reference widens them likewise. Skipped without shader-f16."""
    if not wgpu_backend.half_storage:
        pytest.skip("this device has no shader-f16")
    _tune(monkeypatch, wgpu_backend, ROW128_MIN_TILES=0, WIDE_MIN_TILES=0 if path == "128x128-tiles" else 1 << 30)
    if path == "padded":
        _tune(monkeypatch, wgpu_backend, PAD_MIN_VOLUME=0, PAD_MAX_WORK=100.0)
    dtypes = (np.float16 if half == "a-and-b" else np.float32, np.float16)
    got, want, prof = _matmul_with_bias(wgpu_backend, numpy_backend, 21, trans_a, trans_b, 1, 1, M, N, K, dtypes)
    names = [name for name, _, _ in prof.records]
    widened = names.count("cast:widen_main")
    # the transposed copy widens B only (A is read as it is); the other indirect paths widen every f16 operand
    assert widened == (0 if direct else 1 if path == "transposed-copy" else len(half.split("-and-"))), names
    if direct:
        assert ("matmul_aligned", names[0].split(":")[1], (("ENABLE", "enable f16;"), ("A_ELEM", "f16" if half ==
                "a-and-b" else "f32"), ("B_ELEM", "f16"), ("SUMS", "false"), ("GELU_GRAD", "false"))) in \
            wgpu_backend._pipelines, names
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-3)


def test_f16_storage_is_for_frozen_weights_only(wgpu_backend):
    """A float16 tensor cannot require gradients, and a kernel that reads 32-bit values refuses one by name
    (rather than reading its halves as floats)."""
    import lab
    with pytest.raises(ValueError, match="cannot require gradients"):
        lab.tensor(np.ones(3), dtype="float16", requires_grad=True, backend=wgpu_backend)
    if not wgpu_backend.half_storage:
        pytest.skip("this device has no shader-f16")
    w = lab.tensor(np.arange(7) / 8, dtype="float16", backend=wgpu_backend)
    assert w.dtype == "float16" and w.data.storage.nbytes == 256   # 14 bytes, in the pool's smallest buffer
    np.testing.assert_array_equal(w.numpy(), (np.arange(7) / 8).astype(np.float16))
    with pytest.raises(ValueError, match="float16 tensors are storage for frozen weights"):
        (w * 2.0).numpy()


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("batch_a,batch_b,M,N,K", [(1, 1, 250, 381, 300), (2, 2, 256, 130, 70), (1, 1, 200, 128, 64),
                                                   (3, 1, 128, 256, 77)],
                         ids=["all-ragged", "batched", "rows-only", "k-only-broadcast"])
def test_large_ragged_matmul_runs_padded_to_whole_tiles(wgpu_backend, numpy_backend, monkeypatch, trans_a, trans_b,
                                                        batch_a, batch_b, M, N, K):
    """A large product whose sizes are not whole tiles (a GPT-2 output layer: N = 50257) runs as its zero-padded
    whole-tile product and is cut back (here with the size threshold lowered): the same values as numpy, with a
    bias, whichever of M, N, K is ragged, batched or with B shared by the batch."""
    _tune(monkeypatch, wgpu_backend, PAD_MIN_VOLUME=0, PAD_MAX_WORK=100.0)
    got, want, prof = _matmul_with_bias(wgpu_backend, numpy_backend, 16, trans_a, trans_b, batch_a, batch_b, M, N, K)
    assert got.shape == (max(batch_a, batch_b), M, N)
    assert any(name.startswith("matmul_aligned") for name, _, _ in prof.records), [n for n, _, _ in prof.records]
    assert not any(name.startswith("matmul:") for name, _, _ in prof.records)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("M,N,K", [(700, 8, 384), (130, 3, 5000), (8, 300, 2000), (16, 70, 33), (900, 500, 8),
                                   (37, 29, 5)],
                         ids=["thin-n", "thin-n-split", "thin-m-split", "thin-m", "thin-k", "thin-k-ragged"])
def test_thin_matmuls_match_numpy(wgpu_backend, numpy_backend, monkeypatch, trans_a, trans_b, M, N, K):
    """Products with M, N or K up to 16 (LoRA's rank-r products) take the thin kernels (here from any size): N or
    M thin by matmul_thin.wgsl through strides (M thin computed transposed), split along a long K; K thin (not
    transposed) by lora.wgsl's up_add_t_main without its base."""
    import lab
    _tune(monkeypatch, wgpu_backend, THIN_MIN_VOLUME=0, ROWS_MAX=0)   # (up to 16 rows would take matmul_rows.wgsl)
    rng = np.random.default_rng(17)
    a = rng.standard_normal((1,) + ((K, M) if trans_a else (M, K))).astype(np.float32)
    b = rng.standard_normal((1,) + ((N, K) if trans_b else (K, N))).astype(np.float32)
    up = wgpu_backend.from_numpy
    with lab.profile(wgpu_backend) as prof:
        got = wgpu_backend.to_numpy(wgpu_backend.matmul(up(a), up(b), trans_a, trans_b))
    names = [name for name, _, _ in prof.records]
    if min(M, N) <= 16:
        assert "matmul_thin:main" in names, names
    elif not (trans_a or trans_b):
        assert "lora:up_add_t_main" in names, names
    np.testing.assert_allclose(got, numpy_backend.matmul(a, b, trans_a, trans_b), rtol=1e-4, atol=1e-3)


def _heads_of(x, offset, heads, dim):
    """The (B * heads, T, dim) stack of head matrices inside x (B, T, W), taken apart plainly in numpy."""
    Bsz, T, _ = x.shape
    part = x[:, :, offset:offset + heads * dim].reshape(Bsz, T, heads, dim)
    return part.transpose(0, 2, 1, 3).reshape(Bsz * heads, T, dim)


@pytest.mark.parametrize("layout", ["nn", "tn", "nt", "tt"])
@pytest.mark.parametrize("T,D,tiles", [(128, 128, "_wide"), (128, 64, "128"), (192, 64, "")],
                         ids=["128x128-tiles", "128-row-tiles", "64-row-tiles"])
def test_matmul_reads_and_writes_heads_in_place(any_backend, layout, T, D, tiles, monkeypatch):
    """Attention's products on HeadViews: q, k, v read where they lie in a packed (B, T, 3C) buffer, the product
    written into its heads' columns of a (B, T, C) one (every other column untouched), with no copies on wgpu
    except the transposed B the 64-column kernels take. Shapes as attention's: A (T, T) with B a view (T, D) and
    the result a view (nn, tn), or A and B both views (T, D), B transposed, and the result (T, T) (nt, tt)."""
    import lab
    from lab.engine.backend import HeadView
    B_ = any_backend
    if B_.name == "wgpu":
        _tune(monkeypatch, B_, ROW128_MIN_TILES=0, WIDE_MIN_TILES=0 if tiles == "_wide" else 1 << 30)
    rng = np.random.default_rng(13)
    Bsz, H = 2, 2
    trans_a, trans_b = layout[0] == "t", layout[1] == "t"
    packed = rng.standard_normal((Bsz, T, 3 * H * D + 4)).astype(np.float32)  # 4 spare columns at the end
    C = H * D
    square = np.tril(rng.standard_normal((Bsz * H, T, T))).astype(np.float32)
    up = B_.from_numpy
    packed_d = up(packed)
    q, k, v = (HeadView(packed_d, i * C, H, D) for i in range(3))
    with lab.profile(B_) as prof:
        if trans_b:   # q k^T: both operands in place
            a = q if not trans_a else None
            if trans_a:  # A stored (K, M) = (D, T) per head: a plain stack, as a layout test of tt
                a_np = np.ascontiguousarray(_heads_of(packed, 0, H, D).transpose(0, 2, 1))
                a = up(a_np)
            got = B_.to_numpy(B_.matmul(a, k, trans_a, True))
            want = _heads_of(packed, 0, H, D) @ _heads_of(packed, C, H, D).transpose(0, 2, 1)
        else:         # att v into y's columns: the result in place
            dest_np = np.full((Bsz, T, C + 8), 7.0, np.float32)
            dest = up(dest_np)
            B_.matmul(up(square), v, trans_a, False, out=HeadView(dest, 4, H, D))
            got_full = B_.to_numpy(dest)
            a_np = square.transpose(0, 2, 1) if trans_a else square
            want = a_np @ _heads_of(packed, 2 * C, H, D)
            got = _heads_of(got_full, 4, H, D)
            assert (got_full[:, :, :4] == 7).all() and (got_full[:, :, 4 + C:] == 7).all(), "columns outside the heads"
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-3)
    if B_.name == "wgpu":
        names = [name for name, _, _ in prof.records]
        entry = layout[0] + ("t" if trans_b and tiles == "_wide" else "n") + tiles
        assert f"matmul_aligned:{entry}" in names, names
        copies = [n for n in names if n.startswith("copy")]
        assert len(copies) == (trans_b and tiles != "_wide"), names


def test_matmul_on_heads_that_no_whole_tile_kernel_takes_copies_them(wgpu_backend, numpy_backend):
    """Ragged shapes (T 40, heads of 12) gather the heads, run the bounds-checked kernel and scatter the result."""
    from lab.engine.backend import HeadView
    rng = np.random.default_rng(14)
    packed = rng.standard_normal((3, 40, 72)).astype(np.float32)
    square = rng.standard_normal((6, 40, 40)).astype(np.float32)
    results = []
    for B_ in (wgpu_backend, numpy_backend):
        dest = B_.from_numpy(np.zeros((3, 40, 24), np.float32))
        B_.matmul(B_.from_numpy(square), HeadView(B_.from_numpy(packed), 48, 2, 12), out=HeadView(dest, 0, 2, 12))
        results.append(B_.to_numpy(dest))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_heads_of(results[1], 0, 2, 12), square @ _heads_of(packed, 48, 2, 12), rtol=1e-5)


@pytest.mark.parametrize("down_matmul,up_t", [(False, False), (True, True)], ids=["lora-kernels", "tiled-and-bt"])
def test_lora_forward_kernels_match_numpy(wgpu_backend, numpy_backend, monkeypatch, down_matmul, up_t):
    """LoRA's forward both ways: lora.wgsl's kernels on A and B as stored, and (the default) H = x A^T by the
    matmul kernels with the up-projection reading B transposed; on ragged and whole shapes."""
    import lab
    monkeypatch.setattr(wgpu_backend, "LORA_DOWN_MATMUL", down_matmul)
    monkeypatch.setattr(wgpu_backend, "LORA_UP_TRANSPOSED", up_t)
    rng = np.random.default_rng(15)
    for M, K, N, r in ((37, 29, 44, 3), (256, 384, 1152, 8)):
        x, a, b, base = (rng.standard_normal(s).astype(np.float32) for s in ((M, K), (r, K), (N, r), (M, N)))
        up, down = wgpu_backend.from_numpy, wgpu_backend.to_numpy
        with lab.profile(wgpu_backend) as prof:
            h = wgpu_backend.lora_down(up(x), up(a))
            y = down(wgpu_backend.lora_up_add(up(base), h, up(b), 0.5))
        names = [name for name, _, _ in prof.records]
        assert ("lora:down_main" in names) != down_matmul and ("lora:up_add_t_main" in names) == up_t, names
        np.testing.assert_allclose(down(h), numpy_backend.lora_down(x, a), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(y, numpy_backend.lora_up_add(base, numpy_backend.lora_down(x, a), b, 0.5),
                                   rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def subgroup_reductions(wgpu_backend):
    """A second wgpu backend whose row kernels reduce through subgroup operations (LAB_SUBGROUPS=1), beside the
    session's, which uses the shared-memory tree (the default)."""
    from lab.engine.wgpu import WgpuBackend

    class SubgroupReductions(WgpuBackend):
        SUBGROUPS = True
    return SubgroupReductions()


def test_subgroup_reductions_where_asked_and_the_device_has_them(wgpu_backend, subgroup_reductions):
    """lavapipe has the `subgroup` feature with its subgroups over consecutive invocations (subgroup_probe.wgsl),
    so CI tests the subgroup reductions as well as the default tree."""
    assert not wgpu_backend.subgroup_reductions and wgpu_backend._includes == ()
    assert subgroup_reductions.subgroup_reductions == ("subgroup" in subgroup_reductions.features)
    if subgroup_reductions.subgroup_reductions:
        from lab.engine.kernels import specialize
        assert "subgroupAdd" in specialize("softmax", subgroup_reductions._includes, RWG=64)
        assert "subgroupAdd" not in specialize("softmax", RWG=64)


@pytest.mark.parametrize("reduction", ["tree", "subgroup"])
@pytest.mark.parametrize("n", [7, 384, 1500], ids=["short", "model", "long"])
def test_row_kernels_at_both_workgroup_sizes(wgpu_backend, subgroup_reductions, numpy_backend, n, reduction):
    """Rows up to 1024 run on 64 threads, longer ones on 256 (softmax, layernorm, cross-entropy), reducing through
    the shared-memory tree or (where the device has them) subgroup operations."""
    wgpu_backend = wgpu_backend if reduction == "tree" else subgroup_reductions
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, n)).astype(np.float32)
    g = rng.standard_normal((5, n)).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    up, down = wgpu_backend.from_numpy, wgpu_backend.to_numpy
    y = numpy_backend.softmax(x, 0.5)
    np.testing.assert_allclose(down(wgpu_backend.softmax(up(x), 0.5)), y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(down(wgpu_backend.softmax_bwd(up(y), up(g), 0.5)), numpy_backend.softmax_bwd(y, g, 0.5),
                               rtol=1e-4, atol=1e-6)
    got = [down(a) for a in wgpu_backend.layernorm(up(x), up(w), up(b), 1e-5)]
    want = numpy_backend.layernorm(x, w, b, 1e-5)
    for a, e in zip(got, want):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)
    dx = down(wgpu_backend.layernorm_bwd(up(x), up(w), up(want[1]), up(want[2]), up(g))[0])
    np.testing.assert_allclose(dx, numpy_backend.layernorm_bwd(x, w, want[1], want[2], g)[0], rtol=1e-3, atol=1e-4)
    t = rng.integers(0, n, 5).astype(np.int32)
    loss, _ = wgpu_backend.cross_entropy(up(x), up(t), -100)
    np.testing.assert_allclose(down(loss), numpy_backend.cross_entropy(x, t, -100)[0], rtol=1e-5)
    total = down(wgpu_backend.sumsq_many([up(x), up(g), up(w)]))   # the gradient norm's partial sums
    np.testing.assert_allclose(total, [sum(np.square(v.astype(np.float64)).sum() for v in (x, g, w))], rtol=1e-5)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("B,T,C,H", [(2, 7, 12, 3), (2, 64, 128, 2)], ids=["ragged", "heads-in-place"])
def test_fused_self_attention_equals_the_composed_ops(any_backend, dropout_p, B, T, C, H):
    """causal_self_attention (one node, packed qkv; the heads read in place where the kernels allow, the dropout
    applied by the softmax kernels) against split + permute + attention + permute (softmax, then dropout by a
    pass of its own), forward and backward, with the same dropout mask."""
    import lab
    from lab.engine import ops as F
    from lab.engine.random import get_state, set_state
    rng = np.random.default_rng(9)
    x = rng.standard_normal((B, T, 3 * C)).astype(np.float32)
    g = rng.standard_normal((B, T, C)).astype(np.float32)
    state = get_state()
    results = []
    for fused in (True, False):
        set_state(state)
        qkv = lab.tensor(x, backend=any_backend, requires_grad=True)
        if fused:
            y, att = F.causal_self_attention(qkv, H, dropout_p, True, return_weights=True)
        else:
            q, k, v = (t.reshape(B, T, H, C // H).permute(0, 2, 1, 3) for t in F.split(qkv, C, axis=2))
            y, att = F.scaled_dot_product_attention(q, k, v, causal=True, dropout_p=dropout_p, training=True,
                                                    return_weights=True)
            y = y.permute(0, 2, 1, 3).reshape(B, T, C)
        (y * lab.tensor(g, backend=any_backend)).sum().backward()
        results.append((y.numpy(), att.numpy(), qkv.grad.numpy()))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_embedding_backward_of_a_large_table(wgpu_backend, numpy_backend):
    """A table beyond the per-chunk kernel's size (V C > 2^20, as GPT-2's 50257 x 768): embedding.wgsl's
    links_main and chain_main, each position linked to the next with its token and each token's chain summed
    in order from its first position; repeated tokens, tokens at both ends of the table, a negative index
    skipped, rows of tokens not in the batch zero."""
    rng = np.random.default_rng(18)
    V, C, N = 4099, 260, 700
    idx = rng.integers(0, V, N).astype(np.int32)
    idx[:40] = 7                                   # one token many times
    idx[40], idx[41], idx[42] = 0, V - 1, -1
    g = rng.standard_normal((N, C)).astype(np.float32)
    import lab
    with lab.profile(wgpu_backend) as prof:
        got = wgpu_backend.to_numpy(wgpu_backend.embedding_bwd(wgpu_backend.from_numpy(idx), wgpu_backend.from_numpy(g),
                                                               V))
    assert [n for n, _, _ in prof.records] == ["copy:fill_main", "embedding:links_main", "embedding:chain_main"]
    want = np.zeros((V, C), np.float32)
    keep = idx >= 0
    np.add.at(want, idx[keep], g[keep])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# The numpy backend's fast paths (BLAS reductions, one-hot and sorted embedding gradients, in-place AdamW) against
# the plain numpy formulas they replace; the finite-difference checks above cover only small shapes.
@pytest.mark.parametrize("V,N", [(73, 700), (5000, 900)], ids=["one-hot", "sorted-runs"])
def test_numpy_embedding_backward_paths(numpy_backend, V, N, monkeypatch):
    import lab.engine.numpy_backend as nb
    rng = np.random.default_rng(3)
    idx, g = rng.integers(0, V, N).astype(np.int32), rng.standard_normal((N, 16)).astype(np.float32)
    idx[:50] = 7                                                # a long run of one token
    want = np.zeros((V, 16), np.float32)
    np.add.at(want, idx, g)
    if V > 100:
        monkeypatch.setattr(nb, "ONE_HOT_LIMIT", 0)
    np.testing.assert_allclose(numpy_backend.embedding_bwd(idx, g, V), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,axis", [((6, 70), 1), ((70, 6), 0), ((1, 300, 5), 1), ((3, 4, 5), 1), ((5,), 0),
                                        ((0, 4), 0), ((4, 0), 1)])
def test_numpy_sum_fast_paths(numpy_backend, shape, axis):
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    got = numpy_backend.reduce("sum", x, axis)
    np.testing.assert_allclose(got, x.sum(axis=axis), rtol=1e-5, atol=1e-5)
    assert got.shape == x.sum(axis=axis).shape
    assert not np.shares_memory(got, x), "a reduction must not alias its input (gradients are updated in place)"


def test_numpy_adamw_matches_the_formula(numpy_backend):
    rng = np.random.default_rng(5)
    p, g = rng.standard_normal(1000), rng.standard_normal(1000)
    m, v = rng.standard_normal(1000) * 0.1, rng.random(1000) * 0.1
    check_numpy_adamw(numpy_backend, p, g, m, v, step=7)


@pytest.mark.parametrize("trans_a", [False, True], ids=["nn", "tn"])
@pytest.mark.parametrize("T,tm,tn", [(256, 128, 128), (256, 128, 64), (192, 64, 64)],
                         ids=["128x128-tiles", "128-row-tiles", "64-row-tiles"])
def test_triangle_hints_skip_only_what_is_zero(wgpu_backend, numpy_backend, trans_a, T, tm, tn, monkeypatch):
    """Causal attention's products: with A lower triangular the skipped tiles are exactly the zero ones; with
    triangle="out" the lower triangle is exact and the tiles above the diagonal come back as zeros."""
    import lab
    _tune(monkeypatch, wgpu_backend, ROW128_MIN_TILES=0, WIDE_MIN_TILES=0 if tn == 128 else 1 << 30)
    rng = np.random.default_rng(11)
    lower = np.tril(rng.standard_normal((3, T, T))).astype(np.float32)
    v = rng.standard_normal((3, T, 64)).astype(np.float32)
    up = wgpu_backend.from_numpy
    with lab.profile(wgpu_backend) as prof:
        got = wgpu_backend.to_numpy(wgpu_backend.matmul(up(lower), up(v), trans_a, False, triangle="a"))
    assert any("a-triangle" in label for _, label, _ in prof.records)
    np.testing.assert_allclose(got, numpy_backend.matmul(lower, v, trans_a), rtol=1e-4, atol=1e-3)
    q, k = rng.standard_normal((2, 3, T, 64)).astype(np.float32)
    with lab.profile(wgpu_backend) as prof:
        s = wgpu_backend.to_numpy(wgpu_backend.matmul(up(q), up(k), False, True, triangle="out"))
    assert any(name.endswith("_wide") for name, _, _ in prof.records) == (tn == 128)
    full = numpy_backend.matmul(q, k, False, True)
    keep = np.tril(np.ones((T, T), bool))
    np.testing.assert_allclose(s[:, keep], full[:, keep], rtol=1e-4, atol=1e-3)
    i, j = np.indices((T, T))
    above = (j // tn) * tn >= (i // tm + 1) * tm
    assert above.any() and (s[:, above] == 0).all()


def test_f32bits_matches_numpy_including_out_of_range():
    from lab.engine.wgpu.common import _f32bits
    for x in (0.1, 1e-3, -2.5, 3, float("inf"), -float("inf"), 1e39, -1e39, 3.4028235e38, 1e-45, 0.0, -0.0):
        with np.errstate(over="ignore"):
            assert _f32bits(x) == int(np.array([x], dtype=np.float32).view(np.uint32)[0]), x


def test_linear_gelu_applies_the_activation_in_the_matmul_stores(wgpu_backend, numpy_backend):
    """F.linear(..., activation="gelu") on whole tiles: one matmul dispatch with the GELU epilogue and no pass of
    its own for the activation; the same values and gradients as linear then gelu on numpy."""
    import lab
    from lab.engine import ops as F
    rng = np.random.default_rng(12)
    x_np, w_np, b_np = (rng.standard_normal(s).astype(np.float32) for s in ((2, 64, 32), (32, 128), (128,)))
    g_np = rng.standard_normal((2, 64, 128)).astype(np.float32)
    grads = {}
    for backend in (wgpu_backend, numpy_backend):
        x, w, b = (lab.tensor(v, requires_grad=True, backend=backend) for v in (x_np, w_np, b_np))
        with lab.profile(backend) as prof:
            y = F.linear(x, w, b, activation="gelu") if backend is wgpu_backend else F.linear(x, w, b).gelu()
            (y * lab.tensor(g_np, backend=backend)).sum().backward()
        grads[backend.name] = [y.numpy()] + [t.grad.numpy() for t in (x, w, b)]
        if backend is wgpu_backend:
            names = [name for name, _, _ in prof.records]
            labels = [label for _, label, _ in prof.records]
            assert not any(n == "elementwise:unary_main" for n in names), names
            assert sum("+gelu" in label for label in labels) == 1, labels
    for got, want in zip(grads["wgpu"], grads["numpy"]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    with lab.no_grad():
        x = lab.tensor(x_np, backend=wgpu_backend)
        w, b = lab.tensor(w_np, backend=wgpu_backend), lab.tensor(b_np, backend=wgpu_backend)
        np.testing.assert_allclose(F.linear(x, w, b, activation="gelu").numpy(), grads["numpy"][0], rtol=1e-4,
                                   atol=1e-4)
    with pytest.raises(ValueError, match="activation must be None or 'gelu'"):
        F.linear(x, w, b, activation="relu")


@pytest.mark.parametrize("T,p", [(64, 0.0), (96, 0.3)], ids=["plain", "dropout"])
def test_fused_attention_equals_the_composed_ops(wgpu_backend, numpy_backend, T, p, monkeypatch):
    """With FLASH_ATTENTION (LAB_FLASH_ATTENTION=1), heads of 64 take attention.wgsl's flash-style kernels on wgpu
    (no (T, T) weights in memory, no head split or merge copies): the same output and qkv gradient as the
    composed ops on numpy, the same dropout decisions from the same seed; asking for the weights takes the
    composed path."""
    import lab
    monkeypatch.setattr(wgpu_backend, "FLASH_ATTENTION", True)
    from lab.engine import ops as F
    rng = np.random.default_rng(13)
    qkv_np = rng.standard_normal((2, T, 3 * 128)).astype(np.float32)
    g_np = rng.standard_normal((2, T, 128)).astype(np.float32)
    got, names = {}, {}
    for backend in (wgpu_backend, numpy_backend):
        got[backend.name], names[backend.name] = attention_run(backend, qkv_np, g_np, 2, p=p, seed=3)
    names = set(names["wgpu"])
    assert {"attention:fwd_main", "attention:bwd_kv_main", "attention:bwd_q_main"} <= names, names
    assert not any(n.startswith(("softmax", "matmul", "dropout")) for n in names), names
    for a, b in zip(got["wgpu"], got["numpy"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    with lab.profile(wgpu_backend) as prof:
        y, w = F.causal_self_attention(lab.tensor(qkv_np, backend=wgpu_backend), 2, return_weights=True)
    assert w.shape == (2, 2, T, T) and not any(n.startswith("attention") for n, _, _ in prof.records)
    plain = F.causal_self_attention(lab.tensor(qkv_np, backend=numpy_backend), 2).numpy()  # no dropout here
    np.testing.assert_allclose(y.numpy(), plain, rtol=1e-4, atol=1e-4)


def test_attention_whose_weights_exceed_a_buffer_takes_the_fused_kernels(wgpu_backend, numpy_backend, monkeypatch):
    """Without LAB_FLASH_ATTENTION, a shape whose (B, H, T, T) weights would be larger than the device's
    max-storage-buffer-binding-size (here lowered to between the qkv's bytes and the weights') runs on the fused
    kernels, which never hold them, and gives numpy's output and gradient; asking for the weights then fails
    with the limit named."""
    import lab
    from lab.engine import ops as F
    rng = np.random.default_rng(17)
    qkv_np = rng.standard_normal((1, 256, 3 * 64)).astype(np.float32)     # 196,608 bytes; weights 262,144
    g_np = rng.standard_normal((1, 256, 64)).astype(np.float32)
    assert not wgpu_backend.flash_attention_fits(qkv_np.shape, 1)
    monkeypatch.setattr(wgpu_backend, "max_binding", 200_000)
    assert wgpu_backend.flash_attention_fits(qkv_np.shape, 1)
    got = {}
    for backend in (wgpu_backend, numpy_backend):
        qkv = lab.tensor(qkv_np, requires_grad=True, backend=backend)
        with lab.profile(backend) as prof:
            y = F.causal_self_attention(qkv, 1)
            (y * lab.tensor(g_np, backend=backend)).sum().backward()
        got[backend.name] = (y.numpy(), qkv.grad.numpy())
        if backend is wgpu_backend:
            names = {name for name, _, _ in prof.records}
            assert {"attention:fwd_main", "attention:bwd_q_main"} <= names and "softmax:softmax_main" not in names
    for a, b in zip(got["wgpu"], got["numpy"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="max-storage-buffer-binding-size"):
        F.causal_self_attention(lab.tensor(qkv_np, backend=wgpu_backend), 1, return_weights=True)


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_of_rows_under_a_large_finite_mask_is_uniform_not_nan(any_backend, causal):
    """A left-padded query row sees only padding keys: every score carries the -1e30 padding mask. The kernel once
    computed exp(scale * x - max), which NVIDIA's compiler fused into a multiply-add keeping the product's rounding
    error (~1e22 at this magnitude): exp overflowed and the padded rows went NaN on the H200, then every later layer
    of the row through the cache. Lavapipe does not fuse, so this guards the GPU runs (LAB_REQUIRE_WGPU there)."""
    from lab.engine.ops import softmax
    from lab.engine.tensor import tensor
    rng = np.random.default_rng(0)
    T = 7
    x = (rng.normal(0, 3, (2, 3, T, T)) - 1e30).astype(np.float32)   # (the scores vanish into -1e30's rounding)
    y = softmax(tensor(x, backend=any_backend), scale=0.125, causal=causal).numpy()
    visible = np.tril(np.ones((T, T))) if causal else np.ones((T, T))
    np.testing.assert_allclose(y, np.broadcast_to(visible / visible.sum(-1, keepdims=True), y.shape), rtol=1e-6)


def test_gelu_and_its_gradient_match_torch_across_the_chunks_of_a_large_activation(any_backend):
    """numpy's gelu_and_grad runs its passes GELU_CHUNK elements at a time: an activation of two chunks and a
    ragged end (tails at +-8, where tanh saturates, included) gives PyTorch's tanh GELU and its gradient there, at
    the chunk seams and in the last partial chunk."""
    import torch

    import lab
    from lab.engine.numpy_backend import GELU_CHUNK
    rng = np.random.default_rng(3)
    x_np = (rng.standard_normal((2 * GELU_CHUNK + 37) // 5 * 5) * 3).astype(np.float32).reshape(-1, 5)
    x_np[:4] = [[-8, -3, 0, 3, 8]] * 4
    g_np = rng.standard_normal(x_np.shape).astype(np.float32)
    x = lab.tensor(x_np, requires_grad=True, backend=any_backend)
    y = x.gelu()
    (y * lab.tensor(g_np, backend=any_backend)).sum().backward()
    xt = torch.tensor(x_np, dtype=torch.float64, requires_grad=True)
    yt = torch.nn.functional.gelu(xt, approximate="tanh")
    yt.backward(torch.tensor(g_np, dtype=torch.float64))
    np.testing.assert_allclose(y.numpy(), yt.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x.grad.numpy(), xt.grad.numpy(), rtol=1e-5, atol=1e-5)


def _operand_cases(other):
    """(op name, a call of it with x (2, 3) and one operand made by other(array)): every op taking a second tensor."""
    from lab.engine import ops as F
    w = lambda *s: other(np.ones(s, np.float32))   # noqa: E731
    return [
        ("matmul", lambda x: F.matmul(x, w(3, 4))), ("matmul @", lambda x: x @ w(3, 4)),
        ("linear", lambda x: F.linear(x, w(3, 4))), ("linear bias", lambda x: F.linear(x, F.tensor(np.ones((3, 4)), backend=x.backend), w(4))),
        ("linear residual", lambda x: F.linear(x, F.tensor(np.ones((3, 4)), backend=x.backend), residual=w(2, 4))),
        ("lora_add", lambda x: F.lora_add(x, x, w(2, 3), w(3, 2), 1.0)),
        ("attention", lambda x: F.scaled_dot_product_attention(x.reshape(1, 1, 2, 3), w(1, 1, 2, 3), w(1, 1, 2, 3))),
        ("layer_norm", lambda x: F.layer_norm(x, w(3))), ("rms_norm", lambda x: F.rms_norm(x, w(3))),
        ("embedding", lambda x: F.embedding([0, 1], w(3, 3))), ("concat", lambda x: F.concat([x, w(1, 3)])),
        ("stack", lambda x: F.stack([x, w(2, 3)])), ("add", lambda x: x + w(2, 3)), ("swiglu", lambda x: F.swiglu(x, w(2, 3))),
    ]


def test_an_operand_on_another_backend_is_one_clear_error(wgpu_backend, numpy_backend):
    """matmul (and so attention), linear and lora_add took another backend's tensor as it was: its array reached
    this backend's kernels and failed there ('numpy.ndarray' object has no attribute 'storage')."""
    from lab.engine.tensor import tensor
    for here, there in ((numpy_backend, wgpu_backend), (wgpu_backend, numpy_backend)):
        x = tensor(np.ones((2, 3), np.float32), backend=here, requires_grad=True)
        for name, call in _operand_cases(lambda a: tensor(a, backend=there)):
            if name == "embedding":
                continue   # (its table is the tensor: its own backend's)
            with pytest.raises(ValueError, match=f"{here.name}|{there.name}") as e:
                call(x)
            assert there.name in str(e.value) and here.name in str(e.value), (name, str(e.value))


def test_an_array_where_an_op_needs_a_tensor_is_a_constant_or_one_clear_error(numpy_backend):
    """A numpy array where an op's parameter is read (a norm's weight, an embedding table, lora's A and B, a
    concat's part) failed inside the op with an AttributeError; now ValueError naming the op. The operands that
    arithmetic lifts to constants (matmul's b, add's, linear's weight and bias as matmul's) give the product."""
    from lab.engine.tensor import tensor
    x = tensor(np.ones((2, 3), np.float32), backend=numpy_backend)
    lifted = {"matmul", "matmul @", "linear", "linear bias", "linear residual", "attention", "add", "swiglu"}
    for name, call in _operand_cases(lambda a: a):
        if name in lifted:
            assert call(x).backend is numpy_backend
        else:
            with pytest.raises(ValueError, match=r"expected a Tensor, got a ndarray"):
                call(x)


def test_decode_attention_refuses_rotary_tables_it_cannot_read(any_backend):
    """decode_attention checked q, k, v and the cache but not the rotary tables: int32 tables went to the wgpu
    kernel, which read their bits as floats (1 as 1.4e-45) and returned an output without a word; arrays and
    another backend's tables failed inside it with an AttributeError."""
    from lab.engine import ops as F
    from lab.engine.tensor import no_grad, tensor
    other = "wgpu" if any_backend.name == "numpy" else "numpy"
    H, D = 2, 4
    qkv = tensor(np.ones((1, 1, 4 * D), np.float32), backend=any_backend)
    cache = tuple(tensor(np.zeros((1, 1, 8, D), np.float32), backend=any_backend) for _ in range(2))
    if not F.decode_attention_applies(qkv, D):
        pytest.skip(f"no decode attention kernel on {any_backend.name}")
    ones = np.ones((8, D))
    with no_grad():
        for tables, error in [((tensor(ones.astype(np.int32), backend=any_backend),) * 2, "got dtype int32"),
                              ((ones, ones), "expected a Tensor, got a ndarray")] + (
                [((tensor(ones, backend=other),) * 2, "different backends")] if other != "wgpu" or _has_wgpu() else []):
            with pytest.raises(ValueError, match=f"decode_attention: .*{error}"):
                F.decode_attention(qkv, cache, 2, H, rope=tables)


def _has_wgpu():
    from lab.engine.backend import backend_instance
    try:
        backend_instance("wgpu")
        return True
    except Exception:
        return False


def test_a_float16_operand_of_an_op_other_than_linear_says_linear_reads_it(numpy_backend):
    """matmul refused a float16 operand saying float16 tensors are 'read by linear and matmul only': the error
    contradicted itself. Only linear reads them; the message says so and how to make a float32 copy."""
    from lab.engine import ops as F
    from lab.engine.tensor import tensor
    x = tensor(np.ones((2, 3), np.float32), backend=numpy_backend)
    w = tensor(np.ones((3, 4)), dtype="float16", backend=numpy_backend)
    with pytest.raises(ValueError, match=r"^matmul: float16 tensors .* read by linear \(F.linear, nn.Linear\) only; "
                                         r"lab.tensor\(t.numpy\(\), dtype='float32'\)"):
        F.matmul(x, w)
    np.testing.assert_array_equal(F.linear(x, w).numpy(), np.full((2, 4), 3.0))


def test_softmax_and_lora_add_refuse_a_scale_or_causal_flag_they_cannot_take(any_backend):
    """softmax(scale=None) gave NaN weights on numpy, silently (numpy's float32(None) is NaN), and any truthy causal
    ('no') masked; the wgpu backend failed packing its params ('required argument is not a float'). lora_add's
    scale likewise. Each is one InputError naming the argument, on both backends."""
    from lab.checks import InputError
    from lab.engine import ops as F
    from lab.engine.tensor import tensor
    x = tensor(np.ones((2, 3, 3), np.float32), backend=any_backend)
    for kwargs, error in [({"scale": None}, "softmax: scale must be a finite number, got None"),
                          ({"scale": "2"}, "softmax: scale must be a finite number, got '2'"),
                          ({"scale": float("nan")}, "softmax: scale must be a finite number, got nan"),
                          ({"causal": "no"}, "softmax: causal must be True or False, got 'no'")]:
        with pytest.raises(InputError, match=error):
            F.softmax(x, **kwargs)
    np.testing.assert_allclose(F.softmax(x, scale=np.float32(2.0), causal=np.bool_(True)).numpy()[0, 1],
                               [0.5, 0.5, 0.0], rtol=1e-6)
    a, b = tensor(np.ones((2, 3), np.float32), backend=any_backend), tensor(np.ones((3, 2), np.float32), backend=any_backend)
    with pytest.raises(InputError, match="lora_add: scale must be a finite number, got None"):
        F.lora_add(x, x, a, b, None)
