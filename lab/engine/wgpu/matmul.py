"""Matrix products: the tiled, whole-tile (aligned, wide, 128-row), thin, padded and gathered paths."""
import math

from ..backend import HeadView, gather_heads, scatter_heads
from .common import _f32bits, _round_up
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
    """WgpuBackend's matmul and matmul_gelu."""
    # ------------------------------------------------------------------ fused
    SPLIT_K_TILES = 1024   # split K while the output has fewer tiles than this (enough to fill a large GPU)
    ROW128_MIN_TILES = 256  # 128-row tiles only for products that make at least this many of them
    WIDE_MIN_TILES = 256    # 128 x 128 tiles for products that make at least this many of them (on the H200
    # 270 of them still ran faster than 540 of 128 x 64; fewer leave most of its 132 multiprocessors idle)
    MATMUL_ROWS = True     # row-major A staged along rows (matmul.wgsl main_rows)
    MATMUL_ALIGNED = True  # whole-tile shapes take matmul_aligned.wgsl (vec4 loads, no bounds checks)

    def matmul_gelu(self, a, b, bias=None, keep_pre=True):
        """gelu(a @ b + bias) and, with keep_pre, a @ b + bias (the backward's input): the activation applied as the
        tiles are stored where the product takes the whole-tile kernel in one piece, else by a pass of its own."""
        out, pre, fused = self._matmul(a, b, bias=bias, gelu="keep" if keep_pre else "drop")
        if fused:
            return out, pre
        return self.unary("gelu", out), out if keep_pre else None

    def matmul(self, a, b, trans_a=False, trans_b=False, bias=None, triangle=None, out=None):
        return self._matmul(a, b, trans_a, trans_b, bias, triangle, into=out)[0]

    def _matmul(self, a, b, trans_a=False, trans_b=False, bias=None, triangle=None, gelu=None, into=None):
        """(out, pre, fused): gelu None, the product (+ bias); "keep" or "drop", where the whole-tile kernel takes the
        product in one piece, its GELU with fused=True (and with "keep" the product in pre), else the product.
        a, b may be HeadViews and `into` a HeadView to write the product into (out is then that view): read and
        written in place by the whole-tile kernels, gathered and scattered by copies for the others."""
        views = [x for x in (a, b, into) if isinstance(x, HeadView)]
        heads = views[0].heads if views else 1
        if any(v.heads != heads or v.shape[0] != views[0].shape[0] for v in views) or (
                views and (bias is not None or gelu is not None)):
            raise ValueError("matmul: HeadView operands must share batch and heads, and take no bias or activation")
        ba, bb = a.shape[0], b.shape[0]
        M, K = (a.shape[2], a.shape[1]) if trans_a else (a.shape[1], a.shape[2])
        N = b.shape[1] if trans_b else b.shape[2]
        batch = max(ba, bb)
        if K == 0 and views:
            return self._matmul_gathered(a, b, trans_a, trans_b, triangle, into)
        if K == 0:
            out = self._alloc((batch, M, N), "float32")
            self._flat("copy", "fill_main", [out.size, 0], [None, out], out.size)
            return (out if bias is None else self.binary("add", out, bias)), None, False
        padded = None if views or gelu is not None else self._padded_to_tiles(M, N, K, batch)
        if padded:
            return self._matmul_padded(a, b, trans_a, trans_b, bias, M, N, padded), None, False
        if not views and gelu is None and bias is None and ba == bb == 1 and M * N * K >= self.THIN_MIN_VOLUME:
            if min(M, N) <= self.THIN_MAX:
                return self._matmul_thin(self._f32(a), self._f32(b), trans_a, trans_b, M, N, K), None, False
            if K <= self.THIN_MAX and not trans_a and not trans_b:
                out = self._alloc((1, M, N), "float32")
                self._flat("lora", "up_add_t_main", [M, 0, N, K, _f32bits(1.0), 1],
                           [self._f32(a), self._f32(b), None, out], M * N)
                return out, None, False
        tiles = math.ceil(M / 64) * math.ceil(N / 64) * batch
        wide_shape = M % 128 == 0 and N % 128 == 0 and K % 16 == 0  # whole 128 x 128 tiles
        S = 1
        if tiles < self.SPLIT_K_TILES and K >= 256 and into is None:  # chunks of at least 128 along K
            # as many chunks as fill the device with tiles of 64 x 64 or, where M and N allow, of 128 x 128:
            # the weight gradients' long K then runs at the 128 x 128 tiles' full rate (45.9 TFLOP/s in 32
            # chunks against 34.0 in 8 for 384 x 1536 x 16384 on the H200), well worth summing the chunks after
            S = min(math.ceil(self.SPLIT_K_TILES / (tiles // 4 if wide_shape else tiles)), K // 128)
        kc = math.ceil(math.ceil(K / S) / 16) * 16   # chunks of whole TK steps
        S = math.ceil(K / kc)
        aligned = self.MATMUL_ALIGNED and M % 64 == 0 and N % 64 == 0 and K % 16 == 0
        if not aligned:
            a, b = self._f32(a), self._f32(b)
        wide = self.MATMUL_ALIGNED and wide_shape and M * N * batch * S >= self.WIDE_MIN_TILES << 14
        if views and not (aligned and all(v.offset % 4 == 0 and v.width % 4 == 0 and v.dim % 4 == 0
                                          for v in views)):
            return self._matmul_gathered(a, b, trans_a, trans_b, triangle, into)
        out = self._alloc((S * batch, M, N), "float32") if into is None else into
        label = f"matmul {'T' if trans_a else 'N'}{'T' if trans_b else 'N'} {batch}x{M}x{N}x{K}" + (
            f" split {S}" if S > 1 else "")
        grid = (math.ceil(N / 64), math.ceil(M / 64), batch * S)
        layout = ("t" if trans_a else "n") + ("t" if trans_b else "n")
        if aligned and not wide and layout in ("nt", "tt"):
            # A transposed B is staged badly by the 64-column kernels (its rows run along k); transposing it first
            # costs one copy of B, far less than the product it speeds up (measured: README, Performance). The
            # 128 x 128 kernels transpose it as they stage it.
            if isinstance(b, HeadView):
                outer, inner, row, _ = b.strides()
                b = self.reshape(self.copy_view(b.data, b.offset, (bb // heads, heads, K, N), (outer, inner, 1, row)),
                                 (bb, K, N))
            else:
                b = self.copy_view(self._f32(b), 0, (bb, K, N), (N * K, 1, K))
            layout = layout[0] + "n"
        if aligned:
            # whole tiles, vec4 rows: the unchecked vec4 kernel (strides are multiples of 4 here); a bias is added
            # as the tile is stored, unless split-K partial products are summed afterwards
            fused = bias is not None and S == 1
            act = int(gelu is not None and S == 1)  # the GELU epilogue, for a product in one piece
            pre = self._alloc(out.shape, "float32") if act and gelu == "keep" else None
            entry = layout
            if wide:
                entry, grid = layout + "_wide", (N // 128, M // 128, grid[2])  # 128 x 128 tiles, 8 x 8 per thread
            elif M % 128 == 0 and tiles * S >= 2 * self.ROW128_MIN_TILES:  # 128-row tiles (8 x 4 outputs per
                # thread) where they still leave enough workgroups to fill the device
                entry, grid = layout + "128", (grid[0], M // 128, grid[2])
            tri = 0
            if triangle == "out" and M == N:
                tri = 1
            elif triangle == "a" and M == K:
                tri = 3 if trans_a else 2
            la, lb, lc = (_operand_layout(x, heads) for x in (a, b, out))
            params = [M, N, K, la[1], lb[1], lc[1], batch, kc, int(fused), tri, act, la[3], lb[3], lc[3], heads,
                      la[2], lb[2], lc[2], la[0], lb[0], lc[0], batch * M * N]
            self._dispatch("matmul_aligned", entry, params,
                           [_storage(a), _storage(b), _storage(out), bias if fused else None, pre], grid,
                           batch * M * N * S, _aligned_subs(a, b),
                           label=label + " aligned" + (" +bias" if fused else "") + (" +gelu" if act else "")
                           + (f" {triangle}-triangle" if tri else "") + (" in place" if views else ""))
            if act:
                return out, pre, True
            if fused:
                return out, None, False
        else:
            entry = "main_rows" if self.MATMUL_ROWS and not trans_a else "main"
            params = [M, N, K, M * K if ba > 1 else 0, K * N if bb > 1 else 0, M * N, batch, kc]
            subs = (("TRANS_A", "true" if trans_a else "false"), ("TRANS_B", "true" if trans_b else "false"))
            self._dispatch("matmul", entry, params, [a, b, out], grid, out.size, subs, label=label)
        if S > 1:
            out = self.reshape(self.reduce("sum", self.reshape(out, (S, batch * M * N)), 0), (batch, M, N))
        return (out if bias is None else self.binary("add", out, bias)), None, False

    THIN_MAX = 16              # products with M, N or K up to this take the thin kernels (matmul_thin.wgsl; K:
    THIN_MIN_VOLUME = 1 << 20  # lora.wgsl up_add_t_main) when M N K is at least this
    PAD_MIN_VOLUME = 1 << 28  # M N K from which a ragged product is padded to whole tiles (see _padded_to_tiles)
    PAD_MAX_WORK = 1.05       # ... if the padded product is at most this much more work

    def _matmul_thin(self, a, b, trans_a, trans_b, M, N, K):
        """A single product with N (or M) <= 16: matmul_thin.wgsl on the operands as stored (a thin M computes
        C^T = B^T A^T, written through C's strides), K split into chunks while too few row blocks fill the GPU."""
        a_row, a_k = (1, M) if trans_a else (K, 1)    # element strides of A (m, k) and B (k, n) as stored
        b_k, b_col = (1, K) if trans_b else (N, 1)
        if N <= self.THIN_MAX:
            first, second, rows, cols = a, b, M, N
            strides = [a_row, a_k, b_k, b_col, N, 1]
        else:
            first, second, rows, cols = b, a, N, M
            strides = [b_col, b_k, a_k, a_row, 1, N]
        blocks = math.ceil(rows / 64)
        S = min(math.ceil(1024 / blocks), max(K // 128, 1)) if blocks < 1024 else 1
        kc = math.ceil(math.ceil(K / S) / 32) * 32
        S = math.ceil(K / kc)
        out = self._alloc((S, M, N), "float32")
        params = [rows, cols, K, kc, 0, strides[0], strides[1], 0, strides[2], strides[3], 0, strides[4], strides[5],
                  M * N]
        label = f"matmul {'T' if trans_a else 'N'}{'T' if trans_b else 'N'} 1x{M}x{N}x{K} thin" + (
            f" split {S}" if S > 1 else "")
        self._dispatch("matmul_thin", "main", params, [first, second, out], (blocks, 1, S), M * N * K, label=label)
        if S > 1:
            out = self.reshape(self.reduce("sum", self.reshape(out, (S, M * N)), 0), (1, M, N))
        return out

    def _padded_to_tiles(self, M, N, K, batch):
        """(Mp, Np, Kp), M and N rounded up to 128 and K to 16, where a ragged product is to run as its zero-padded
        whole-tile one (else None): large (a GPT-2 output layer, 8192 x 50257 x 768: the bounds-checked kernels ran
        its three products at about 25 TFLOP/s, 76 of a 209 ms step), and padding adds at most 5% to the work
        (PAD_MAX_WORK); the copies in and out cost far less than the rate gained."""
        if not self.MATMUL_ALIGNED or (M % 128 == 0 and N % 128 == 0 and K % 16 == 0):
            return None
        Mp, Np, Kp = _round_up(M, 128), _round_up(N, 128), _round_up(K, 16)
        if batch * M * N * K >= self.PAD_MIN_VOLUME and Mp * Np * Kp <= self.PAD_MAX_WORK * M * N * K:
            return Mp, Np, Kp
        return None

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
        """Attention's six products all take the whole-tile kernels: T (M, N or K) a multiple of 64, and the head
        width (N or K) too."""
        return self.MATMUL_ALIGNED and seq % 64 == 0 and dim % 64 == 0

    def _matmul_gathered(self, a, b, trans_a, trans_b, triangle, into):
        """A product with HeadViews through contiguous copies of them (for the kernels that take plain stacks)."""
        out = self.matmul(gather_heads(self, a), gather_heads(self, b), trans_a, trans_b, triangle=triangle)
        return (out if into is None else scatter_heads(self, into, out)), None, False
