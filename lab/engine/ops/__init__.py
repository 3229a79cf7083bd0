"""Differentiable ops. Each op computes its forward with backend primitives and defines its backward right
beside it, as a closure over what the forward saved. Shapes in comments: B batch, T time, C channels.

By kind: _common.py (the helpers they share), elementwise.py, reductions.py, shape.py (reshape, permute, indexing,
concat, split, stack), linalg.py (matmul, linear), nn.py (softmax, norms, SwiGLU, rotary, embedding, cross-entropy,
dropout, LoRA), attention.py. This package holds every name the single ops.py module had, and attaches the Tensor
methods."""
import builtins as _builtins  # (the names ops.py had, its imports included, stay reachable as lab.engine.ops.X)
import math
import numbers

import numpy as np

from ... import checks
from .. import random as _random
from ..backend import HeadView, check_index_range, contiguous_strides, gather_heads, scatter_heads
from ..tensor import Tensor, is_grad_enabled, tensor
from ._common import _check_float, _constant, _expand, _lift, _shape_str, _unbroadcast, normalize_axis
from .elementwise import (_binary, add, div, exp, gelu, log, maximum, mul, neg, pow, rdiv, relu, rsub, sqrt, sub,
                          tanh)
from .reductions import _axes, _keep_shape, _reduced, max, mean, sum
from .shape import _view_of_index, concat, getitem, permute, reshape, split, stack, transpose
from .linalg import (_add_residual, _check_activation, _check_residual, _side_by_side, activate, linear,
                     linear_cross_entropy, linears, linears_fused, logits_chunk_rows, matmul, quantized_linear)
from .nn import (_check_norm, _ignore_index, _index_tensor, _last_axis, _layer_norm_node, _norm_bias, _rms_norm_node,
                 add_layer_norm, add_rms_norm, cross_entropy, dropout, embedding, layer_norm, log_softmax, lora_add,
                 rms_norm, rotary, silu, softmax, swiglu)
from .attention import (_grouped_attention, causal_self_attention, decode_attention, decode_attention_applies,
                        scaled_dot_product_attention)
from .recompute import checkpoint

# ---------------------------------------------------------------------------------------------------- Tensor methods


def _install():
    T = Tensor
    T.__add__ = add
    T.__radd__ = lambda a, b: add(a, b)
    T.__sub__ = sub
    T.__rsub__ = lambda a, b: rsub(a, b) if isinstance(b, numbers.Number) else sub(_lift(b, a), a)
    T.__mul__ = mul
    T.__rmul__ = lambda a, b: mul(a, b)
    T.__truediv__ = div
    T.__rtruediv__ = lambda a, b: rdiv(a, b) if isinstance(b, numbers.Number) else div(_lift(b, a), a)
    T.__neg__ = neg
    T.__pow__ = pow
    T.__matmul__ = lambda a, b: matmul(a, b)
    T.__rmatmul__ = lambda a, b: matmul(_lift(b, a), a)
    T.__getitem__ = getitem
    for name in ("exp", "log", "sqrt", "tanh", "relu", "gelu", "sum", "mean", "max", "reshape", "permute",
                 "transpose", "softmax", "log_softmax", "matmul", "maximum"):
        setattr(T, name, globals()[name])
    T.view = reshape
    # the last two axes swapped; a 0-D or 1-D tensor unchanged (a new node), as numpy's .T leaves it
    T.T = property(lambda a: transpose(a, -2, -1) if a.ndim >= 2 else reshape(a, a.shape))


_install()
# what `from lab.engine.ops import *` gave when this was one module: every public name but the submodules', which
# (nn, shape) would shadow the caller's own
__all__ = [n for n in dir() if not n.startswith("_") and n not in
           ("elementwise", "reductions", "shape", "linalg", "nn", "attention", "recompute")]
