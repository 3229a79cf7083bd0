"""kernels/matmul_quant.wgsl: products with a packed q4_0 / q4_1 / int8 weight, dequantized as the tile is staged,
against numpy's dequantize-then-matmul on shapes that are not multiples of the block (32), of 4 or of the tile."""
import types

import numpy as np
import pytest

KINDS = ("q4_0", "q4_1", "int8")


def _pack(w, kind):
    """w (out, in) in the contract's layout (lab/engine/quant.py's), and the float32 values it stands for."""
    out, n_in = w.shape
    if kind == "int8":
        scale = (np.abs(w).max(axis=1) / 127).astype(np.float32)
        q = np.clip(np.round(w / np.where(scale > 0, scale, 1)[:, None]), -127, 127).astype(np.int8)
        padded = np.full((out, -(-n_in // 4) * 4), 77, np.int8)   # padding the kernel must never read
        padded[:, :n_in] = q
        return (types.SimpleNamespace(kind=kind, shape=w.shape, q=padded.view(np.uint32), scale=scale),
                scale[:, None] * q.astype(np.float32))
    nb = -(-n_in // 32)
    blocks = np.zeros((out, nb * 32), np.float32)
    blocks[:, :n_in] = w
    blocks = blocks.reshape(out, nb, 32)
    if kind == "q4_1":
        lo, hi = blocks.min(axis=2), blocks.max(axis=2)
        d, m = ((hi - lo) / 15).astype(np.float16), lo.astype(np.float16)
        q = np.clip(np.round((blocks - m[..., None]) / np.where(d > 0, d, 1)[..., None]), 0, 15)
    else:
        d = (np.abs(blocks).max(axis=2) / 8).astype(np.float16)
        m = np.zeros_like(d)
        q = np.clip(np.round(blocks / np.where(d > 0, d, 1)[..., None]) + 8, 0, 15)
    q = q.astype(np.uint8)
    values = d.astype(np.float32)[..., None] * (q.astype(np.float32) - (8 if kind == "q4_0" else 0)) \
        + m.astype(np.float32)[..., None]
    nibbles = (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)          # byte j: elements j and j + 16
    qs = np.ascontiguousarray(nibbles).view(np.uint32).reshape(out, nb * 4)
    dm = d.view(np.uint16).astype(np.uint32) | (m.view(np.uint16).astype(np.uint32) << 16)
    return (types.SimpleNamespace(kind=kind, shape=w.shape, qs=qs, dm=dm),
            values.reshape(out, nb * 32)[:, :n_in].astype(np.float32))


def _check(backend, x, w, kind, transpose):
    qa, wd = _pack(w, kind)
    qw = backend.upload_quantized(qa)
    got = backend.to_numpy(backend.quantized_matmul(backend.from_numpy(x), qw, transpose))
    want = x.astype(np.float64) @ (wd if transpose else wd.T).astype(np.float64)
    scale = np.abs(x).astype(np.float64) @ np.abs(wd if transpose else wd.T)   # float32 rounding of the sums
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_array_less(np.abs(got - want), 1e-5 * scale + 1e-30)


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_matmul_equals_the_dequantized_product_on_odd_shapes(wgpu_backend, kind):
    rng = np.random.default_rng(0)
    for n in (1, 3, 17):
        for n_in in (5, 32, 33, 70):
            for n_out in (1, 7, 65):
                w = rng.standard_normal((n_out, n_in)).astype(np.float32)
                _check(wgpu_backend, rng.standard_normal((n, n_in)).astype(np.float32), w, kind, False)
                _check(wgpu_backend, rng.standard_normal((n, n_out)).astype(np.float32), w, kind, True)


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_matmul_equals_the_dequantized_product_on_whole_tiles(wgpu_backend, kind):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((192, 256)).astype(np.float32)
    _check(wgpu_backend, rng.standard_normal((128, 256)).astype(np.float32), w, kind, False)
    _check(wgpu_backend, rng.standard_normal((128, 192)).astype(np.float32), w, kind, True)
