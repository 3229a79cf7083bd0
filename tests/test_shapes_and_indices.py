"""Indices, axes and 0-D tensors: one semantics (numpy's) and one error per kind of bad input, on both backends."""
import numpy as np
import pytest
import torch

import lab
from lab.engine import ops as F
from lab.engine.backend import IndexRangeError


def _run(f):
    """f() read back to the host: the wgpu backend reports an out-of-range device index at its next readback."""
    out = f()
    return out.numpy()


# ---------------------------------------------------------------------------------------------------- indices


@pytest.mark.parametrize("device", [False, True], ids=["host", "device"])
def test_embedding_out_of_range_index_refused(use_backend, device):
    w = lab.tensor(np.arange(8, dtype=np.float32).reshape(4, 2), requires_grad=True)
    idx = (lambda a: lab.tensor(np.array(a, dtype=np.int32))) if device else (lambda a: np.array(a))
    with pytest.raises(IndexRangeError, match=r"^embedding: index 7 is out of range for a table of 4 rows "
                                              r"\(allowed 0\.\.3\)$"):
        _run(lambda: F.embedding(idx([[0, 7]]), w))
    with pytest.raises(IndexRangeError, match=r"^embedding: index -1 is out of range"):  # no wrap to row 3
        _run(lambda: F.embedding(idx([-1]), w))
    with pytest.raises(ValueError, match=r"^embedding: indices out of range for a table of 4 rows, the lowest -5 "
                                         r"and the highest 9 \(allowed 0\.\.3\)$"):
        _run(lambda: F.embedding(idx([3, -5, 9, 0, 4]), w))
    # the error is reported once: the lookups after it see their own indices only
    np.testing.assert_array_equal(_run(lambda: F.embedding(idx([3, 0]), w)), [[6, 7], [0, 1]])
    np.testing.assert_array_equal(_run(lambda: F.embedding(idx(np.zeros((0,), np.int32)), w)).shape, (0, 2))


def test_host_indices_beyond_int32_refused_before_they_wrap(use_backend):
    w = lab.tensor(np.zeros((4, 2), np.float32))
    with pytest.raises(IndexRangeError, match=f"index {2**32 + 1} is out of range"):  # int32 would make it 1
        F.embedding(np.array([2**32 + 1]), w)


@pytest.mark.parametrize("device", [False, True], ids=["host", "device"])
def test_cross_entropy_target_out_of_range_refused(use_backend, device):
    logits = lab.tensor(np.zeros((3, 4), np.float32), requires_grad=True)
    tgt = (lambda a: lab.tensor(np.array(a, dtype=np.int32))) if device else (lambda a: np.array(a))
    with pytest.raises(IndexRangeError, match=r"^cross_entropy: target 9 is out of range for 4 classes "
                                              r"\(allowed 0\.\.3, or ignore_index=-100\)$"):
        _run(lambda: F.cross_entropy(logits, tgt([1, 9, 2])))
    with pytest.raises(IndexRangeError, match=r"^cross_entropy: targets out of range for 4 classes, the lowest -1 "
                                              r"and the highest 4 \(allowed 0\.\.3, or ignore_index=7\)$"):
        _run(lambda: F.cross_entropy(logits, tgt([-1, 4, 7]), ignore_index=7))
    # ignore_index is the one value outside 0..V-1 allowed: those rows are left out of the mean
    loss = F.cross_entropy(logits, tgt([-100, 2, -100]))
    np.testing.assert_allclose(loss.item(), np.log(4), rtol=1e-6)
    loss.backward()
    g = logits.grad.numpy()
    np.testing.assert_allclose(g[[0, 2]], 0)
    np.testing.assert_allclose(g[1], [0.25, 0.25, -0.75, 0.25], rtol=1e-6)


def test_device_indices_read_back_only_when_unchecked(wgpu_backend):
    """Host indices are checked before their upload, so their lookups add no readback; indices made on the device
    cost one small read (of the error buffer) at the next readback, not one per op."""
    w = lab.tensor(np.ones((4, 2), np.float32), backend=wgpu_backend)
    idx = lab.tensor(np.array([1, 2], np.int32), backend=wgpu_backend)
    wgpu_backend.sync(wait=True)

    def readbacks(f):
        before = wgpu_backend.stats()["readbacks"]
        f()
        return wgpu_backend.stats()["readbacks"] - before
    assert readbacks(lambda: F.embedding(np.array([1, 2]), w).numpy()) == 1
    assert readbacks(lambda: [F.embedding(idx, w) for _ in range(3)][-1].numpy()) == 2
    assert readbacks(lambda: F.embedding(idx, w).numpy() + F.embedding(np.array([0]), w).numpy()) == 3
    F.embedding(idx, w)
    assert readbacks(lambda: wgpu_backend.sync(wait=True)) == 0  # the wait reads the error buffer instead


def test_training_batches_with_out_of_range_tokens_refused(use_backend):
    """A trainer's batches reach the device as int32 tensors (replays write them straight into the captured
    buffers): both inputs and targets are checked on the host first."""
    from lab.train import Trainer, TrainConfig
    lab.manual_seed(0)
    model = lab.TransformerLM(lab.TransformerConfig(vocab_size=5, n_layer=1, n_head=1, n_embd=8, block_size=4))
    ids = np.array([0, 1, 2, 3, 4, 0])  # every batch: x = ids[0:4], y = ids[1:5]
    trainer = Trainer(model, ids, ids, TrainConfig(steps=3, batch_size=1, eval_every=1000, log_every=1000))
    ids[4] = 5  # changed after the Trainer checked its splits: the 5 a target only
    with pytest.raises(ValueError, match=r"(target|token).* 5"):
        trainer.check_finite(*trainer.train_step())
    ids[4] = 4
    for _ in range(3):  # eager, captured, then replayed on wgpu
        trainer.check_finite(*trainer.train_step())
    ids[4] = 5
    with pytest.raises(ValueError, match=r"(target|token).* 5"):
        trainer.check_finite(*trainer.train_step())

# ---------------------------------------------------------------------------------------------------- axes


def test_out_of_range_axis_refused_by_every_op(use_backend):
    x = lab.tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
    calls = {
        "sum": lambda ax: x.sum(ax), "mean": lambda ax: x.mean(ax), "max": lambda ax: x.max(ax),
        "softmax": lambda ax: F.softmax(x, ax), "log_softmax": lambda ax: F.log_softmax(x, ax),
        "concat": lambda ax: F.concat([x, x], ax), "split": lambda ax: F.split(x, 1, ax),
        "permute": lambda ax: x.permute(ax, 0), "transpose": lambda ax: x.transpose(0, ax),
    }
    for op, call in calls.items():
        for ax in (2, 5, -3):
            with pytest.raises(ValueError, match=rf"^{op}: axis {ax} is out of range for a 2-D tensor "
                                                 rf"\(allowed -2\.\.1\)$"):
                call(ax)
    with pytest.raises(ValueError, match=r"^stack: axis 3 is out of range for a 3-D tensor \(allowed -3\.\.2\)$"):
        F.stack([x, x], 3)
    with pytest.raises(ValueError, match=r"^sum: axis \(1, -1\) names an axis twice$"):
        x.sum((1, -1))
    with pytest.raises(ValueError, match=r"^sum: axis 0 is out of range for a 0-D tensor \(a 0-D tensor has no axes"):
        x.sum().sum(0)
    with pytest.raises(ValueError, match=r"^permute: \(1,\) is not a permutation of the 2 axes of \(2, 3\)$"):
        x.permute(1)
    with pytest.raises(ValueError, match=r"^permute: \(1, 1\) is not a permutation"):
        x.permute(1, 1)
    with pytest.raises(ValueError, match=r"^concat: axis must be an integer, got 1.0$"):
        F.concat([x, x], 1.0)
    with pytest.raises(ValueError, match=r"^reshape: sizes must be integers >= 0 with at most one -1"):
        x.reshape(-2, -3)
    # in range, negative axes name the same axes as numpy's
    a = x.numpy()
    assert F.concat([x, x], -1).shape == np.concatenate([a, a], -1).shape
    assert [p.shape for p in F.split(x, 1, -2)] == [(1, 3), (1, 3)]
    assert x.permute(-1, -2).shape == (3, 2)
    np.testing.assert_array_equal(F.stack([x, x], -1).numpy(), np.stack([a, a], -1))

# ---------------------------------------------------------------------------------------------------- 0-D tensors


UNARY = {"neg": (lambda t: -t, torch.neg), "exp": (F.exp, torch.exp), "log": (F.log, torch.log),
         "sqrt": (F.sqrt, torch.sqrt), "tanh": (F.tanh, torch.tanh), "relu": (F.relu, torch.relu),
         "gelu": (F.gelu, lambda t: torch.nn.functional.gelu(t, approximate="tanh")),
         "add_c": (lambda t: t + 2.0, lambda t: t + 2.0), "mul_c": (lambda t: t * 3.0, lambda t: t * 3.0),
         "rsub": (lambda t: 1.0 - t, lambda t: 1.0 - t), "rdiv": (lambda t: 2.0 / t, lambda t: 2.0 / t),
         "pow": (lambda t: t ** 3, lambda t: t ** 3), "sum": (F.sum, torch.sum), "mean": (F.mean, torch.mean),
         "reshape": (lambda t: t.reshape(1, 1), lambda t: t.reshape(1, 1))}
BINARY = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
          "div": lambda a, b: a / b, "maximum": (F.maximum, torch.maximum)}


@pytest.mark.parametrize("name", UNARY)
def test_zero_dim_tensors_same_on_both_backends(use_backend, name):
    """A 0-D input through each op forward and backward: numpy's shape (), torch's values and gradients."""
    ours, theirs = UNARY[name]
    x = lab.tensor(np.float32(0.7), requires_grad=True)
    assert x.shape == ()
    y = ours(x)
    xt = torch.tensor(0.7, requires_grad=True)
    yt = theirs(xt)
    assert y.shape == tuple(yt.shape)
    np.testing.assert_allclose(y.numpy(), yt.detach().numpy(), rtol=1e-5)
    y.sum().backward()
    yt.sum().backward()
    assert x.grad.shape == ()
    np.testing.assert_allclose(x.grad.numpy(), xt.grad.numpy(), rtol=1e-5)


@pytest.mark.parametrize("name", BINARY)
def test_zero_dim_tensors_broadcast_in_binary_ops(use_backend, name):
    op = BINARY[name]
    ours, theirs = op if isinstance(op, tuple) else (op, op)
    for shape in [(), (3,)]:  # 0-D with 0-D, and 0-D broadcast against a vector
        a = lab.tensor(np.float32(0.7), requires_grad=True)
        b = lab.tensor(np.full(shape, 1.3, np.float32), requires_grad=True)
        at, bt = torch.tensor(0.7, requires_grad=True), torch.full(shape, 1.3, requires_grad=True)
        y, yt = ours(a, b), theirs(at, bt)
        assert y.shape == tuple(yt.shape)
        np.testing.assert_allclose(y.numpy(), yt.detach().numpy(), rtol=1e-5)
        y.sum().backward()
        yt.sum().backward()
        assert a.grad.shape == () and b.grad.shape == shape
        np.testing.assert_allclose(a.grad.numpy(), at.grad.numpy(), rtol=1e-5)
        np.testing.assert_allclose(b.grad.numpy(), bt.grad.numpy(), rtol=1e-5)


def test_integer_indexing_drops_axes_like_numpy(use_backend):
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    x = lab.tensor(a, requires_grad=True)
    for index in [1, (1, 2), (1, 2, 3), (-1, -1, -1), (slice(None), 1), (Ellipsis, 2), (0, None, 1)]:
        y = x[index]
        assert y.shape == a[index].shape, index
        np.testing.assert_array_equal(y.numpy(), a[index])
    x[1, 2, 3].backward()
    assert x.grad.numpy()[1, 2, 3] == 1 and x.grad.numpy().sum() == 1
    assert lab.tensor(np.float32(2)).shape == () and lab.tensor(5).shape == ()
    assert x.sum().shape == () and x.sum().numpy().shape == ()
    assert x[0, 0, 0].item() == 0.0


def test_concat_of_zero_dim_refused_stack_joins_them(use_backend):
    v = lab.tensor(np.array([1.0, 2.0, 3.0], np.float32), requires_grad=True)
    with pytest.raises(ValueError, match=r"^concat: 0-D tensors cannot be concatenated"):
        F.concat([v[0], v[1]])
    s = F.stack([v[2], v[0]])
    assert s.shape == (2,)
    np.testing.assert_array_equal(s.numpy(), [3.0, 1.0])
    (s * lab.tensor(np.array([10.0, 1.0], np.float32))).sum().backward()
    np.testing.assert_array_equal(v.grad.numpy(), [1.0, 0.0, 10.0])
    with pytest.raises(ValueError, match=r"^stack: shapes \(\) and \(3,\) differ"):
        F.stack([v[0], v])


def test_concat_refuses_mixed_dtypes_and_backends(wgpu_backend, numpy_backend):
    for b in (numpy_backend, wgpu_backend):
        x = lab.tensor(np.ones((2, 3), np.float32), backend=b)
        with pytest.raises(ValueError, match=rf"^concat: tensors on {b.name} \(float32\) and {b.name} \(int32\)"):
            F.concat([x, lab.tensor(np.ones((2, 3), np.int32), backend=b)])
    with pytest.raises(ValueError, match=r"^concat: tensors on numpy \(float32\) and wgpu \(float32\)"):
        F.concat([lab.tensor(np.ones(2, np.float32), backend=numpy_backend),
                  lab.tensor(np.ones(2, np.float32), backend=wgpu_backend)])


def test_len_of_zero_dim_tensor_is_a_type_error(use_backend):
    with pytest.raises(TypeError, match=r"len\(\) of a 0-D tensor"):
        len(lab.tensor(np.float32(1)))


def test_transpose_property_of_0d_and_1d_tensors_returns_them_unchanged(use_backend):
    for v in (np.float32(2.5), np.array([1.0, 2.0, 3.0], dtype=np.float32)):
        x = lab.tensor(v, requires_grad=True)
        y = x.T  # numpy: a.T of a 0-D or 1-D array is the array itself
        assert y.shape == v.T.shape
        np.testing.assert_array_equal(y.numpy(), v.T)
        (y * 2.0).sum().backward()
        np.testing.assert_array_equal(x.grad.numpy(), np.full(v.shape, 2.0))
    assert lab.tensor(np.zeros((2, 3, 4))).T.shape == (2, 4, 3)  # lab's .T swaps the last two axes


@pytest.mark.parametrize("op", ["sum", "max"])
def test_reduction_over_no_axes_returns_a_copy_not_the_input(use_backend, op):
    x = lab.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = getattr(x, op)(axis=())
    np.testing.assert_array_equal(y.numpy(), [1.0, -2.0, 3.0])  # numpy: a reduction over () copies
    assert use_backend.storage(y.data) is not use_backend.storage(x.data)
    y.backward(np.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(x.grad.numpy(), [1.0, 2.0, 3.0])  # no ties to split: every element is its max


def test_max_over_an_empty_axis_is_refused(use_backend):
    x = lab.tensor(np.zeros((0, 3)))
    for axis in (0, None, (0, 1)):  # the GPU would have returned its identity as if it were a maximum
        with pytest.raises(ValueError, match=r"max: axis 0 of \(0, 3\) is empty"):
            x.max(axis=axis)
    assert x.max(axis=1).shape == (0,)  # an empty result over a non-empty axis is fine, as in numpy


def test_max_maximum_and_relu_pass_nan_and_extreme_values_as_numpy(use_backend):
    nan, big = np.float32(np.nan), np.finfo(np.float32).max
    v = np.array([[1.0, nan, 2.0], [-np.inf, -np.inf, -np.inf], [-big, -big, -big]], dtype=np.float32)
    np.testing.assert_array_equal(lab.tensor(v).max(axis=1).numpy(), v.max(axis=1))  # nan, -inf, -FLT_MAX
    a = np.array([1.0, nan, nan, -1.0], dtype=np.float32)
    b = np.array([nan, 1.0, nan, 0.0], dtype=np.float32)
    np.testing.assert_array_equal(lab.tensor(a).maximum(lab.tensor(b)).numpy(), np.maximum(a, b))
    np.testing.assert_array_equal(lab.tensor(a).relu().numpy(), np.maximum(a, 0))


def test_arithmetic_on_int_tensors_is_refused_naming_the_dtype(use_backend):
    i = lab.tensor([1, 2, 3])  # on the GPU its bits were read as floats (1 -> 1.4e-45); numpy cut 2.5 to 2
    for f in (lambda: i + 1, lambda: i * 2.5, lambda: 1.0 - i, lambda: 2.0 / i, lambda: i ** 2, lambda: -i,
              lambda: i.exp(), lambda: i.relu(), lambda: i.gelu(), lambda: i.sum(), lambda: i.mean(),
              lambda: i.max(), lambda: i.softmax()):
        with pytest.raises(ValueError, match="expected a floating-point tensor, got dtype int32"):
            f()
    np.testing.assert_array_equal(i[1:].numpy(), [2, 3])  # moving int values (indexing, reshape) is fine


def test_boolean_index_and_two_ellipses_are_refused(use_backend):
    x = lab.tensor([1.0, 2.0, 3.0])
    with pytest.raises(IndexError, match="boolean indices are not supported"):
        x[True]  # a bool is an int to Python: this read x[1]
    with pytest.raises(IndexError, match="single ellipsis"):
        x[..., ...]
    with pytest.raises(ValueError, match="axis must be None, an integer or a tuple of integers, got 1.0"):
        x.sum(axis=1.0)


def test_empty_products_and_reductions_give_gradients_of_their_inputs_shapes(use_backend):
    for sa, sb in [((2, 3), (3, 0)), ((0, 2, 3), (0, 3, 4)), ((2, 2, 3), (2, 3, 0))]:
        a, b = lab.tensor(np.ones(sa), requires_grad=True), lab.tensor(np.ones(sb), requires_grad=True)
        out = a @ b
        assert out.shape == np.matmul(np.ones(sa), np.ones(sb)).shape
        out.backward(np.ones(out.shape))
        assert a.grad.shape == sa and b.grad.shape == sb
        assert not a.grad.numpy().any() and not b.grad.numpy().any()
    x = lab.tensor(np.ones((2, 0)), requires_grad=True)
    y = x.sum(axis=0)
    assert y.shape == (0,)
    y.backward(np.ones((0,)))
    assert x.grad.shape == (2, 0)


def test_pow_tanh_and_scalar_division_at_special_values_match_numpy(use_backend):
    """WGSL's pow() is exp2(c log2 x) (lavapipe: 0^-1 = 0, NaN^2 = 0, (-1)^0.5 = 1), clamp() turned a NaN into a
    finite tanh, and a / 0.0 raised ZeroDivisionError: each value as numpy gives it."""
    with np.errstate(all="ignore"):
        v = np.array([0.0, 1.0, -1.0, -0.5, 2.0, 1e30, np.inf, -np.inf, np.nan], dtype=np.float32)
        x = lab.tensor(v)
        for c in (0, 2, 3, -1, -2, 1.5, 0.25):
            # (rtol: the GPU's pow is exp2(c log2 x), some ulp off numpy's)
            np.testing.assert_allclose((x ** c).numpy(), v ** np.float32(c), rtol=1e-5, err_msg=f"x ** {c}")
        np.testing.assert_allclose(x.tanh().numpy(), np.tanh(v), rtol=1e-6, atol=0)  # (the GPU's: 1-2 ulp off)
        for c in (0.0, 3.0, 1e-40):
            want = v / np.float32(c)
            if c == 1e-40 and use_backend.name == "wgpu":
                # a GPU may flush the subnormal divisor to zero (the H200 does, lavapipe does not): 0 / 1e-40 is then
                # 0 / 0; every other entry is the same either way
                want[0] = (x / c).numpy()[0] if np.isnan((x / c).numpy()[0]) else want[0]
            np.testing.assert_allclose((x / c).numpy(), want, rtol=1e-6, err_msg=f"x / {c}")


def test_pow_zero_and_relu_gradients_at_zero_and_nan_as_pytorch(use_backend):
    x = lab.tensor([0.0, 2.0, np.nan], requires_grad=True)
    (x ** 0).sum().backward()  # constant: 0 everywhere (0 * x^-1 was NaN at 0)
    np.testing.assert_array_equal(x.grad.numpy(), [0.0, 0.0, 0.0])
    x.grad = None
    x.relu().backward(np.ones(3))  # PyTorch passes the gradient at a NaN input
    np.testing.assert_array_equal(x.grad.numpy(), [0.0, 1.0, 1.0])


def test_fused_ops_refuse_int_tables_weights_and_bad_settings_with_one_clear_error(use_backend):
    """An int table, weight or dropout input had its bits read as floats on the GPU (1 -> 1.4e-45); a dropout seed
    outside 32 bits raised OverflowError on numpy and wrapped on the GPU; p='0.5' was a TypeError; a negative eps
    made NaN rows; a 1-D linear weight an unpacking error."""
    f = lab.tensor(np.ones((2, 3)))
    i = lab.tensor(np.ones((2, 3), dtype=np.int32))
    float_needed = [lambda: F.embedding(np.array([1]), i), lambda: F.linear(f, lab.tensor(np.ones((3, 2), np.int32))),
                    lambda: F.layer_norm(f, lab.tensor(np.ones(3, np.int32))), lambda: F.dropout(i, 0.5, seed=1)]
    for call in float_needed:
        with pytest.raises(ValueError, match="expected a floating-point tensor, got dtype int32"):
            call()
    for seed in (-1, 2 ** 32, 1.5):
        with pytest.raises(ValueError, match=r"dropout: seed must be an integer >= 0 and <= 4,294,967,295"):
            F.dropout(f, 0.5, seed=seed)
    for p in ("0.5", float("nan"), 1.0, True):
        with pytest.raises(ValueError, match=r"dropout: p must be a number in \[0, 1\)"):
            F.dropout(f, p)
    with pytest.raises(ValueError, match="layer_norm: eps must be a finite number >= 0, got -1"):
        F.layer_norm(f, lab.tensor(np.ones(3)), eps=-1.0)
    with pytest.raises(ValueError, match=r"linear: the weight must be 2-D \(K, N\), got shape \(3,\)"):
        F.linear(f, lab.tensor(np.ones(3)))
    with pytest.raises(ValueError, match="reshape: sizes must be integers"):
        lab.tensor(np.ones(1)).reshape(True)


def test_softmax_of_extreme_rows_and_mean_of_nothing_as_numpy(use_backend):
    big = np.finfo(np.float32).max
    rows = np.array([[-big, -big, -big], [0.0, -np.inf, 1.0]], dtype=np.float32)
    e = np.exp(rows - rows.max(-1, keepdims=True))
    np.testing.assert_allclose(lab.tensor(rows).softmax().numpy(), e / e.sum(-1, keepdims=True), rtol=1e-6)
    with np.errstate(divide="ignore"):  # (log 0 = -inf, expected)
        np.testing.assert_allclose(lab.tensor(rows).log_softmax().numpy(), np.log(e / e.sum(-1, keepdims=True)),
                                   rtol=1e-6)
    assert np.isnan(lab.tensor(np.zeros((0, 3))).mean().item())  # numpy and PyTorch: NaN, not 0
    assert lab.tensor(np.zeros((2, 0))).log_softmax().shape == (2, 0)


def test_integers_beyond_int32_are_refused_not_wrapped(use_backend):
    for v in (np.array([2 ** 40]), np.array([2 ** 31 + 5], np.uint32), np.array([-2 ** 31 - 1])):
        with pytest.raises(ValueError, match=r"do not fit an int32 tensor \(allowed -2147483648\.\.2147483647\)"):
            lab.tensor(v)  # was 0, and -2147483643
    np.testing.assert_array_equal(lab.tensor(np.array([-2 ** 31, 2 ** 31 - 1])).numpy(), [-2 ** 31, 2 ** 31 - 1])


def test_zeros_and_ones_check_their_shape_dtype_and_gradient_flag(use_backend):
    for shape in ((-1,), (2.5,), (True, 2)):
        with pytest.raises(ValueError, match=r"zeros: sizes must be integers >= 0"):
            lab.zeros(*shape)  # the GPU made a tensor of shape (-1,) or (2.5,)
    with pytest.raises(ValueError, match="only floating-point tensors can require gradients, got dtype int32"):
        lab.ones(2, dtype="int32", requires_grad=True)
    assert lab.zeros((2, 0)).shape == (2, 0) and lab.ones(()).shape == ()
    with pytest.raises(ValueError, match="layer_norm: the input needs at least one axis"):
        F.layer_norm(lab.tensor(1.0), lab.tensor(np.ones(1)))
    with pytest.raises(ValueError, match=r"cross_entropy: logits need a class axis"):
        F.cross_entropy(lab.tensor(1.0), np.array(0))
