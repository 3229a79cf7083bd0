// Batched matrix product for shapes that fill whole tiles: M and N multiples of 64, K (or the split-K chunk)
// a multiple of 16, every row a whole number of vec4s. Same contract and tiling as matmul.wgsl (64 x 64 tiles,
// 16 x 16 threads with 4 x 4 outputs each, TK = 16, split-K through workgroup z), but the operands are bound as
// vec4 arrays: each thread stages one 16-byte load per operand per K step, with no bounds checks at all.
// Entry points by layout (the contiguous axis decides how a tile is staged):
//   nn: A (M, K) rows along k, B (K, N) rows along n.  Ar[m][k / 4], Bs[k][n / 4]; outer products.
//   tn: A (K, M) rows along m, B (K, N).               As[k][m / 4], Bs[k][n / 4]; outer products.
// (A B-transposed entry with both tiles along k and 4-wide dot products measured 6.9 TFLOP/s on the H200 against
// 17.6 for matmul.wgsl's main_rows, so transposed B stays there.)
// Bindings: @binding(0) P = [M, N, K, stride_a, stride_b, stride_c, batch, kc, has_bias] (strides in floats),
// @binding(1) A, @binding(2) B, @binding(3) C, @binding(4) BIAS (N,): with has_bias, added to every row as the
// tile is stored (a Linear layer's bias, without a pass of its own). Dispatch: (N / 64, M / 64, batch * S).

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;

@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> A: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> B: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> C: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> BIAS: array<vec4<f32>>;

var<workgroup> Ta: array<vec4<f32>, 256>;
var<workgroup> Tb: array<vec4<f32>, 256>;

struct Tile { M: u32, N: u32, K: u32, a: u32, b: u32, c: u32, k_begin: u32, k_end: u32, m0: u32, n0: u32 }

fn tile(wid: vec3<u32>) -> Tile {
    let batch = wid.z % P[6];
    let k_begin = (wid.z / P[6]) * P[7];
    return Tile(P[0], P[1], P[2], batch * P[3] / 4u, batch * P[4] / 4u, wid.z * P[5] / 4u, k_begin,
                min(P[2], k_begin + P[7]), wid.y * TM, wid.x * TN);
}

// C rows m0 + 4 ty .. + 3, columns n0 + 4 tx .. + 3 (one vec4 per row).
fn store(t: Tile, tx: u32, ty: u32, r0: vec4<f32>, r1: vec4<f32>, r2: vec4<f32>, r3: vec4<f32>) {
    let row = t.m0 + 4u * ty;
    let q = (t.n0 + 4u * tx) / 4u;
    let n4 = t.N / 4u;
    var b = vec4<f32>(0.0);
    if (P[8] != 0u) { b = BIAS[q]; }
    C[t.c + row * n4 + q] = r0 + b;
    C[t.c + (row + 1u) * n4 + q] = r1 + b;
    C[t.c + (row + 2u) * n4 + q] = r2 + b;
    C[t.c + (row + 3u) * n4 + q] = r3 + b;
}

@compute @workgroup_size(256)
fn nn(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = tile(wid);
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
    let t = tile(wid);
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
