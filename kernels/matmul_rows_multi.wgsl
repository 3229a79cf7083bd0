// Several Linear layers of one input of a few rows in one dispatch (a Llama decode step: q, k, v projections; the
// MLP's gate and up with SwiGLU). matmul_rows.wgsl's scheme (K reduced inside the workgroup, TN columns x 256 / TN
// slices of K per workgroup, threads along the columns of weights stored (K, N), ROWS = M accumulators each):
//   concat: up to three weights W0 (K, N0), W1 (K, N1), W2 (K, N2); workgroup x < T0 takes W0's columns, then
//           T1 of W1's, then W2's (Ti = ceil(Ni / TN)); C (M, N0 + N1 + N2) holds x W0 + b0 | x W1 + b1 | x W2 + b2
//           side by side (the packed projection decode_attention reads).
//   swiglu: two weights of one N, C (M, N) = silu(x W0 + b0) * (x W1 + b1), both products in each thread.
// Bindings: @binding(0) P = [M, K, N0, N1, N2, T0, T1, bias mask (bit i: b_i)], @binding(1) A (M, K), @binding(2-4)
// W0..W2, @binding(5) C, @binding(6-8) BIAS0..2. Weights as stored: f32, or f16 (ENABLE `enable f16;`).
// Dispatch: (T0 + T1 + T2, 1, 1) (swiglu: (T0, 1, 1)).

{{ENABLE}}

const WG: u32 = 256u;
const TN: u32 = {{TN}}u;   // columns per workgroup (matmul_plan.rows_cols)
const KS: u32 = WG / TN;
const ROWS: u32 = {{ROWS}}u;

@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> A: array<f32>;
@group(0) @binding(2) var<storage, read> W0: array<{{B_ELEM}}>;
@group(0) @binding(3) var<storage, read> W1: array<{{B_ELEM}}>;
@group(0) @binding(4) var<storage, read> W2: array<{{B_ELEM}}>;
@group(0) @binding(5) var<storage, read_write> C: array<f32>;
@group(0) @binding(6) var<storage, read> BIAS0: array<f32>;
@group(0) @binding(7) var<storage, read> BIAS1: array<f32>;
@group(0) @binding(8) var<storage, read> BIAS2: array<f32>;

var<workgroup> red: array<vec4<f32>, 256>;   // [slice][column]: four rows' partial sums

// Rows r0..r0 + 3 of this workgroup's columns summed over the slices: thread lid < 4 TN gets row r0 + lid / TN,
// column lid % TN (uniform control flow: every thread calls it).
fn summed(lid: u32, vals: vec4<f32>) -> f32 {
    red[lid] = vals;   // (lid = s * TN + c)
    workgroupBarrier();
    var v = 0.0;
    if (lid < 4u * TN) {
        for (var j = 0u; j < KS; j++) { v += red[j * TN + lid % TN][lid / TN]; }
    }
    workgroupBarrier();
    return v;
}

fn silu(x: f32) -> f32 {   // as swiglu.wgsl: exp(-x) overflowing gives 0 (-0), no NaN
    return x * (1.0 / (1.0 + exp(-x)));
}

@compute @workgroup_size(WG)
fn concat(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let M = P[0];
    let K = P[1];
    let Ntot = P[2] + P[3] + P[4];
    let w = select(select(2u, 1u, wid.x < P[5] + P[6]), 0u, wid.x < P[5]);
    let t = wid.x - select(select(P[5] + P[6], P[5], w == 1u), 0u, w == 0u);
    let N = P[2 + w];
    let offset = select(select(P[2] + P[3], P[2], w == 1u), 0u, w == 0u);
    let c = lid % TN;
    let s = lid / TN;
    let n = t * TN + c;
    var acc: array<f32, 16>;
    if (n < N) {
#unroll i in 0 1 2
        if (w == $i) {
            for (var k = s; k < K; k += KS) {
                let b = f32(W$i[k * N + n]);
#unroll m < 16
                if ($m < ROWS) { acc[$m] += A[$m * K + k] * b; }
#end
            }
        }
#end
    }
#unroll r < 4
    if ($r * 4 < ROWS) {
        let v = summed(lid, vec4<f32>(acc[$r * 4], acc[$r * 4 + 1], acc[$r * 4 + 2], acc[$r * 4 + 3]));
        let m = $r * 4 + lid / TN;
        let col = t * TN + lid % TN;
        if (lid < 4u * TN && m < M && col < N) {
            var bias = 0.0;
            if ((P[7] & (1u << w)) != 0u) {   // (each read only where its bias is bound: no index past a dummy)
                if (w == 0u) { bias = BIAS0[col]; } else if (w == 1u) { bias = BIAS1[col]; } else { bias = BIAS2[col]; }
            }
            C[m * Ntot + offset + col] = v + bias;
        }
    }
#end
}

@compute @workgroup_size(WG)
fn swiglu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let M = P[0];
    let K = P[1];
    let N = P[2];
    let c = lid % TN;
    let s = lid / TN;
    let n = wid.x * TN + c;
    var gate: array<f32, 16>;
    var up: array<f32, 16>;
    if (n < N) {
        for (var k = s; k < K; k += KS) {
            let g = f32(W0[k * N + n]);
            let u = f32(W1[k * N + n]);
#unroll m < 16
            if ($m < ROWS) {
                let a = A[$m * K + k];
                gate[$m] += a * g;
                up[$m] += a * u;
            }
#end
        }
    }
#unroll r < 4
    if ($r * 4 < ROWS) {
        let g = summed(lid, vec4<f32>(gate[$r * 4], gate[$r * 4 + 1], gate[$r * 4 + 2], gate[$r * 4 + 3]));
        let u = summed(lid, vec4<f32>(up[$r * 4], up[$r * 4 + 1], up[$r * 4 + 2], up[$r * 4 + 3]));
        let m = $r * 4 + lid / TN;
        let col = wid.x * TN + lid % TN;
        if (lid < 4u * TN && m < M && col < N) {
            var bg = 0.0;
            var bu = 0.0;
            if ((P[7] & 1u) != 0u) { bg = BIAS0[col]; }
            if ((P[7] & 2u) != 0u) { bu = BIAS1[col]; }
            C[m * N + col] = silu(g + bg) * (u + bu);
        }
    }
#end
}
