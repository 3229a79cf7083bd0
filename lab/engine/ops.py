"""Differentiable ops. Each op computes its forward with backend primitives and defines its backward right
beside it, as a closure over what the forward saved. Shapes in comments: B batch, T time, C channels."""
import builtins as _builtins  # sum and max are ops in this module
import math
import numbers

import numpy as np

from .. import checks
from .backend import HeadView, check_index_range, contiguous_strides, gather_heads, scatter_heads
from .tensor import Tensor, is_grad_enabled, tensor
from . import random as _random

# ---------------------------------------------------------------------------------------------------- helpers


def _shape_str(s):
    return str(tuple(s))


def _lift(x, like):
    """Tensors pass through; arrays and lists become tensors on `like`'s backend. Numbers (bools, ints, floats) join
    a float tensor in its dtype, as PyTorch's do: a float64 array went through float32 (1e-12 steps lost), and a
    list of ints became an int32 tensor that the op then refused."""
    if isinstance(x, Tensor):
        if x.backend is not like.backend:
            raise ValueError(f"tensors live on different backends: {like.backend.name} and {x.backend.name}; "
                             "move one with .to(...)")
        return x
    arr = np.asarray(x)
    if arr.dtype.kind in "biuf" and like.dtype in ("float32", "float64"):
        return tensor(arr, dtype=like.dtype, backend=like.backend)
    return tensor(np.asarray(arr, dtype=np.float32) if arr.dtype.kind == "f" else arr, backend=like.backend)


def _constant(c, op):
    """A number a scalar op takes, as a float: complex refused with the op named (each backend failed its own way);
    an int beyond the float range is +-inf, as float32 rounds it (10**400 raised OverflowError)."""
    if not isinstance(c, numbers.Real):
        raise ValueError(f"{op}: the constant must be a real number, got {c!r}")
    try:
        return float(c)
    except OverflowError:
        return math.inf if c > 0 else -math.inf


def _unbroadcast(B, g, shape):
    """Sum a broadcast gradient back down to `shape`."""
    shape = tuple(shape)
    while len(g.shape) > len(shape):
        g = B.reduce("sum", g, 0)
    for ax, s in enumerate(shape):
        if s == 1 and g.shape[ax] != 1:
            g = B.reshape(B.reduce("sum", g, ax), g.shape[:ax] + (1,) + g.shape[ax + 1:])
    return g


def _expand(B, g, keep_shape, shape):
    """Broadcast g (reshaped to keep_shape, with 1s on reduced axes) to `shape` through a stride-0 copy."""
    g = B.reshape(g, keep_shape)
    strides = [0 if k == 1 and s != 1 else st for k, s, st in zip(keep_shape, shape, contiguous_strides(keep_shape))]
    return B.copy_view(g, 0, tuple(shape), strides)


def _check_float(x, op):
    """Arithmetic needs float32 or float64: the GPU kernels read every buffer as f32, so an int32 tensor's bits would
    be taken as floats there (1 read as 1.4e-45), and numpy would round a float constant to the int type."""
    dtype = x.dtype   # (a str made from the array's dtype: read once, this runs for every op of a step)
    if dtype in ("float32", "float64"):
        return
    if dtype == "float16":
        raise ValueError(f"{op}: float16 tensors are storage for frozen weights, read by linear and matmul only")
    raise ValueError(f"{op}: expected a floating-point tensor, got dtype {dtype} (allowed: float32, and float64 "
                     "on numpy; lab.tensor(t.numpy(), dtype='float32') makes a float copy)")

# ---------------------------------------------------------------------------------------------------- elementwise


def _binary(op, a, b):
    B = a.backend
    b = _lift(b, a)
    _check_float(a, op)
    _check_float(b, op)
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"{op}: shapes {_shape_str(a.shape)} and {_shape_str(b.shape)} cannot be broadcast") from None
    return B, b, B.binary(op, a.data, b.data)


def add(a, b):
    if isinstance(b, numbers.Number):
        _check_float(a, "add")
        b = _constant(b, "add")
        return Tensor._make(a.backend.scalar("add", a.data, b), a.backend, (a,), lambda g: (g,))
    B, b, out = _binary("add", a, b)
    return Tensor._make(out, B, (a, b), lambda g: (_unbroadcast(B, g, a.shape), _unbroadcast(B, g, b.shape)))


def sub(a, b):
    if isinstance(b, numbers.Number):
        return add(a, -_constant(b, "sub"))
    B, b, out = _binary("sub", a, b)
    return Tensor._make(out, B, (a, b),
                        lambda g: (_unbroadcast(B, g, a.shape), _unbroadcast(B, B.unary("neg", g), b.shape)))


def rsub(a, c):  # c - a
    _check_float(a, "rsub")
    c = _constant(c, "rsub")
    B = a.backend
    return Tensor._make(B.scalar("rsub", a.data, c), B, (a,), lambda g: (B.unary("neg", g),))


def mul(a, b):
    if isinstance(b, numbers.Number):
        _check_float(a, "mul")
        b = _constant(b, "mul")
        B = a.backend
        return Tensor._make(B.scalar("mul", a.data, b), B, (a,), lambda g: (B.scalar("mul", g, b),))
    B, b, out = _binary("mul", a, b)

    def backward(g):
        return (_unbroadcast(B, B.binary("mul", g, b.data), a.shape) if a.requires_grad else None,
                _unbroadcast(B, B.binary("mul", g, a.data), b.shape) if b.requires_grad else None)
    return Tensor._make(out, B, (a, b), backward)


def div(a, b):
    if isinstance(b, numbers.Number):  # divided, not multiplied by 1/b: b = 0 gives inf as numpy, 1/1e-40 overflows
        _check_float(a, "div")
        b = _constant(b, "div")
        B = a.backend
        return Tensor._make(B.scalar("div", a.data, b), B, (a,), lambda g: (B.scalar("div", g, b),))
    B, b, out = _binary("div", a, b)

    def backward(g):  # d(a/b)/db = -(a/b)/b
        ga = _unbroadcast(B, B.binary("div", g, b.data), a.shape) if a.requires_grad else None
        gb = None
        if b.requires_grad:
            gb = _unbroadcast(B, B.unary("neg", B.binary("div", B.binary("mul", g, out), b.data)), b.shape)
        return ga, gb
    return Tensor._make(out, B, (a, b), backward)


def rdiv(a, c):  # c / a;  d/da = -c/a^2 = -out/a
    _check_float(a, "rdiv")
    c = _constant(c, "rdiv")
    B = a.backend
    out = B.scalar("rdiv", a.data, c)
    return Tensor._make(out, B, (a,), lambda g: (B.unary("neg", B.binary("div", B.binary("mul", g, out), a.data)),))


def pow(a, c):
    if not isinstance(c, numbers.Number):
        raise ValueError("pow: the exponent must be a Python number")
    _check_float(a, "pow")
    c = _constant(c, "pow")
    B = a.backend
    out = B.scalar("pow", a.data, c)
    if c == 0:  # x^0 is constant: its gradient is 0 everywhere, not 0 * x^-1 (NaN at x = 0)
        return Tensor._make(out, B, (a,), lambda g: (B.full(a.shape, 0.0, a.dtype),))
    return Tensor._make(out, B, (a,), lambda g: (B.binary("mul", g, B.scalar("mul", B.scalar("pow", a.data, c - 1), c)),))


def maximum(a, b):
    B, b, out = _binary("maximum", a, b)

    def backward(g):  # the gradient goes to the larger input, half to each on ties (PyTorch's rule; all to a before)
        wa, wb = B.binary("eq", out, a.data), B.binary("eq", out, b.data)  # 1 where each is the maximum
        share = B.binary("div", g, B.binary("maximum", B.binary("add", wa, wb), B.full((), 1.0, g.dtype)))
        return _unbroadcast(B, B.binary("mul", share, wa), a.shape), _unbroadcast(B, B.binary("mul", share, wb), b.shape)
    return Tensor._make(out, B, (a, b), backward)


def neg(a):
    _check_float(a, "neg")
    B = a.backend
    return Tensor._make(B.unary("neg", a.data), B, (a,), lambda g: (B.unary("neg", g),))


def exp(a):
    _check_float(a, "exp")
    B = a.backend
    out = B.unary("exp", a.data)
    return Tensor._make(out, B, (a,), lambda g: (B.binary("mul", g, out),))


def log(a):
    _check_float(a, "log")
    B = a.backend
    return Tensor._make(B.unary("log", a.data), B, (a,), lambda g: (B.binary("div", g, a.data),))


def sqrt(a):
    _check_float(a, "sqrt")
    B = a.backend
    out = B.unary("sqrt", a.data)
    return Tensor._make(out, B, (a,), lambda g: (B.binary("sqrt_bwd", out, g),))


def tanh(a):
    _check_float(a, "tanh")
    B = a.backend
    out = B.unary("tanh", a.data)
    return Tensor._make(out, B, (a,), lambda g: (B.binary("tanh_bwd", out, g),))


def relu(a):
    _check_float(a, "relu")
    B = a.backend
    return Tensor._make(B.unary("relu", a.data), B, (a,), lambda g: (B.binary("relu_bwd", a.data, g),))


def gelu(a):
    """GELU, tanh approximation (GPT-2). A backend that keeps the derivative (Backend.gelu_keeps_grad: numpy)
    computes it in the forward when a gradient will be needed; the others recompute it from the input in the
    backward."""
    _check_float(a, "gelu")
    B = a.backend
    if a.requires_grad and is_grad_enabled() and B.gelu_keeps_grad:
        out, slope = B.gelu_and_grad(a.data)
        return Tensor._make(out, B, (a,), lambda g: (B.binary("mul", g, slope),))
    return Tensor._make(B.unary("gelu", a.data), B, (a,), lambda g: (B.binary("gelu_bwd", a.data, g),))


def silu(x):
    """x * sigmoid(x) (SiLU, the Llama MLP's gate), composed as x * (1 + tanh(x/2)) / 2: no exp that overflows for
    large |x| (tanh saturates; the backends' tanh is stable at both ends). A fused kernel may take its place."""
    _check_float(x, "silu")
    half = x * 0.5   # halved first: x * (1 + tanh) would overflow float32 for x above 1.7e38
    return half * (tanh(half) + 1.0)


def swiglu(gate, up):
    """silu(gate) * up: the gated unit of Llama's MLP (SwiGLU). One elementwise pass forward and one backward
    (dgate, dup) where the backend fuses it (Backend.fused_swiglu); composed of silu and mul elsewhere."""
    _check_float(gate, "swiglu")
    up = _lift(up, gate)
    _check_float(up, "swiglu")
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate and up must have the same shape, got {_shape_str(gate.shape)} and "
                         f"{_shape_str(up.shape)}")
    B = gate.backend
    if not B.fused_swiglu:
        return silu(gate) * up
    return Tensor._make(B.swiglu(gate.data, up.data), B, (gate, up), lambda g: B.swiglu_bwd(gate.data, up.data, g))


def rms_norm(x, weight, eps=1e-6):
    """RMSNorm over the last axis (Llama): x / sqrt(mean(x^2) + eps) * weight, as transformers' LlamaRMSNorm.
    One pass over the rows forward and one backward where the backend fuses it (Backend.fused_rms_norm)."""
    eps = checks.real("rms_norm: eps", eps, 0.0)
    _check_norm(x, weight, None, "rms_norm")
    if not x.backend.fused_rms_norm:
        return x / sqrt(mean(x * x, axis=-1, keepdims=True) + eps) * weight
    y, rstd = x.backend.rms_norm(x.data, weight.data, eps)
    return _rms_norm_node(y, x, weight, rstd)


def _rms_norm_node(y, x, weight, rstd):
    """The autograd node of y = RMSNorm(x); like LayerNorm's, its backward adds x's gradient from the residual
    stream into dx in the same kernel (absorbs=0)."""
    B = x.backend

    def backward(g, acc):
        return B.rms_norm_bwd(x.data, weight.data, rstd, g, acc)
    return Tensor._make(y, B, (x, weight), backward, absorbs=0)


def add_rms_norm(x, y, weight, eps=1e-6):
    """(x + y, rms_norm(x + y)) in one pass over the rows: a Llama layer's residual add and the RMSNorm after it,
    as add_layer_norm is for LayerNorm. Gradients as the two ops give them."""
    y = _lift(y, x)
    _check_float(x, "add_rms_norm")
    _check_float(y, "add_rms_norm")
    eps = checks.real("add_rms_norm: eps", eps, 0.0)
    if x.shape != y.shape:
        raise ValueError(f"add_rms_norm: x and y must have the same shape, got {_shape_str(x.shape)} and "
                         f"{_shape_str(y.shape)}")
    _check_norm(x, weight, None, "add_rms_norm")
    B = x.backend
    if not B.fused_rms_norm:
        s = x + y
        return s, rms_norm(s, weight, eps)
    h, rstd, total = B.rms_norm(x.data, weight.data, eps, residual=y.data)
    s = Tensor._make(total, B, (x, y), lambda g: (g, g))
    return s, _rms_norm_node(h, s, weight, rstd)


def rotary(x, cos, sin, pos=None, heads=None):
    """Rotary position embedding in transformers' rotate-half form: x * cos + rotate_half(x) * sin, where
    rotate_half(x) = concat(-x2, x1) of x's two halves. x (..., T, D); cos and sin (T, D), or with `pos` the
    tables of positions 0..P-1 (P, D), of which rows pos..pos+T-1 are used (tokens after a KV cache's pos).
    With `heads`, x is a packed projection (B, T, heads * D) and the result its heads (B, heads, T, D): the head
    split rides along. One pass where the backend fuses it (Backend.fused_rotary); the backward is the transposed
    rotation (by -theta). Gradients reach cos and sin only through the composed path, taken when they need them."""
    cos, sin = _lift(cos, x), _lift(sin, x)
    for t in (x, cos, sin):
        _check_float(t, "rotary")
    D = cos.shape[-1] if heads is not None and cos.ndim else x.shape[-1] if x.ndim else 0
    if heads is not None:
        heads = checks.integer("rotary: heads", heads, low=1)
        if x.ndim != 3 or x.shape[2] != heads * D:
            raise ValueError(f"rotary: with heads={heads}, x must be (B, T, heads * D) = (B, T, {heads * D}) for "
                             f"tables of D={D} columns, got x {_shape_str(x.shape)}")
    T = x.shape[-2] if heads is None and x.ndim >= 2 else x.shape[1] if heads is not None else 0
    if pos is None:
        fits = cos.shape == (T, D)
        want = "(T, D)"
    else:
        pos = checks.integer("rotary: pos", pos, low=0)
        fits = cos.ndim == 2 and cos.shape[1] == D and cos.shape[0] >= pos + T
        want = f"(P, D) with P >= pos + T = {pos + T}"
    if x.ndim < 2 or D % 2 or cos.shape != sin.shape or not fits:
        raise ValueError(f"rotary: x must be (..., T, D) with D even and cos, sin {want}, got x "
                         f"{_shape_str(x.shape)}, cos {_shape_str(cos.shape)}, sin {_shape_str(sin.shape)}")
    B = x.backend
    if B.fused_rotary and not (is_grad_enabled() and (cos.requires_grad or sin.requires_grad)):
        return Tensor._make(B.rotary(x.data, cos.data, sin.data, pos or 0, heads=heads), B, (x,),
                            lambda g: (B.rotary(g, cos.data, sin.data, pos or 0, inverse=True, heads=heads),))
    if heads is not None:
        x = x.reshape(x.shape[0], T, heads, D).permute(0, 2, 1, 3)                # (B, heads, T, D)
    if pos is not None and (pos or cos.shape[0] != T):
        cos, sin = cos[pos:pos + T], sin[pos:pos + T]
    x1, x2 = split(x, D // 2, axis=-1)
    return x * cos + concat([-x2, x1], axis=-1) * sin

# ---------------------------------------------------------------------------------------------------- reductions


def normalize_axis(axis, ndim, op):
    """`axis` of an `ndim`-D tensor as an index 0..ndim-1: the one check of every op that takes an axis (taken modulo
    ndim, an axis out of range would silently name another one)."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise ValueError(f"{op}: axis must be an integer, got {axis!r}")
    if not -ndim <= axis < ndim:
        allowed = f"allowed {-ndim}..{ndim - 1}" if ndim else "a 0-D tensor has no axes"
        raise ValueError(f"{op}: axis {axis} is out of range for a {ndim}-D tensor ({allowed})")
    return int(axis) % ndim


def _axes(axis, ndim, op):
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, numbers.Integral):
        axes = (axis,)
    elif isinstance(axis, (tuple, list, range)):
        axes = tuple(axis)
    else:
        raise ValueError(f"{op}: axis must be None, an integer or a tuple of integers, got {axis!r}")
    out = [normalize_axis(ax, ndim, op) for ax in axes]
    if len(set(out)) != len(out):
        raise ValueError(f"{op}: axis {tuple(axes)} names an axis twice")
    return tuple(sorted(out))


def _keep_shape(shape, axes):
    return tuple(1 if k in axes else s for k, s in enumerate(shape))


def _reduced(B, op, data, axes):
    """data reduced by `op` over `axes`, always a new array: with axes=() (nothing to reduce) a copy, as numpy
    gives, so that writing into the result (an optimizer's in-place update of a .grad) never changes the input."""
    if not axes:
        return B.copy_view(data, 0, tuple(data.shape), contiguous_strides(data.shape))
    for ax in reversed(axes):
        data = B.reduce(op, data, ax)
    return data


def sum(a, axis=None, keepdims=False):
    _check_float(a, "sum")
    B = a.backend
    axes = _axes(axis, a.ndim, "sum")
    out = _reduced(B, "sum", a.data, axes)
    keep = _keep_shape(a.shape, axes)
    if keepdims:
        out = B.reshape(out, keep)
    return Tensor._make(out, B, (a,), lambda g: (_expand(B, g, keep, a.shape),))


def mean(a, axis=None, keepdims=False):
    axes = _axes(axis, a.ndim, "mean")
    n = math.prod(a.shape[k] for k in axes)
    return mul(sum(a, axes, keepdims), 1.0 / n if n else math.nan)  # the mean of no elements is NaN (numpy, PyTorch)


def max(a, axis=-1, keepdims=False):
    """Maximum along `axis`: an int, a tuple, or None for all elements (as numpy). On ties the gradient is split
    evenly among the maximal elements (PyTorch's amax): each gets g / count, so the shares add up to g (giving
    each the whole g would make a gradient that sums to count * g, not a subgradient)."""
    _check_float(a, "max")
    B = a.backend
    axes = _axes(axis, a.ndim, "max")
    empty = [ax for ax in axes if a.shape[ax] == 0]
    if empty:  # numpy refuses too; the GPU's reduction would return its identity, -inf, as if it were a value
        raise ValueError(f"max: axis {empty[0]} of {_shape_str(a.shape)} is empty, and the maximum of no elements "
                         "is undefined; reduce over non-empty axes")
    out = _reduced(B, "max", a.data, axes)
    keep = _keep_shape(a.shape, axes)

    def backward(g):
        mask = B.binary("eq", a.data, B.reshape(out, keep))  # 1 on each maximal element
        count = B.reshape(_reduced(B, "sum", mask, axes), keep)
        return (B.binary("mul", mask, _expand(B, B.binary("div", B.reshape(g, keep), count), keep, a.shape)),)
    return Tensor._make(B.reshape(out, keep) if keepdims else out, B, (a,), backward)

# ---------------------------------------------------------------------------------------------------- shapes


def reshape(a, *shape):
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else tuple(shape)
    if shape.count(-1) > 1 or any(not isinstance(s, numbers.Integral) or isinstance(s, bool) or s < -1 for s in shape):
        raise ValueError(f"reshape: sizes must be integers >= 0 with at most one -1, got {shape}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if known == 0 or a.size % known:
            raise ValueError(f"reshape: cannot reshape {_shape_str(a.shape)} into {shape}")
        shape = tuple(a.size // known if s == -1 else s for s in shape)
    if math.prod(shape) != a.size:
        raise ValueError(f"reshape: cannot reshape {_shape_str(a.shape)} ({a.size} elements) into {shape} "
                         f"({math.prod(shape)} elements)")
    B = a.backend
    return Tensor._make(B.reshape(a.data, shape), B, (a,), lambda g: (B.reshape(g, a.shape),))


def permute(a, *axes):
    given = tuple(axes[0]) if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else tuple(axes)
    axes = tuple(normalize_axis(ax, a.ndim, "permute") for ax in given)
    if sorted(axes) != list(range(a.ndim)):
        raise ValueError(f"permute: {given} is not a permutation of the {a.ndim} axes of {_shape_str(a.shape)}")
    B = a.backend
    st = contiguous_strides(a.shape)
    out = B.copy_view(a.data, 0, tuple(a.shape[k] for k in axes), [st[k] for k in axes])
    inverse = tuple(np.argsort(axes))

    def backward(g):
        gst = contiguous_strides(g.shape)
        return (B.copy_view(g, 0, a.shape, [gst[k] for k in inverse]),)
    return Tensor._make(out, B, (a,), backward)


def transpose(a, dim0=-2, dim1=-1):
    dim0, dim1 = (normalize_axis(d, a.ndim, "transpose") for d in (dim0, dim1))
    axes = list(range(a.ndim))
    axes[dim0], axes[dim1] = axes[dim1], axes[dim0]
    return permute(a, axes)


def _view_of_index(shape, index):
    """(offset, shape, strides) of a[index] for ints, slices with step > 0, Ellipsis and None."""
    if not isinstance(index, tuple):
        index = (index,)
    for ix in index:  # a bool is an Integral: True would silently read element 1, where numpy adds an axis
        if isinstance(ix, (bool, np.bool_)):
            raise IndexError(f"unsupported index {ix!r}: boolean indices are not supported; use ints, slices, ... "
                             "or None")
    if _builtins.sum(ix is Ellipsis for ix in index) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    n_real = len([i for i in index if i is not None and i is not Ellipsis])
    if n_real > len(shape):
        raise IndexError(f"too many indices ({n_real}) for a tensor of shape {_shape_str(shape)}")
    if Ellipsis in index:
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (len(shape) - n_real) + index[k + 1:]
    index = index + (slice(None),) * (len(shape) - (len(index) - index.count(None)))
    strides = contiguous_strides(shape)
    offset, out_shape, out_strides, d = 0, [], [], 0
    for ix in index:
        if ix is None:
            out_shape.append(1)
            out_strides.append(0)
            continue
        size = shape[d]
        if isinstance(ix, numbers.Integral):
            if not -size <= ix < size:
                raise IndexError(f"index {ix} is out of bounds for axis {d} with size {size}")
            offset += (ix % size) * strides[d]
        elif isinstance(ix, slice):
            start, stop, step = ix.indices(size)
            if step <= 0:
                raise IndexError(f"slice step must be positive, got {step}")
            offset += start * strides[d]
            out_shape.append(_builtins.max(0, math.ceil((stop - start) / step)))
            out_strides.append(strides[d] * step)
        else:
            raise IndexError(f"unsupported index {ix!r}: use ints, slices, ... or None")
        d += 1
    return offset, tuple(out_shape), out_strides


def getitem(a, index):
    B = a.backend
    offset, shape, strides = _view_of_index(a.shape, index)
    out = B.copy_view(a.data, offset, shape, strides)

    def backward(g):
        full = B.full(a.shape, 0.0, a.dtype)  # a's dtype: a float64 gradient must not pass through float32
        B.write_view(full, offset, strides, B.reshape(g, shape))
        return (full,)
    return Tensor._make(out, B, (a,), backward)


def concat(tensors, axis=0):
    tensors = list(tensors)
    if not tensors:
        raise ValueError("concat: need at least one tensor")
    first = tensors[0]
    if first.ndim == 0:  # as numpy: there is no axis to join along
        raise ValueError("concat: 0-D tensors cannot be concatenated (they have no axis); stack() them")
    ax = normalize_axis(axis, first.ndim, "concat")
    for t in tensors[1:]:
        if t.backend is not first.backend or t.dtype != first.dtype:
            raise ValueError(f"concat: tensors on {first.backend.name} ({first.dtype}) and {t.backend.name} "
                             f"({t.dtype}): all must share one backend and dtype")
        if t.ndim != first.ndim or any(t.shape[k] != first.shape[k] for k in range(first.ndim) if k != ax):
            raise ValueError(f"concat: shapes {_shape_str(first.shape)} and {_shape_str(t.shape)} differ outside "
                             f"axis {ax}")
    B = first.backend
    shape = list(first.shape)
    shape[ax] = _builtins.sum(t.shape[ax] for t in tensors)
    out = B.full(tuple(shape), 0.0, first.dtype)
    strides = contiguous_strides(shape)
    offsets, at = [], 0
    for t in tensors:
        offsets.append(at * strides[ax])
        B.write_view(out, at * strides[ax], strides, t.data)
        at += t.shape[ax]

    def backward(g):
        return tuple(B.copy_view(g, off, t.shape, strides) for t, off in zip(tensors, offsets))
    return Tensor._make(out, B, tuple(tensors), backward)


def split(a, sizes, axis=0):
    """Split into pieces of `sizes` (a list) or into equal pieces of size `sizes` (an int) along `axis`."""
    ax = normalize_axis(axis, a.ndim, "split")
    n = a.shape[ax]
    if isinstance(sizes, numbers.Integral) and not isinstance(sizes, bool):
        if sizes <= 0:
            raise ValueError(f"split: the piece size must be a positive integer, got {sizes}")
        sizes = [sizes] * (n // sizes) + ([n % sizes] if n % sizes else [])
    if not isinstance(sizes, (list, tuple, range, np.ndarray)) or any(
            not isinstance(s, numbers.Integral) or isinstance(s, bool) or s < 0 for s in sizes):
        raise ValueError(f"split: sizes must be a positive integer or a list of non-negative integers, got {sizes!r}")
    if _builtins.sum(sizes) != n:
        raise ValueError(f"split: sizes {list(sizes)} do not add up to {n} (axis {ax} of {_shape_str(a.shape)})")
    out, at = [], 0
    for s in sizes:
        index = (slice(None),) * ax + (slice(at, at + s),)
        out.append(getitem(a, index))
        at += s
    return out


def stack(tensors, axis=0):
    """Tensors of one shape joined along a new axis `axis` (0-D tensors too, which concat refuses)."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("stack: need at least one tensor")
    shape = tensors[0].shape
    for t in tensors[1:]:
        if t.shape != shape:
            raise ValueError(f"stack: shapes {_shape_str(shape)} and {_shape_str(t.shape)} differ; stack needs one shape")
    ax = normalize_axis(axis, len(shape) + 1, "stack")
    return concat([reshape(t, shape[:ax] + (1,) + shape[ax:]) for t in tensors], ax)


# ---------------------------------------------------------------------------------------------------- matmul


def matmul(a, b, transpose_a=False, transpose_b=False):
    """a @ b with optional transposed operands. Leading (batch) dims must match, or one side is 2D."""
    if not isinstance(b, Tensor):
        b = _lift(b, a)
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"matmul: operands need at least 2 dimensions, got shapes {_shape_str(a.shape)} "
                         f"and {_shape_str(b.shape)}")
    _check_float(a, "matmul")
    _check_float(b, "matmul")
    B = a.backend
    M, Ka = (a.shape[-1], a.shape[-2]) if transpose_a else (a.shape[-2], a.shape[-1])
    Kb, N = (b.shape[-1], b.shape[-2]) if transpose_b else (b.shape[-2], b.shape[-1])
    if Ka != Kb:
        raise ValueError(f"matmul: shapes {_shape_str(a.shape)} and {_shape_str(b.shape)} do not align: "
                         f"{Ka} != {Kb}")
    lead_a, lead_b = a.shape[:-2], b.shape[:-2]
    if lead_a and lead_b and lead_a != lead_b:
        raise ValueError(f"matmul: batch dimensions {lead_a} and {lead_b} differ (shapes {_shape_str(a.shape)} "
                         f"and {_shape_str(b.shape)}); they must match or one operand must be 2D")
    lead = lead_a or lead_b
    if not lead_b and not transpose_a:  # fold a's batch into its rows: one big GEMM instead of many small ones
        a3 = B.reshape(a.data, (1, math.prod(lead_a) * M, Ka))
    else:
        a3 = B.reshape(a.data, (math.prod(lead_a),) + a.shape[-2:])
    b3 = B.reshape(b.data, (math.prod(lead_b),) + b.shape[-2:])
    out = B.reshape(B.matmul(a3, b3, transpose_a, transpose_b), lead + (M, N))

    def backward(g):
        batch = _builtins.max(a3.shape[0], b3.shape[0])
        # rows per batch as the forward's product had them (a's batch folded in or not), not size // N: N or the
        # batch may be 0 (an empty product)
        g3 = B.reshape(g, (batch, a3.shape[-1] if transpose_a else a3.shape[-2], N))
        ga = gb = None
        if a.requires_grad:
            ga = B.matmul(b3, g3, transpose_b, True) if transpose_a else B.matmul(g3, b3, False, not transpose_b)
            if a3.shape[0] == 1 and ga.shape[0] > 1:
                ga = B.reduce("sum", ga, 0)
            ga = B.reshape(ga, a.shape)
        if b.requires_grad:
            gb = B.matmul(g3, a3, True, transpose_a) if transpose_b else B.matmul(a3, g3, not transpose_a, False)
            if b3.shape[0] == 1 and gb.shape[0] > 1:
                gb = B.reduce("sum", gb, 0)
            gb = B.reshape(gb, b.shape)
        return ga, gb
    return Tensor._make(out, B, (a, b), backward)

def _check_activation(activation):
    if activation not in (None, "gelu"):
        raise ValueError(f"linear: activation must be None or 'gelu', got {activation!r}")


def activate(x, activation):
    """x with linear's `activation` (None or "gelu") applied by its own op: for a layer whose output is not one
    product the matmul's store could apply it to (a LoRA layer's base + adapter)."""
    _check_activation(activation)
    return x if activation is None else gelu(x)


def linear(x, weight, bias=None, activation=None):
    """x @ weight + bias for x (..., K), weight (K, N), bias (N,): one node, the bias added by the matmul kernel
    as it stores its tiles where it can (a pass over the output saved per layer). activation="gelu" returns
    gelu(x @ weight + bias), applied as the tiles are stored on a backend with matmul_gelu (wgpu), else by gelu()."""
    _check_activation(activation)
    if weight.ndim != 2:
        raise ValueError(f"linear: the weight must be 2-D (K, N), got shape {_shape_str(weight.shape)}")
    if weight.dtype != "float16":  # (a float16 weight is storage the matmul reads as it is)
        _check_float(weight, "linear")
    if bias is not None:
        _check_float(bias, "linear")
    K, N = weight.shape
    if x.shape[-1] != K or (bias is not None and bias.shape != (N,)):
        raise ValueError(f"linear: input {_shape_str(x.shape)}, weight {_shape_str(weight.shape)} and bias "
                         f"{_shape_str(bias.shape) if bias is not None else None} do not fit (want (..., {K}), "
                         f"({K}, N), (N,))")
    _check_float(x, "linear")
    B = x.backend
    if activation == "gelu" and not B.fused_matmul_gelu:
        return activate(linear(x, weight, bias), activation)
    M = math.prod(x.shape[:-1])
    x3, w3 = B.reshape(x.data, (1, M, K)), B.reshape(weight.data, (1, K, N))
    b = bias.data if bias is not None else None
    pre = None
    if activation == "gelu":
        needs_grad = is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
        out, pre = B.matmul_gelu(x3, w3, b, keep_pre=needs_grad)
    else:
        out = B.matmul(x3, w3, bias=b)
    out = B.reshape(out, x.shape[:-1] + (N,))

    def backward(g):
        if pre is not None:
            g = B.binary("gelu_bwd", B.reshape(pre, g.shape), g)
        g3 = B.reshape(g, (1, M, N))
        gx = B.reshape(B.matmul(g3, w3, False, True), x.shape) if x.requires_grad else None
        gw = B.reshape(B.matmul(x3, g3, True, False), (K, N)) if weight.requires_grad else None
        grads = (gx, gw)
        if bias is not None:
            grads += (B.reduce("sum", B.reshape(g, (M, N)), 0) if bias.requires_grad else None,)
        return grads
    inputs = (x, weight) if bias is None else (x, weight, bias)
    return Tensor._make(out, B, inputs, backward)


# ---------------------------------------------------------------------------------------------------- fused NN ops


def _last_axis(axis, x, op):
    if normalize_axis(axis, x.ndim, op) != x.ndim - 1:
        raise ValueError(f"{op}: only the last axis is supported, got axis={axis} for shape {_shape_str(x.shape)}")


def softmax(x, axis=-1, scale=1.0, causal=False):
    """softmax(scale * x) over the last axis; `causal` masks column j > row i of the last two dims."""
    _check_float(x, "softmax")
    _last_axis(axis, x, "softmax")
    if causal and (x.ndim < 2 or x.shape[-1] != x.shape[-2]):
        raise ValueError(f"softmax: causal masking needs square trailing dims (T, T), got {_shape_str(x.shape)}")
    B = x.backend
    out = B.softmax(x.data, scale, causal)
    return Tensor._make(out, B, (x,), lambda g: (B.softmax_bwd(out, g, scale),))


def log_softmax(x, axis=-1):
    _check_float(x, "log_softmax")
    _last_axis(axis, x, "log_softmax")
    B = x.backend
    out = B.log_softmax(x.data)
    return Tensor._make(out, B, (x,), lambda g: (B.log_softmax_bwd(out, g),))


def _norm_bias(x, weight, bias, op):
    """The bias data of a LayerNorm over x's last axis (zeros without one), its parameters' shapes checked."""
    _check_norm(x, weight, bias, op)
    return bias.data if bias is not None else x.backend.full((x.shape[-1],), 0.0)


def _check_norm(x, weight, bias, op):
    for t in (weight, bias):   # (a kernel handed another backend's array failed inside it)
        if t is not None:
            _lift(t, x)
    for t in (x, weight) + ((bias,) if bias is not None else ()):
        _check_float(t, op)
    if x.ndim == 0:
        raise ValueError(f"{op}: the input needs at least one axis to normalize over, got a 0-D tensor")
    C = x.shape[-1]
    if weight.shape != (C,) or (bias is not None and bias.shape != (C,)):
        raise ValueError(f"{op}: weight/bias must have shape ({C},) for input {_shape_str(x.shape)}, got "
                         f"{_shape_str(weight.shape)}" + (f" and {_shape_str(bias.shape)}" if bias is not None else ""))


def layer_norm(x, weight, bias=None, eps=1e-5):
    """LayerNorm over the last axis (fused forward and backward)."""
    eps = checks.real("layer_norm: eps", eps, 0.0)  # a negative eps made NaN rows (sqrt of a negative variance)
    y, mean, rstd = x.backend.layernorm(x.data, weight.data, _norm_bias(x, weight, bias, "layer_norm"), eps)
    return _layer_norm_node(y, x, weight, bias, mean, rstd)


def _layer_norm_node(y, x, weight, bias, mean, rstd):
    """The autograd node of y = LayerNorm(x). Its backward adds x's gradient from x's other uses (in a
    transformer, the residual stream that also carries x) into dx in the same kernel: absorbs=0."""
    B = x.backend

    def backward(g, acc):
        return B.layernorm_bwd(x.data, weight.data, mean, rstd, g, acc)
    parents = (x, weight) + ((bias,) if bias is not None else ())
    return Tensor._make(y, B, parents, backward, absorbs=0)


def add_layer_norm(x, y, weight, bias=None, eps=1e-5):
    """(x + y, layer_norm(x + y)) in one pass over the rows: a residual add and the LayerNorm that follows it
    (a transformer block's x + attn(ln_1(x)) then ln_2). Gradients as the two ops give them."""
    y = _lift(y, x)
    _check_float(x, "add_layer_norm")
    _check_float(y, "add_layer_norm")
    eps = checks.real("add_layer_norm: eps", eps, 0.0)
    if x.shape != y.shape:
        raise ValueError(f"add_layer_norm: x and y must have the same shape, got {_shape_str(x.shape)} and "
                         f"{_shape_str(y.shape)}")
    B = x.backend
    h, mean, rstd, total = B.layernorm(x.data, weight.data, _norm_bias(x, weight, bias, "add_layer_norm"), eps,
                                       residual=y.data)
    s = Tensor._make(total, B, (x, y), lambda g: (g, g))
    return s, _layer_norm_node(h, s, weight, bias, mean, rstd)


def _index_tensor(idx, like, limit, op, ignore_index=None):
    """(indices as an int32 tensor on `like`'s backend, whether they were checked): host indices are checked
    against 0..limit-1 here, before the upload (cheap, and before int32 could wrap them); a tensor's are left to
    the backend's primitive, which checks them where they live (see WgpuBackend.check_indices)."""
    if isinstance(idx, Tensor):
        if idx.dtype != "int32":
            raise ValueError(f"{op}: indices must be int32, got {idx.dtype}")
        if idx.backend is not like.backend:
            raise ValueError(f"{op}: the indices live on the {idx.backend.name} backend and the tensor on "
                             f"{like.backend.name}; move one with .to(...)")
        return idx, False
    arr = np.asarray(idx)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{op}: indices must be integers, got dtype {arr.dtype}")
    check_index_range(arr, limit, op, ignore_index)
    return tensor(arr.astype(np.int32), backend=like.backend), True


def embedding(idx, weight):
    """weight[idx]: (V, C) table, integer idx of any shape -> idx.shape + (C,)."""
    _check_float(weight, "embedding")  # (an int table's bits were read as floats on the GPU)
    if weight.ndim != 2:
        raise ValueError(f"embedding: the table must be 2-D (V, C), got shape {_shape_str(weight.shape)}")
    V = weight.shape[0]
    idx, checked = _index_tensor(idx, weight, V, "embedding")
    B = weight.backend
    out = B.embedding(weight.data, idx.data, checked=checked)
    return Tensor._make(out, B, (weight,), lambda g: (B.embedding_bwd(idx.data, g, V),))


def cross_entropy(logits, targets, ignore_index=-100):
    """Mean cross-entropy of logits (..., V) against integer targets (...), skipping ignore_index."""
    _check_float(logits, "cross_entropy")
    if logits.ndim == 0:
        raise ValueError("cross_entropy: logits need a class axis (..., V), got a 0-D tensor")
    V = logits.shape[-1]
    tshape = targets.shape if isinstance(targets, Tensor) else np.shape(targets)
    if tuple(tshape) != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets of shape {_shape_str(tshape)} do not match logits "
                         f"{_shape_str(logits.shape)} (expected {_shape_str(logits.shape[:-1])})")
    t, checked = _index_tensor(targets, logits, V, "cross_entropy", ignore_index)
    B = logits.backend
    x2 = B.reshape(logits.data, (math.prod(logits.shape[:-1]), V))
    t1 = B.reshape(t.data, (math.prod(logits.shape[:-1]),))
    loss, saved = B.cross_entropy(x2, t1, ignore_index, checked=checked)

    def backward(g):
        return (B.reshape(B.cross_entropy_bwd(x2, t1, saved, g, ignore_index), logits.shape),)
    return Tensor._make(loss, B, (logits,), backward)


def dropout(x, p=0.1, training=True, seed=None):
    """Zero each element with probability p and scale the rest by 1/(1-p). The mask comes from a counter-based
    RNG keyed by `seed` (drawn from lab.manual_seed's generator if None), so backward re-derives it."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be a number in [0, 1), got {checks.show(p)}")
    _check_float(x, "dropout")
    if not training or p == 0.0:
        return x
    if seed is None:
        seed = _random.next_seed()
    else:  # the mask's key is 32 bits: numpy raised OverflowError outside them, the GPU wrapped the seed silently
        seed = checks.integer("dropout: seed", seed, 0, 2 ** 32 - 1)
    B = x.backend
    return Tensor._make(B.dropout(x.data, p, seed), B, (x,), lambda g: (B.dropout(g, p, seed),))


def lora_add(base_out, x, A, B, scale):
    """base_out + scale * (x A^T) B^T: LoRA's update added to a frozen layer's output.
    x (..., K), A (r, K), B (N, r), base_out (..., N). Forward fused (lora.wgsl); backward four matmuls."""
    K, N = x.shape[-1], base_out.shape[-1]
    r = A.shape[0]
    if A.shape != (r, K) or B.shape != (N, r) or base_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"lora_add: shapes do not fit: x {_shape_str(x.shape)}, A {_shape_str(A.shape)} (want (r, {K})), "
                         f"B {_shape_str(B.shape)} (want ({N}, {r})), base output {_shape_str(base_out.shape)}")
    Bk = x.backend
    M = math.prod(x.shape[:-1])
    x2 = Bk.reshape(x.data, (M, K))
    h = Bk.lora_down(x2, A.data)                                             # (M, r)
    y = Bk.lora_up_add(Bk.reshape(base_out.data, (M, N)), h, B.data, scale)  # (M, N)

    def backward(g):
        g3 = Bk.reshape(g, (1, M, N))
        dB = Bk.scalar("mul", Bk.matmul(g3, Bk.reshape(h, (1, M, r)), True, False), scale)    # s g^T h: (N, r)
        dh = Bk.scalar("mul", Bk.matmul(g3, Bk.reshape(B.data, (1, N, r))), scale)            # s g B:   (M, r)
        dA = Bk.matmul(dh, Bk.reshape(x2, (1, M, K)), True, False)                            # dh^T x:  (r, K)
        dx = Bk.matmul(dh, Bk.reshape(A.data, (1, r, K))) if x.requires_grad else None       # dh A:    (M, K)
        return (g, None if dx is None else Bk.reshape(dx, x.shape), Bk.reshape(dA, (r, K)), Bk.reshape(dB, (N, r)))
    return Tensor._make(Bk.reshape(y, base_out.shape), Bk, (base_out, x, A, B), backward)


def scaled_dot_product_attention(q, k, v, causal=True, dropout_p=0.0, training=True, return_weights=False):
    """softmax(q k^T / sqrt(D), causal mask) v for q, k, v of shape (B, H, T, D).

    The scale and the mask are fused into the softmax kernel. With return_weights=True also returns the
    attention weights (B, H, T, T) before dropout, as heatmaps show them."""
    if q.shape != k.shape or q.shape != v.shape or q.ndim != 4:
        raise ValueError(f"attention: q, k, v must share one shape (B, H, T, D), got {_shape_str(q.shape)}, "
                         f"{_shape_str(k.shape)}, {_shape_str(v.shape)}")
    scores = matmul(q, k, transpose_b=True)                               # (B, H, T, T)
    att = softmax(scores, scale=1.0 / math.sqrt(q.shape[-1]), causal=causal)
    y = matmul(dropout(att, dropout_p, training), v)                      # (B, H, T, D)
    return (y, att) if return_weights else y

def causal_self_attention(qkv, n_head, dropout_p=0.0, training=True, return_weights=False):
    """Multi-head causal self-attention from the packed projection qkv (B, T, 3C) (q, k, v side by side, as GPT-2's
    c_attn makes it) to y (B, T, C), heads merged. One autograd node: the products read q, k, v where they lie in
    the packed projection and write y (and, backward, dq, dk, dv) straight into the merged layouts (HeadView; where
    a backend's kernel cannot, it copies), where split + permute + attention + permute would copy each of them. The same
    arithmetic as scaled_dot_product_attention, the same dropout mask. With return_weights=True also returns the
    attention weights (B, H, T, T) before dropout (no gradient flows through them)."""
    if qkv.ndim != 3 or qkv.shape[2] % 3 or (qkv.shape[2] // 3) % n_head:
        raise ValueError(f"causal_self_attention: qkv must be (B, T, 3C) with C divisible by n_head={n_head}, got "
                         f"{_shape_str(qkv.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"causal_self_attention: dropout_p must be in [0, 1), got {dropout_p}")
    Bk = qkv.backend
    Bsz, T, C3 = qkv.shape
    C, H = C3 // 3, n_head
    D = C // H
    scale = 1.0 / math.sqrt(D)
    if not return_weights and Bk.flash_attention_fits(qkv.shape, H):
        # fused kernels, the weights never in memory (wgpu, heads of 64); the seed is drawn as below
        seed = _random.next_seed() if training and dropout_p > 0 else None
        y, lse = Bk.flash_attention(qkv.data, H, scale, dropout_p, seed)
        return Tensor._make(y, Bk, (qkv,), lambda g: (
            Bk.flash_attention_bwd(qkv.data, y, lse, g, H, scale, dropout_p, seed),))
    # q, k, v (B * H, T, D) where they lie in qkv, and y written straight into the merged (B, T, C) layout; a
    # backend whose kernels cannot take these views for this shape gets each head stack copied once instead
    in_place = Bk.heads_in_place(T, D)
    heads = (lambda x: x) if in_place else (lambda x: gather_heads(Bk, x))

    def product_into(view, a, b, trans_a=False, trans_b=False):
        if in_place:
            return Bk.matmul(a, b, trans_a, trans_b, triangle="a", out=view)
        return scatter_heads(Bk, view, Bk.matmul(a, b, trans_a, trans_b, triangle="a"))

    q, k, v = (heads(HeadView(qkv.data, i * C, H, D)) for i in range(3))
    # the triangle hints let the GPU skip what the causal mask zeroes (about half of each product)
    scores = Bk.matmul(q, k, False, True, triangle="out")                       # (BH, T, T)
    seed = _random.next_seed() if training and dropout_p > 0 else None
    drop = (dropout_p, seed) if seed is not None else None
    if drop is None:
        att = att_d = Bk.softmax(scores, scale, True)
    else:  # the weights and their dropped copy from one pass (the same mask as dropout())
        att, att_d = Bk.softmax(scores, scale, True, dropout=drop)
    out = Bk.empty((Bsz, T, C), qkv.data.dtype)
    product_into(HeadView(out, 0, H, D), att_d, v)                                  # y

    def backward(g):
        gy = heads(HeadView(g, 0, H, D))
        g_att = Bk.matmul(gy, v, False, True, triangle="out")  # its upper triangle meets att's zeros
        gqkv = Bk.empty((Bsz, T, C3), g.dtype)                   # the three products below write every element
        product_into(HeadView(gqkv, 2 * C, H, D), att_d, gy, True, False)        # dv
        gs = Bk.softmax_bwd(att, g_att, scale, dropout=drop)  # (through dropout's mask first, in the same pass)
        product_into(HeadView(gqkv, 0, H, D), gs, k)                              # dq
        product_into(HeadView(gqkv, C, H, D), gs, q, True, False)                 # dk
        return (gqkv,)
    y_t = Tensor._make(out, Bk, (qkv,), backward)
    if return_weights:
        return y_t, Tensor(Bk.reshape(att, (Bsz, H, T, T)), Bk)
    return y_t


# ---------------------------------------------------------------------------------------------------- Tensor methods


def _install():
    T = Tensor
    T.__add__ = add
    T.__radd__ = lambda a, b: add(a, b)
    T.__sub__ = sub
    T.__rsub__ = lambda a, b: rsub(a, b) if isinstance(b, numbers.Number) else sub(_lift(b, a), a)
    T.__mul__ = mul
    T.__rmul__ = lambda a, b: mul(a, b)
    T.__truediv__ = div
    T.__rtruediv__ = lambda a, b: rdiv(a, b) if isinstance(b, numbers.Number) else div(_lift(b, a), a)
    T.__neg__ = neg
    T.__pow__ = pow
    T.__matmul__ = lambda a, b: matmul(a, b)
    T.__rmatmul__ = lambda a, b: matmul(_lift(b, a), a)
    T.__getitem__ = getitem
    for name in ("exp", "log", "sqrt", "tanh", "relu", "gelu", "sum", "mean", "max", "reshape", "permute",
                 "transpose", "softmax", "log_softmax", "matmul", "maximum"):
        setattr(T, name, globals()[name])
    T.view = reshape
    # the last two axes swapped; a 0-D or 1-D tensor unchanged (a new node), as numpy's .T leaves it
    T.T = property(lambda a: transpose(a, -2, -1) if a.ndim >= 2 else reshape(a, a.shape))


_install()
