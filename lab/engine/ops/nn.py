"""Neural-network ops, fused where the backend has a kernel for them: softmax, the norms (with the residual add),
SwiGLU, rotary, embedding, cross-entropy, dropout, LoRA's update."""
import math
import numbers

import numpy as np

from ... import checks
from .. import random as _random
from ..backend import check_index_range
from ..tensor import Tensor, is_grad_enabled, tensor
from ._common import _check_float, _lift, _shape_str, normalize_axis
from .elementwise import sqrt, tanh
from .reductions import mean
from .shape import concat, split


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


def _last_axis(axis, x, op):
    if normalize_axis(axis, x.ndim, op) != x.ndim - 1:
        raise ValueError(f"{op}: only the last axis is supported, got axis={axis} for shape {_shape_str(x.shape)}")


def softmax(x, axis=-1, scale=1.0, causal=False, length=None):
    """softmax(scale * x) over the last axis; `causal` masks column j > row i of the last two dims, `length` every
    column j >= length (a decode step's scores over a whole KV cache block, of which `length` slots are filled:
    the shapes stay those of the block, so one captured step serves every position)."""
    _check_float(x, "softmax")
    _last_axis(axis, x, "softmax")
    # (numpy took scale=None as NaN and any truthy causal as True, silently; the GPU's params packing failed)
    scale = checks.real("softmax: scale", scale)
    if not isinstance(causal, (bool, np.bool_)):
        raise checks.InputError(f"softmax: causal must be True or False, got {checks.show(causal)}")
    if causal and (x.ndim < 2 or x.shape[-1] != x.shape[-2]):
        raise ValueError(f"softmax: causal masking needs square trailing dims (T, T), got {_shape_str(x.shape)}")
    if length is not None:
        if causal:
            raise ValueError("softmax: causal and length masks cannot be combined")
        length = checks.integer("softmax length", length, low=1, high=x.shape[-1])
    B = x.backend
    out = B.softmax(x.data, scale, causal) if length is None else B.softmax(x.data, scale, length=length)
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


def _ignore_index(op, value):
    """ignore_index as an int32: the wgpu kernels compare targets with its int32 bits, so 2**32 + 2 or 2.5 there
    skipped target 2 where numpy skipped none, and None was a TypeError on one backend and 'skip none' on the other."""
    return checks.integer(f"{op}: ignore_index", value, -2 ** 31, 2 ** 31 - 1)


def cross_entropy(logits, targets, ignore_index=-100):
    """Mean cross-entropy of logits (..., V) against integer targets (...), skipping ignore_index."""
    _check_float(logits, "cross_entropy")
    ignore_index = _ignore_index("cross_entropy", ignore_index)
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
    for t in (base_out, x, A, B):
        _check_float(t, "lora_add")
    scale = checks.real("lora_add: scale", scale)
    base_out, A, B = (_lift(t, x) for t in (base_out, A, B))   # (another backend's arrays reached these kernels)
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
