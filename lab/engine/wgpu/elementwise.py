"""Elementwise ops, reductions and strided copies."""
import math

import numpy as np

from ..backend import MAXDIM, broadcast_strides, contiguous_strides
from .common import _f32bits, _grid, _split


class ElementwiseOps:
    """WgpuBackend's unary, scalar, binary, reduce, copy_view and write_view."""
    _SUBS_DEFAULT = (("UNARY", "u_neg"), ("SCALAR", "s_add"), ("BINARY", "b_add"))

    def _ew_subs(self, key, fn):
        return tuple((k, fn if k == key else v) for k, v in self._SUBS_DEFAULT)

    def unary(self, op, a):
        out = self._alloc(a.shape, "float32")
        self._flat("elementwise", "unary_main", [a.size], [a, None, out], a.size, self._ew_subs("UNARY", "u_" + op))
        return out

    def scalar(self, op, a, c):
        out = self._alloc(a.shape, "float32")
        self._flat("elementwise", "scalar_main", [a.size, _f32bits(c)], [a, None, out], a.size,
                   self._ew_subs("SCALAR", "s_" + op))
        return out

    def binary(self, op, a, b):
        shape = tuple(np.broadcast_shapes(a.shape, b.shape))
        out = self._alloc(shape, "float32")
        if a.shape == b.shape:  # the common case: one flat dimension
            dims, sa, sb = [out.size], [1], [1]
        else:
            dims, sa, sb = list(shape), broadcast_strides(a.shape, shape), broadcast_strides(b.shape, shape)
            if len(dims) > MAXDIM:
                raise ValueError(f"broadcasting supports at most {MAXDIM} dimensions, got shape {shape}")
        pad = [0] * (MAXDIM - len(dims))
        params = [out.size, len(dims)] + dims + pad + sa + pad + sb + pad
        self._flat("elementwise", "binary_main", params, [a, b, out], out.size, self._ew_subs("BINARY", "b_" + op))
        return out

    def add_(self, dst, src):
        if src.size != dst.size:
            raise ValueError(f"add_: {src.shape} into {dst.shape}: the sizes differ")
        self._flat("elementwise", "add_into_main", [dst.size], [None, src, dst], dst.size, self._SUBS_DEFAULT)
        return dst

    # ------------------------------------------------------------------ reductions and data movement
    # max starts from -inf (bits 0xff800000): -3.4e38 is above -FLT_MAX and came back as the maximum of -inf entries
    _REDUCE = {"sum": ("r_add", "m_id", "0.0"), "max": ("r_max", "m_id", "bitcast<f32>(0xff800000u)"),
               "sumsq": ("r_add", "m_square", "0.0")}

    def _reduce_into(self, op, a, axis, out, out_offset):
        outer, n, inner = math.prod(a.shape[:axis]), a.shape[axis], math.prod(a.shape[axis + 1:])
        if outer * inner == 0:  # an empty result (a (2, 0) summed over axis 0): nothing to compute or to write
            return
        self._reduce_passes(op, a, outer, n, inner, out, out_offset)

    def _reduce_passes(self, op, src, outer, n, inner, out, out_offset, tail=None):
        """Reduce src viewed as (outer, n, inner) along n into out[out_offset:], chunking n while the output
        alone is too small to fill the device (see reduce.wgsl). tail (array, at), outer 1: the result's columns
        from `at` on go to that array instead (a split product and its column sums: matmul_column_sums)."""
        combine, fmap, ident = self._REDUCE[op]
        while True:
            if inner == 1:  # a workgroup per (o, chunk): chunks of up to 4096 elements, 16 per thread
                S, chunk = _split(n, 4096, math.ceil(4096 / max(outer, 1)))
            else:           # a thread per (o, chunk, j): aim for ~128K threads, chunks of at least 16 rows
                S, chunk = _split(n, 16, math.ceil(131072 / (outer * inner)))
            last = S == 1
            dst, dst_off = (out, out_offset) if last else (self._alloc((outer * S * inner,), "float32"), 0)
            rest, at = tail if last and tail else (None, inner)
            params = [outer, n, inner, dst_off, S, chunk, at]
            subs = (("COMBINE", combine), ("MAP", fmap), ("IDENTITY", ident))
            if inner == 1:
                self._dispatch("reduce", "rows_main", params, [src, dst], _grid(outer * S), outer * S, subs)
            else:
                self._flat("reduce", "columns_main", params, [src, dst, rest], outer * S * inner, subs)
            if last:
                return
            src, n, fmap = dst, S, "m_id"

    def reduce(self, op, a, axis):
        out = self._alloc(a.shape[:axis] + a.shape[axis + 1:], "float32")
        self._reduce_into(op, a, axis, out, 0)
        return out

    def _copy(self, src, src_off, src_strides, dst, dst_off, dst_strides, shape):
        if len(shape) > MAXDIM:
            raise ValueError(f"strided copy supports at most {MAXDIM} dimensions, got shape {tuple(shape)}")
        pad = [0] * (MAXDIM - len(shape))
        n = math.prod(shape)
        params = [n, len(shape), src_off, dst_off] + list(shape) + pad + list(src_strides) + pad + list(dst_strides) + pad
        self._flat("copy", "copy_main", params, [src, dst], n)

    def copy_view(self, a, offset, shape, strides):
        out = self._alloc(shape, a.dtype)
        self._copy(a, offset, strides, out, 0, contiguous_strides(shape), shape)
        return out

    def write_view(self, dst, offset, strides, src):
        self._copy(src, 0, contiguous_strides(src.shape), dst, offset, strides, src.shape)
