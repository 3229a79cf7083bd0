// Batched matrix product  C[b] = op(A[b]) @ op(B[b]),  C[b]: (M, N) row-major, op = identity or transpose.
//   A[b] is stored (M, K) row-major, or (K, M) when TRANS_A; B[b] is stored (K, N), or (N, K) when TRANS_B.
//   Batch b starts at b * stride_{a,b,c}; a stride of 0 broadcasts that operand across the batch.
// Tiling: one workgroup computes a TM x TN tile of C with 16 x 16 threads; each thread owns a 4 x 4 block
// held in four vec4 accumulators. K advances TK at a time through workgroup memory staged as vec4, so the
// inner loop is two vec4 loads and four vec4 FMAs. Bounds are checked only when staging, never in the inner loop.
// Split-K: when the output has too few tiles to fill the device (a weight gradient: 384 x 1152 summed over
// K = 16384 positions), the K range is cut into S chunks of kc (a multiple of TK); workgroup z = s * batch + b
// writes its partial product to C + z * M * N, and the host sums the S slices. S = 1, kc = K otherwise.
// Bindings: @binding(0) P = [M, N, K, stride_a, stride_b, stride_c, batch, kc], @binding(1) A, @binding(2) B,
// @binding(3) C. Dispatch: (ceil(N / TN), ceil(M / TM), batch * S).

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;
const TRANS_A: bool = {{TRANS_A}};
const TRANS_B: bool = {{TRANS_B}};

@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> A: array<f32>;
@group(0) @binding(2) var<storage, read> B: array<f32>;
@group(0) @binding(3) var<storage, read_write> C: array<f32>;

var<workgroup> As: array<vec4<f32>, 256>;   // [TK][TM / 4]: As[k * 16 + i] = A(m0 + 4i .. 4i + 3, k0 + k)
var<workgroup> Bs: array<vec4<f32>, 256>;   // [TK][TN / 4]: Bs[k * 16 + j] = B(k0 + k, n0 + 4j .. 4j + 3)

fn load_a(base: u32, m: u32, k: u32, M: u32, K: u32, k_end: u32) -> f32 {
    if (m >= M || k >= k_end) { return 0.0; }
    if (TRANS_A) { return A[base + k * M + m]; }
    return A[base + m * K + k];
}

fn load_b(base: u32, k: u32, n: u32, K: u32, N: u32, k_end: u32) -> f32 {
    if (k >= k_end || n >= N) { return 0.0; }
    if (TRANS_B) { return B[base + n * K + k]; }
    return B[base + k * N + n];
}

// main_rows: the same product for a row-major A (TRANS_A false), staging A along its rows so that four
// neighbouring threads read one row's TK contiguous floats (coalesced) instead of four rows' single floats.
// Its A tile, in As's place, is kept [TM][TK / 4] (vec4 over k): As[m * 4 + q] = A(m0 + m, k0 + 4q .. 4q + 3);
// each step of four k values does 4 + 4 vec4 loads for 16 vec4 FMAs, the same ratio as main.

// One tile of C; a_rows: stage A along its rows (main_rows), else along k (main). Each entry point passes a
// constant, so the compiler drops the untaken branches.
fn tile(wid: vec3<u32>, lid: u32, a_rows: bool) {
    let M = P[0];
    let N = P[1];
    let K = P[2];
    let batch = wid.z % P[6];
    let k_begin = (wid.z / P[6]) * P[7];
    let k_end = min(K, k_begin + P[7]);
    let a_base = batch * P[3];
    let b_base = batch * P[4];
    let c_base = wid.z * P[5];
    let m0 = wid.y * TM;
    let n0 = wid.x * TN;
    let tx = lid % 16u;             // this thread's columns: n0 + 4 tx .. + 3
    let ty = lid / 16u;             // this thread's rows:    m0 + 4 ty .. + 3
    let sk = lid / 16u;             // staging: row k of the tile ...
    let si = lid % 16u;             // ... and vec4 slot i of it
    let am = m0 + lid / 4u;         // main_rows' A staging: row am, columns k0 + 4 aq .. + 3
    let aq = lid % 4u;

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);

    for (var k0 = k_begin; k0 < k_end; k0 += TK) {
        let ka = k0 + sk;
        if (a_rows) {
            let ak = k0 + 4u * aq;
            As[lid] = vec4<f32>(load_a(a_base, am, ak, M, K, k_end), load_a(a_base, am, ak + 1u, M, K, k_end),
                                load_a(a_base, am, ak + 2u, M, K, k_end), load_a(a_base, am, ak + 3u, M, K, k_end));
        } else {
            let ma = m0 + 4u * si;
            As[lid] = vec4<f32>(load_a(a_base, ma, ka, M, K, k_end), load_a(a_base, ma + 1u, ka, M, K, k_end),
                                load_a(a_base, ma + 2u, ka, M, K, k_end), load_a(a_base, ma + 3u, ka, M, K, k_end));
        }
        let nb = n0 + 4u * si;
        Bs[lid] = vec4<f32>(load_b(b_base, ka, nb, K, N, k_end), load_b(b_base, ka, nb + 1u, K, N, k_end),
                            load_b(b_base, ka, nb + 2u, K, N, k_end), load_b(b_base, ka, nb + 3u, K, N, k_end));
        workgroupBarrier();
        if (a_rows) {
            for (var q = 0u; q < 4u; q++) {
                let b0 = Bs[(4u * q) * 16u + tx];
                let b1 = Bs[(4u * q + 1u) * 16u + tx];
                let b2 = Bs[(4u * q + 2u) * 16u + tx];
                let b3 = Bs[(4u * q + 3u) * 16u + tx];
                let a0 = As[(4u * ty) * 4u + q];
                let a1 = As[(4u * ty + 1u) * 4u + q];
                let a2 = As[(4u * ty + 2u) * 4u + q];
                let a3 = As[(4u * ty + 3u) * 4u + q];
                acc0 += a0.x * b0 + a0.y * b1 + a0.z * b2 + a0.w * b3;
                acc1 += a1.x * b0 + a1.y * b1 + a1.z * b2 + a1.w * b3;
                acc2 += a2.x * b0 + a2.y * b1 + a2.z * b2 + a2.w * b3;
                acc3 += a3.x * b0 + a3.y * b1 + a3.z * b2 + a3.w * b3;
            }
        } else {
            for (var k = 0u; k < TK; k++) {
                let a = As[k * 16u + ty];
                let b = Bs[k * 16u + tx];
                acc0 += a.x * b;
                acc1 += a.y * b;
                acc2 += a.z * b;
                acc3 += a.w * b;
            }
        }
        workgroupBarrier();
    }

    let row = m0 + 4u * ty;
    let col = n0 + 4u * tx;
    var accs = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var r = 0u; r < 4u; r++) {
        if (row + r >= M) { break; }
        let out = c_base + (row + r) * N + col;
        let v = accs[r];
        for (var c = 0u; c < 4u; c++) {
            if (col + c < N) { C[out + c] = v[c]; }
        }
    }
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    tile(wid, lid, false);
}

@compute @workgroup_size(256)
fn main_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    tile(wid, lid, true);
}
