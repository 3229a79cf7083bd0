"""Products: matmul, and linear (x @ weight + bias, with the activation applied as the tiles are stored)."""
import builtins as _builtins  # sum and max are ops of this package: the builtins are named as such throughout
import math

import numpy as np

from ... import checks
from ..tensor import QuantizedWeight, Tensor, is_grad_enabled
from ._common import _check_float, _lift, _shape_str
from .elementwise import gelu
from .nn import _ignore_index, _index_tensor, cross_entropy, swiglu
from .shape import concat


def matmul(a, b, transpose_a=False, transpose_b=False):
    """a @ b with optional transposed operands. Leading (batch) dims must match, or one side is 2D."""
    b = _lift(b, a)   # (a Tensor of another backend refused: its array reached the other's kernels)
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


# At most this many bytes of logits exist at a time in linear_cross_entropy: gpt2-small's head (50257 wide) takes
# 640 of its 8192 rows a chunk: 0.13 GB of logits, turned into their gradient in place, where the whole logits and
# their gradient held 3.3 GB (at most WebGPU's smallest binding limit, 128 MiB, so any device takes a chunk)
LOGITS_CHUNK_BYTES = 1 << 27


def linear_cross_entropy(x, weight, targets, bias=None, ignore_index=-100, transpose_b=True, chunk_rows=None):
    """cross_entropy(matmul(x, weight, transpose_b=transpose_b) + bias, targets) without the whole logits: x (..., C),
    weight (V, C) with transpose_b (a tied embedding's table, as GPT-2's head reads it) or (C, V) without (a Linear's),
    bias (V,) or None, integer targets x.shape[:-1] (ignore_index skipped; the mean over the rest, 0 for none).
    The rows go chunk_rows at a time (default: LOGITS_CHUNK_BYTES of logits). When a gradient is wanted, each chunk's
    logits become softmax - onehot in place and add into dx, dweight and dbias, so only one chunk's logits ever exist
    and the backward only scales those sums by the incoming gradient over the count (Liger-Kernel's fused linear
    cross-entropy). Equal to the composed ops within float32 rounding (the sums are taken in another order)."""
    op = "linear_cross_entropy"
    ignore_index = _ignore_index(op, ignore_index)
    if not isinstance(weight, QuantizedWeight):   # (arrays and lists are constants, as matmul takes them)
        weight, bias = _lift(weight, x), None if bias is None else _lift(bias, x)
    if isinstance(weight, QuantizedWeight) or weight.ndim != 2:
        raise ValueError(f"{op}: the weight must be a 2-D float tensor, got {weight.dtype} of shape "
                         f"{_shape_str(weight.shape)}")
    for t in (x, weight) + ((bias,) if bias is not None else ()):
        _check_float(t, op)
    if x.ndim == 0:
        raise ValueError(f"{op}: x needs a feature axis (..., C), got a 0-D tensor")
    V, C = weight.shape if transpose_b else weight.shape[::-1]
    layout = "(V, C) with transpose_b=True" if transpose_b else "(C, V) with transpose_b=False"
    if x.shape[-1] != C:
        raise ValueError(f"{op}: x {_shape_str(x.shape)} and weight {_shape_str(weight.shape)} do not align: "
                         f"{x.shape[-1]} != {C} (the weight is {layout})")
    if bias is not None and bias.shape != (V,):
        raise ValueError(f"{op}: bias of shape {_shape_str(bias.shape)} does not fit weight "
                         f"{_shape_str(weight.shape)} {layout}: want ({V},)")
    tshape = tuple(targets.shape if isinstance(targets, Tensor) else np.shape(targets))
    if tshape != x.shape[:-1]:
        raise ValueError(f"{op}: targets of shape {_shape_str(tshape)} do not match x {_shape_str(x.shape)} "
                         f"(expected {_shape_str(x.shape[:-1])})")
    N = math.prod(x.shape[:-1])
    step = logits_chunk_rows(V) if chunk_rows is None else checks.integer(f"{op}: chunk_rows", chunk_rows, low=1)
    if N == 0:   # no rows: the composed ops' answer (0) without a loop over no chunks
        return cross_entropy(matmul(x, weight, transpose_b=transpose_b) + (0.0 if bias is None else bias), targets,
                             ignore_index)
    t, checked = _index_tensor(targets, x, V, op, ignore_index)
    B = x.backend
    x2, t1 = B.reshape(x.data, (N, C)), B.reshape(t.data, (N,))
    # zero classes and features to the widths the backend's products take whole (wgpu: tiles of 128; gpt2-small's
    # 50257 classes -> 50304, SmolLM2's 576 features -> 640) once here, where the matmul would pad the weight and cut
    # the logits back for every product of every chunk
    Vp = B.padded_width(_builtins.min(step, N), V, C)
    Cp = B.padded_width(_builtins.min(step, N), C, Vp)
    w, b = weight.data, bias.data if bias is not None else None
    wide = (Vp, Cp) if transpose_b else (Cp, Vp)
    if (Vp, Cp) != (V, C):
        w, w0 = B.full(wide, 0.0, weight.dtype), w
        B.write_view(w, 0, (wide[1], 1), w0)
        if b is not None and Vp != V:
            b, b0 = B.full((Vp,), 0.0, bias.dtype), b
            B.write_view(b, 0, (1,), b0)
    if Cp != C:
        x2, x0 = B.full((N, Cp), 0.0, x.dtype), x2
        B.write_view(x2, 0, (Cp, 1), x0)
    w3 = B.reshape(w, (1,) + wide)
    inputs = (x, weight) + ((bias,) if bias is not None else ())
    grad = is_grad_enabled()
    want_x, want_w, want_b = (grad and p is not None and p.requires_grad for p in (x, weight, bias))
    grads = want_x or want_w or want_b
    if grads or N > step:   # (two: the backward kernel binds its count and its g apart)
        one, unit_g = B.full((1,), 1.0, x.dtype), (B.full((1,), 1.0, x.dtype) if grads else None)
    total = count = dx = dw = db = None
    for s in range(0, N, step):
        logits = d3 = None   # the last chunk's logits (and their gradient over them) go before this chunk's come
        n = _builtins.min(step, N - s)
        xc = x2 if n == N else B.copy_view(x2, s * Cp, (n, Cp), (Cp, 1))                      # (n, Cp)
        tc = t1 if n == N else B.copy_view(t1, s, (n,), (1,))
        logits = B.reshape(B.matmul(B.reshape(xc, (1, n, Cp)), w3, False, transpose_b, bias=b), (n, Vp))
        loss, (lse, valid, cnt) = B.cross_entropy(logits, tc, ignore_index, checked=checked, classes=V)
        if n < N:   # the chunk's sum over its rows, and its count, summed over the chunks
            part = B.binary("mul", B.reshape(loss, (1,)), cnt)
            total = part if total is None else B.binary("add", total, part)
        count = cnt if count is None else B.binary("add", count, cnt)
        if not grads:
            continue
        # a count of one and g = 1: softmax - onehot on valid rows, 0 on ignored ones (scaled in the backward)
        d3 = B.reshape(B.cross_entropy_bwd(logits, tc, (lse, valid, one), unit_g, ignore_index, V, in_place=True),
                       (1, n, Vp))   # (over the logits: one chunk's (n, Vp) array, not two)
        if want_x:
            dxc = B.reshape(B.matmul(d3, w3, False, not transpose_b), (n, Cp))                 # (n, Cp)
            if n == N:
                dx = dxc
            else:
                dx = B.empty((N, Cp), x.dtype) if dx is None else dx
                B.write_view(dx, s * Cp, (Cp, 1), dxc)
        if want_w:   # the running sum added into in place: it and one chunk's product, not a third (V, C) array
            xc3 = B.reshape(xc, (1, n, Cp))
            dwc = B.matmul(d3, xc3, True, False) if transpose_b else B.matmul(xc3, d3, True, False)
            dw = dwc if dw is None else B.add_(dw, dwc)
            del dwc
        if want_b:
            dbc = B.reduce("sum", B.reshape(d3, (n, Vp)), 0)                                     # (Vp,)
            db = dbc if db is None else B.add_(db, dbc)
    # the padding's gradients (zeros) dropped
    if (Vp, Cp) != (V, C) and want_w:
        dw = B.copy_view(dw, 0, weight.shape, (wide[1], 1))
    if Vp != V and want_b:
        db = B.copy_view(db, 0, (V,), (1,))
    if Cp != C and want_x:
        dx = B.copy_view(dx, 0, (N, C), (Cp, 1))
    denom = B.binary("maximum", count, one) if grads or N > step else None
    out = loss if N <= step else B.reshape(B.binary("div", total, denom), ())   # (one chunk: its mean is the loss)

    def backward(g):
        scale = B.binary("div", B.reshape(g, (1,)), denom)
        grads = (B.reshape(B.binary("mul", dx, scale), x.shape) if want_x else None,
                 B.reshape(B.binary("mul", dw, scale), weight.shape) if want_w else None)
        return grads + ((B.binary("mul", db, scale) if want_b else None,) if bias is not None else ())
    return Tensor._make(out, B, inputs, backward)


def logits_chunk_rows(V):
    """Rows of a chunk of V-wide logits within LOGITS_CHUNK_BYTES; a multiple of 128 (the matmul's whole tiles)
    where there are that many."""
    rows = _builtins.max(1, LOGITS_CHUNK_BYTES // (4 * _builtins.max(V, 1)))
    return rows - rows % 128 if rows >= 128 else rows


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
    _check_float(x, "linear")
    weight, bias = _lift(weight, x), None if bias is None else _lift(bias, x)   # (as matmul takes its operands)
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
    # x made by a GELU linear: this node's parent is its pre-activation, whose gradient gelu'(pre) * (g W^T) the
    # product that makes it applies as it stores (no gelu_bwd pass); x's own node is left for its other uses
    gelu_input = x._gelu_input if x.requires_grad else None

    def through(g):   # the gradients of x, weight and bias from the product's (pre-activation's) gradient g
        g3 = B.reshape(g, (1, M, N))
        gx = None
        if x.requires_grad:
            gx = B.reshape(B.matmul(g3, w3, False, True) if gelu_input is None else
                           B.matmul_gelu_grad(g3, w3, B.reshape(gelu_input.data, (1, M, K))), x.shape)
        gw = gb = None
        if weight.requires_grad and bias is not None and bias.requires_grad:   # both from one pass over g
            gw, gb = B.matmul_column_sums(x3, g3, True)
        elif weight.requires_grad:
            gw = B.matmul(x3, g3, True, False)
        elif bias is not None and bias.requires_grad:
            gb = B.reduce("sum", B.reshape(g, (M, N)), 0)
        return (gx, B.reshape(gw, (K, N)) if gw is not None else None) + ((gb,) if bias is not None else ())

    def backward(g_out):
        g = g_out if pre is None else B.binary("gelu_bwd", B.reshape(pre, g_out.shape), g_out)
        return through(g) + ((g_out if residual.requires_grad else None,) if residual is not None else ())
    inputs = tuple(t for t in (x if gelu_input is None else gelu_input, weight, bias, residual) if t is not None)
    y = Tensor._make(out, B, inputs, backward)
    if pre is not None and residual is None and y.requires_grad and B.fused_gelu_grad:
        # the pre-activation as a node of its own, the linear's without the activation (for a linear reading y,
        # where the backend folds gelu' into its product; else y's node serves, as PyTorch's graph would have it)
        y._gelu_input = Tensor._make(B.reshape(pre, y.shape), B, inputs, through)
    return y


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
        if how == "concat" and _side_by_side(x, weights, biases):
            # one product of the weights side by side: their copy (K sum N_i) is no larger than the outputs'
            # (M sum N_i), which concatenating the outputs copies (and splits their gradient, a copy more), beside
            # n - 1 more products each way and the sum of x's gradients
            return linear(x, concat(weights, axis=1), None if biases[0] is None else concat(biases))
        outs = [linear(x, w, b) for w, b in zip(weights, biases)]
        return concat(outs, axis=-1) if how == "concat" else swiglu(*outs)
    B = x.backend
    M, K = math.prod(x.shape[:-1]), x.shape[-1]
    out = B.linears(B.reshape(x.data, (1, M, K)), [w.data for w in weights],
                    [b.data if b is not None else None for b in biases], how)
    return Tensor(B.reshape(out, x.shape[:-1] + (out.shape[-1],)), B)


def _side_by_side(x, weights, biases):
    """Whether linears' "concat" of these is one linear of the weights side by side: float32 weights (K, N_i) and
    biases (all or none) on x's backend, and at least K rows of x (else copying the weights costs more)."""
    K = x.shape[-1] if isinstance(x, Tensor) and x.ndim else None
    tensors = list(weights) + [b for b in biases if b is not None]
    return (len(weights) > 1 and K is not None and math.prod(x.shape[:-1]) >= K and x.dtype == "float32"
            and all(isinstance(t, Tensor) and not isinstance(t, QuantizedWeight) and t.backend is x.backend
                    and t.dtype == "float32" for t in tensors)
            and all(w.ndim == 2 and w.shape[0] == K for w in weights)
            and (all(b is None for b in biases) or all(b is not None and b.shape == (w.shape[1],)
                                                        for w, b in zip(weights, biases))))


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
    residual = _lift(residual, x)
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
        bias = _lift(bias, x)
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
