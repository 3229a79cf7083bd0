"""Reductions over axes: sum, mean, max."""
import math
import numbers

from ..backend import contiguous_strides
from ..tensor import Tensor
from ._common import _check_float, _expand, _shape_str, normalize_axis
from .elementwise import mul


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


def max(a, axis=None, keepdims=False):
    """Maximum along `axis`: an int, a tuple, or None for all elements (the default, as numpy's, PyTorch's and sum's,
    so that x / x.max() scales by one number). On ties the gradient is split evenly among the maximal elements
    (PyTorch's amax): each gets g / count, so the shares add up to g (giving each the whole g would make a gradient
    that sums to count * g, not a subgradient)."""
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
