// Backward of the fused RMSNorm (forward and the math: rmsnorm.wgsl), xhat = x * rstd.
//   backward_x_main: dx = rstd * (gx - xhat * mean_j(gx * xhat)),  gx = g * w   (one workgroup per row)
//                    with P[4] = 1, + ACC: the input's gradient from its other uses (the residual stream's),
//                    added here instead of by a pass of its own
//   backward_w_main: partial column sums over chunks of rows, one thread per (chunk s, feature j):
//                    OUT[s, j] = sum_{rows r in chunk s} g * xhat   (the host sums the S partials into dw)
// Bindings: P = [rows, n, S, chunk, accumulate], X, W, RSTD, G, OUT (dx, or dw's partials), ACC.

#include flat
const RWG: u32 = {{RWG}}u;   // threads per row of backward_x_main (the host picks 64 or 256)

@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> W: array<f32>;
@group(0) @binding(3) var<storage, read> RSTD: array<f32>;
@group(0) @binding(4) var<storage, read> G: array<f32>;
@group(0) @binding(5) var<storage, read_write> OUT: array<f32>;
@group(0) @binding(6) var<storage, read> ACC: array<f32>;

#include workgroup_reduce

@compute @workgroup_size(RWG)
fn backward_x_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let r = wid.y * nwg.x + wid.x;
    if (r >= P[0]) { return; }
    let n = P[1];
    let base = r * n;
    let rstd = RSTD[r];
    var s = 0.0;
    for (var j = lid; j < n; j += RWG) { s += G[base + j] * W[j] * X[base + j]; }
    let m = wg_sum(s, lid) / f32(n) * rstd * rstd;   // xhat * mean_j(gx * xhat) = x * m
    for (var j = lid; j < n; j += RWG) {
        var dx = rstd * (G[base + j] * W[j] - X[base + j] * m);
        if (P[4] == 1u) { dx += ACC[base + j]; }
        OUT[base + j] = dx;
    }
}

@compute @workgroup_size(WG)
fn backward_w_main(inv: Invocation) {
    let e = flat(inv);
    let rows = P[0];
    let n = P[1];
    let S = P[2];
    let chunk = P[3];
    if (e >= S * n) { return; }
    let j = e % n;
    let s = e / n;
    let r1 = min(rows, (s + 1u) * chunk);
    var dw = 0.0;
    for (var r = s * chunk; r < r1; r++) { dw += G[r * n + j] * X[r * n + j] * RSTD[r]; }
    OUT[e] = dw;
}
