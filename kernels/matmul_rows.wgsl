// Products of a few rows: C (M, N) = A (M, K) B + bias, then GELU, then + R, for M <= 16 (a decode step's linears:
// batch rows x one token). The tiled kernels give such a product a 64 x 64 tile per 64 columns, 63/64 of it rows
// that do not exist, and split K over a second dispatch that sums the chunks; here a workgroup reduces K itself
// and applies the epilogue as it stores, so a Linear layer of a decode step is one dispatch.
// A workgroup covers TN columns of C with its 256 threads in WG / TN slices of K, each thread M accumulators
// (ROWS = M, a constant of the pipeline: the accumulators stay in registers); the slices are summed through
// workgroup memory, four rows at a time, in a fixed order (replays are bitwise the eager step).
// Entry points by B's layout, each arranged so that neighbouring threads read neighbouring weights (coalesced):
//   nn: B (K, N) (a Linear's weight, stored (in, out)): TN_NN columns x 256 / TN_NN slices, threads along the
//       columns.
//   nt: B (N, K) (the tied head's embedding, K contiguous per output column): 8 columns x 32 slices, threads
//       along K.
// Bindings: @binding(0) P = [M, N, K, has_bias, gelu, has_residual, keep_pre], @binding(1) A (M, K),
// @binding(2) B, @binding(3) C (M, N), @binding(4) BIAS (N,), @binding(5) R (M, N), @binding(6) PRE (M, N): with
// gelu and keep_pre, the product + bias before the activation (linear's backward). A and B as stored: f32, or f16
// for float16 storage (ENABLE `enable f16;`). Dispatch: (ceil(N / TN), 1, 1).

{{ENABLE}}

const WG: u32 = 256u;
const TN_NN: u32 = {{TN_NN}}u;   // columns per workgroup, nn (matmul_plan.rows_cols)
const TN_NT: u32 = 8u;    // ... nt (matmul_plan.ROWS_COLS_NT)
const ROWS: u32 = {{ROWS}}u;

@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> A: array<{{A_ELEM}}>;
@group(0) @binding(2) var<storage, read> B: array<{{B_ELEM}}>;
@group(0) @binding(3) var<storage, read_write> C: array<f32>;
@group(0) @binding(4) var<storage, read> BIAS: array<f32>;
@group(0) @binding(5) var<storage, read> R: array<f32>;
@group(0) @binding(6) var<storage, read_write> PRE: array<f32>;

var<workgroup> red: array<vec4<f32>, 256>;   // [slice][column]: four rows' partial sums

#include activation

fn rows(wid: vec3<u32>, lid: u32, along_k: bool) {
    let M = P[0];
    let N = P[1];
    let K = P[2];
    let TN = select(TN_NN, TN_NT, along_k);
    let KS = WG / TN;
    let c = select(lid % TN, lid / KS, along_k);
    let s = select(lid / TN, lid % KS, along_k);
    let n = wid.x * TN + c;
    var acc: array<f32, 16>;
    if (n < N) {
        for (var k = s; k < K; k += KS) {
            let b = f32(B[select(k * N + n, n * K + k, along_k)]);
#unroll m < 16
            if ($m < ROWS) { acc[$m] += f32(A[$m * K + k]) * b; }
#end
        }
    }
#unroll r < 4
    if ($r * 4 < ROWS) {
        red[s * TN + c] = vec4<f32>(acc[$r * 4], acc[$r * 4 + 1], acc[$r * 4 + 2], acc[$r * 4 + 3]);
        workgroupBarrier();
        let cc = lid % TN;
        let m = $r * 4 + lid / TN;
        let col = wid.x * TN + cc;
        if (lid < 4u * TN && m < M && col < N) {
            var v = 0.0;
            for (var j = 0u; j < KS; j++) { v += red[j * TN + cc][lid / TN]; }
            let i = m * N + col;
            if (P[3] != 0u) { v += BIAS[col]; }
            if (P[4] != 0u) {
                if (P[6] != 0u) { PRE[i] = v; }
                v = u_gelu(v);
            }
            if (P[5] != 0u) { v += R[i]; }
            C[i] = v;
        }
        workgroupBarrier();
    }
#end
}

@compute @workgroup_size(WG)
fn nn(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    rows(wid, lid, false);
}

@compute @workgroup_size(WG)
fn nt(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    rows(wid, lid, true);
}
