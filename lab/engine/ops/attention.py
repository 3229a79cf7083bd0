"""Attention: scaled_dot_product_attention composed of ops, and causal_self_attention as one node over the packed
q, k, v projection (flash kernels where the backend fits them)."""
import math

import numpy as np

from .. import random as _random
from ..backend import HeadView, gather_heads, scatter_heads
from ..tensor import Tensor, is_grad_enabled
from ._common import _check_float, _shape_str
from .linalg import matmul
from .nn import dropout, rotary, softmax
from .shape import split


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


def causal_self_attention(qkv, n_head, dropout_p=0.0, training=True, return_weights=False, n_kv_head=None,
                          rope=None):
    """Multi-head causal self-attention from the packed projection qkv (B, T, 3C) (q, k, v side by side, as GPT-2's
    c_attn makes it) to y (B, T, C), heads merged. One autograd node: the products read q, k, v where they lie in
    the packed projection and write y (and, backward, dq, dk, dv) straight into the merged layouts (HeadView; where
    a backend's kernel cannot, it copies), where split + permute + attention + permute would copy each of them. The same
    arithmetic as scaled_dot_product_attention, the same dropout mask. With return_weights=True also returns the
    attention weights (B, H, T, T) before dropout (no gradient flows through them).

    Grouped-query attention (Llama): with n_kv_head (Hkv, dividing n_head) qkv is (B, T, (H + 2 Hkv) D) and query
    head h reads key-value head h // (H / Hkv); the key-value heads are never repeated (the fused kernels sum their
    gradients over the group, the composed path batches each group's queries against its one head). rope: None or
    the rotary tables (cos, sin) (P, D), P >= T: q and k rotated at positions 0 .. T - 1 first (F.rotary's
    rotate-half form; the fused kernels rotate as they read and rotate dq, dk back as they write)."""
    H = n_head
    Hkv = H if n_kv_head is None else n_kv_head
    for name, v in (("n_head", H), ("n_kv_head", Hkv)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"causal_self_attention: {name} must be a positive integer, got {v!r}")
    H, Hkv = int(H), int(Hkv)   # (a numpy integer would make D one, which the kernels' block choice refuses)
    _check_float(qkv, "causal_self_attention: qkv")   # (the fused kernels would read an int's bits as floats)
    if H % Hkv or qkv.ndim != 3 or qkv.shape[2] % (H + 2 * Hkv):
        want = "(B, T, 3C) with C divisible by n_head" if n_kv_head is None else \
            "(B, T, (n_head + 2 n_kv_head) D) with n_kv_head dividing n_head"
        raise ValueError(f"causal_self_attention: qkv must be {want}, got {_shape_str(qkv.shape)} for n_head={H}"
                         + ("" if n_kv_head is None else f", n_kv_head={Hkv}"))
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float, np.floating)) or \
            not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"causal_self_attention: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    Bk = qkv.backend
    Bsz, T, C3 = qkv.shape
    D = C3 // (H + 2 * Hkv)
    C = H * D
    scale = 1.0 / math.sqrt(D)
    if rope is not None:
        if not isinstance(rope, (tuple, list)) or len(rope) != 2 or not all(isinstance(t, Tensor) for t in rope):
            raise ValueError(f"causal_self_attention: rope must be the rotary tables (cos, sin), got {rope!r}")
        cos, sin = rope
        if (D % 2 or cos.ndim != 2 or cos.shape != sin.shape or cos.shape[1] != D or cos.shape[0] < T
                or cos.backend is not Bk or sin.backend is not Bk):
            raise ValueError(f"causal_self_attention: rotary tables must be (P, D) with P >= T = {T} and D = {D} "
                             f"even, on qkv's {Bk.name} backend, got cos {_shape_str(cos.shape)}, sin "
                             f"{_shape_str(sin.shape)}")
        for name, t in (("cos", cos), ("sin", sin)):
            _check_float(t, f"causal_self_attention: rotary table {name}")
    tables_grad = rope is not None and is_grad_enabled() and any(t.requires_grad for t in rope)
    if not (return_weights or tables_grad) and Bk.flash_attention_fits(qkv.shape, H, Hkv, rope is not None):
        # fused kernels, the weights never in memory (wgpu); the seed is drawn as below
        seed = _random.next_seed() if training and dropout_p > 0 else None
        tables = None if rope is None else (rope[0].data, rope[1].data)
        y, lse = Bk.flash_attention(qkv.data, H, scale, dropout_p, seed, Hkv, tables)
        return Tensor._make(y, Bk, (qkv,), lambda g: (
            Bk.flash_attention_bwd(qkv.data, y, lse, g, H, scale, dropout_p, seed, Hkv, tables),))
    if Hkv != H or rope is not None:
        return _grouped_attention(qkv, H, Hkv, D, dropout_p, training, return_weights, rope)
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
        gs = Bk.softmax_bwd(att, g_att, scale, dropout=drop,   # (through dropout's mask first, in the same pass,
                            dropped=att_d if drop is not None else None)   # or read from the dropped weights)
        product_into(HeadView(gqkv, 0, H, D), gs, k)                              # dq
        product_into(HeadView(gqkv, C, H, D), gs, q, True, False)                 # dk
        return (gqkv,)
    y_t = Tensor._make(out, Bk, (qkv,), backward)
    if return_weights:
        return y_t, Tensor(Bk.reshape(att, (Bsz, H, T, T)), Bk)
    return y_t


def _grouped_attention(qkv, H, Hkv, D, dropout_p, training, return_weights, rope):
    """causal_self_attention's composed path for Hkv < H key-value heads (or rotary ones): each key-value head's G
    query heads as one (G T, D) batch against it (as LlamaAttention does), so keys and values are read, never
    repeated; q is gathered into that order (one copy of q, as the head split or the rotation makes anyway)."""
    Bsz, T, _ = qkv.shape
    G = H // Hkv
    q, k, v = split(qkv, [H * D, Hkv * D, Hkv * D], axis=2)
    if rope is None:
        q = q.reshape(Bsz, T, H, D).permute(0, 2, 1, 3)                          # (B, H, T, D)
        k = k.reshape(Bsz, T, Hkv, D).permute(0, 2, 1, 3)                        # (B, Hkv, T, D)
    else:   # (rotary splits the heads off in its pass)
        q, k = rotary(q, *rope, 0, heads=H), rotary(k, *rope, 0, heads=Hkv)
    q = q.reshape(Bsz, Hkv, G * T, D)                                            # heads h = kv G + g
    v = v.reshape(Bsz, T, Hkv, D).permute(0, 2, 1, 3)
    scores = matmul(q, k, transpose_b=True).reshape(Bsz, Hkv, G, T, T)
    att = softmax(scores, scale=1.0 / math.sqrt(D), causal=True)           # the (B, H, T, T) order: h = kv G + g
    y = matmul(dropout(att, dropout_p, training).reshape(Bsz, Hkv, G * T, T), v)
    y = y.reshape(Bsz, Hkv, G, T, D).permute(0, 3, 1, 2, 4).reshape(Bsz, T, H * D)
    return (y, att.detach().reshape(Bsz, H, T, T)) if return_weights else y


def decode_attention_applies(qkv, head_dim):
    """Whether a one-token step's attention may go through decode_attention: the backend has its kernel for heads
    of head_dim and no gradient is wanted of the projections (qkv: a tensor or the tuple (q, k, v))."""
    parts = qkv if isinstance(qkv, tuple) else (qkv,)
    return parts[0].backend.decode_attention_fits(head_dim) and not (
        is_grad_enabled() and any(t.requires_grad for t in parts))


def decode_attention(qkv, cache, pos, n_head, pad=None, rope=None):
    """A decode step's attention, one new token per row, in one pass where the backend fuses it: this token's
    key and value written into the KV cache at slot pos, softmax(q k^T / sqrt(D)) over the row's slots
    pad[b]..pos and its sum of values, heads merged. The same arithmetic as the composed step (heads split and
    permuted, cache write, products, softmax, heads merged), without its copies; slots past pos are never read.

    qkv: the packed projection (B, 1, (H + 2 Hkv) D) (q, k, v side by side, as GPT-2's c_attn makes it) or the
    tuple (q, k, v) of projections (B, 1, H D), (B, 1, Hkv D), (B, 1, Hkv D). cache: the layer's (keys, values),
    each (B, Hkv, block, D); query head h reads key-value head h // (H / Hkv) (GQA). pad: None or (B,) counts of
    left-padding slots (as forward_cached takes them), each <= pos. rope: None or the rotary tables (cos, sin)
    (P, D), P > pos: q and k rotated at each row's position pos - pad[b] (Llama). Inference only: no gradient."""
    parts = qkv if isinstance(qkv, tuple) else (qkv,)
    cache_k, cache_v = cache
    where = "decode_attention"
    if len(parts) not in (1, 3) or cache_k.ndim != 4 or cache_v.shape != cache_k.shape:
        raise ValueError(f"{where}: qkv must be the packed projection or (q, k, v), and cache two (B, Hkv, block, "
                         f"D) tensors of one shape, got {len(parts)} projection(s), cache "
                         f"{_shape_str(cache_k.shape)} and {_shape_str(cache_v.shape)}")
    Bsz, Hkv, block, D = cache_k.shape
    H = n_head
    if not isinstance(H, (int, np.integer)) or H < 1 or H % Hkv:
        raise ValueError(f"{where}: n_head must be a positive multiple of the cache's {Hkv} key-value heads, "
                         f"got {H!r}")
    want = [(H + 2 * Hkv) * D] if len(parts) == 1 else [H * D, Hkv * D, Hkv * D]
    if any(t.shape != (Bsz, 1, w) for t, w in zip(parts, want)):
        raise ValueError(f"{where}: projections must be {', '.join(_shape_str((Bsz, 1, w)) for w in want)} (one "
                         f"token per row of the cache's batch {Bsz}, {H} query and {Hkv} key-value heads of {D}), "
                         f"got {', '.join(_shape_str(t.shape) for t in parts)}")
    for t in parts + (cache_k, cache_v) + tuple(rope or ()):   # (the kernel read an int32 table's bits as floats)
        _check_float(t, where)
        if t.backend is not parts[0].backend:
            raise ValueError(f"{where}: tensors live on different backends: {parts[0].backend.name} and "
                             f"{t.backend.name}")
    if isinstance(pos, bool) or not isinstance(pos, (int, np.integer)) or not 0 <= pos < block:
        raise ValueError(f"{where}: pos must be a cache slot in [0, {block - 1}], got {pos!r}")
    if pad is not None:
        pad = np.asarray(pad)
        if pad.dtype.kind not in "iu" or pad.shape != (Bsz,) or (pad.size and (pad.min() < 0 or pad.max() > pos)):
            raise ValueError(f"{where}: pad must be one count of left-padding slots per row ({Bsz}), each in [0, "
                             f"pos={pos}] (the token at pos is the row's own), got {pad.tolist()}")
    if rope is not None:
        cos, sin = rope
        if D % 2 or cos.ndim != 2 or cos.shape != sin.shape or cos.shape[1] != D or cos.shape[0] <= pos:
            raise ValueError(f"{where}: rotary tables must be (P, D) with P > pos={pos} and D={D} even, got cos "
                             f"{_shape_str(cos.shape)}, sin {_shape_str(sin.shape)}")
    if is_grad_enabled() and any(t.requires_grad for t in parts):
        raise ValueError(f"{where}: no gradient: a decode step's attention is inference only (run it under "
                         f"lab.no_grad(); training takes causal_self_attention through full forwards)")
    Bk = parts[0].backend
    if not Bk.decode_attention_fits(D):
        raise ValueError(f"{where}: the {Bk.name} backend has no decode attention kernel for heads of {D} "
                         f"(decode_attention_applies says where it has)")
    offsets = (0, H * D, (H + Hkv) * D) if len(parts) == 1 else (0, 0, 0)
    arrays = tuple((t.data, o) for t, o in zip(parts * 3 if len(parts) == 1 else parts, offsets))
    pad_data = None if pad is None else Bk.from_numpy(pad.astype(np.int32))
    tables = (None, None) if rope is None else (rope[0].data, rope[1].data)
    y = Bk.decode_attention(arrays, cache_k.data, cache_v.data, int(pos), H, 1.0 / math.sqrt(D), pad_data, *tables)
    return Tensor(y, Bk)
