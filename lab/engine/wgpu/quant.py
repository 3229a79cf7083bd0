"""Quantized frozen weights on the device: upload_quantized keeps lab.engine.quant's packed words as they are
(u32 storage, no float copy), quantized_matmul runs kernels/matmul_quant.wgsl, which dequantizes W's tile as it
stages it into workgroup memory."""
import math

import numpy as np

from ...checks import InputError
from .common import _round_up, _split
from .matmul_plan import storage

KINDS = {"q4_0": 0, "q4_1": 1, "int8": 2}
TILE, TK = 64, 32   # matmul_quant.wgsl's output tiles (64 x 64) and its step along K


class QuantizedGPUArray:
    """A packed weight W (out, in) on the device: `words` the quantized values, `meta` q4's (d, m) pairs or int8's
    float32 scales, both as int32 arrays holding their 32-bit patterns."""
    __slots__ = ("kind", "shape", "words", "meta")

    def __init__(self, kind, shape, words, meta):
        self.kind, self.shape, self.words, self.meta = kind, tuple(shape), words, meta

    @property
    def nbytes(self):
        return 4 * (self.words.size + self.meta.size)

    def __repr__(self):
        return f"QuantizedGPUArray(kind={self.kind!r}, shape={self.shape})"


def _packed(qa):
    """(words, meta) of a QuantizedArray as uint32 arrays of the sizes its kind and shape call for."""
    kind, shape = getattr(qa, "kind", None), getattr(qa, "shape", None)
    if kind not in KINDS:
        raise InputError(f"upload_quantized: kind {kind!r} is not one the kernels read: {sorted(KINDS)}")
    if not (isinstance(shape, tuple) and len(shape) == 2 and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise InputError(f"upload_quantized: shape must be (out, in), two counts, got {shape!r}")
    out, n_in = shape
    if kind == "int8":
        parts = (("q", qa.q, (out, math.ceil(n_in / 4)), np.uint32), ("scale", qa.scale, (out,), np.float32))
    else:
        nb = math.ceil(n_in / 32)
        parts = (("qs", qa.qs, (out, nb * 4), np.uint32), ("dm", qa.dm, (out, nb), np.uint32))
    arrays = []
    for name, a, shape, dtype in parts:
        got = "none" if a is None else f"{np.asarray(a).dtype} {np.shape(a)}"
        if a is None or np.shape(a) != shape or np.asarray(a).dtype != dtype:
            raise InputError(f"upload_quantized: a {kind} weight of shape {qa.shape} needs {name} {np.dtype(dtype)} "
                             f"{shape}, got {got}")
        arrays.append(np.ascontiguousarray(a).view(np.int32))
    return arrays


class QuantOps:
    """WgpuBackend's quantized-weight capability (Backend.upload_quantized, Backend.quantized_matmul)."""

    def upload_quantized(self, qa):
        words, meta = _packed(qa)
        return QuantizedGPUArray(qa.kind, qa.shape, self.from_numpy(words), self.from_numpy(meta))

    def quantized_matmul(self, x, qw, transpose=False):
        """x (N, in) @ W^T -> (N, out), or with transpose x (N, out) @ W -> (N, in), for W = qw (out, in)."""
        if not isinstance(qw, QuantizedGPUArray):
            raise InputError(f"quantized_matmul: the weight must be upload_quantized's handle on this backend, got "
                             f"{type(qw).__name__}")
        out_dim, in_dim = qw.shape
        k, cols = (out_dim, in_dim) if transpose else (in_dim, out_dim)
        if len(x.shape) != 2 or x.dtype != "float32" or x.shape[1] != k:
            raise InputError(f"quantized_matmul: x {x.dtype} {tuple(x.shape)} does not align with the {qw.kind} weight "
                             f"(out, in) = {qw.shape}{' transposed' if transpose else ''}: needs float32 (N, {k})")
        M = x.shape[0]
        if not self._matmul_limits.workgroup_storage >= storage("matmul_quant"):
            raise ValueError(f"quantized_matmul: kernels/matmul_quant.wgsl needs {storage('matmul_quant')} bytes of "
                             f"workgroup memory, more than this device's {self._matmul_limits.workgroup_storage}")
        tiles = math.ceil(cols / TILE) * math.ceil(M / TILE)
        S, kc = 1, max(k, 1)
        t = self.matmul_tuning
        if 0 < tiles < t.SPLIT_K_TILES and k >= t.SPLIT_K_MIN_K:   # too few tiles to fill the device: split as matmul
            S, kc = _split(k, t.SPLIT_K_MIN_CHUNK, math.ceil(t.SPLIT_K_TILES / tiles))
            kc = _round_up(kc, TK)   # (whole TK steps: no tile straddles two chunks)
            S = math.ceil(k / kc)
        if k == 0:
            return self.full((M, cols), 0.0)
        y = self._alloc((S * M, cols), "float32")
        entry = "backward" if transpose else "forward"
        label = f"quantized matmul {qw.kind} {entry} {M}x{in_dim}x{out_dim}" + (f" split {S}" if S > 1 else "")
        # a grid beyond the device's workgroups per dimension runs as several, each from its first tile
        most = self._matmul_limits.max_workgroups
        tile_cols, tile_rows = math.ceil(cols / TILE), math.ceil(M / TILE)
        for c0 in range(0, tile_cols, most):
            for r0 in range(0, tile_rows, most):
                grid = (min(most, tile_cols - c0), min(most, tile_rows - r0), S)
                self._dispatch("matmul_quant", entry, [M, in_dim, out_dim, kc, c0, r0], [x, qw.words, qw.meta, y],
                               grid, M * cols * k, (("KIND", KINDS[qw.kind]),), label=label)
        if S > 1:
            y = self.reshape(self.reduce("sum", self.reshape(y, (S, M * cols)), 0), (M, cols))
        return y
