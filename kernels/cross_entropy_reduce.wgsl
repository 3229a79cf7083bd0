// Second and third stages of the fused cross-entropy (first stage and the math: cross_entropy.wgsl).
//   mean_main:     OUT[0] = sum_r LOSS[r] / max(1, sum_r VALID[r]);  COUNT[0] = sum_r VALID[r]   (one workgroup)
//   backward_main: dx[r, j] = g * (exp(x[r, j] - lse[r]) - [j == t[r]]) / max(1, count)   (0 for ignored rows and
//                  for the padding columns V..W-1 of rows W apart)
// Bindings: P = [rows, V, ignore_index bits, W]; mean: LOSS, VALID, OUT, COUNT; backward: X, T, LSE, VALID, COUNT, G,
// DX (backward_inplace_main: the logits in DX, X unbound).

#include flat

@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> T: array<i32>;
@group(0) @binding(3) var<storage, read> LSE: array<f32>;
@group(0) @binding(4) var<storage, read> LOSS: array<f32>;
@group(0) @binding(5) var<storage, read> VALID: array<f32>;
@group(0) @binding(6) var<storage, read_write> OUT: array<f32>;     // mean: the loss; backward: dx
@group(0) @binding(7) var<storage, read_write> COUNT: array<f32>;   // written by mean, read by backward
@group(0) @binding(8) var<storage, read> G: array<f32>;

var<workgroup> red: array<f32, WG>;
var<workgroup> red2: array<f32, WG>;

@compute @workgroup_size(WG)
fn mean_main(@builtin(local_invocation_index) lid: u32) {
    let rows = P[0];
    var s = 0.0;
    var c = 0.0;
    for (var r = lid; r < rows; r += WG) { s += LOSS[r]; c += VALID[r]; }
    red[lid] = s;
    red2[lid] = c;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k = k / 2u) {
        if (lid < k) { red[lid] += red[lid + k]; red2[lid] += red2[lid + k]; }
        workgroupBarrier();
    }
    if (lid == 0u) {
        OUT[0] = red[0] / max(1.0, red2[0]);
        COUNT[0] = red2[0];
    }
}

fn dx_of(e: u32, x: f32) -> f32 {   // element e (< rows * W) of dx, from its logit x
    let V = P[1];
    let W = P[3];
    let r = e / W;
    let j = e % W;
    if (VALID[r] == 0.0 || j >= V) { return 0.0; }
    let hot = select(0.0, 1.0, i32(j) == T[r]);
    return G[0] * (exp(x - LSE[r]) - hot) / max(1.0, COUNT[0]);
}

@compute @workgroup_size(WG)
fn backward_main(inv: Invocation) {
    let e = flat(inv);
    if (e >= P[0] * P[3]) { return; }
    OUT[e] = dx_of(e, X[e]);
}

// backward_inplace_main: the same, written over the logits (bound as OUT; X unbound): one (rows, W) array, not two
@compute @workgroup_size(WG)
fn backward_inplace_main(inv: Invocation) {
    let e = flat(inv);
    if (e >= P[0] * P[3]) { return; }
    OUT[e] = dx_of(e, OUT[e]);
}
