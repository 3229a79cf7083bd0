"""Products: matmul, and linear (x @ weight + bias, with the activation applied as the tiles are stored)."""
import builtins as _builtins  # sum and max are ops of this package: the builtins are named as such throughout
import math

from ..tensor import QuantizedWeight, Tensor, is_grad_enabled
from ._common import _check_float, _lift, _shape_str
from .elementwise import gelu
from .nn import swiglu
from .shape import concat


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


def linear(x, weight, bias=None, activation=None, residual=None):
    """x @ weight + bias for x (..., K), weight (K, N), bias (N,): one node, the bias added by the matmul kernel
    as it stores its tiles where it can (a pass over the output saved per layer). activation="gelu" returns
    gelu(x @ weight + bias), applied as the tiles are stored on a backend with matmul_gelu (wgpu), else by gelu().
    residual (..., N), the output's shape: added last (a block's residual stream, x + layer(h)), by the kernel
    where it can (a decode step's few rows: one dispatch for the whole layer).
    A packed weight (quant.QuantizedWeight) goes to quantized_linear: any Linear layer may hold one."""
    if isinstance(weight, QuantizedWeight):
        return quantized_linear(x, weight, bias, activation, residual)
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
    residual = _check_residual(residual, x, N, "linear")
    B = x.backend
    if activation == "gelu" and not B.fused_matmul_gelu:
        return _add_residual(activate(linear(x, weight, bias), activation), residual)
    M = math.prod(x.shape[:-1])
    x3, w3 = B.reshape(x.data, (1, M, K)), B.reshape(weight.data, (1, K, N))
    b = bias.data if bias is not None else None
    r = B.reshape(residual.data, (1, M, N)) if residual is not None else None
    pre = None
    if activation == "gelu":
        needs_grad = is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
        out, pre = B.matmul_gelu(x3, w3, b, keep_pre=needs_grad, residual=r)
    else:
        out = B.matmul(x3, w3, bias=b, residual=r)
    out = B.reshape(out, x.shape[:-1] + (N,))

    def backward(g_out):
        g = g_out if pre is None else B.binary("gelu_bwd", B.reshape(pre, g_out.shape), g_out)
        g3 = B.reshape(g, (1, M, N))
        gx = B.reshape(B.matmul(g3, w3, False, True), x.shape) if x.requires_grad else None
        gw = B.reshape(B.matmul(x3, g3, True, False), (K, N)) if weight.requires_grad else None
        grads = (gx, gw)
        if bias is not None:
            grads += (B.reduce("sum", B.reshape(g, (M, N)), 0) if bias.requires_grad else None,)
        return grads + ((g_out if residual.requires_grad else None,) if residual is not None else ())
    inputs = tuple(t for t in (x, weight, bias, residual) if t is not None)
    return Tensor._make(out, B, inputs, backward)


def linears(x, weights, biases=None, how="concat"):
    """Several linear layers of one input x (..., K), weights (K, N_i), biases (N_i,) or None: how "concat", their
    outputs side by side (..., sum N_i) (Llama's q, k, v projections as the packed projection decode_attention
    reads); "swiglu", two of one width: silu(x W0 + b0) * (x W1 + b1) (Llama's gate and up). One pass where the
    backend takes them (linears_fused: wgpu, a decode step's few rows, no gradient wanted), else each linear, then
    concat or swiglu."""
    biases = [None] * len(weights) if biases is None else list(biases)
    if how not in ("concat", "swiglu") or not weights or len(biases) != len(weights) or (
            how == "swiglu" and len(weights) != 2):
        raise ValueError(f"linears: how must be 'concat' (one or more weights) or 'swiglu' (two), with a bias or None "
                         f"for each weight; got how={how!r}, {len(weights)} weight(s), {len(biases)} bias(es)")
    if not linears_fused(x, weights, biases, how):
        outs = [linear(x, w, b) for w, b in zip(weights, biases)]
        return concat(outs, axis=-1) if how == "concat" else swiglu(*outs)
    B = x.backend
    M, K = math.prod(x.shape[:-1]), x.shape[-1]
    out = B.linears(B.reshape(x.data, (1, M, K)), [w.data for w in weights],
                    [b.data if b is not None else None for b in biases], how)
    return Tensor(B.reshape(out, x.shape[:-1] + (out.shape[-1],)), B)


def linears_fused(x, weights, biases, how):
    """Whether linears(x, weights, biases, how) runs as one pass of the backend: float weights (K, N_i) and biases
    that fit x, on its backend, no gradient wanted."""
    K = x.shape[-1]
    tensors = [x] + list(weights) + [b for b in biases if b is not None]
    return (all(isinstance(t, Tensor) and not isinstance(t, QuantizedWeight) and t.backend is x.backend
                for t in tensors)
            and x.dtype == "float32" and all(w.dtype in ("float32", "float16") and w.ndim == 2 and w.shape[0] == K
                                             for w in weights)
            and all(b is None or (b.dtype == "float32" and b.shape == (w.shape[1],)) for w, b in zip(weights, biases))
            and not (is_grad_enabled() and any(t.requires_grad for t in tensors))
            and x.backend.linears_fit(math.prod(x.shape[:-1]), [w.data for w in weights], how))


def _check_residual(residual, x, N, op):
    """residual as a Tensor of linear's output shape x.shape[:-1] + (N,), or None; one error for anything else."""
    if residual is None:
        return None
    residual = residual if isinstance(residual, Tensor) else _lift(residual, x)
    _check_float(residual, op)
    if residual.shape != x.shape[:-1] + (N,):
        raise ValueError(f"{op}: residual {_shape_str(residual.shape)} must have the output's shape "
                         f"{_shape_str(x.shape[:-1] + (N,))} (input {_shape_str(x.shape)}, {N} outputs)")
    return residual


def _add_residual(y, residual):
    """y + residual (a composed linear's residual add), or y."""
    return y if residual is None else y + residual


def quantized_linear(x, qweight, bias=None, activation=None, residual=None):
    """linear(x, qweight, bias, activation, residual) for a packed frozen weight (quant.QuantizedWeight, shape (K, N)): the
    backend's quantized_matmul dequantizes as it multiplies. Gradients reach x and a trainable bias, never the
    packed weight, and are what a float32 weight holding the dequantized values gives."""
    _check_activation(activation)
    if not isinstance(qweight, QuantizedWeight):
        raise ValueError(f"quantized_linear: the weight must be a QuantizedWeight (lab.engine.quant), got "
                         f"{type(qweight).__name__}; a float weight goes to linear")
    if bias is not None:
        _check_float(bias, "quantized_linear")
    K, N = qweight.shape
    if x.shape[-1] != K or (bias is not None and bias.shape != (N,)):
        raise ValueError(f"quantized_linear: input {_shape_str(x.shape)}, weight {_shape_str(qweight.shape)} and "
                         f"bias {_shape_str(bias.shape) if bias is not None else None} do not fit (want (..., {K}), "
                         f"({K}, N), (N,))")
    _check_float(x, "quantized_linear")
    if qweight.backend is not x.backend:
        raise ValueError(f"quantized_linear: the input is on {x.backend.name}, the weight on {qweight.backend.name}")
    residual = _check_residual(residual, x, N, "quantized_linear")
    B = x.backend
    M = math.prod(x.shape[:-1])
    out = B.quantized_matmul(B.reshape(x.data, (M, K)), qweight.data, False)   # (M, N)
    if bias is not None:
        out = B.binary("add", out, bias.data)
    out = B.reshape(out, x.shape[:-1] + (N,))

    def backward(g):
        g2 = B.reshape(g, (M, N))
        gx = B.reshape(B.quantized_matmul(g2, qweight.data, True), x.shape) if x.requires_grad else None
        if bias is None:
            return (gx,)
        return gx, (B.reduce("sum", g2, 0) if bias.requires_grad else None)
    inputs = (x,) if bias is None else (x, bias)
    return _add_residual(activate(Tensor._make(out, B, inputs, backward), activation), residual)
