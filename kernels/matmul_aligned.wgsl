// Batched matrix product for shapes that fill whole tiles: M and N multiples of 64, K (or the split-K chunk)
// a multiple of 16, every row a whole number of vec4s. Same contract as matmul.wgsl (16 x 16 threads, TK = 16,
// split-K through workgroup z), but the operands are bound as vec4 arrays: each thread stages 16-byte loads,
// with no bounds checks at all. Entry points by layout (the contiguous axis decides how a tile is staged):
//   nn: A (M, K) rows along k, B (K, N) rows along n.  Ar[m][k / 4], Bs[k][n / 4]; outer products.
//   tn: A (K, M) rows along m, B (K, N).               As[k][m / 4], Bs[k][n / 4]; outer products.
// nn, tn: 64 x 64 tiles, 4 x 4 outputs per thread. nn128, tn128 (M a multiple of 128): 128 x 64 tiles, 8 x 4
// outputs per thread: half the shared-memory reads of B per multiply-add, 8-17% faster on the H200 on every
// model shape measured (benchmarks/matmul_variants.py; 128 x 128 tiles of 8 x 8 and prefetching the next tile
// into registers were no faster there).
// (A B-transposed entry with both tiles along k and 4-wide dot products measured 6.9 TFLOP/s on the H200 against
// 17.6 for matmul.wgsl's main_rows, so transposed B stays there.)
// Bindings: @binding(0) P = [M, N, K, stride_a, stride_b, stride_c, batch, kc, has_bias, triangle] (strides in
// floats), @binding(1) A, @binding(2) B, @binding(3) C, @binding(4) BIAS (N,): with has_bias, added to every row as the
// tile is stored (a Linear layer's bias, without a pass of its own). Dispatch: (N / 64, M / 64, batch * S).

const TN: u32 = 64u;
const TK: u32 = 16u;

@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> A: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> B: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> C: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> BIAS: array<vec4<f32>>;

var<workgroup> Ta: array<vec4<f32>, 512>;
var<workgroup> Tb: array<vec4<f32>, 256>;

struct Tile { M: u32, N: u32, K: u32, a: u32, b: u32, c: u32, k_begin: u32, k_end: u32, m0: u32, n0: u32 }

// Causal attention's products skip the work a triangle makes zero (triangle, P[9]; square products, tiles of
// whole TK steps): 1, only C's lower triangle is wanted: tiles wholly above the diagonal are stored as zeros;
// 2, A (M, K) is lower triangular: row m sums k <= m only; 3, A stored (K, M) is lower triangular: column m of
// it (row m of the product) sums k >= m only.
fn tile(wid: vec3<u32>, tm: u32) -> Tile {
    let batch = wid.z % P[6];
    let m0 = wid.y * tm;
    let n0 = wid.x * TN;
    var k_begin = (wid.z / P[6]) * P[7];
    var k_end = min(P[2], k_begin + P[7]);
    let triangle = P[9];
    if (triangle == 1u && n0 >= m0 + tm) { k_end = k_begin; }
    if (triangle == 2u) { k_end = min(k_end, m0 + tm); }
    if (triangle == 3u) { k_begin = max(k_begin, m0); }
    return Tile(P[0], P[1], P[2], batch * P[3] / 4u, batch * P[4] / 4u, wid.z * P[5] / 4u, k_begin, k_end, m0, n0);
}

// The bias to add to columns n0 + 4 tx .. + 3 (zero without one).
fn bias(t: Tile, tx: u32) -> vec4<f32> {
    if (P[8] != 0u) { return BIAS[t.n0 / 4u + tx]; }
    return vec4<f32>(0.0);
}

// C row `row`, columns n0 + 4 tx .. + 3.
fn put(t: Tile, row: u32, tx: u32, v: vec4<f32>) {
    C[t.c + row * (t.N / 4u) + t.n0 / 4u + tx] = v;
}

// C rows m0 + 4 ty .. + 3, columns n0 + 4 tx .. + 3 (one vec4 per row).
fn store(t: Tile, tx: u32, ty: u32, r0: vec4<f32>, r1: vec4<f32>, r2: vec4<f32>, r3: vec4<f32>) {
    let row = t.m0 + 4u * ty;
    let b = bias(t, tx);
    put(t, row, tx, r0 + b);
    put(t, row + 1u, tx, r1 + b);
    put(t, row + 2u, tx, r2 + b);
    put(t, row + 3u, tx, r3 + b);
}

@compute @workgroup_size(256)
fn nn(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = tile(wid, 64u);
    let tx = lid % 16u;
    let ty = lid / 16u;
    let k4 = t.K / 4u;
    let n4 = t.N / 4u;
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    for (var k0 = t.k_begin; k0 < t.k_end; k0 += TK) {
        Ta[lid] = A[t.a + (t.m0 + lid / 4u) * k4 + k0 / 4u + lid % 4u];        // Ar[m * 4 + q]
        Tb[lid] = B[t.b + (k0 + lid / 16u) * n4 + t.n0 / 4u + lid % 16u];      // Bs[k * 16 + j]
        workgroupBarrier();
        for (var q = 0u; q < 4u; q++) {
            let b0 = Tb[(4u * q) * 16u + tx];
            let b1 = Tb[(4u * q + 1u) * 16u + tx];
            let b2 = Tb[(4u * q + 2u) * 16u + tx];
            let b3 = Tb[(4u * q + 3u) * 16u + tx];
            let a0 = Ta[(4u * ty) * 4u + q];
            let a1 = Ta[(4u * ty + 1u) * 4u + q];
            let a2 = Ta[(4u * ty + 2u) * 4u + q];
            let a3 = Ta[(4u * ty + 3u) * 4u + q];
            c0 += a0.x * b0 + a0.y * b1 + a0.z * b2 + a0.w * b3;
            c1 += a1.x * b0 + a1.y * b1 + a1.z * b2 + a1.w * b3;
            c2 += a2.x * b0 + a2.y * b1 + a2.z * b2 + a2.w * b3;
            c3 += a3.x * b0 + a3.y * b1 + a3.z * b2 + a3.w * b3;
        }
        workgroupBarrier();
    }
    store(t, tx, ty, c0, c1, c2, c3);
}

@compute @workgroup_size(256)
fn tn(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = tile(wid, 64u);
    let tx = lid % 16u;
    let ty = lid / 16u;
    let m4 = t.M / 4u;
    let n4 = t.N / 4u;
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    for (var k0 = t.k_begin; k0 < t.k_end; k0 += TK) {
        Ta[lid] = A[t.a + (k0 + lid / 16u) * m4 + t.m0 / 4u + lid % 16u];      // As[k * 16 + i]
        Tb[lid] = B[t.b + (k0 + lid / 16u) * n4 + t.n0 / 4u + lid % 16u];      // Bs[k * 16 + j]
        workgroupBarrier();
        for (var k = 0u; k < TK; k++) {
            let a = Ta[k * 16u + ty];
            let b = Tb[k * 16u + tx];
            c0 += a.x * b;
            c1 += a.y * b;
            c2 += a.z * b;
            c3 += a.w * b;
        }
        workgroupBarrier();
    }
    store(t, tx, ty, c0, c1, c2, c3);
}

// C rows m0 + 8 ty .. + 7: A's tile is 128 rows x 4 vec4 (two loads per thread), B's as in nn.
@compute @workgroup_size(256)
fn nn128(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = tile(wid, 128u);
    let tx = lid % 16u;
    let ty = lid / 16u;
    let k4 = t.K / 4u;
    let n4 = t.N / 4u;
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    var c4 = vec4<f32>(0.0);
    var c5 = vec4<f32>(0.0);
    var c6 = vec4<f32>(0.0);
    var c7 = vec4<f32>(0.0);
    let ia = t.a + (t.m0 + lid / 4u) * k4 + lid % 4u;       // rows lid / 4 and 64 + lid / 4
    let ib = t.b + (lid / 16u) * n4 + t.n0 / 4u + lid % 16u;
    for (var k0 = t.k_begin; k0 < t.k_end; k0 += TK) {
        Ta[lid] = A[ia + k0 / 4u];
        Ta[lid + 256u] = A[ia + 64u * k4 + k0 / 4u];
        Tb[lid] = B[ib + k0 * n4];
        workgroupBarrier();
        for (var q = 0u; q < 4u; q++) {
            let b0 = Tb[(4u * q) * 16u + tx];
            let b1 = Tb[(4u * q + 1u) * 16u + tx];
            let b2 = Tb[(4u * q + 2u) * 16u + tx];
            let b3 = Tb[(4u * q + 3u) * 16u + tx];
            let a0 = Ta[(8u * ty + 0u) * 4u + q];
            c0 += a0.x * b0 + a0.y * b1 + a0.z * b2 + a0.w * b3;
            let a1 = Ta[(8u * ty + 1u) * 4u + q];
            c1 += a1.x * b0 + a1.y * b1 + a1.z * b2 + a1.w * b3;
            let a2 = Ta[(8u * ty + 2u) * 4u + q];
            c2 += a2.x * b0 + a2.y * b1 + a2.z * b2 + a2.w * b3;
            let a3 = Ta[(8u * ty + 3u) * 4u + q];
            c3 += a3.x * b0 + a3.y * b1 + a3.z * b2 + a3.w * b3;
            let a4 = Ta[(8u * ty + 4u) * 4u + q];
            c4 += a4.x * b0 + a4.y * b1 + a4.z * b2 + a4.w * b3;
            let a5 = Ta[(8u * ty + 5u) * 4u + q];
            c5 += a5.x * b0 + a5.y * b1 + a5.z * b2 + a5.w * b3;
            let a6 = Ta[(8u * ty + 6u) * 4u + q];
            c6 += a6.x * b0 + a6.y * b1 + a6.z * b2 + a6.w * b3;
            let a7 = Ta[(8u * ty + 7u) * 4u + q];
            c7 += a7.x * b0 + a7.y * b1 + a7.z * b2 + a7.w * b3;
        }
        workgroupBarrier();
    }
    let row = t.m0 + 8u * ty;
    let b = bias(t, tx);
    put(t, row + 0u, tx, c0 + b);
    put(t, row + 1u, tx, c1 + b);
    put(t, row + 2u, tx, c2 + b);
    put(t, row + 3u, tx, c3 + b);
    put(t, row + 4u, tx, c4 + b);
    put(t, row + 5u, tx, c5 + b);
    put(t, row + 6u, tx, c6 + b);
    put(t, row + 7u, tx, c7 + b);
}

// A (K, M): A's tile is 16 k x 32 vec4 of m (two loads per thread); a thread's 8 rows are two vec4 of it.
@compute @workgroup_size(256)
fn tn128(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = tile(wid, 128u);
    let tx = lid % 16u;
    let ty = lid / 16u;
    let m4 = t.M / 4u;
    let n4 = t.N / 4u;
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    var c4 = vec4<f32>(0.0);
    var c5 = vec4<f32>(0.0);
    var c6 = vec4<f32>(0.0);
    var c7 = vec4<f32>(0.0);
    let ia = t.a + (lid / 32u) * m4 + t.m0 / 4u + lid % 32u;  // k rows lid / 32 and 8 + lid / 32
    let ib = t.b + (lid / 16u) * n4 + t.n0 / 4u + lid % 16u;
    for (var k0 = t.k_begin; k0 < t.k_end; k0 += TK) {
        Ta[lid] = A[ia + k0 * m4];
        Ta[lid + 256u] = A[ia + (k0 + 8u) * m4];
        Tb[lid] = B[ib + k0 * n4];
        workgroupBarrier();
        for (var k = 0u; k < TK; k++) {
            let lo = Ta[k * 32u + 2u * ty];
            let hi = Ta[k * 32u + 2u * ty + 1u];
            let b = Tb[k * 16u + tx];
            c0 += lo.x * b;
            c1 += lo.y * b;
            c2 += lo.z * b;
            c3 += lo.w * b;
            c4 += hi.x * b;
            c5 += hi.y * b;
            c6 += hi.z * b;
            c7 += hi.w * b;
        }
        workgroupBarrier();
    }
    let row = t.m0 + 8u * ty;
    let b = bias(t, tx);
    put(t, row + 0u, tx, c0 + b);
    put(t, row + 1u, tx, c1 + b);
    put(t, row + 2u, tx, c2 + b);
    put(t, row + 3u, tx, c3 + b);
    put(t, row + 4u, tx, c4 + b);
    put(t, row + 5u, tx, c5 + b);
    put(t, row + 6u, tx, c6 + b);
    put(t, row + 7u, tx, c7 + b);
}
