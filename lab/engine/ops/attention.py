"""Attention: scaled_dot_product_attention composed of ops, and causal_self_attention as one node over the packed
q, k, v projection (flash kernels where the backend fits them)."""
import math

from .. import random as _random
from ..backend import HeadView, gather_heads, scatter_heads
from ..tensor import Tensor
from ._common import _shape_str
from .linalg import matmul
from .nn import dropout, softmax


def scaled_dot_product_attention(q, k, v, causal=True, dropout_p=0.0, training=True, return_weights=False):
    """softmax(q k^T / sqrt(D), causal mask) v for q, k, v of shape (B, H, T, D).

    The scale and the mask are fused into the softmax kernel. With return_weights=True also returns the
    attention weights (B, H, T, T) before dropout, as heatmaps show them."""
    if q.shape != k.shape or q.shape != v.shape or q.ndim != 4:
        raise ValueError(f"attention: q, k, v must share one shape (B, H, T, D), got {_shape_str(q.shape)}, "
                         f"{_shape_str(k.shape)}, {_shape_str(v.shape)}")
    scores = matmul(q, k, transpose_b=True)                               # (B, H, T, T)
    att = softmax(scores, scale=1.0 / math.sqrt(q.shape[-1]), causal=causal)
    y = matmul(dropout(att, dropout_p, training), v)                      # (B, H, T, D)
    return (y, att) if return_weights else y


def causal_self_attention(qkv, n_head, dropout_p=0.0, training=True, return_weights=False):
    """Multi-head causal self-attention from the packed projection qkv (B, T, 3C) (q, k, v side by side, as GPT-2's
    c_attn makes it) to y (B, T, C), heads merged. One autograd node: the products read q, k, v where they lie in
    the packed projection and write y (and, backward, dq, dk, dv) straight into the merged layouts (HeadView; where
    a backend's kernel cannot, it copies), where split + permute + attention + permute would copy each of them. The same
    arithmetic as scaled_dot_product_attention, the same dropout mask. With return_weights=True also returns the
    attention weights (B, H, T, T) before dropout (no gradient flows through them)."""
    if qkv.ndim != 3 or qkv.shape[2] % 3 or (qkv.shape[2] // 3) % n_head:
        raise ValueError(f"causal_self_attention: qkv must be (B, T, 3C) with C divisible by n_head={n_head}, got "
                         f"{_shape_str(qkv.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"causal_self_attention: dropout_p must be in [0, 1), got {dropout_p}")
    Bk = qkv.backend
    Bsz, T, C3 = qkv.shape
    C, H = C3 // 3, n_head
    D = C // H
    scale = 1.0 / math.sqrt(D)
    if not return_weights and Bk.flash_attention_fits(qkv.shape, H):
        # fused kernels, the weights never in memory (wgpu, heads of 64); the seed is drawn as below
        seed = _random.next_seed() if training and dropout_p > 0 else None
        y, lse = Bk.flash_attention(qkv.data, H, scale, dropout_p, seed)
        return Tensor._make(y, Bk, (qkv,), lambda g: (
            Bk.flash_attention_bwd(qkv.data, y, lse, g, H, scale, dropout_p, seed),))
    # q, k, v (B * H, T, D) where they lie in qkv, and y written straight into the merged (B, T, C) layout; a
    # backend whose kernels cannot take these views for this shape gets each head stack copied once instead
    in_place = Bk.heads_in_place(T, D)
    heads = (lambda x: x) if in_place else (lambda x: gather_heads(Bk, x))

    def product_into(view, a, b, trans_a=False, trans_b=False):
        if in_place:
            return Bk.matmul(a, b, trans_a, trans_b, triangle="a", out=view)
        return scatter_heads(Bk, view, Bk.matmul(a, b, trans_a, trans_b, triangle="a"))

    q, k, v = (heads(HeadView(qkv.data, i * C, H, D)) for i in range(3))
    # the triangle hints let the GPU skip what the causal mask zeroes (about half of each product)
    scores = Bk.matmul(q, k, False, True, triangle="out")                       # (BH, T, T)
    seed = _random.next_seed() if training and dropout_p > 0 else None
    drop = (dropout_p, seed) if seed is not None else None
    if drop is None:
        att = att_d = Bk.softmax(scores, scale, True)
    else:  # the weights and their dropped copy from one pass (the same mask as dropout())
        att, att_d = Bk.softmax(scores, scale, True, dropout=drop)
    out = Bk.empty((Bsz, T, C), qkv.data.dtype)
    product_into(HeadView(out, 0, H, D), att_d, v)                                  # y

    def backward(g):
        gy = heads(HeadView(g, 0, H, D))
        g_att = Bk.matmul(gy, v, False, True, triangle="out")  # its upper triangle meets att's zeros
        gqkv = Bk.empty((Bsz, T, C3), g.dtype)                   # the three products below write every element
        product_into(HeadView(gqkv, 2 * C, H, D), att_d, gy, True, False)        # dv
        gs = Bk.softmax_bwd(att, g_att, scale, dropout=drop)  # (through dropout's mask first, in the same pass)
        product_into(HeadView(gqkv, 0, H, D), gs, k)                              # dq
        product_into(HeadView(gqkv, C, H, D), gs, q, True, False)                 # dk
        return (gqkv,)
    y_t = Tensor._make(out, Bk, (qkv,), backward)
    if return_weights:
        return y_t, Tensor(Bk.reshape(att, (Bsz, H, T, T)), Bk)
    return y_t
