"""What the op modules share: lifting operands onto a tensor's backend, the dtype and axis checks, and summing a
broadcast gradient back to its operand's shape."""
import math
import numbers

import numpy as np

from ..backend import contiguous_strides
from ..tensor import QuantizedWeight, Tensor, tensor


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
    _check_tensor(x, op)
    dtype = x.dtype   # (a str made from the array's dtype: read once, this runs for every op of a step)
    if dtype in ("float32", "float64"):
        return
    if dtype == "float16":
        raise ValueError(f"{op}: float16 tensors are storage for frozen weights, read by linear (F.linear, nn.Linear) "
                         "only; lab.tensor(t.numpy(), dtype='float32') makes a float32 copy")
    raise ValueError(f"{op}: expected a floating-point tensor, got dtype {dtype} (allowed: float32, and float64 "
                     "on numpy; lab.tensor(t.numpy(), dtype='float32') makes a float copy)")


def _check_tensor(x, op):
    if not isinstance(x, Tensor):   # (an array got as far as a backend's kernel: an AttributeError from inside it)
        raise ValueError(f"{op}: expected a Tensor, got a {type(x).__name__} (lab.tensor(...) makes one)")


def _check_unpacked(x, op):
    """A packed weight (QuantizedWeight) has no float elements to view or copy: only its linear layer reads it."""
    _check_tensor(x, op)
    if isinstance(x, QuantizedWeight):
        raise ValueError(f"{op}: a {x.dtype} weight of shape {_shape_str(x.shape)} is packed (a frozen quantized "
                         f"base): only its linear layer (F.linear) multiplies by it; .numpy() gives its float32 "
                         f"values, lab.tensor(w.numpy()) a float tensor of them")


def normalize_axis(axis, ndim, op):
    """`axis` of an `ndim`-D tensor as an index 0..ndim-1: the one check of every op that takes an axis (taken modulo
    ndim, an axis out of range would silently name another one)."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise ValueError(f"{op}: axis must be an integer, got {axis!r}")
    if not -ndim <= axis < ndim:
        allowed = f"allowed {-ndim}..{ndim - 1}" if ndim else "a 0-D tensor has no axes"
        raise ValueError(f"{op}: axis {axis} is out of range for a {ndim}-D tensor ({allowed})")
    return int(axis) % ndim
