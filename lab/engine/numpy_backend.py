"""The numpy backend: the reference implementation of every primitive, and the fast path on CPU-only machines.

Works in the dtype it is given (float32 normally, float64 for finite-difference gradient checks).
"""
import ctypes
import os
import sys

import numpy as np

from .backend import Backend

SQRT_2_OVER_PI = 0.7978845608028654
GELU_C = 0.044715


def _gelu_sigmoid(x):
    """s = sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3); then gelu(x) = 0.5 x (1 + tanh u) = x s.
    Computed in place: numpy's temporaries, not its arithmetic, dominate here."""
    s = x * x
    s *= GELU_C
    s += 1.0
    s *= x
    s *= -2.0 * SQRT_2_OVER_PI
    np.exp(s, out=s)
    s += 1.0
    return np.reciprocal(s, out=s)


def pcg(x):
    """PCG-RXS-M-XS 32-bit output permutation; the same function as dropout.wgsl, bit for bit."""
    x = np.asarray(x, dtype=np.uint32)
    s = x * np.uint32(747796405) + np.uint32(2891336453)
    w = ((s >> ((s >> np.uint32(28)) + np.uint32(4))) ^ s) * np.uint32(277803737)
    return (w >> np.uint32(22)) ^ w


def dropout_keep_mask(n, p, seed):
    i = np.arange(n, dtype=np.uint32)
    u = (pcg(i ^ pcg(np.array([seed], dtype=np.uint32)))[...] >> np.uint32(8)).astype(np.float32)
    return u * np.float32(1.0 / 16777216.0) >= np.float32(p)


UNARY = {
    "neg": np.negative, "exp": np.exp, "log": np.log, "sqrt": np.sqrt, "tanh": np.tanh,
    "relu": lambda x: np.maximum(x, 0),
    "gelu": lambda x: x * _gelu_sigmoid(x),
}
SCALAR = {
    "add": lambda x, c: x + c, "mul": lambda x, c: x * c, "rsub": lambda x, c: c - x,
    "rdiv": lambda x, c: c / x, "pow": lambda x, c: x ** c,
}


def _gelu_bwd(x, g):
    """d gelu / dx = 0.5 (1 + t) + 0.5 x (1 - t^2) u'  with t = tanh u = 2 s - 1, i.e.  s + 2 x s (1 - s) u'."""
    s = _gelu_sigmoid(x)
    d = x * x
    d *= 3.0 * GELU_C
    d += 1.0
    d *= 2.0 * SQRT_2_OVER_PI
    d *= x
    d *= s
    d *= 1.0 - s
    d += s
    d *= g
    return d


BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide, "maximum": np.maximum,
    "eq": lambda a, b: (a == b).astype(np.result_type(a, b)),
    "relu_bwd": lambda x, g: np.where(x > 0, g, 0).astype(g.dtype),
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


class NumpyBackend(Backend):
    name = "numpy"
    def __init__(self):
        self._stats = {"dispatches": 0, "submits": 0, "readbacks": 0}
        self.malloc_tuned = _keep_freed_memory_for_reuse()

    # -- memory --
    def from_numpy(self, x):
        return np.array(x, copy=True, order="C")

    def to_numpy(self, a):
        return np.array(a, copy=True)

    def full(self, shape, value, dtype="float32"):
        return np.full(shape, value, dtype=dtype)

    def empty(self, shape, dtype="float32"):
        return np.empty(shape, dtype=dtype)

    def reshape(self, a, shape):
        return a.reshape(shape)

    def stats(self):
        return dict(self._stats, bytes_in_use=None, peak_bytes_in_use=None)

    # -- elementwise --
    def unary(self, op, a):
        with np.errstate(all="ignore"):
            return UNARY[op](a).astype(a.dtype, copy=False)

    def scalar(self, op, a, c):
        with np.errstate(all="ignore"):
            return SCALAR[op](a, a.dtype.type(c)).astype(a.dtype, copy=False)

    def binary(self, op, a, b):
        with np.errstate(all="ignore"):
            return np.ascontiguousarray(BINARY[op](a, b))

    # -- reductions and data movement --
    def reduce(self, op, a, axis):
        if op == "sum":
            return a.sum(axis=axis)
        if op == "max":
            return a.max(axis=axis)
        if op == "sumsq":
            return (a * a).sum(axis=axis)
        raise ValueError(f"unknown reduction {op!r}")

    def copy_view(self, a, offset, shape, strides):
        item = a.itemsize
        view = np.lib.stride_tricks.as_strided(a.reshape(-1)[offset:], shape=shape,
                                               strides=[s * item for s in strides])
        return np.ascontiguousarray(view)

    def write_view(self, dst, offset, strides, src):
        item = dst.itemsize
        view = np.lib.stride_tricks.as_strided(dst.reshape(-1)[offset:], shape=src.shape,
                                               strides=[s * item for s in strides])
        view[...] = src

    # -- fused --
    def matmul(self, a, b, trans_a=False, trans_b=False, bias=None):
        a = a.swapaxes(-1, -2) if trans_a else a
        b = b.swapaxes(-1, -2) if trans_b else b
        out = np.matmul(a, b)
        if bias is not None:
            out += bias
        return out

    def softmax(self, a, scale=1.0, causal=False):
        x = a * a.dtype.type(scale)
        if causal:
            T = a.shape[-1]
            x = np.where(np.tril(np.ones((a.shape[-2], T), dtype=bool)), x, -np.inf)
        x = x - x.max(axis=-1, keepdims=True)
        e = np.exp(x)
        return e / e.sum(axis=-1, keepdims=True)

    def softmax_bwd(self, y, g, scale=1.0):
        return y.dtype.type(scale) * y * (g - (g * y).sum(axis=-1, keepdims=True))

    def log_softmax(self, a):
        m = a.max(axis=-1, keepdims=True)
        return a - m - np.log(np.exp(a - m).sum(axis=-1, keepdims=True))

    def log_softmax_bwd(self, y, g):
        return g - np.exp(y) * g.sum(axis=-1, keepdims=True)

    def layernorm(self, x, w, b, eps):
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        rstd = 1.0 / np.sqrt(var + eps)
        y = (x - mean) * rstd * w + b
        return y.astype(x.dtype, copy=False), mean[..., 0], rstd[..., 0].astype(x.dtype, copy=False)

    def layernorm_bwd(self, x, w, mean, rstd, g):
        n = x.shape[-1]
        xhat = (x - mean[..., None]) * rstd[..., None]
        gx = g * w
        dx = rstd[..., None] * (gx - gx.sum(-1, keepdims=True) / n - xhat * (gx * xhat).sum(-1, keepdims=True) / n)
        g2, xhat2 = g.reshape(-1, n), xhat.reshape(-1, n)
        return dx, (g2 * xhat2).sum(0), g2.sum(0)

    def embedding(self, w, idx):
        return w[idx]

    def embedding_bwd(self, idx, g, num_embeddings):
        dw = np.zeros((num_embeddings, g.shape[-1]), dtype=g.dtype)
        np.add.at(dw, idx.reshape(-1), g.reshape(-1, g.shape[-1]))
        return dw

    def cross_entropy(self, logits, targets, ignore_index):
        m = logits.max(axis=-1, keepdims=True)
        lse = (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))[:, 0]
        valid = (targets != ignore_index) & (targets >= 0) & (targets < logits.shape[1])
        safe = np.where(valid, targets, 0)
        rows = lse - logits[np.arange(len(targets)), safe]
        count = valid.sum()
        loss = np.asarray((rows * valid).sum() / max(count, 1), dtype=logits.dtype)
        return loss, (lse, valid, count)

    def cross_entropy_bwd(self, logits, targets, saved, g, ignore_index):
        lse, valid, count = saved
        p = np.exp(logits - lse[:, None])
        p[np.arange(len(targets)), np.where(valid, targets, 0)] -= 1
        return (p * valid[:, None] * (g / max(count, 1))).astype(logits.dtype, copy=False)

    def dropout(self, x, p, seed):
        keep = dropout_keep_mask(x.size, p, seed).reshape(x.shape)
        return np.where(keep, x * x.dtype.type(1.0 / (1.0 - p)), 0).astype(x.dtype, copy=False)

    def lora_down(self, x, a):
        return x @ a.T

    def lora_up_add(self, base, h, b, scale):
        return base + base.dtype.type(scale) * (h @ b.T)

    # -- optimizers (in place) --
    def adamw_(self, p, g, m, v, lr, b1, b2, eps, wd, step, guard=None):
        if guard is not None and not np.isfinite(guard).all():
            return  # a non-finite gradient norm skips the update (as the wgpu kernel does)
        p -= lr * wd * p
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * g * g
        p -= lr * (m / (1 - b1 ** step)) / (np.sqrt(v / (1 - b2 ** step)) + eps)

    def sgd_(self, p, g, buf, lr, momentum, wd, guard=None):
        if guard is not None and not np.isfinite(guard).all():
            return
        d = g + wd * p
        buf *= momentum
        buf += d
        p -= lr * buf

    def sumsq_into(self, a, out, slot):
        out[slot] = np.dot(a.reshape(-1), a.reshape(-1))

    def clip_(self, g, normsq, max_norm):
        g *= min(1.0, max_norm / (float(np.sqrt(normsq[0])) + 1e-6))
