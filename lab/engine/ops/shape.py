"""Shape ops: reshape, permute, transpose, indexing, concat, split, stack. Views are copied through the backend's
strided copy (copy_view); their backwards write the gradient back through the same strides."""
import builtins as _builtins  # sum and max are ops of this package: the builtins are named as such throughout
import math
import numbers

import numpy as np

from ..backend import contiguous_strides
from ..tensor import Tensor
from ._common import _check_tensor, _check_unpacked, _shape_str, normalize_axis


def reshape(a, *shape):
    _check_unpacked(a, "reshape")
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
    _check_unpacked(a, "permute")
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
    _check_unpacked(a, "getitem")
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
    for t in tensors:
        _check_unpacked(t, "concat")
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
    out = B.empty(tuple(shape), first.dtype)   # (the parts write every element)
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
    for t in tensors:
        _check_tensor(t, "stack")
    shape = tensors[0].shape
    for t in tensors[1:]:
        if t.shape != shape:
            raise ValueError(f"stack: shapes {_shape_str(shape)} and {_shape_str(t.shape)} differ; stack needs one shape")
    ax = normalize_axis(axis, len(shape) + 1, "stack")
    return concat([reshape(t, shape[:ax] + (1,) + shape[ax:]) for t in tensors], ax)
