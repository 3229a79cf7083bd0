"""Neural-network kernels: softmax, LayerNorm, embedding, cross-entropy, dropout, fused attention, LoRA."""
import math
import os
import threading

from . import attention_plan
from .attention_plan import AttentionTuning
from .common import _f32bits, _grid, _row_subs, _split


class NNOps:
    """WgpuBackend's row kernels, embedding, cross-entropy, dropout, attention and LoRA kernels."""
    def _rows(self, shape):
        return math.prod(shape[:-1]), shape[-1]

    def _softmax_params(self, head, dropout):
        """softmax.wgsl's params: head = [rows, n, T, scale bits, causal], then the dropout riding along (p, seed)
        or none; while capturing, a replay's new seed is patched in."""
        if dropout is None:
            return head + [0, 0, 0, 0]
        p, seed = dropout

        def params(seed):
            return head + [1, seed, _f32bits(p), _f32bits(1.0 / (1.0 - p))]
        if self._capture is not None:  # a replay draws the step's seeds anew: the captured seed maps to its new one
            self._patch = lambda step: params(step["seeds"].get(seed, seed))
        return params(seed)

    def softmax(self, a, scale=1.0, causal=False, dropout=None, length=None):
        rows, n = self._rows(a.shape)
        out = self._alloc(a.shape, "float32")
        dropped = self._alloc(a.shape, "float32") if dropout is not None else None
        T = a.shape[-2] if causal else 1 if length is None else length
        mode = 2 if length is not None else int(causal)
        self._dispatch("softmax", "softmax_main", self._softmax_params([rows, n, T, _f32bits(scale), mode],
                                                                       dropout),
                       [a, None, out, dropped], _grid(rows), rows * n, _row_subs(n))
        return out if dropout is None else (out, dropped)

    def softmax_bwd(self, y, g, scale=1.0, dropout=None, dropped=None):   # (the kernel makes the mask in its pass)
        rows, n = self._rows(y.shape)
        out = self._alloc(y.shape, "float32")
        self._dispatch("softmax", "softmax_bwd_main", self._softmax_params([rows, n, 1, _f32bits(scale), 0], dropout),
                       [y, g, out], _grid(rows), rows * n, _row_subs(n))
        return out

    def log_softmax(self, a):
        rows, n = self._rows(a.shape)
        out = self._alloc(a.shape, "float32")
        self._dispatch("softmax", "log_softmax_main", self._softmax_params([rows, n, 1, 0, 0], None), [a, None, out],
                       _grid(rows), rows * n, _row_subs(n))
        return out

    def log_softmax_bwd(self, y, g):
        rows, n = self._rows(y.shape)
        out = self._alloc(y.shape, "float32")
        self._dispatch("softmax", "log_softmax_bwd_main", self._softmax_params([rows, n, 1, 0, 0], None), [y, g, out],
                       _grid(rows), rows * n, _row_subs(n))
        return out

    def layernorm(self, x, w, b, eps, residual=None):
        rows, n = self._rows(x.shape)
        y = self._alloc(x.shape, "float32")
        mean = self._alloc(x.shape[:-1], "float32")
        rstd = self._alloc(x.shape[:-1], "float32")
        total = self._alloc(x.shape, "float32") if residual is not None else None
        self._dispatch("layernorm", "forward_main", [rows, n, _f32bits(eps), int(residual is not None)],
                       [x, w, b, y, mean, rstd, residual, total], _grid(rows), rows * n, _row_subs(n))
        return (y, mean, rstd) if residual is None else (y, mean, rstd, total)

    def layernorm_bwd(self, x, w, mean, rstd, g, acc=None):
        rows, n = self._rows(x.shape)
        dx = self._alloc(x.shape, "float32")
        self._dispatch("layernorm_backward", "backward_x_main", [rows, n, 1, rows, int(acc is not None)],
                       [x, w, mean, rstd, g, dx, None, acc], _grid(rows), rows * n, _row_subs(n))
        # dw, db are column sums over all rows: partial sums over row chunks first, so that enough threads run.
        S, chunk = _split(rows, 16, math.ceil(131072 / max(n, 1)))
        dw, db = self._alloc((n,), "float32"), self._alloc((n,), "float32")
        if S == 1 or n == 0:
            self._flat("layernorm_backward", "backward_wb_main", [rows, n, S, chunk, 0],
                       [x, None, mean, rstd, g, dw, db], S * n, _row_subs(n))
            return dx, dw, db
        # both partials side by side: one reduction's passes sum them (half the passes of two)
        parts = self._alloc((S, 2 * n), "float32")
        self._flat("layernorm_backward", "backward_wb_main", [rows, n, S, chunk, 1],
                   [x, None, mean, rstd, g, parts], S * n, _row_subs(n))
        self._reduce_passes("sum", parts, 1, S, 2 * n, dw, 0, tail=(db, n))
        return dx, dw, db

    def rms_norm(self, x, w, eps, residual=None):
        rows, n = self._rows(x.shape)
        y = self._alloc(x.shape, "float32")
        rstd = self._alloc(x.shape[:-1], "float32")
        total = self._alloc(x.shape, "float32") if residual is not None else None
        self._dispatch("rmsnorm", "forward_main", [rows, n, _f32bits(eps), int(residual is not None)],
                       [x, w, y, rstd, residual, total], _grid(rows), rows * n, _row_subs(n))
        return (y, rstd) if residual is None else (y, rstd, total)

    def rms_norm_bwd(self, x, w, rstd, g, acc=None):
        rows, n = self._rows(x.shape)
        dx = self._alloc(x.shape, "float32")
        self._dispatch("rmsnorm_backward", "backward_x_main", [rows, n, 1, rows, int(acc is not None)],
                       [x, w, rstd, g, dx, acc], _grid(rows), rows * n, _row_subs(n))
        # dw is a column sum over all rows: partial sums over row chunks first, so that enough threads run
        S, chunk = _split(rows, 16, math.ceil(131072 / max(n, 1)))
        parts = self._alloc((S, n), "float32")
        self._flat("rmsnorm_backward", "backward_w_main", [rows, n, S, chunk, 0], [x, None, rstd, g, parts],
                   S * n, _row_subs(n))
        return dx, self.reshape(parts, (n,)) if S == 1 else self.reduce("sum", parts, 0)

    def swiglu(self, gate, up):
        out = self._alloc(gate.shape, "float32")
        self._flat("swiglu", "forward_main", [gate.size], [gate, up, None, out], gate.size)
        return out

    def swiglu_bwd(self, gate, up, g):
        dgate, dup = self._alloc(gate.shape, "float32"), self._alloc(gate.shape, "float32")
        self._flat("swiglu", "backward_main", [gate.size], [gate, up, g, dgate, dup], gate.size)
        return dgate, dup

    def rotary(self, x, cos, sin, pos, inverse=False, heads=None):
        D = cos.shape[1]
        if heads is None:
            shape, T, H, layout = x.shape, x.shape[-2], 1, 0
        elif inverse:   # (B, heads, T, D) -> (B, T, heads * D)
            shape, T, H, layout = (x.shape[0], x.shape[2], heads * D), x.shape[2], heads, 2
        else:           # (B, T, heads * D) -> (B, heads, T, D)
            shape, T, H, layout = (x.shape[0], heads, x.shape[1], D), x.shape[1], heads, 1
        out = self._alloc(shape, "float32")
        self._flat("rotary", "inverse_main" if inverse else "forward_main", [x.size, T, D, pos, H, layout],
                   [x, cos, sin, out], x.size)
        return out

    def embedding(self, w, idx, checked=False):
        V, C = w.shape
        N = idx.size
        out = self._alloc(idx.shape + (C,), "float32")
        self._flat("embedding", "forward_main", [N, C, V], [idx, w, out, None, self._index_errors], N * C)
        if not checked and N > 0:
            self._indices_unchecked.add(threading.get_ident())
        return out

    def embedding_bwd(self, idx, g, num_embeddings):
        C, V, N = g.shape[-1], num_embeddings, idx.size
        if V * C <= (1 << 20):  # small vocabulary: a thread per (chunk, row, column), then sum the chunks
            S, chunk = _split(N, 64, (1 << 21) // max(V * C, 1))
            parts = self._alloc((S, V, C), "float32")
            self._flat("embedding", "backward_vocab_main", [N, C, V, S, chunk], [idx, g, parts], S * V * C)
            return self.reshape(parts, (V, C)) if S == 1 else self.reduce("sum", parts, 0)
        dw = self.full((V, C), 0.0)   # rows of tokens not in the batch
        links = self._alloc((N,), "int32")
        self._flat("embedding", "links_main", [N, C, V, 0, 0], [idx, None, None, links], N)
        self._flat("embedding", "chain_main", [N, C, V, 0, 0], [idx, g, dw, links], N * C)
        return dw

    def cross_entropy(self, logits, targets, ignore_index, checked=False, classes=None):
        rows, W = logits.shape
        V = W if classes is None else classes
        lse = self._alloc((rows,), "float32")
        loss_rows = self._alloc((rows,), "float32")
        valid = self._alloc((rows,), "float32")
        loss = self._alloc((), "float32")
        count = self._alloc((1,), "float32")
        params = [rows, V, ignore_index, W]
        self._dispatch("cross_entropy", "rows_main", params,
                       [logits, targets, lse, loss_rows, valid, self._index_errors], _grid(rows), rows, _row_subs(V))
        if not checked and rows > 0:
            self._indices_unchecked.add(threading.get_ident())
        self._dispatch("cross_entropy_reduce", "mean_main", params, [None, None, None, loss_rows, valid, loss, count],
                       (1, 1, 1))
        return loss, (lse, valid, count)

    def cross_entropy_bwd(self, logits, targets, saved, g, ignore_index, classes=None, in_place=False):
        lse, valid, count = saved
        rows, W = logits.shape
        dx = logits if in_place else self._alloc(logits.shape, "float32")
        self._flat("cross_entropy_reduce", "backward_inplace_main" if in_place else "backward_main",
                   [rows, W if classes is None else classes, ignore_index, W],
                   [None if in_place else logits, targets, lse, None, valid, dx, count, g], rows * W)
        return dx

    def dropout(self, x, p, seed):
        out, n = self._alloc(x.shape, "float32"), x.size

        def params(seed):   # (n, not x: a capture keeps this for its replays, and x's memory must not live as long)
            return [n, seed, _f32bits(p), _f32bits(1.0 / (1.0 - p))]
        if self._capture is not None:  # a replay draws the step's seeds anew: the captured seed maps to its new one
            self._patch = lambda step: params(step["seeds"].get(seed, seed))
        self._flat("dropout", "main", params(seed), [x, out], x.size)
        return out

    # Causal self-attention by attention.wgsl's fused kernels where they apply, for the shapes whose (B, H, T, T)
    # weights cannot be one buffer (above the device's max-storage-buffer-binding-size: the composed path cannot
    # run them at all), and for every shape with rotary tables (Llama: attention_tuning.FLASH_DEFAULT_ROTARY), with
    # attention_tuning.FLASH_DEFAULT or LAB_FLASH_ATTENTION=1 (LAB_FLASH_ATTENTION=0: only where they must;
    # attention_plan.kernels_run). They keep the weights out of memory (gpt2-small's are 400 MB a layer, several
    # times over in the composed backward); for GPT-2's shapes they are slower on the H200 (FLASH_DEFAULT's
    # comment). Larger blocks where the workgroup memory takes them: attention_plan.
    FLASH_ATTENTION = attention_plan.asked(os.environ.get("LAB_FLASH_ATTENTION", ""))
    attention_tuning = AttentionTuning()

    def _attention_blocks(self, head_dim):
        storage = self.limits.get("max-compute-workgroup-storage-size", 16384)
        threads = self.limits.get("max-compute-invocations-per-workgroup", 256)
        return tuple(attention_plan.blocks(kind, head_dim, storage, self.attention_tuning, threads)
                     for kind in ("fwd", "bwd"))

    def flash_attention_fits(self, qkv_shape, n_head, n_kv_head=None, rotary=False):
        """Whether attention.wgsl's kernels take this packed qkv (B, T, (H + 2 Hkv) D) (heads of D a multiple of 4
        up to 256, of 8 with rotary, any T within the grid, at most 65535 heads in all: one workgroup row each,
        blocks that fit the device's workgroup memory: attention_plan.kernels_take) and are to: asked for
        (FLASH_ATTENTION, else attention_tuning's default for rotary or not), or the weights too big a buffer
        (attention_plan.kernels_run)."""
        Bsz, T, W = qkv_shape
        n_kv = n_head if n_kv_head is None else n_kv_head
        D, rest = divmod(W, n_head + 2 * n_kv)
        return bool(not rest and n_kv > 0 and not n_head % n_kv and attention_plan.kernels_run(
            D, Bsz * n_head, T, self.limits.get("max-compute-workgroup-storage-size", 16384), self.max_binding,
            rotary, self.FLASH_ATTENTION, self.attention_tuning,
            self.limits.get("max-compute-invocations-per-workgroup", 256),
            self.limits.get("max-compute-workgroups-per-dimension", 65535)))

    def flash_attention(self, qkv, n_head, scale, p, seed, n_kv_head=None, rope=None):
        """Causal self-attention from the packed qkv (B, T, (H + 2 Hkv) D) by attention.wgsl's fused kernels: (y (B,
        T, H D), lse (B H, T)), the weights never in memory (flash_attention_fits says where they apply). rope: None
        or the rotary tables (cos, sin) (P >= T, D), q and k rotated at positions 0 .. T - 1 as they are read."""
        Bsz, T, W = qkv.shape
        n_kv = n_head if n_kv_head is None else n_kv_head
        D = W // (n_head + 2 * n_kv)
        bq, bk, ty = blocks = self._attention_blocks(D)[0]
        y = self._alloc((Bsz, T, n_head * D), "float32")
        lse = self._alloc((Bsz * n_head, T), "float32")
        self._attention("fwd_main", qkv, n_head, n_kv, scale, p, seed, rope,
                        [self._rotated_qkv(qkv, n_head, n_kv, rope, blocks), None, lse, None, y],
                        (-(-T // bq), Bsz * n_head), f"attention fwd {Bsz}x{n_head}x{T} {bq}x{bk}x{ty}", blocks)
        return y, lse

    def flash_attention_bwd(self, qkv, y, lse, g, n_head, scale, p, seed, n_kv_head=None, rope=None):
        """dqkv (B, T, (H + 2 Hkv) D) for flash_attention's y = f(qkv) and its output gradient g (B, T, H D): dk, dv
        of each key-value head summed over the query heads that read it (dq, dk through the rotation with rope)."""
        Bsz, T, W = qkv.shape
        n_kv = n_head if n_kv_head is None else n_kv_head
        D = W // (n_head + 2 * n_kv)
        bq, bk, ty = blocks = self._attention_blocks(D)[1]
        n = Bsz * T * n_head
        dr = self._alloc((n,), "float32")
        self._dispatch("attention", "delta_main", self._attention_params(qkv.shape, n_head, n_kv, scale, p, None,
                                                                         rope),
                       [qkv, g, lse, dr, y], _grid(math.ceil(n / 128)), n, self._attention_subs(blocks, D))
        dqkv = self._alloc(qkv.shape, "float32")  # the two kernels write disjoint parts, every element
        binds = [self._rotated_qkv(qkv, n_head, n_kv, rope, blocks), g, lse, dr, dqkv]
        self._attention("bwd_kv_main", qkv, n_head, n_kv, scale, p, seed, rope, binds, (-(-T // bk), Bsz * n_kv),
                        f"attention bwd dk dv {Bsz}x{n_head}x{T} {bq}x{bk}x{ty}", blocks)
        self._attention("bwd_q_main", qkv, n_head, n_kv, scale, p, seed, rope, binds, (-(-T // bq), Bsz * n_head),
                        f"attention bwd dq {Bsz}x{n_head}x{T} {bq}x{bk}x{ty}", blocks)
        return dqkv

    def _rotated_qkv(self, qkv, n_head, n_kv, rope, blocks):
        """qkv, or with rope a copy with q and k rotated (attention.wgsl's rotate_main), which the kernels read."""
        if rope is None:
            return qkv
        out = self._alloc(qkv.shape, "float32")
        D = qkv.shape[2] // (n_head + 2 * n_kv)
        self._dispatch("attention", "rotate_main", self._attention_params(qkv.shape, n_head, n_kv, 1.0, 0.0, None,
                                                                          rope),
                       [qkv, None, None, None, out, *rope], _grid(math.ceil(qkv.size / 4 / 128)), qkv.size,
                       self._attention_subs(blocks, D), label=f"attention rotate {'x'.join(map(str, qkv.shape))}")
        return out

    @staticmethod
    def _attention_subs(blocks, head_dim):
        return tuple(zip(("BQ", "BK", "TY", "D4"), (*blocks, head_dim // 4)))

    @staticmethod
    def _attention_params(shape, n_head, n_kv, scale, p, seed, rope):
        Bsz, T, _ = shape
        drop = seed is not None and p > 0
        return [Bsz, T, n_head, n_kv, _f32bits(scale), seed if drop else 0, int(drop), _f32bits(p),
                _f32bits(1.0 / (1.0 - p)), int(rope is not None)]

    def _attention(self, entry, qkv, n_head, n_kv, scale, p, seed, rope, binds, grid, label, blocks):
        shape = qkv.shape
        D = shape[2] // (n_head + 2 * n_kv)
        if self._capture is not None and seed is not None:  # a replay draws the step's seeds anew
            self._patch = lambda step: self._attention_params(shape, n_head, n_kv, scale, p,
                                                              step["seeds"].get(seed, seed), rope)
        tables = list(rope) if rope is not None else [qkv, qkv]   # (any buffer where never read)
        self._dispatch("attention", entry, self._attention_params(shape, n_head, n_kv, scale, p, seed, rope),
                       binds + tables, grid, qkv.size, self._attention_subs(blocks, D), label=label)

    DECODE_WG = 64   # decode_attention.wgsl's RWG

    def decode_attention_fits(self, head_dim):
        """Whether decode_attention.wgsl's workgroup memory (q, k, v of one head and two RWG rows) fits the device."""
        need = (3 * head_dim + 2 * self.DECODE_WG) * 4
        return need <= self.limits.get("max-compute-workgroup-storage-size", 16384)

    def decode_attention(self, parts, cache_k, cache_v, pos, n_head, scale, pad=None, cos=None, sin=None):
        """A decode step's attention in one dispatch (decode_attention.wgsl): (B, 1, n_head * D)."""
        (q, qo), (k, ko), (v, vo) = parts
        Bsz, Hkv, block, D = cache_k.shape
        y = self._alloc((Bsz, 1, n_head * D), "float32")
        rows = Bsz * n_head
        self._dispatch("decode_attention", "main",
                       [Bsz, n_head, Hkv, D, block, pos, qo, ko, vo, q.shape[-1], k.shape[-1], v.shape[-1],
                        _f32bits(scale), int(cos is not None), int(pad is not None)],
                       [q, k, v, cos, sin, pad, cache_k, cache_v, y], _grid(rows), rows * D,
                       (("D", D), ("DPT", -(-D // self.DECODE_WG))), label=f"decode attention {Bsz}x{n_head}x{D}")
        return y

    LORA_DOWN_MATMUL = True  # H = x A^T by the matmul kernels (tiled, split along K), not lora.wgsl's down_main

    def lora_down(self, x, a):
        (M, K), r = x.shape, a.shape[0]
        if self.LORA_DOWN_MATMUL:
            # one thread per output reading a whole row of x (down_main) ran 2-3x slower on the H200 than the
            # tiled kernels on the same shapes (the backward's rank-r products)
            return self.reshape(self.matmul(self.reshape(x, (1, M, K)), self.reshape(a, (1, r, K)), False, True),
                                (M, r))
        out = self._alloc((M, r), "float32")
        self._flat("lora", "down_main", [M, K, 0, r, 0], [x, a, None, out], M * r)
        return out

    LORA_UP_TRANSPOSED = True  # the up-projection reads B transposed (lora.wgsl up_add_t_main)

    def lora_up_add(self, base, h, b, scale):
        (M, N), r = base.shape, h.shape[1]
        out = self._alloc((M, N), "float32")
        if self.LORA_UP_TRANSPOSED:
            bt = self.copy_view(b, 0, (r, N), (1, r))
            self._flat("lora", "up_add_t_main", [M, 0, N, r, _f32bits(scale), 0], [h, bt, base, out], M * N)
        else:
            self._flat("lora", "up_add_main", [M, 0, N, r, _f32bits(scale), 0], [h, b, base, out], M * N)
        return out
