"""The numpy backend: the reference implementation of every primitive, and the fast path on CPU-only machines.

Works in the dtype it is given (float32 normally, float64 for finite-difference gradient checks).
"""
import ctypes
import math
import os
import sys

import numpy as np

from . import blas, quant
from .backend import Backend, HeadView, check_index_range

SQRT_2_OVER_PI = 0.7978845608028654
GELU_C = 0.044715
SHIFT_FREE = 64.0  # softmax: exp of scores in (-64, 64) neither overflows float32 (a sum of up to 10^9 of them)
# nor leaves a row whose sum underflows (each row's largest term is above exp(-64))
GELU_CHUNK = 1 << 15  # elements per in-cache pass (GELU, AdamW, dropout: 128 KiB of float32, in a core's L2)
BLOCK = 1 << 16   # elements of a block of softmax's rows (256 KiB of float32), for arrays over IN_CACHE elements:
IN_CACHE = 1 << 18   # up to 1 MiB, an array and its result stay in a core's L2 whole, and blocks only add calls
ONE_HOT_LIMIT = 1 << 22  # embedding backward through a one-hot matrix up to this many elements (16 MiB)


def _at_least_1d(a):
    return a.reshape(1) if a.ndim == 0 else a


def _row_sum(a):
    """Sums over the last axis, kept as a length-1 axis. A matrix-vector product with ones: BLAS does it about
    5x faster than a.sum(-1) on the short rows here (64 to 512 wide)."""
    return (a @ np.ones(a.shape[-1], dtype=a.dtype))[..., None]


def _row_dot(a, b):
    """sum(a * b) over the last axis, kept as a length-1 axis, without the product's temporary. (np.vecdot was
    10-40% faster but less accurate end to end: SmolLM2's logits against a float64 run, rms 1.36e-5 with einsum,
    1.51e-5 with vecdot; PyTorch's float32 1.30e-5. This backend is the reference.)"""
    return np.einsum("...i,...i->...", a, b)[..., None]


def _sum(a, axis):
    """a.sum(axis) for float arrays as a product with a ones vector where that is one BLAS call (rows: 2-5x
    faster than numpy's reduction on these shapes). Always a new array: callers may update results in place."""
    n = a.shape[axis]
    if a.dtype.kind != "f" or a.ndim == 0:
        return a.sum(axis=axis)
    rest = a.shape[:axis] + a.shape[axis + 1:]
    ones = np.ones(n, dtype=a.dtype)
    if axis == a.ndim - 1:
        return (a.reshape(math.prod(rest), n) @ ones).reshape(rest)
    if math.prod(a.shape[:axis]) == 1:
        return (ones @ a.reshape(n, math.prod(rest))).reshape(rest)
    return a.sum(axis=axis)


def _row_max(a):
    """Maximum over the last axis, kept as a length-1 axis. Halving the row with np.maximum is about 1.5x
    faster than a.max(-1) on short rows (numpy reduces those one row at a time)."""
    n, m = a.shape[-1], a
    while n > 1 and n % 2 == 0:
        n //= 2
        m = np.maximum(m[..., :n], m[..., n:])
    return m if n == 1 else m.max(axis=-1, keepdims=True)


def _gelu_tanh(x):
    """tanh(u), u = sqrt(2/pi) (x + 0.044715 x^3): GELU's inner term, computed in place (numpy's passes over
    memory, not its arithmetic, are the cost here)."""
    t = x * x
    t *= x.dtype.type(SQRT_2_OVER_PI * GELU_C)
    t += x.dtype.type(SQRT_2_OVER_PI)
    t *= x
    return np.tanh(t, out=t)


def _gelu(x):
    """gelu(x) = 0.5 x (1 + tanh u)."""
    y = _gelu_tanh(x)
    y += 1
    y *= x
    y *= x.dtype.type(0.5)
    return y


def pcg(x):
    """PCG-RXS-M-XS 32-bit output permutation; the same function as dropout.wgsl, bit for bit."""
    x = np.asarray(x, dtype=np.uint32)
    s = x * np.uint32(747796405) + np.uint32(2891336453)
    w = ((s >> ((s >> np.uint32(28)) + np.uint32(4))) ^ s) * np.uint32(277803737)
    return (w >> np.uint32(22)) ^ w


_IDX = np.arange(GELU_CHUNK, dtype=np.uint32)


def _dropout_into(x, out, p, seed, start=0, times=1.0):
    """out = dropout(x) * times for flat arrays whose first element is element `start` of the dropped array: kept
    where u_i >= p, u_i = (pcg(i ^ pcg(seed)) >> 8) / 2^24, scaled by times / (1 - p), else +0 (dropout.wgsl's
    select, bit for bit). u_i >= p is compared as integers: (h >> 8) >= ceil(float32(p) 2^24), exact since h >> 8 <
    2^24. The mask's dozen integer passes and the select run GELU_CHUNK elements at a time, in cache: over a whole
    attention matrix they went to memory, and np.where's select alone cost as much as the mask (5x on (48, 256,
    256))."""
    m = min(GELU_CHUNK, x.size)
    key = int(pcg(np.array([seed], dtype=np.uint32))[0])
    low, mul, inc = GELU_CHUNK - 1, 747796405, 2891336453   # (pcg's first step: s = h mul + inc)
    # for a chunk starting at a multiple of GELU_CHUNK, h = i ^ key = (idx ^ (key & low)) | high, the two parts'
    # bits disjoint: s = (idx ^ (key & low)) mul + (high mul + inc) mod 2^32, its first product made once a call
    # (one pass a chunk where three were)
    idx_mul = np.bitwise_xor(_IDX[:m], np.uint32(key & low))
    idx_mul *= np.uint32(mul)
    h, w = np.empty(m, np.uint32), np.empty(m, np.uint32)
    threshold = math.ceil(float(np.float32(p)) * 16777216.0)
    below = np.uint32((threshold - 1) & 0xFFFFFFFF)
    scale = x.dtype.type(times / (1.0 - p))
    for i in range(0, x.size, GELU_CHUNK):
        k = min(GELU_CHUNK, x.size - i)
        hs, ws, o = h[:k], w[:k], out[i:i + k]
        c = (start + i) & 0xFFFFFFFF   # (the counter wraps at 2^32, as on the GPU)
        if c & low == 0:
            np.add(idx_mul[:k], np.uint32((((c ^ key) & ~low) * mul + inc) & 0xFFFFFFFF), out=hs)
        else:
            np.add(_IDX[:k], np.uint32(c), out=hs)
            hs ^= np.uint32(key)
            hs *= np.uint32(mul)                        # pcg(h), as pcg() computes it
            hs += np.uint32(inc)
        np.right_shift(hs, np.uint32(28), out=ws)
        ws += np.uint32(4)
        np.right_shift(hs, ws, out=ws)
        ws ^= hs
        ws *= np.uint32(277803737)
        np.right_shift(ws, np.uint32(22), out=hs)
        hs ^= ws
        hs >>= np.uint32(8)
        np.multiply(x[i:i + k], scale, out=o)
        if x.dtype.itemsize == 4:   # the select as a bitwise and: all ones where kept, zero where dropped:
            np.subtract(below, hs, out=hs)   # threshold - 1 - h, negative as int32 exactly where h >= threshold
            signs = hs.view(np.int32)        # (both below 2^24), and its sign spread over the word
            np.right_shift(signs, np.int32(31), out=signs)
            np.bitwise_and(o.view(np.uint32), hs, out=o.view(np.uint32))
        else:
            np.copyto(o, 0, where=hs < np.uint32(threshold))


def dropout_keep_mask(n, p, seed):
    """keep[i] for elements 0..n-1: dropout's mask (_dropout_into's), as booleans."""
    out = np.empty(n, np.float32)
    _dropout_into(np.ones(n, np.float32), out, p, seed)
    return out != 0


def _per_block(items, item_size):
    """How many items (rows, matrices) of item_size elements to take per in-cache block: all of them where they fit
    the cache together."""
    return max(1, items) if items * item_size <= IN_CACHE else max(1, BLOCK // item_size)   # (>= 1: a range's step)


UNARY = {
    "neg": np.negative, "exp": np.exp, "log": np.log, "sqrt": np.sqrt, "tanh": np.tanh,
    "relu": lambda x: np.maximum(x, 0),
    "gelu": _gelu,
}
SCALAR = {
    "add": lambda x, c: x + c, "mul": lambda x, c: x * c, "rsub": lambda x, c: c - x,
    "rdiv": lambda x, c: c / x, "div": lambda x, c: x / c, "pow": lambda x, c: x ** c,
}


def _gelu_bwd(x, g):
    """d gelu / dx = 0.5 (1 + t) + 0.5 x (1 - t^2) u',  t = tanh u,  u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2)."""
    f = x.dtype.type
    t = _gelu_tanh(x)
    xdu = x * x                        # becomes x u'
    xdu *= f(3 * SQRT_2_OVER_PI * GELU_C)
    xdu += f(SQRT_2_OVER_PI)
    xdu *= x
    d = t * t
    np.subtract(1, d, out=d)
    d *= xdu
    d += t
    d += 1
    d *= g
    d *= f(0.5)
    return d


def _sigmoid_and_silu(x):
    with np.errstate(over="ignore"):   # exp(-x) = inf for x < -88 (float32): sigmoid 0, silu -0
        s = 1.0 / (1.0 + np.exp(-x))
    return s, x * s


def _gelu_and_grad(x):
    """gelu(x) and gelu'(x) together, while x is still in the cache from the product that made it: the backward is
    then one multiply, where recomputing tanh from a long-evicted x cost twice the forward's time. With
    h = (1 + tanh u) / 2: gelu = x h, gelu' = h + 0.5 x u' (1 - tanh^2 u) = h + 2 x u' h (1 - h). Its dozen passes
    run over GELU_CHUNK elements at a time, so that they stay in the core's cache: over a whole activation each pass
    went to memory (and its temporaries to fresh pages), 2x slower on tiny's (768, 512), 3x on a (16384, 1536)."""
    f = x.dtype.type
    flat = x.reshape(-1)
    y, d = np.empty_like(flat), np.empty_like(flat)
    buf = np.empty(min(GELU_CHUNK, flat.size), x.dtype)
    for i in range(0, flat.size, GELU_CHUNK):
        xs, h, ds = flat[i:i + GELU_CHUNK], y[i:i + GELU_CHUNK], d[i:i + GELU_CHUNK]
        w = np.multiply(xs, xs, out=buf[:len(xs)])
        np.multiply(w, f(SQRT_2_OVER_PI * GELU_C), out=h)
        h += f(SQRT_2_OVER_PI)
        h *= xs
        np.tanh(h, out=h)
        h *= f(0.5)
        h += f(0.5)
        w *= f(2 * 3 * SQRT_2_OVER_PI * GELU_C)   # 2 u' / x
        w += f(2 * SQRT_2_OVER_PI)
        w *= xs
        w *= h
        np.subtract(f(1), h, out=ds)
        ds *= w
        ds += h
        h *= xs
    return y.reshape(x.shape), d.reshape(x.shape)


BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide, "maximum": np.maximum,
    "eq": lambda a, b: (a == b).astype(np.result_type(a, b)),
    "relu_bwd": lambda x, g: np.where(x <= 0, 0, g).astype(g.dtype),  # (a NaN input passes g on, as PyTorch's)
    "tanh_bwd": lambda y, g: g * (1 - y * y),
    "sqrt_bwd": lambda y, g: g * 0.5 / y,
    "gelu_bwd": _gelu_bwd,
}


def _keep_freed_memory_for_reuse():
    """Training makes the same large temporaries (activations, gradients) every step. glibc serves blocks over
    its mmap threshold with fresh mmap'd pages, which the kernel must zero on first touch, every time; that was
    a third of a step's time. Raising the threshold to its maximum (32 MiB) and not trimming the heap makes freed
    temporaries come back from the heap instead. Process-wide; LAB_KEEP_MALLOC=1 leaves malloc alone."""
    if not sys.platform.startswith("linux") or os.environ.get("LAB_KEEP_MALLOC") == "1":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def _chunks(*arrays):
    """Equally sized arrays as flat views GELU_CHUNK elements at a time, for in-place passes that should run in
    cache; arrays that fit one chunk (or any not contiguous, which has no flat view to write through) whole."""
    if arrays[0].size <= GELU_CHUNK or not all(a.flags.c_contiguous for a in arrays):
        return [arrays]
    flat = [a.reshape(-1) for a in arrays]
    return [tuple(a[i:i + GELU_CHUNK] for a in flat) for i in range(0, flat[0].size, GELU_CHUNK)]


def _plus(x, b):
    """x += b where b is not None; x."""
    if b is not None:
        x += b
    return x


def _clip_to(g, norm, max_norm):
    """Scale g in place as clip_ does, given the global norm (the optimizers' fused clipping)."""
    if max_norm > 0:
        if norm is None:
            raise ValueError("clipping to max_norm needs the gradient norm as guard")
        g *= min(1.0, max_norm / (float(norm.reshape(-1)[0]) + 1e-6))


def _heads4(x, Bsz, heads):
    """A HeadView, or a (B * heads | 1, rows, cols) array, as a (B | 1, heads | 1, rows, cols) numpy view."""
    if isinstance(x, HeadView):
        item = x.data.itemsize
        return np.lib.stride_tricks.as_strided(x.data.reshape(-1)[x.offset:], shape=x.shape4(),
                                               strides=[st * item for st in x.strides()])
    if x.shape[0] == 1:
        return x.reshape((1, 1) + x.shape[1:])
    return x.reshape((Bsz, heads) + x.shape[1:])


class NumpyBackend(Backend):
    name = "numpy"
    def __init__(self):
        self._stats = {"dispatches": 0, "submits": 0, "readbacks": 0}
        self.malloc_tuned = _keep_freed_memory_for_reuse()
        self.blas = blas.describe()   # (LAB_BLAS checked here, once: a bad value is an error before any step)
        self._masks = {}

    # -- memory --
    def from_numpy(self, x):
        return np.array(x, copy=True, order="C")

    def to_numpy(self, a):
        return np.array(a, copy=True)

    def full(self, shape, value, dtype="float32"):
        if value == 0 and not np.signbit(value):   # calloc's zeros: no page is touched until written (a model's
            return np.zeros(shape, dtype=dtype)     # parameters being loaded, a KV cache's unused positions)
        return np.full(shape, value, dtype=dtype)

    def empty(self, shape, dtype="float32"):
        return np.empty(shape, dtype=dtype)

    def write(self, a, x):
        x = np.asarray(x)
        if x.size != a.size:
            raise ValueError(f"write: {x.size} values for an array of shape {a.shape}")
        np.copyto(a, x.reshape(a.shape), casting="same_kind")

    def reshape(self, a, shape):
        return a.reshape(shape)

    def storage(self, a):
        while isinstance(a, np.ndarray) and a.base is not None:
            a = a.base
        return a

    def stats(self):
        return dict(self._stats, bytes_in_use=None, peak_bytes_in_use=None)

    # -- elementwise --
    # numpy turns arithmetic on 0-D arrays into scalars, which have no out= and no in-place update: the elementwise
    # primitives work on a 0-D input as shape (1,) and give the result back its shape ()
    def unary(self, op, a):
        with np.errstate(all="ignore"):
            return UNARY[op](_at_least_1d(a)).astype(a.dtype, copy=False).reshape(a.shape)

    def scalar(self, op, a, c):
        with np.errstate(all="ignore"):
            return SCALAR[op](_at_least_1d(a), a.dtype.type(c)).astype(a.dtype, copy=False).reshape(a.shape)

    gelu_keeps_grad = True   # (recomputing tanh in the backward costs more on the host than keeping the slope)

    def gelu_and_grad(self, x):
        with np.errstate(all="ignore"):
            return tuple(r.reshape(x.shape) for r in _gelu_and_grad(_at_least_1d(x)))

    def binary(self, op, a, b):
        with np.errstate(all="ignore"):
            out = np.ascontiguousarray(BINARY[op](_at_least_1d(a), _at_least_1d(b)))
        return out.reshape(()) if a.ndim == 0 and b.ndim == 0 else out

    def add_(self, dst, src):
        np.add(dst, src.reshape(dst.shape), out=dst)
        return dst

    # -- reductions and data movement --
    def reduce(self, op, a, axis):  # (a reduction to shape () is a numpy scalar: made a 0-D array)
        if op == "sum":
            return np.asarray(_sum(a, axis))
        if op == "max":
            return np.asarray(a.max(axis=axis))
        if op == "sumsq":
            return np.asarray((a * a).sum(axis=axis))
        raise ValueError(f"unknown reduction {op!r}")

    def copy_view(self, a, offset, shape, strides):
        item = a.itemsize
        view = np.lib.stride_tricks.as_strided(a.reshape(-1)[offset:], shape=shape,
                                               strides=[s * item for s in strides])
        return np.array(view, copy=True, order="C")  # a copy even where the view is contiguous, as on wgpu

    def write_view(self, dst, offset, strides, src):
        item = dst.itemsize
        view = np.lib.stride_tricks.as_strided(dst.reshape(-1)[offset:], shape=src.shape,
                                               strides=[s * item for s in strides])
        view[...] = src

    # -- fused --
    def matmul(self, a, b, trans_a=False, trans_b=False, bias=None, triangle=None, out=None,  # (no use for hints)
               residual=None):
        if isinstance(a, HeadView) or isinstance(b, HeadView) or out is not None:
            return self._matmul_heads(a, b, trans_a, trans_b, out)
        # float16 operands are storage (frozen weights): the product is float32 arithmetic, as on the GPU
        a, b = (x.astype(np.float32) if x.dtype == np.float16 else x for x in (a, b))
        a = a.swapaxes(-1, -2) if trans_a else a
        b = b.swapaxes(-1, -2) if trans_b else b
        if trans_b and b.ndim == 3 and b.shape[0] > 1:
            # numpy's stacked matmul takes a transposed B 25% slower than a copy of it laid out plainly
            # (attention's q k^T, 48 x 64 x 32 x 64: 199 against 151 us with the copy); a single product hands
            # the transpose to BLAS, which is faster as it is
            b = np.ascontiguousarray(b)
        out = blas.matmul(a, b)
        if bias is not None:
            out += bias
        if residual is not None:
            out += residual
        return out

    def heads_in_place(self, seq, dim):
        return True

    def linears_fit(self, rows, weights, how):
        return True   # (a decode layer's q, k, v or gate, up: one op instead of each linear's, then concat/swiglu)

    def linears(self, a, weights, biases, how):
        # (numpy's own calls, not self.matmul: lab.profile times this as one primitive)
        if how == "swiglu":
            gate, up = (_plus(blas.matmul(a, w.astype(np.float32, copy=False)), b) for w, b in zip(weights, biases))
            return _sigmoid_and_silu(gate)[1] * up
        out = np.empty(a.shape[:-1] + (sum(w.shape[1] for w in weights),), np.float32)
        o = 0
        for w, b in zip(weights, biases):   # each product written into its columns: no concat copy
            _plus(blas.matmul(a, w.astype(np.float32, copy=False), out=out[..., o:o + w.shape[1]]), b)
            o += w.shape[1]
        return out

    def quantized_matmul(self, x, qw, transpose=False):
        # a chunk of W's rows dequantized at a time (quant.chunk_rows: 2 MB of floats): a layer's float32 weight is
        # never whole in memory, only its packed bytes
        n_out, n_in = qw.shape
        dtype = np.result_type(x.dtype, np.float32)   # a float64 input's product in float64, as linear's
        out = np.zeros((x.shape[0], n_in), dtype) if transpose else np.empty((x.shape[0], n_out), dtype)
        step = quant.chunk_rows(qw)
        for o in range(0, n_out, step):
            w = quant.dequantize(qw, o, o + step)
            if transpose:
                out += blas.matmul(x[:, o:o + step], w)
            else:
                blas.matmul(x, w.T, out=out[:, o:o + step])
            del w   # before the next chunk is made: one chunk's floats at a time
        return out

    def _matmul_heads(self, a, b, trans_a, trans_b, out):
        """Products with HeadView operands or destination: every operand as a (B, heads, rows, cols) view, the
        heads read and written where they lie (BLAS takes rows any distance apart)."""
        views = [x for x in (a, b, out) if isinstance(x, HeadView)]
        Bsz, H = views[0].data.shape[0], views[0].heads
        a, b = (_heads4(x, Bsz, H) for x in (a, b))
        a = a.swapaxes(-1, -2) if trans_a else a
        b = b.swapaxes(-1, -2) if trans_b else b
        if trans_b and b.size <= IN_CACHE:
            # a small transposed B (attention's keys at tiny's (48, 64, 32)) laid out plainly first: 25% faster with
            # the copy; a large one's transposing copy costs more than the product gains
            b = np.ascontiguousarray(b)
        if out is None:
            return blas.matmul(a, b).reshape((Bsz * H,) + (a.shape[-2], b.shape[-1]))
        blas.matmul(a, b, out=_heads4(out, Bsz, H))
        return out

    def softmax(self, a, scale=1.0, causal=False, dropout=None, length=None):
        if length is not None:  # the first `length` columns of every row; the rest get exactly 0
            y = np.zeros_like(a)
            y[..., :length] = self.softmax(a[..., :length], scale)
            return y
        out = np.empty(a.shape, a.dtype)
        dropped = np.empty(a.shape, a.dtype) if dropout is not None else None   # (y, dropout(y)): attention's
        # weights and what its product uses. Both a block of whole matrices (rows with causal) at a time, in cache:
        # the half dozen passes over a whole (48, 256, 256) went to memory
        if a.size == 0:
            return out if dropout is None else (out, dropped)
        T, S = (a.shape[-2] if causal else 1), (a.shape[-1] if a.ndim else 1)
        a3, y3 = a.reshape(-1, T, S), out.reshape(-1, T, S)
        mask = self._causal_mask(T, S, a.dtype) if causal else None
        k = _per_block(len(a3), T * S)
        for j in range(0, len(a3), k):
            x = np.multiply(a3[j:j + k], a.dtype.type(scale), out=y3[j:j + k])
            # exp(x - c) / sum for any c: the row max keeps exp from overflowing and a row's sum from vanishing,
            # but finding it row by row is 40% of the time on attention's short rows. Two reductions over the
            # block bound every row instead: all scores within +-SHIFT_FREE need no shift at all, a range narrower
            # than that is shifted by the largest; only wider ones take the row max.
            hi, lo = x.max(initial=-np.inf), x.min(initial=np.inf)
            if causal:
                x += mask
            with np.errstate(invalid="ignore"):  # rows holding inf give nan, as they should, without a warning
                if not (-SHIFT_FREE < lo and hi < SHIFT_FREE):
                    x -= hi if hi - lo < SHIFT_FREE else _row_max(x)
            np.exp(x, out=x)
            # (a divide, not a multiply by the reciprocal: that rounds twice and raised SmolLM2's logits' rms
            # error against a float64 run from 1.36e-5 to 1.68e-5, for a 4% faster softmax)
            x /= _row_sum(x)
            if dropout is not None:
                _dropout_into(x.reshape(-1), dropped.reshape(-1)[j * T * S:(j + k) * T * S], *dropout,
                              start=j * T * S)
        return out if dropout is None else (out, dropped)

    def _causal_mask(self, rows, cols, dtype):
        """Additive mask: 0 where column j <= row i, -inf above the diagonal. Made once per shape."""
        key = (rows, cols, np.dtype(dtype).str)
        if key not in self._masks:
            self._masks[key] = np.triu(np.full((rows, cols), -np.inf, dtype=dtype), 1)
        return self._masks[key]

    def softmax_bwd(self, y, g, scale=1.0, dropout=None, dropped=None):
        S = y.shape[-1] if y.ndim else 1
        out = np.empty(y.shape, np.result_type(y, g))
        if dropout is None or dropped is None:
            dropped = None
        elif dropped.shape != y.shape:
            raise ValueError(f"softmax_bwd: dropped has shape {dropped.shape}, y {y.shape}: they must be equal")
        if y.size == 0:
            return out
        g2, y2, d2 = np.ascontiguousarray(g).reshape(-1, S), y.reshape(-1, S), out.reshape(-1, S)
        rows = _per_block(len(y2), S)   # (a block of rows at a time, in cache, as softmax)
        if dropped is not None:
            z2, f = np.ascontiguousarray(dropped).reshape(-1, S), out.dtype.type
            ys_s = np.empty((min(rows, len(y2)), S), out.dtype)
        for r in range(0, len(y2), rows):
            gs, ys, d = g2[r:r + rows], y2[r:r + rows], d2[r:r + rows]
            if dropped is not None:
                # z = dropout(y) = y mask / (1 - p): g's gradient through the mask is gm = g mask / (1 - p), and
                # softmax's backward y (gm - sum(gm y)) = g z - y sum(g z). The mask's dozen integer passes are
                # not made again (2/3 of the backward's time)
                with np.errstate(invalid="ignore", over="ignore"):   # (an inf in g: checked just below)
                    gz = np.multiply(gs, z2[r:r + rows], out=d)
                    s = _row_sum(gz)
                if np.isfinite(s).all():   # (else an inf or NaN in g: through the mask below, whose select
                    if scale != 1.0:       # drops it where dropped, as the kernel's; g z would make it NaN)
                        s *= f(scale)
                        gz *= f(scale)
                    gz -= np.multiply(ys, s, out=ys_s[:len(ys)])
                    continue
            if dropout is not None:  # g is the gradient of dropout(y): through dropout's backward first, with the
                _dropout_into(gs.reshape(-1), d.reshape(-1), *dropout, start=r * S, times=scale)   # scale folded in
                gs = d
            np.subtract(gs, _row_dot(gs, ys), out=d)
            d *= ys
            if scale != 1.0 and dropout is None:
                d *= y.dtype.type(scale)
        return out

    def log_softmax(self, a):
        if a.size == 0:  # (an empty row has no max; the result is as empty as the input, as on wgpu)
            return a.copy()
        m = a.max(axis=-1, keepdims=True)
        return a - m - np.log(np.exp(a - m).sum(axis=-1, keepdims=True))

    def log_softmax_bwd(self, y, g):
        return g - np.exp(y) * g.sum(axis=-1, keepdims=True)

    def layernorm(self, x, w, b, eps, residual=None):
        # (with residual, the add fused in: LayerNorm of x + residual, and that sum.) A block of rows at a time, in
        # cache: the half dozen passes over a shakespeare-char activation (3 MiB) went to memory
        n, R = x.shape[-1], math.prod(x.shape[:-1])
        f = x.dtype.type
        dtype = x.dtype if residual is None else np.result_type(x, residual)
        y, mean, rstd = np.empty((R, n), dtype), np.empty(R, dtype), np.empty(R, dtype)
        total = np.empty((R, n), dtype) if residual is not None else None
        x2, res2 = x.reshape(R, n), (residual.reshape(R, n) if residual is not None else None)
        ones = np.ones(n, dtype)
        rows = _per_block(R, n)
        for r in range(0, R, rows):
            xs = x2[r:r + rows] if total is None else np.add(x2[r:r + rows], res2[r:r + rows], out=total[r:r + rows])
            m = np.divide(xs @ ones, f(n), out=mean[r:r + rows])
            ys = np.subtract(xs, m[:, None], out=y[r:r + rows])
            rs = np.divide(_row_dot(ys, ys)[:, 0], f(n), out=rstd[r:r + rows])   # (in place: each small op costs
            rs += f(eps)                                                     # a few us at tiny's 768 rows)
            np.sqrt(rs, out=rs)
            np.divide(f(1), rs, out=rs)
            ys *= rs[:, None]   # (((x - mean) rstd) w + b, as layernorm.wgsl rounds it; rstd w as one (rows, n)
            ys *= w             # product first was faster alone, slower in a training step: one more array)
            ys += b
        out = y.reshape(x.shape), mean.reshape(x.shape[:-1]), rstd.reshape(x.shape[:-1])
        return out if total is None else out + (total.reshape(x.shape),)

    def layernorm_bwd(self, x, w, mean, rstd, g, acc=None):
        n, R = x.shape[-1], math.prod(x.shape[:-1])
        dtype = np.result_type(x, g, w)
        f = dtype.type
        x2, g2, mean2, rstd2 = x.reshape(R, n), g.reshape(R, n), mean.reshape(R), rstd.reshape(R)
        acc2 = acc.reshape(R, n) if acc is not None else None
        w = w.reshape(n)   # (its n values, as the kernel reads them)
        dx, dw = np.empty((R, n), dtype), np.zeros(n, np.result_type(x, g))
        rows = _per_block(R, n)   # (a block of rows at a time, in cache, as layernorm)
        centred, ones = np.empty((min(rows, R), n), np.result_type(x, mean)), np.ones(n, dtype)
        # dx = rstd (g w - c1 - xhat c2), c1 = mean(g w), c2 = mean(g w xhat), xhat = (x - mean) rstd, written on
        # xc = x - mean so that xhat is never made: with q = g xc, dw = rstd^T q and c2 = rstd (q w) / n are BLAS
        # matrix-vector products, and dx = rstd g w - rstd c1 - xc (rstd^2 c2), rstd c1 the row mean of the first
        # term. Centred first, as the forward: x rstd - mean rstd would cancel where |mean| >> std
        for r in range(0, R, rows):
            gs, rs = g2[r:r + rows], rstd2[r:r + rows]
            xc = np.subtract(x2[r:r + rows], mean2[r:r + rows, None], out=centred[:len(gs)])
            d = np.multiply(gs, xc, out=dx[r:r + rows])
            dw += rs @ d
            k = d @ w
            k *= rs   # (a factor of rstd at a time: rstd^3 alone is subnormal in float32 for rows of scale over 4.4e12)
            k /= f(n)
            k *= rs
            k *= rs
            np.multiply(gs, w, out=d)
            d *= rs[:, None]
            c1 = d @ ones   # (the mean of the very terms it is taken from: a single column's gradient is exactly 0)
            c1 /= f(n)
            xc *= k[:, None]
            d -= xc
            d -= c1[:, None]
            if acc is not None:  # the input's gradient from its other uses, added in
                d += acc2[r:r + rows]
        return dx.reshape(g.shape), dw, np.ones(R, dtype=g.dtype) @ g2

    fused_rms_norm = fused_swiglu = fused_rotary = True   # (fewer temporaries than the composed ops)

    def rms_norm(self, x, w, eps, residual=None):
        if residual is not None:  # the residual add fused in: RMSNorm of x + residual, and that sum
            total = x + residual
            return self.rms_norm(total, w, eps) + (total,)
        with np.errstate(all="ignore"):   # (rows beyond float32's range: as the composed ops, 0 or NaN)
            rstd = 1.0 / np.sqrt(_row_dot(x, x) / x.dtype.type(x.shape[-1]) + x.dtype.type(eps))
            y = x * rstd
        y *= w
        return y, rstd[..., 0]

    def rms_norm_bwd(self, x, w, rstd, g, acc=None):
        n = x.shape[-1]
        xhat = x * rstd[..., None]
        gx = g * w
        dx = gx - xhat * (_row_dot(gx, xhat) / gx.dtype.type(n))
        dx *= rstd[..., None]
        if acc is not None:  # the input's gradient from its other uses, added in
            dx += acc
        return dx, np.einsum("ij,ij->j", g.reshape(-1, n), xhat.reshape(-1, n))

    def swiglu(self, gate, up):
        return np.asarray(_sigmoid_and_silu(gate)[1] * up)

    def swiglu_bwd(self, gate, up, g):
        s, silu = _sigmoid_and_silu(gate)
        return np.asarray(g * up * (s + silu * (1.0 - s))), np.asarray(g * silu)

    def decode_attention_fits(self, head_dim):
        return True

    def decode_attention(self, parts, cache_k, cache_v, pos, n_head, scale, pad=None, cos=None, sin=None):
        # the reference: the composed decode step's products and softmax on the same shapes, so the same numbers
        Bsz, Hkv, _, D = cache_k.shape
        (q, k, v) = (a.reshape(Bsz, -1)[:, o:o + n * D].reshape(Bsz, n, 1, D)
                     for (a, o), n in zip(parts, (n_head, Hkv, Hkv)))
        if cos is not None:
            p = np.full(Bsz, pos) if pad is None else pos - pad
            q, k = (self._rotate_rows(x, cos[p], sin[p]) for x in (q, k))
        cache_k[:, :, pos:pos + 1], cache_v[:, :, pos:pos + 1] = k, v
        S, G = pos + 1, n_head // Hkv
        scores = self.matmul(q.reshape(Bsz * Hkv, G, D), cache_k[:, :, :S].reshape(Bsz * Hkv, S, D), False, True)
        if pad is not None:   # (lab.models.transformer.padding_mask's -1e30)
            scores = scores + np.where(np.arange(S)[None] < pad[:, None], np.float32(-1e30), np.float32(0)
                                       ).repeat(Hkv, 0)[:, None]
        y = blas.matmul(self.softmax(scores, scale), cache_v[:, :, :S].reshape(Bsz * Hkv, S, D))
        return y.reshape(Bsz, 1, n_head * D)

    @staticmethod
    def _rotate_rows(x, c, s):
        """rotary's forward of x (B, heads, 1, D) with each row's own table rows c, s (B, D)."""
        c, s = c[:, None, None], s[:, None, None]
        h = x.shape[-1] // 2
        out = x * c
        out[..., :h] -= x[..., h:] * s[..., :h]
        out[..., h:] += x[..., :h] * s[..., h:]
        return out

    def rotary(self, x, cos, sin, pos, inverse=False, heads=None):
        D = cos.shape[1]
        if heads is not None and not inverse:   # the packed projection (B, T, heads * D) -> its heads (B, heads, T, D)
            x = np.ascontiguousarray(x.reshape(x.shape[0], x.shape[1], heads, D).transpose(0, 2, 1, 3))
        if heads is not None and inverse:
            out = self.rotary(x, cos, sin, pos, inverse)   # (B, heads, T, D) -> (B, T, heads * D)
            return np.ascontiguousarray(out.transpose(0, 2, 1, 3)).reshape(x.shape[0], x.shape[2], heads * D)
        T = x.shape[-2]
        h = D // 2
        c, s = cos[pos:pos + T], sin[pos:pos + T]
        out = x * c
        if inverse:   # the transposed rotation: x's halves meet the sines of their partners' columns
            out[..., :h] += x[..., h:] * s[:, h:]
            out[..., h:] -= x[..., :h] * s[:, :h]
        else:
            out[..., :h] -= x[..., h:] * s[:, :h]
            out[..., h:] += x[..., :h] * s[:, h:]
        return out

    def embedding(self, w, idx, checked=False):
        if not checked:  # (numpy would wrap a negative index)
            check_index_range(idx, w.shape[0], "embedding")
        return w[idx]

    def embedding_bwd(self, idx, g, num_embeddings):
        idx, g = idx.reshape(-1), g.reshape(-1, g.shape[-1])
        if num_embeddings * len(idx) <= ONE_HOT_LIMIT:  # small vocabularies: one-hot^T @ g, one BLAS call
            one_hot = np.zeros((num_embeddings, len(idx)), dtype=g.dtype)
            one_hot[idx, np.arange(len(idx))] = 1
            return one_hot @ g
        # large ones: sort the rows by token and add each token's run (np.add.at is 1.3-8x slower)
        order = np.argsort(idx, kind="stable")
        tokens = idx[order]
        starts = np.flatnonzero(np.r_[True, tokens[1:] != tokens[:-1]])
        dw = np.zeros((num_embeddings, g.shape[-1]), dtype=g.dtype)
        if len(idx):
            dw[tokens[starts]] = np.add.reduceat(g[order], starts, axis=0)
        return dw

    def cross_entropy(self, logits, targets, ignore_index, checked=False, classes=None):
        logits = logits if classes is None else logits[:, :classes]
        if not checked:
            check_index_range(targets, logits.shape[1], "cross_entropy", ignore_index)
        m = logits.max(axis=-1, keepdims=True)
        e = logits - m   # (one temporary the size of the logits, exponentiated in place)
        np.exp(e, out=e)
        lse = (m + np.log(e.sum(axis=-1, keepdims=True)))[:, 0]
        del e
        valid = (targets != ignore_index) & (targets >= 0) & (targets < logits.shape[1])
        safe = np.where(valid, targets, 0)
        rows = lse - logits[np.arange(len(targets)), safe]
        count = np.asarray([valid.sum()], dtype=logits.dtype)   # (1,), as the device keeps it (Backend.cross_entropy)
        loss = np.asarray((rows * valid).sum() / max(count[0], 1), dtype=logits.dtype)
        return loss, (lse, valid, count)

    def cross_entropy_bwd(self, logits, targets, saved, g, ignore_index, classes=None, in_place=False):
        lse, valid, count = saved
        if classes is not None and classes < logits.shape[1]:   # the padding columns' gradient: 0
            out = logits if in_place else np.zeros_like(logits)
            out[:, :classes] = self.cross_entropy_bwd(logits[:, :classes], targets, saved, g, ignore_index)
            out[:, classes:] = 0
            return out
        p = logits if in_place else np.empty_like(logits)   # one (rows, V) array: softmax, minus onehot, scaled
        np.subtract(logits, lse[:, None].astype(logits.dtype, copy=False), out=p)
        np.exp(p, out=p)
        p[np.arange(len(targets)), np.where(valid, targets, 0)] -= 1
        p *= (valid * (g / max(count[0], 1)))[:, None]
        return p.astype(logits.dtype, copy=False)

    def dropout(self, x, p, seed):
        out = np.empty(x.shape, x.dtype)
        _dropout_into(np.ascontiguousarray(x).reshape(-1), out.reshape(-1), p, seed)
        return out

    def lora_down(self, x, a):
        return blas.matmul(x, a.T)

    def lora_up_add(self, base, h, b, scale):
        return base + base.dtype.type(scale) * blas.matmul(h, b.T)

    # -- optimizers (in place) --
    def adamw_(self, p, g, m, v, lr, b1, b2, eps, wd, step, guard=None, max_norm=0.0):
        if guard is not None and not np.isfinite(guard).all():
            return  # a non-finite gradient norm skips the update (as the wgpu kernel does)
        _clip_to(g, guard, max_norm)
        f = p.dtype.type
        c2, c1 = f(1 / math.sqrt(1 - b2 ** step)), f(lr / (1 - b1 ** step))
        parts = _chunks(p, g, m, v)
        buf = np.empty(parts[0][0].size, p.dtype)   # (the first part is the largest)
        # p -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps), in place through one temporary, a chunk at a
        # time: its dozen passes then stay in cache (1.6x on a (384, 1536) weight)
        for p, g, m, v in parts:
            t = buf[:p.size].reshape(p.shape)
            p *= f(1 - lr * wd)
            np.multiply(g, f(1 - b1), out=t)
            m *= f(b1)
            m += t
            np.multiply(g, g, out=t)
            t *= f(1 - b2)
            v *= f(b2)
            v += t
            np.sqrt(v, out=t)
            t *= c2
            t += f(eps)
            np.divide(m, t, out=t)
            t *= c1
            p -= t

    def sgd_(self, p, g, buf, lr, momentum, wd, guard=None, max_norm=0.0):
        if guard is not None and not np.isfinite(guard).all():
            return
        _clip_to(g, guard, max_norm)
        d = g + wd * p
        buf *= momentum
        buf += d
        p -= lr * buf

    def sumsq_into(self, a, out, slot):
        out[slot] = np.dot(a.reshape(-1), a.reshape(-1))

    def clip_(self, g, normsq, max_norm):
        g *= min(1.0, max_norm / (float(np.sqrt(normsq[0])) + 1e-6))
