// Thin products: C (M, N) = A (M, K) B (K, N) with N <= 16, every operand read and written through strides
// (LoRA's rank-r products: x A^T, g B, and, computed transposed, dh^T x and g^T h). The 64 x 64 tiles of the
// general kernels spend 7/8 of their work on N = 8 columns that do not exist; here a workgroup covers 64 rows
// by 16 columns, each thread 4 outputs, and the products run at the rate of reading A.
// Params: P = [M, N, K, kc, a_off, a_row, a_k, b_off, b_k, b_col, c_off, c_row, c_col, c_split]: element (m, k)
// of A at a_off + m a_row + k a_k, (k, n) of B at b_off + k b_k + n b_col, (m, n) of C at c_off + m c_row +
// n c_col (+ s c_split for split-K chunk s, workgroup z; chunks of kc along K).
// Dispatch: (ceil(M / 64), 1, chunks).

const WG: u32 = 256u;
const TM: u32 = 64u;
const TK: u32 = 32u;
const TN: u32 = 16u;
const AS: u32 = 33u;   // As row stride: one more than TK, so a warp's 8 rows at one k fall on distinct banks

@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> A: array<f32>;
@group(0) @binding(2) var<storage, read> B: array<f32>;
@group(0) @binding(3) var<storage, read_write> C: array<f32>;

var<workgroup> As: array<f32, 2112>;   // 64 rows x AS
var<workgroup> Bs: array<f32, 512>;    // 32 k x 16 n

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let M = P[0];
    let N = P[1];
    let K = P[2];
    let m0 = wid.x * TM;
    let k_begin = wid.z * P[3];
    let k_end = min(K, k_begin + P[3]);
    let a_along_k = P[6] == 1u;   // neighbouring threads load neighbouring floats: along k, or along m
    let b_along_n = P[9] == 1u;
    let row = lid / 4u;
    let c0 = (lid % 4u) * 4u;
    var acc = vec4<f32>(0.0);
    for (var k0 = k_begin; k0 < k_end; k0 += TK) {
        for (var u = 0u; u < 8u; u++) {
            let i = lid + u * WG;
            let m = select(i % TM, i / TK, a_along_k);
            let k = select(i / TM, i % TK, a_along_k);
            var v = 0.0;
            if (m0 + m < M && k0 + k < k_end) { v = A[P[4] + (m0 + m) * P[5] + (k0 + k) * P[6]]; }
            As[m * AS + k] = v;
        }
        for (var u = 0u; u < 2u; u++) {
            let i = lid + u * WG;
            let k = select(i % TK, i / TN, b_along_n);
            let n = select(i / TK, i % TN, b_along_n);
            var v = 0.0;
            if (n < N && k0 + k < k_end) { v = B[P[7] + (k0 + k) * P[8] + n * P[9]]; }
            Bs[k * TN + n] = v;
        }
        workgroupBarrier();
        for (var k = 0u; k < TK; k++) {
            let a = As[row * AS + k];
            let b = k * TN + c0;
            acc += a * vec4<f32>(Bs[b], Bs[b + 1u], Bs[b + 2u], Bs[b + 3u]);
        }
        workgroupBarrier();
    }
    let m = m0 + row;
    if (m < M) {
        let base = P[10] + wid.z * P[13] + m * P[11];
        for (var j = 0u; j < 4u; j++) {
            if (c0 + j < N) { C[base + (c0 + j) * P[12]] = acc[j]; }
        }
    }
}
