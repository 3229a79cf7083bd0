"""Quantized frozen weights on the host: the packed layouts the matmuls read (numpy here, WGSL on the GPU).

A QuantizedArray holds a linear layer's weight in HF's layout, shape (out, in), quantized along `in`:
- q4_0 / q4_1: blocks of 32 weights, GGUF's own. `qs` uint32 (out, nblocks * 4): a block's 16 nibble bytes as 4
  little-endian u32 (byte j holds element j in its low nibble, element j + 16 in its high one); `dm` uint32
  (out, nblocks): d's float16 bits in the low half, m's in the high half (0 for q4_0). Element q (0..15) is
  d * q + m (q4_1) or d * (q - 8) (q4_0). nblocks = ceil(in / 32): a tail block's padding is never read.
- int8: `q` uint32 (out, ceil(in / 4)), four int8 a word, little-endian (element k at byte k % 4 of word k // 4);
  `scale` float32 (out,): value = scale[o] * q (per-output-channel absmax).
u32 words because WGSL storage has no 8- or 16-bit types; d and m unpack with unpack2x16float (core WGSL).
A model holds one as a tensor.QuantizedWeight (the frozen weight of an nn.Linear); the backends multiply by it
(Backend.quantized_matmul).
"""
import numpy as np

from ..checks import InputError

KINDS = ("q4_0", "q4_1", "int8")
BLOCK = 32
_GGUF_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}   # a float16 d (and m for Q4_1), then 16 nibble bytes


class QuantizedArray:
    """A packed (out, in) weight; see the module's docstring for the fields of each kind."""
    __slots__ = ("kind", "shape", "qs", "dm", "q", "scale")

    def __init__(self, kind, shape, qs=None, dm=None, q=None, scale=None):
        self.kind, self.shape = kind, (int(shape[0]), int(shape[1]))
        self.qs, self.dm, self.q, self.scale = qs, dm, q, scale

    @property
    def arrays(self):
        return [a for a in (self.qs, self.dm, self.q, self.scale) if a is not None]

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self.arrays)

    def rows(self, start, stop):
        """Output rows start..stop-1, packed (views, no copy)."""
        pick = lambda a: None if a is None else a[start:stop]   # noqa: E731
        return QuantizedArray(self.kind, (min(stop, self.shape[0]) - start, self.shape[1]),
                              *(pick(a) for a in (self.qs, self.dm, self.q, self.scale)))

    def __repr__(self):
        return f"QuantizedArray(kind={self.kind!r}, shape={self.shape}, nbytes={self.nbytes})"


def _check_kind(kind, op):
    if kind not in KINDS:
        raise InputError(f"{op}: kind must be one of {list(KINDS)}, got {kind!r}")


def quantize(w, kind):
    """w (out, in) float32 packed as `kind`, with ggml's rounding for q4_0 / q4_1 (quantize_row_q4_*_ref) and
    per-output-channel absmax for int8."""
    _check_kind(kind, "quantize")
    w = np.asarray(w)
    if w.dtype.kind not in "biuf":   # a complex weight's imaginary part was dropped with a warning
        raise InputError(f"quantize: the weight must hold real numbers, got dtype {w.dtype}")
    w = w.astype(np.float32, copy=False)
    if w.ndim != 2 or w.shape[1] == 0:
        raise InputError(f"quantize: the weight must be 2-D (out, in) with in >= 1, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise InputError(f"quantize: the weight holds NaN or Inf (shape {w.shape})")
    out, n = w.shape
    if kind == "int8":
        scale = np.abs(w).max(axis=1) / np.float32(127)
        # divided, not multiplied by 1 / scale: a row of subnormal values has a scale whose inverse is Inf
        q = np.divide(w, scale[:, None], out=np.zeros_like(w), where=scale[:, None] > 0)
        q = np.clip(np.rint(q), -127, 127).astype(np.int8)
        q = np.pad(q, ((0, 0), (0, -n % 4)))
        return QuantizedArray(kind, w.shape, q=np.ascontiguousarray(q).view("<u4"), scale=scale.astype(np.float32))
    nb = -(-n // BLOCK)
    blocks = np.pad(w, ((0, 0), (0, nb * BLOCK - n))).reshape(out, nb, BLOCK)
    real = (np.arange(nb * BLOCK) < n).reshape(nb, BLOCK)   # a tail block's padding takes no part in its scale
    with np.errstate(all="ignore"):   # a range beyond float16's: refused below
        d, m, q = _q4_blocks(blocks, real, kind)
        d16, m16 = d.astype(np.float16), m.astype(np.float16)
    if not (np.isfinite(d16).all() and np.isfinite(m16).all()):
        raise InputError(f"quantize: {kind} keeps each block's scale{' and minimum' if kind == 'q4_1' else ''} as "
                         f"float16 (at most 65504), and this weight's values reach {w.min():.6g} .. {w.max():.6g}; "
                         f"use int8 (a float32 scale per row), float16 or float32")
    # float16 steps of 6e-8 near zero: a block of tiny values gets a scale (and minimum) that rounds far off, or to
    # 0, flattening the block. Refused where a value may come back off by more than half the block's largest
    # magnitude and by more than float16's own precision of the weight's largest (a few tiny blocks in a real
    # weight cost nothing)
    off = (np.float32(15 if kind == "q4_1" else 8) * np.abs(d16.astype(np.float32) - d) +
           np.abs(m16.astype(np.float32) - m))
    size = np.where(real, np.abs(blocks), 0).max(axis=2)
    lost = off > np.maximum(size / 2, size.max(initial=0) * np.float32(2 ** -10))
    if lost.any():
        raise InputError(f"quantize: {kind} keeps each block's scale{' and minimum' if kind == 'q4_1' else ''} as "
                         f"float16, whose smallest step is 6e-08, and this weight's values ({w.min():.6g} .. "
                         f"{w.max():.6g}) are too small for it: {int(lost.sum())} of {lost.size} blocks would come "
                         f"back off by up to {off.max():.3g}; use int8 (a float32 scale per row) or float32")
    q = np.where(real, q, 0).astype(np.uint8)
    nibbles = q[..., :16] | (q[..., 16:] << 4)
    dm = d16.view(np.uint16).astype(np.uint32)
    if kind == "q4_1":
        dm |= m16.view(np.uint16).astype(np.uint32) << 16
    return QuantizedArray(kind, w.shape, qs=np.ascontiguousarray(nibbles.reshape(out, nb * 16)).view("<u4"), dm=dm)


def _q4_blocks(blocks, real, kind):
    """(d, m, q) of ggml's quantize_row_q4_1_ref / q4_0_ref for blocks (out, nblocks, 32), d and m in float32."""
    if kind == "q4_1":
        lo = np.where(real, blocks, np.inf).min(axis=2)
        hi = np.where(real, blocks, -np.inf).max(axis=2)
        d = (hi - lo) / np.float32(15)
        inv = np.divide(1, d, out=np.zeros_like(d), where=d != 0)
        q = np.minimum(15, np.floor((blocks - lo[..., None]) * inv[..., None] + np.float32(0.5)))
        m = lo
    else:   # q4_0: d = the signed value of largest magnitude / -8
        idx = np.abs(np.where(real, blocks, 0)).argmax(axis=2)
        d = np.take_along_axis(blocks, idx[..., None], axis=2)[..., 0] / np.float32(-8)
        inv = np.divide(1, d, out=np.zeros_like(d), where=d != 0)
        q = np.minimum(15, np.floor(blocks * inv[..., None] + np.float32(8.5)))
        m = np.zeros_like(d)
    return d, m, q


def from_gguf(raw, type_name, shape):
    """A GGUF Q4_0 / Q4_1 tensor's blocks (uint8 (rows, bytes per row), as lab.gguf.read_packed gives them, HF
    shape (out, in)) repacked losslessly: the same nibbles and float16 scales, no dequantize-requantize."""
    if type_name not in _GGUF_BLOCK_BYTES:
        raise InputError(f"from_gguf: GGUF quantization type {type_name} has no packed layout lab's quantized "
                         f"matmuls read (they read {', '.join(_GGUF_BLOCK_BYTES)}); load it as float32 (or "
                         f"base_dtype='int8', which quantizes the dequantized values)")
    out, n = (int(s) for s in shape)
    size = _GGUF_BLOCK_BYTES[type_name]
    raw = np.asarray(raw, dtype=np.uint8)
    if n < 1 or n % BLOCK or raw.size != out * (n // BLOCK) * size:
        raise InputError(f"from_gguf: {raw.size} bytes of {type_name} do not hold a ({out}, {n}) tensor (want "
                         f"{out} rows of {n} // {BLOCK} blocks of {size} bytes, in a multiple of {BLOCK})")
    blocks = raw.reshape(out, n // BLOCK, size)
    dm = np.ascontiguousarray(blocks[..., 0:2]).view("<u2")[..., 0].astype(np.uint32)
    if type_name == "Q4_1":
        dm |= np.ascontiguousarray(blocks[..., 2:4]).view("<u2")[..., 0].astype(np.uint32) << 16
    qs = np.ascontiguousarray(blocks[..., size - 16:]).reshape(out, n // 2).view("<u4")
    return QuantizedArray(type_name.lower(), (out, n), qs=qs, dm=dm)


def zeros(kind, shape):
    """A QuantizedArray of `kind` and shape (out, in) whose every value is 0 (a weight a load is about to write)."""
    _check_kind(kind, "zeros")
    out, n = shape
    if kind == "int8":
        return QuantizedArray(kind, shape, q=np.zeros((out, -(-n // 4)), np.uint32), scale=np.zeros(out, np.float32))
    return QuantizedArray(kind, shape, qs=np.zeros((out, -(-n // BLOCK) * 4), np.uint32),
                          dm=np.zeros((out, -(-n // BLOCK)), np.uint32))


def dequantize(qa, start=0, stop=None):
    """Output rows start..stop-1 (all by default) of qa as float32 (rows, in), computed as gguf's dequantize
    does (d * q + m in float32), so a GGUF's tensor comes out bit for bit as lab.gguf.read_gguf reads it."""
    stop = qa.shape[0] if stop is None else stop
    part = qa.rows(start, stop)
    rows, n = part.shape
    if qa.kind == "int8":
        w = part.q.view(np.int8)[:, :n].astype(np.float32)
        w *= part.scale[:, None]
        return w
    nb = part.dm.shape[1]
    nibbles = part.qs.view(np.uint8).reshape(rows, nb, 16)
    w = np.empty((rows, nb, BLOCK), np.float32)   # computed in place: one float array the size of the rows
    np.bitwise_and(nibbles, 15, out=w[..., :16], casting="unsafe")
    np.right_shift(nibbles, 4, out=w[..., 16:], casting="unsafe")
    d = (part.dm & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float32)[..., None]
    if qa.kind == "q4_1":
        w *= d
        w += (part.dm >> 16).astype(np.uint16).view(np.float16).astype(np.float32)[..., None]
    else:
        w -= np.float32(8)
        w *= d
    return w.reshape(rows, nb * BLOCK)[:, :n]


def packed_nbytes(kind, shape):
    """The bytes of a QuantizedArray of `kind` and shape (out, in), without making it (the planner's count)."""
    _check_kind(kind, "packed_nbytes")
    out, n = shape
    return out * (4 * -(-n // 4) + 4) if kind == "int8" else out * -(-n // BLOCK) * 20


def chunk_rows(qa, floats=1 << 19):
    """How many output rows to dequantize at a time: about `floats` float32 values (2 MB), at least one row."""
    return max(1, floats // max(1, qa.shape[1]))
