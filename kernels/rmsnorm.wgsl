// Fused RMSNorm over the last axis (n features), rows independent: Llama's norm, LayerNorm without the centering
// and the bias.
//   forward_main: rstd = 1/sqrt(mean_j(x^2) + eps);  y = x * rstd * w   (one workgroup per row)
//                 with a residual (P[3] = 1) x is X + RES, written to SUM as it is read: a layer's residual add and
//                 the RMSNorm after it in one pass
// The backward kernels, which bind a different set of buffers, are in rmsnorm_backward.wgsl.
// Bindings: P = [rows, n, eps bits, has_residual], X, W, Y, RSTD, RES, SUM

const RWG: u32 = {{RWG}}u;   // threads per row (the host picks 64 or 256 by row length)

@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> W: array<f32>;
@group(0) @binding(3) var<storage, read_write> Y: array<f32>;
@group(0) @binding(4) var<storage, read_write> RSTD: array<f32>;
@group(0) @binding(5) var<storage, read> RES: array<f32>;
@group(0) @binding(6) var<storage, read_write> SUM: array<f32>;

// Element i of the normalized input: X, or X + RES with a residual (uniform: P[3] is the same for every thread).
fn x_at(i: u32) -> f32 {
    if (P[3] == 1u) { return X[i] + RES[i]; }
    return X[i];
}

#include workgroup_reduce

@compute @workgroup_size(RWG)
fn forward_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let r = wid.y * nwg.x + wid.x;
    if (r >= P[0]) { return; }
    let n = P[1];
    let base = r * n;
    var s = 0.0;
    for (var j = lid; j < n; j += RWG) {
        let x = x_at(base + j);
        if (P[3] == 1u) { SUM[base + j] = x; }
        s += x * x;
    }
    let rstd = inverseSqrt(wg_sum(s, lid) / f32(n) + bitcast<f32>(P[2]));
    for (var j = lid; j < n; j += RWG) { Y[base + j] = x_at(base + j) * rstd * W[j]; }
    if (lid == 0u) { RSTD[r] = rstd; }
}
