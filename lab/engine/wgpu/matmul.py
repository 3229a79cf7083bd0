"""Matrix products: matmul_plan.py chooses the path (tiled, whole-tile, thin, padded, gathered); this runs it."""
import functools

from ..backend import HeadView, check_column_sums, check_gelu_grad, gather_heads, scatter_heads
from .common import _f32bits
from .matmul_plan import Limits, Tuning, heads_in_place, plan, plan_group, rows_cols
from .memory import GPUArray


def _storage(x):
    """The buffer behind an operand (a HeadView's activation)."""
    return x.data if isinstance(x, HeadView) else x


def _aligned_subs(a, b):
    """matmul_aligned.wgsl's operand types: f32, or f16 for a float16 array (the f16-storage products)."""
    elems = ["f16" if getattr(x, "dtype", None) == "float16" else "f32" for x in (a, b)]
    return (("ENABLE", "enable f16;" if "f16" in elems else ""), ("A_ELEM", elems[0]), ("B_ELEM", elems[1]))


def _operand_layout(x, heads):
    """(offset, outer, inner, row stride) in floats of matmul_aligned.wgsl's operand addressing (see its header):
    matrix b at offset + (b / heads) outer + (b % heads) inner, rows `row stride` apart."""
    if isinstance(x, HeadView):
        outer, inner, row, _ = x.strides()
        return x.offset, outer, inner, row
    n, rows, cols = x.shape
    if n == 1:  # one matrix for the whole batch
        return 0, 0, 0, cols
    return 0, heads * rows * cols, rows * cols, cols


class MatmulOps:
    """WgpuBackend's matmul and matmul_gelu: matmul_plan.plan chooses, _matmul carries the plan out."""
    matmul_tuning = Tuning()

    @functools.cached_property
    def _matmul_limits(self):
        return Limits.of(self.limits)

    def matmul_gelu(self, a, b, bias=None, keep_pre=True, residual=None):
        """gelu(a @ b + bias) (+ residual) and, with keep_pre, a @ b + bias (the backward's input): the activation
        (and the residual) applied as the product is stored where its kernel can, else by a pass of its own."""
        out, pre, fused = self._matmul(a, b, bias=bias, gelu="keep" if keep_pre else "drop", residual=residual)
        if not fused:
            out, pre = self.unary("gelu", out), out if keep_pre else None
        return (out if residual is None or fused == "all" else self.binary("add", out, residual)), pre

    def matmul_column_sums(self, a, b, trans_a=False):
        check_column_sums(a, b, trans_a)
        out, sums, _ = self._matmul(a, b, trans_a, column_sums=True)
        if sums is None:   # a path whose kernel does not sum them: a reduction of their own
            sums = self.reduce("sum", self.reshape(b, b.shape[1:]), 0)
        return out, sums

    @property
    def fused_gelu_grad(self):
        return self.matmul_tuning.GELU_GRAD_FUSED

    def matmul_gelu_grad(self, g, w, pre):
        check_gelu_grad(g, w, pre)
        if not self.matmul_tuning.GELU_GRAD_FUSED:
            return self.binary("gelu_bwd", pre, self.matmul(g, w, False, True))
        out, _, fused = self._matmul(g, w, False, True, gelu="grad", gelu_grad=pre)
        return out if fused else self.binary("gelu_bwd", pre, out)

    def matmul(self, a, b, trans_a=False, trans_b=False, bias=None, triangle=None, out=None, residual=None):
        y, _, fused = self._matmul(a, b, trans_a, trans_b, bias, triangle, into=out, residual=residual)
        return y if residual is None or fused == "all" else self.binary("add", y, residual)

    def _matmul(self, a, b, trans_a=False, trans_b=False, bias=None, triangle=None, gelu=None, into=None,
                residual=None, column_sums=False, gelu_grad=None):
        """(out, pre, fused): gelu None, the product (+ bias); "keep" or "drop", where the whole-tile kernel takes the
        product in one piece, its GELU with fused=True (and with "keep" the product in pre), else the product.
        fused == "all": every epilogue asked for, `residual` (added last) included, is applied (matmul_rows.wgsl);
        any other path leaves the residual to the caller. column_sums (no bias, GELU or residual): pre is b's column
        sums (N,) where the whole-tile kernel took them with the product (Plan.column_sums), else None.
        gelu "grad" (gelu_grad: pre, the product's shape): the product times gelu'(pre) where the whole-tile kernel
        takes the product in one piece (fused=True), else the product.
        a, b may be HeadViews and `into` a HeadView to write the product into (out is then that view): read and
        written in place by the whole-tile kernels, gathered and scattered by copies for the others."""
        views = [x for x in (a, b, into) if isinstance(x, HeadView)]
        heads = views[0].heads if views else 1
        if any(v.heads != heads or v.shape[0] != views[0].shape[0] for v in views) or (
                views and (bias is not None or gelu is not None or residual is not None)):
            raise ValueError("matmul: HeadView operands must share batch and heads, and take no bias or activation")
        ba, bb = a.shape[0], b.shape[0]
        M, K = (a.shape[2], a.shape[1]) if trans_a else (a.shape[1], a.shape[2])
        N = b.shape[1] if trans_b else b.shape[2]
        batch = max(ba, bb)
        if batch > self._matmul_limits.max_workgroups and not views:
            out = self._matmul_batches(a, b, trans_a, trans_b, triangle, M, N, self._matmul_limits.max_workgroups)
            return (out if bias is None else self.binary("add", out, bias)), None, False
        p = plan(M, N, K, ba, bb, trans_a, trans_b, bias=bias is not None, gelu=gelu is not None, triangle=triangle,
                 views=bool(views), views_vec4=all(v.offset % 4 == 0 and v.width % 4 == 0 and v.dim % 4 == 0
                                                   for v in views),
                 into=into is not None, column_sums=column_sums, limits=self._matmul_limits,
                 tuning=self.matmul_tuning)
        if p.path == "rows":
            if gelu == "grad":   # (matmul_rows.wgsl applies GELU, not its derivative)
                return self._matmul_rows(a, b, bias, None, residual, M, N, K, p)[0], None, False
            return self._matmul_rows(a, b, bias, gelu, residual, M, N, K, p)
        if p.path == "thin_k":
            out = self._alloc((1, M, N), "float32")
            self._dispatch("lora", "up_add_t_main", [M, 0, N, K, _f32bits(1.0), 1],
                           [self._f32(a), self._f32(b), None, out], p.grid, M * N)
            return out, None, False
        if p.cast:
            a, b = self._f32(a), self._f32(b)
        if p.path == "gathered":
            return self._matmul_gathered(a, b, trans_a, trans_b, triangle, into)
        if p.path == "zeros":
            out = self._alloc((batch, M, N), "float32")
            self._flat("copy", "fill_main", [out.size, 0], [None, out], out.size)
            return (out if bias is None else self.binary("add", out, bias)), None, False
        if p.path == "padded":
            return self._matmul_padded(a, b, trans_a, trans_b, bias, M, N, p.padded), None, False
        if p.path == "thin":
            return self._matmul_thin(a, b, trans_a, trans_b, M, N, K, p), None, False
        S = p.split
        sums = p.column_sums
        # split with column sums: each chunk's partial sums follow its partial product, so one pass sums both
        chunk = M * N + N if sums and S > 1 else batch * M * N
        out = self._alloc((S, chunk) if sums else (S * batch, M, N), "float32") if into is None else into
        label = f"matmul {'T' if trans_a else 'N'}{'T' if trans_b else 'N'} {batch}x{M}x{N}x{K}" + (
            f" split {S}" if S > 1 else "")
        if p.transpose_b:
            if isinstance(b, HeadView):
                outer, inner, row, _ = b.strides()
                b = self.reshape(self.copy_view(b.data, b.offset, (bb // heads, heads, K, N), (outer, inner, 1, row)),
                                 (bb, K, N))
            else:
                b = self.copy_view(self._f32(b), 0, (bb, K, N), (N * K, 1, K))
        if p.path == "aligned":
            # whole tiles, vec4 rows: the unchecked vec4 kernel (strides are multiples of 4 here)
            grad = p.gelu and gelu == "grad"
            fused, act = p.fused_bias, int(p.gelu and not grad)
            pre = self._alloc(out.shape, "float32") if act and gelu == "keep" else gelu_grad if grad else None
            if sums and S == 1:
                pre = self._alloc((N,), "float32")
            la, lb = (_operand_layout(x, heads) for x in (a, b))
            lc = (0, 0, 0, N) if sums else _operand_layout(out, heads)
            params = [M, N, K, la[1], lb[1], lc[1], batch, p.k_chunk, int(fused), p.triangle, act, la[3], lb[3], lc[3],
                      heads, la[2], lb[2], lc[2], la[0], lb[0], lc[0], chunk, (2 if S == 1 else 1) if sums else 0]
            self._dispatch("matmul_aligned", p.entry, params,
                           [_storage(a), _storage(b), _storage(out), bias if fused else None, pre], p.grid,
                           batch * M * N * S, _aligned_subs(a, b) + (("SUMS", "true" if sums else "false"),
                                                                     ("GELU_GRAD", "true" if grad else "false")),
                           label=label + " aligned" + (" +bias" if fused else "") + (" +gelu" if act else "")
                           + (" +gelu grad" if grad else "")
                           + (" +column sums" if sums else "")
                           + (f" {triangle}-triangle" if p.triangle else "") + (" in place" if views else ""))
            if act or grad:
                return out, pre if act else None, True
            if fused:
                return out, None, False
            if sums and S == 1:
                return self.reshape(out, (1, M, N)), pre, False
            if sums:
                total, pre = self._alloc((1, M, N), "float32"), self._alloc((N,), "float32")
                self._reduce_passes("sum", out, 1, S, chunk, total, 0, tail=(pre, M * N))
                return total, pre, False
        else:
            params = [M, N, K, M * K if ba > 1 else 0, K * N if bb > 1 else 0, M * N, batch, p.k_chunk]
            subs = (("TRANS_A", "true" if trans_a else "false"), ("TRANS_B", "true" if trans_b else "false"))
            self._dispatch("matmul", p.entry, params, [a, b, out], p.grid, out.size, subs, label=label)
        if S > 1:
            out = self.reshape(self.reduce("sum", self.reshape(out, (S, batch * M * N)), 0), (batch, M, N))
        return (out if bias is None else self.binary("add", out, bias)), None, False

    def linears_fit(self, rows, weights, how):
        return len({w.dtype for w in weights}) == 1 and plan_group(
            rows, tuple(w.shape[-1] for w in weights), how, self._matmul_limits, self.matmul_tuning) is not None

    def linears(self, a, weights, biases, how):
        """Several (K, N_i) weights of one input a (1, M, K) in one matmul_rows_multi.wgsl dispatch (linears_fit)."""
        M, K = a.shape[1:]
        widths = [w.shape[-1] for w in weights]
        p = plan_group(M, tuple(widths), how, self._matmul_limits, self.matmul_tuning)
        out = self._alloc((1, M, sum(widths) if how == "concat" else widths[0]), "float32")
        pad = [0] * (3 - len(weights))
        mask = sum(1 << i for i, b in enumerate(biases) if b is not None)
        cols = rows_cols("nn", M, self.matmul_tuning)
        tiles = [-(-n // cols) for n in widths] + pad
        self._dispatch("matmul_rows_multi", p.entry, [M, K] + widths + pad + tiles[:2] + [mask],
                       [a] + list(weights) + [None] * len(pad) + [out] + list(biases) + [None] * len(pad), p.grid,
                       M * K * sum(widths), _aligned_subs(a, weights[0]) + (("ROWS", M), ("TN", cols)),
                       label=f"linears {how} 1x{M}x{'+'.join(map(str, widths))}x{K} rows")
        return out

    def _matmul_rows(self, a, b, bias, gelu, residual, M, N, K, p):
        """A product of M <= 16 rows by matmul_rows.wgsl in one dispatch, bias, GELU and residual applied as it
        stores: (out, pre, "all")."""
        if residual is not None and residual.size != M * N:
            raise ValueError(f"matmul: residual of shape {residual.shape} for a product of {M} x {N}: it must hold "
                             f"one value per output")
        out = self._alloc((1, M, N), "float32")
        pre = self._alloc((1, M, N), "float32") if gelu == "keep" else None
        fused = [x is not None for x in (bias, gelu, residual, pre)]
        label = f"matmul {p.layout.upper()} 1x{M}x{N}x{K} rows" + "".join(
            f" +{name}" for name, on in zip(("bias", "gelu", "residual"), fused) if on)
        self._dispatch("matmul_rows", p.entry, [M, N, K] + [int(f) for f in fused], [a, b, out, bias, residual, pre],
                       p.grid, M * N * K, _aligned_subs(a, b) + (("ROWS", M), ("TN_NN", rows_cols("nn", M, self.matmul_tuning))),
                       label=label)
        return out, pre, "all"

    def _matmul_thin(self, a, b, trans_a, trans_b, M, N, K, p):
        """A single product with N (or M) <= 16 by matmul_thin.wgsl on the operands as stored, planned as p."""
        a_row, a_k = (1, M) if trans_a else (K, 1)    # element strides of A (m, k) and B (k, n) as stored
        b_k, b_col = (1, K) if trans_b else (N, 1)
        if p.swap:
            first, second, rows, cols = b, a, N, M
            strides = [b_col, b_k, a_k, a_row, 1, N]
        else:
            first, second, rows, cols = a, b, M, N
            strides = [a_row, a_k, b_k, b_col, N, 1]
        S = p.split
        out = self._alloc((S, M, N), "float32")
        params = [rows, cols, K, p.k_chunk, 0, strides[0], strides[1], 0, strides[2], strides[3], 0, strides[4],
                  strides[5], M * N]
        label = f"matmul {'T' if trans_a else 'N'}{'T' if trans_b else 'N'} 1x{M}x{N}x{K} thin" + (
            f" split {S}" if S > 1 else "")
        self._dispatch("matmul_thin", "main", params, [first, second, out], p.grid, M * N * K, label=label)
        if S > 1:
            out = self.reshape(self.reduce("sum", self.reshape(out, (S, M * N)), 0), (1, M, N))
        return out

    def _matmul_padded(self, a, b, trans_a, trans_b, bias, M, N, padded):
        """a @ b through zero-padded copies of sizes `padded` (zeros add nothing to the product), the result cut
        back to (batch, M, N): a view of its first rows where only M was padded."""
        Mp, Np, Kp = padded
        a = self._zero_padded(self._f32(a), (Kp, Mp) if trans_a else (Mp, Kp))
        b = self._zero_padded(self._f32(b), (Np, Kp) if trans_b else (Kp, Np))
        bias = self._zero_padded(self.reshape(bias, (1, 1, N)), (1, Np)) if bias is not None else None
        out = self._matmul(a, b, trans_a, trans_b, self.reshape(bias, (Np,)) if bias is not None else None)[0]
        batch = out.shape[0]
        if Np == N and (batch == 1 or Mp == M):  # the wanted rows are a prefix of the padded result
            return GPUArray(out.storage, (batch, M, N), out.dtype)
        return self.copy_view(out, 0, (batch, M, N), (Mp * Np, Np, 1))

    def _matmul_batches(self, a, b, trans_a, trans_b, triangle, M, N, chunk):
        """A batch of more products than a grid has workgroups along z (65,535 on any WebGPU device), `chunk` products
        at a time through copies of their operands (the kernels take a batch from offset 0)."""
        a, b = self._f32(a), self._f32(b)
        batch = max(a.shape[0], b.shape[0])
        out = self._alloc((batch, M, N), "float32")
        for i in range(0, batch, chunk):
            n = min(chunk, batch - i)
            a_i, b_i = (x if x.shape[0] == 1 else self.copy_view(x, i * x.shape[1] * x.shape[2], (n,) + x.shape[1:],
                                                                 (x.shape[1] * x.shape[2], x.shape[2], 1)) for x in (a, b))
            self.write_view(out, i * M * N, (M * N, N, 1), self.matmul(a_i, b_i, trans_a, trans_b, triangle=triangle))
        return out

    def _f32(self, x):
        """x, or a float32 copy of a float16 array (for the kernels that read float32 only: everything but the
        whole-tile matmuls)."""
        if isinstance(x, HeadView) or x.dtype != "float16":
            return x
        out = self._alloc(x.shape, "float32")
        self._flat("cast", "widen_main", [x.size], [x, out], x.size)
        return out

    def _zero_padded(self, x, rows_cols):
        """x (n, r, c) in the top-left corner of a zeroed (n, R, C) array (x itself when it is that size)."""
        n, r, c = x.shape
        R, C = rows_cols
        if (r, c) == (R, C):
            return x
        out = self._alloc((n, R, C), "float32")
        self._flat("copy", "pad_main", [out.size, R, C, r, c], [x, out], out.size)
        return out

    def heads_in_place(self, seq, dim):
        return heads_in_place(seq, dim, self._matmul_limits, self.matmul_tuning)

    def padded_width(self, M, N, K):
        p = plan(M, N, K, limits=self._matmul_limits, tuning=self.matmul_tuning)
        return p.padded[1] if p.path == "padded" else N

    def _matmul_gathered(self, a, b, trans_a, trans_b, triangle, into):
        """A product with HeadViews through contiguous copies of them (for the kernels that take plain stacks)."""
        out = self.matmul(gather_heads(self, a), gather_heads(self, b), trans_a, trans_b, triangle=triangle)
        return (out if into is None else scatter_heads(self, into, out)), None, False
