"""Small pure helpers the wgpu runtime's modules share: params packing (float bits, u32) and grid arithmetic."""
import math
import struct

import numpy as np

WG = 256


def _u32(x):
    return int(x) & 0xFFFFFFFF


def _round_up(n, m):
    return -(-n // m) * m


def _f32bits(x):
    """The bits of x as a float32 (rounded to nearest; beyond float32's range, +-inf)."""
    try:
        return _U32.unpack(_F32.pack(x))[0]
    except OverflowError:
        with np.errstate(over="ignore"):
            return int(np.array([x], dtype=np.float32).view(np.uint32)[0])


_F32, _U32 = struct.Struct("<f"), struct.Struct("<I")


def _row_subs(n):
    """Threads per row for the row kernels (softmax, layernorm, cross-entropy): a short row gets 64, so a
    workgroup's reductions take fewer steps and four times as many rows are in flight."""
    return (("RWG", 64 if n <= 1024 else 256),)


def _split(n, min_chunk, max_pieces):
    """Cut n items into S chunks of `chunk` (the last may be short): as many as max_pieces allows, each at least
    min_chunk long. Returns (S, chunk); the kernels that sum partial results over such chunks use it."""
    S = max(1, min(math.ceil(n / min_chunk), max_pieces))
    chunk = max(1, math.ceil(n / S))
    return max(1, math.ceil(n / chunk)), chunk


def _grid(n_groups):
    """Split a 1D count of workgroups into a 2D grid that respects the 65535-per-dimension limit."""
    if n_groups <= 65535:
        return (max(n_groups, 1), 1, 1)
    y = math.ceil(n_groups / 65535)
    return (math.ceil(n_groups / y), y, 1)
