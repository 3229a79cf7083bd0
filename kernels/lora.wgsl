// LoRA's low-rank path, fused with the frozen layer's output (Hu et al., 2021):
//   y = base + s * (x A^T) B^T,   x: (M, K), A: (r, K), B: (N, r), s = alpha / r
//   down_main:   H[m, j] = sum_k X[m, k] A[j, k]                     H = x A^T: (M, r), one thread per (m, j)
//   up_add_main: Y[m, n] = BASE[m, n] + s * sum_j H[m, j] B[n, j]    one thread per (m, n): the up-projection
//                and the addition to the base output in a single pass over Y, r (<= 64 or so) FMAs per element
//   up_add_t_main: the same from B transposed (r, N), which the backend copies first (N r floats): neighbouring
//                threads then read neighbouring floats of it; with P[5] = 1 without BASE: any product with a
//                short K, H (M, r) times BT (r, N) (the backend's thin-K matmuls: LoRA's dx = dh A)
// The backward (dA, dB, dx) is four matmuls with a K as large as M or N, which the tiled matmul kernel serves;
// the backend computes H = x A^T by the matmul kernels too (down_main stays as the plain reference kernel).
// Bindings: P = [M, K, N, r, s bits, no base], @binding(1) IN (X or H), @binding(2) W (A or B), @binding(3) BASE,
// @binding(4) OUT.

#include flat

@group(0) @binding(1) var<storage, read> IN: array<f32>;
@group(0) @binding(2) var<storage, read> W: array<f32>;
@group(0) @binding(3) var<storage, read> BASE: array<f32>;
@group(0) @binding(4) var<storage, read_write> OUT: array<f32>;

@compute @workgroup_size(WG)
fn down_main(inv: Invocation) {
    let e = flat(inv);
    let M = P[0];
    let K = P[1];
    let r = P[3];
    if (e >= M * r) { return; }
    let m = e / r;
    let j = e % r;
    var acc = 0.0;
    for (var k = 0u; k < K; k++) { acc += IN[m * K + k] * W[j * K + k]; }
    OUT[e] = acc;
}

// Output element e = (m, n) of the up-projection: W holds B (N, r), or with transposed B^T (r, N).
fn up_add(e: u32, transposed: bool) {
    let M = P[0];
    let N = P[2];
    let r = P[3];
    if (e >= M * N) { return; }
    let m = e / N;
    let n = e % N;
    var acc = 0.0;
    for (var j = 0u; j < r; j++) { acc += IN[m * r + j] * W[select(n * r + j, j * N + n, transposed)]; }
    var base = 0.0;
    if (P[5] == 0u) { base = BASE[e]; }
    OUT[e] = base + bitcast<f32>(P[4]) * acc;
}

@compute @workgroup_size(WG)
fn up_add_main(inv: Invocation) {
    up_add(flat(inv), false);
}

// up_add_main with B given transposed, BT: (r, N): a warp's 32 outputs of one row read 32 neighbouring floats
// of BT per j (one row of H, the same for all of them), where B (N, r) has them r floats apart.
@compute @workgroup_size(WG)
fn up_add_t_main(inv: Invocation) {
    up_add(flat(inv), true);
}
