"""Elementwise ops: arithmetic with broadcasting (and with Python numbers) and the unary functions."""
import numbers

import numpy as np

from ..tensor import Tensor, is_grad_enabled
from ._common import _check_float, _constant, _lift, _shape_str, _unbroadcast


def _binary(op, a, b):
    B = a.backend
    b = _lift(b, a)
    _check_float(a, op)
    _check_float(b, op)
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"{op}: shapes {_shape_str(a.shape)} and {_shape_str(b.shape)} cannot be broadcast") from None
    return B, b, B.binary(op, a.data, b.data)


def add(a, b):
    if isinstance(b, numbers.Number):
        _check_float(a, "add")
        b = _constant(b, "add")
        return Tensor._make(a.backend.scalar("add", a.data, b), a.backend, (a,), lambda g: (g,))
    B, b, out = _binary("add", a, b)
    return Tensor._make(out, B, (a, b), lambda g: (_unbroadcast(B, g, a.shape), _unbroadcast(B, g, b.shape)))


def sub(a, b):
    if isinstance(b, numbers.Number):
        return add(a, -_constant(b, "sub"))
    B, b, out = _binary("sub", a, b)
    return Tensor._make(out, B, (a, b),
                        lambda g: (_unbroadcast(B, g, a.shape), _unbroadcast(B, B.unary("neg", g), b.shape)))


def rsub(a, c):  # c - a
    _check_float(a, "rsub")
    c = _constant(c, "rsub")
    B = a.backend
    return Tensor._make(B.scalar("rsub", a.data, c), B, (a,), lambda g: (B.unary("neg", g),))


def mul(a, b):
    if isinstance(b, numbers.Number):
        _check_float(a, "mul")
        b = _constant(b, "mul")
        B = a.backend
        return Tensor._make(B.scalar("mul", a.data, b), B, (a,), lambda g: (B.scalar("mul", g, b),))
    B, b, out = _binary("mul", a, b)

    def backward(g):
        return (_unbroadcast(B, B.binary("mul", g, b.data), a.shape) if a.requires_grad else None,
                _unbroadcast(B, B.binary("mul", g, a.data), b.shape) if b.requires_grad else None)
    return Tensor._make(out, B, (a, b), backward)


def div(a, b):
    if isinstance(b, numbers.Number):  # divided, not multiplied by 1/b: b = 0 gives inf as numpy, 1/1e-40 overflows
        _check_float(a, "div")
        b = _constant(b, "div")
        B = a.backend
        return Tensor._make(B.scalar("div", a.data, b), B, (a,), lambda g: (B.scalar("div", g, b),))
    B, b, out = _binary("div", a, b)

    def backward(g):  # d(a/b)/db = -(a/b)/b
        ga = _unbroadcast(B, B.binary("div", g, b.data), a.shape) if a.requires_grad else None
        gb = None
        if b.requires_grad:
            gb = _unbroadcast(B, B.unary("neg", B.binary("div", B.binary("mul", g, out), b.data)), b.shape)
        return ga, gb
    return Tensor._make(out, B, (a, b), backward)


def rdiv(a, c):  # c / a;  d/da = -c/a^2 = -out/a
    _check_float(a, "rdiv")
    c = _constant(c, "rdiv")
    B = a.backend
    out = B.scalar("rdiv", a.data, c)
    return Tensor._make(out, B, (a,), lambda g: (B.unary("neg", B.binary("div", B.binary("mul", g, out), a.data)),))


def pow(a, c):
    if not isinstance(c, numbers.Number):
        raise ValueError("pow: the exponent must be a Python number")
    _check_float(a, "pow")
    c = _constant(c, "pow")
    B = a.backend
    out = B.scalar("pow", a.data, c)
    if c == 0:  # x^0 is constant: its gradient is 0 everywhere, not 0 * x^-1 (NaN at x = 0)
        return Tensor._make(out, B, (a,), lambda g: (B.full(a.shape, 0.0, a.dtype),))
    return Tensor._make(out, B, (a,), lambda g: (B.binary("mul", g, B.scalar("mul", B.scalar("pow", a.data, c - 1), c)),))


def maximum(a, b):
    B, b, out = _binary("maximum", a, b)

    def backward(g):  # the gradient goes to the larger input, half to each on ties (PyTorch's rule; all to a before)
        wa, wb = B.binary("eq", out, a.data), B.binary("eq", out, b.data)  # 1 where each is the maximum
        share = B.binary("div", g, B.binary("maximum", B.binary("add", wa, wb), B.full((), 1.0, g.dtype)))
        return _unbroadcast(B, B.binary("mul", share, wa), a.shape), _unbroadcast(B, B.binary("mul", share, wb), b.shape)
    return Tensor._make(out, B, (a, b), backward)


def neg(a):
    _check_float(a, "neg")
    B = a.backend
    return Tensor._make(B.unary("neg", a.data), B, (a,), lambda g: (B.unary("neg", g),))


def exp(a):
    _check_float(a, "exp")
    B = a.backend
    out = B.unary("exp", a.data)
    return Tensor._make(out, B, (a,), lambda g: (B.binary("mul", g, out),))


def log(a):
    _check_float(a, "log")
    B = a.backend
    return Tensor._make(B.unary("log", a.data), B, (a,), lambda g: (B.binary("div", g, a.data),))


def sqrt(a):
    _check_float(a, "sqrt")
    B = a.backend
    out = B.unary("sqrt", a.data)
    return Tensor._make(out, B, (a,), lambda g: (B.binary("sqrt_bwd", out, g),))


def tanh(a):
    _check_float(a, "tanh")
    B = a.backend
    out = B.unary("tanh", a.data)
    return Tensor._make(out, B, (a,), lambda g: (B.binary("tanh_bwd", out, g),))


def relu(a):
    _check_float(a, "relu")
    B = a.backend
    return Tensor._make(B.unary("relu", a.data), B, (a,), lambda g: (B.binary("relu_bwd", a.data, g),))


def gelu(a):
    """GELU, tanh approximation (GPT-2). A backend that keeps the derivative (Backend.gelu_keeps_grad: numpy)
    computes it in the forward when a gradient will be needed; the others recompute it from the input in the
    backward."""
    _check_float(a, "gelu")
    B = a.backend
    if a.requires_grad and is_grad_enabled() and B.gelu_keeps_grad:
        out, slope = B.gelu_and_grad(a.data)
        return Tensor._make(out, B, (a,), lambda g: (B.binary("mul", g, slope),))
    return Tensor._make(B.unary("gelu", a.data), B, (a,), lambda g: (B.binary("gelu_bwd", a.data, g),))
