// Backward of the fused LayerNorm (forward and the math: layernorm.wgsl).
//   backward_x_main:  dx = rstd * (gx - mean_j(gx) - xhat * mean_j(gx * xhat)),  gx = g * w   (workgroup per row)
//                     with P[4] = 1, + ACC: the input's gradient from its other uses (the residual stream's),
//                     added here instead of by a pass of its own
//   backward_wb_main: partial column sums over chunks of rows, one thread per (chunk s, feature j):
//                     OUT0[s, j] = sum_{rows r in chunk s} g * xhat,  OUT1[s, j] = sum g
//                     (S = 1 writes them directly); with P[4] = 1 both into OUT0, row s = [dw's n, db's n], so one
//                     reduction pass sums the S partials of both (into dw and db: reduce.wgsl's `at`)
// Bindings: P = [rows, n, S, chunk, accumulate | together], X, W, MEAN, RSTD, G, then OUT0 (dx, or dw), OUT1
// (db), ACC.

#include flat
const RWG: u32 = {{RWG}}u;   // threads per row of backward_x_main (the host picks 64 or 256)

@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> W: array<f32>;
@group(0) @binding(3) var<storage, read> MEAN: array<f32>;
@group(0) @binding(4) var<storage, read> RSTD: array<f32>;
@group(0) @binding(5) var<storage, read> G: array<f32>;
@group(0) @binding(6) var<storage, read_write> OUT0: array<f32>;
@group(0) @binding(7) var<storage, read_write> OUT1: array<f32>;
@group(0) @binding(8) var<storage, read> ACC: array<f32>;

#include workgroup_reduce

@compute @workgroup_size(RWG)
fn backward_x_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let r = wid.y * nwg.x + wid.x;
    if (r >= P[0]) { return; }
    let n = P[1];
    let base = r * n;
    let mean = MEAN[r];
    let rstd = RSTD[r];
    var s1 = 0.0;
    var s2 = 0.0;
    for (var j = lid; j < n; j += RWG) {
        let gx = G[base + j] * W[j];
        s1 += gx;
        s2 += gx * (X[base + j] - mean) * rstd;
    }
    let m1 = wg_sum(s1, lid) / f32(n);
    let m2 = wg_sum(s2, lid) / f32(n);
    for (var j = lid; j < n; j += RWG) {
        let xhat = (X[base + j] - mean) * rstd;
        var dx = rstd * (G[base + j] * W[j] - m1 - xhat * m2);
        if (P[4] == 1u) { dx += ACC[base + j]; }
        OUT0[base + j] = dx;
    }
}

@compute @workgroup_size(WG)
fn backward_wb_main(inv: Invocation) {
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
    var db = 0.0;
    for (var r = s * chunk; r < r1; r++) {
        let g = G[r * n + j];
        dw += g * (X[r * n + j] - MEAN[r]) * RSTD[r];
        db += g;
    }
    if (P[4] == 1u) {
        OUT0[e + s * n] = dw;
        OUT0[e + s * n + n] = db;
    } else {
        OUT0[e] = dw;
        OUT1[e] = db;
    }
}
