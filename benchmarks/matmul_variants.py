"""Time the aligned matmul kernels' tilings against each other on the model's shapes (64 x 64 tiles of 4 x 4 per
thread: nn, tn; 128 x 64 tiles of 8 x 4: nn128, tn128; 128 x 128 tiles of 8 x 8: nn_wide, tn_wide), and the
128 x 64 ones compiled with naga's runtime checks ("(checked)"): rounds that alternate the variants (the
device's clocks drift), the best round's median per variant. Usage: python benchmarks/matmul_variants.py (on a
GPU machine). Measured on the H200 and dropped (matmul-variants-h200.log has the kept ones): for 128 x 128 tiles,
TK = 16 single-buffered (35.2 nn / 46.0 tn TFLOP/s at 4096), TK = 8 single-buffered (36.1 / 42.6), nn staging A
along k (39.0 with separate FMAs), against 47.2 / 48.3 for the double-buffered, A-as-(k, m) kernels kept;
earlier, for 128 x 64 tiles, a register prefetch of the next tile without double buffering, and TK = 32."""
import os
import statistics

import numpy as np

import lab
from lab.engine.backend import backend_instance
from lab.engine.wgpu.matmul import _aligned_subs

B = backend_instance("wgpu")
rng = np.random.default_rng(0)
CASES = [("4096 nn", "nn", 4096, 4096, 4096, 1), ("fc fwd", "nn", 16384, 1536, 384, 1),
         ("proj fwd", "nn", 16384, 384, 1536, 1), ("qkv fwd", "nn", 16384, 1152, 384, 1),
         ("4096 tn", "tn", 4096, 4096, 4096, 1), ("fc gw", "tn", 384, 1536, 16384, 8),
         ("proj gw", "tn", 1536, 384, 16384, 8), ("qkv gw", "tn", 384, 1152, 16384, 10),
         ("gpt2 fc", "nn", 8192, 3072, 768, 1), ("gpt2 head", "nn", 8192, 50304, 768, 1),
         ("gpt2 fc gw", "tn", 768, 3072, 8192, 2), ("fc gw", "tn", 384, 1536, 16384, 32),
         ("qkv gw", "tn", 384, 1152, 16384, 32), ("gpt2 fc gw", "tn", 768, 3072, 8192, 8),
         ("4096 nt", "nt", 4096, 4096, 4096, 1), ("fc dX", "nt", 16384, 384, 1536, 1),
         ("proj dX", "nt", 16384, 1536, 384, 1), ("4096 tt", "tt", 4096, 4096, 4096, 1)]
if os.environ.get("SMALL"):
    CASES = [("small nn", "nn", 256, 128, 64, 1), ("small tn", "tn", 256, 128, 64, 2),
             ("small nt", "nt", 256, 128, 64, 1), ("small tt", "tt", 128, 256, 64, 2)]
# (kernel, entry, tile rows, tile columns, compiled with naga's runtime checks)
VARIANTS = {"nn": [("matmul_aligned", "nn128", 128, 64, True), ("matmul_aligned", "nn", 64, 64, False),
                   ("matmul_aligned", "nn128", 128, 64, False), ("matmul_aligned", "nn_wide", 128, 128, False)],
            "tn": [("matmul_aligned", "tn128", 128, 64, True), ("matmul_aligned", "tn", 64, 64, False),
                   ("matmul_aligned", "tn128", 128, 64, False), ("matmul_aligned", "tn_wide", 128, 128, False)],
            # B stored (N, K): only the 128 x 128 kernels take it as it is (the others need a transposed copy)
            "nt": [("matmul_aligned", "nt_wide", 128, 128, False)],
            "tt": [("matmul_aligned", "tt_wide", 128, 128, False)]}
CHECKED = (("CHECKED", "1"),)  # a substitution no source uses: a pipeline of its own, built with the checks
# HALF=1: the f16-storage products instead (A and B stored as float16, or B alone, against both float32), on the
# 128 x 128 kernels the engine runs the model's products on
HALF = bool(os.environ.get("HALF"))
if HALF:
    VARIANTS = {k: [v for v in vs if v[1].endswith("_wide")] for k, vs in VARIANTS.items()}


def dispatch(kernel, entry, params, binds, grid, size, checked):
    B.SHADER_CHECKS = checked
    try:
        B._dispatch(kernel, entry, params, binds, grid, size, subs=_aligned_subs(binds[0], binds[1])
                    + (CHECKED if checked else ()))
    finally:
        del B.SHADER_CHECKS

for name, layout, M, N, K, S in CASES:
    a_np = rng.standard_normal((M, K) if layout[0] == "n" else (K, M)).astype(np.float32)
    b_np = rng.standard_normal((K, N) if layout[1] == "n" else (N, K)).astype(np.float32)
    rows = (a_np[:8] if layout[0] == "n" else a_np[:, :8].T).astype(np.float64) @ (
        b_np if layout[1] == "n" else b_np.T).astype(np.float64)
    stored = [("f32", B.from_numpy(a_np), B.from_numpy(b_np))]
    if HALF:
        stored += [("f16 B", stored[0][1], B.from_numpy(b_np.astype(np.float16))),
                   ("f16 A,B", B.from_numpy(a_np.astype(np.float16)), B.from_numpy(b_np.astype(np.float16)))]
    kc = -(-K // S // 16) * 16 if S > 1 else K
    S = -(-K // kc)
    runs = []
    for (kernel, entry, tm, tn, checked), (storage, a, b) in ((v, s) for v in VARIANTS[layout] for s in stored):
        if M % tm or N % tn:
            continue
        out = B.empty((S, M, N))
        lda, ldb = (K if layout[0] == "n" else M), (N if layout[1] == "n" else K)   # rows as stored
        params = [M, N, K, 0, 0, M * N, 1, kc, 0, 0, 0, lda, ldb, N, 1, 0, 0, 0, 0, 0, 0, M * N]
        grid = (N // tn, M // tm, S)
        dispatch(kernel, entry, params, [a, b, out, None, None], grid, out.size, checked)
        got = B.to_numpy(out).sum(0)[:8]
        err = np.abs(got - rows).max() / np.abs(rows).max()
        tag = entry + ("(checked)" if checked else "") + (f"[{storage}]" if HALF else "")
        runs.append((tag, kernel, entry, params, [a, b, out, None, None], grid, out.size, checked, err, []))
    for _ in range(int(os.environ.get("ROUNDS", 6))):
        for tag, kernel, entry, params, binds, grid, size, checked, err, times in runs:
            with lab.profile(B) as prof:
                for _ in range(8):
                    dispatch(kernel, entry, params, binds, grid, size, checked)
            times.append(statistics.median(t for _, _, t in prof.records))
    line = f"{name:10s} {M}x{N}x{K} split {S}:"
    for tag, kernel, entry, params, binds, grid, size, checked, err, times in runs:
        line += f"  {tag} {2 * M * N * K / min(times) / 1e3:5.1f}" + (
            f" (ERR {err:.0e})" if err > (5e-3 if "f16" in tag else 1e-4) else "")
    print(line + " TF/s", flush=True)
