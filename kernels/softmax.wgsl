// Row-wise softmax family over the last axis; one workgroup per row of n elements.
//   softmax_main:         y = softmax(scale * x), optionally causal: row r is query q = r % T and
//                         sees only columns j <= q (the rest get probability exactly 0).
//   log_softmax_main:     y = x - max(x) - log(sum(exp(x - max(x))))
//   softmax_bwd_main:     dx = scale * y * (g - sum_j(g * y))           (y = softmax output)
// Attention's dropout rides along where asked (P[5] = 1; seed P[6], p P[7], 1/(1-p) P[8]): softmax_main also
// writes OUT2 = dropout(y), and softmax_bwd_main takes G as the gradient of dropout(y), applying the same mask
// (dropout_mask.wgsl, element index r * n + j as dropout.wgsl numbers them) before the softmax's backward.
//   log_softmax_bwd_main: dx = g - exp(y) * sum_j(g)                    (y = log_softmax output)
// Max-subtraction keeps exp() from overflowing for any input.
// Bindings: @binding(0) P = [rows, n, T, scale bits, causal, dropout, seed, p bits, 1/(1-p) bits], @binding(1)
// X (x or y), @binding(2) G, @binding(3) OUT, @binding(4) OUT2.

const RWG: u32 = {{RWG}}u;   // threads per row (the host picks 64 or 256 by row length)

@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> G: array<f32>;
@group(0) @binding(3) var<storage, read_write> OUT: array<f32>;
@group(0) @binding(4) var<storage, read_write> OUT2: array<f32>;

#include workgroup_reduce
#include dropout_mask

fn dropping() -> bool { return P[5] == 1u; }

// v, dropped as dropout.wgsl would drop element i (scaled by 1/(1-p) when kept)
fn dropped(v: f32, i: u32, hashed_seed: u32) -> f32 {
    return select(0.0, v * bitcast<f32>(P[8]), keep(i, hashed_seed, bitcast<f32>(P[7])));
}

fn row_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 { return wid.y * nwg.x + wid.x; }

// Number of visible columns of row r: causal (P[4] = 1), or the first P[2] of every row (P[4] = 2: a decode
// step's scores over a whole KV cache block, P[2] slots filled).
fn row_limit(r: u32, n: u32) -> u32 {
    if (P[4] == 2u) { return min(n, P[2]); }
    if (P[4] != 0u) { return min(n, (r % P[2]) + 1u); }
    return n;
}

@compute @workgroup_size(RWG)
fn softmax_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let r = row_index(wid, nwg);
    if (r >= P[0]) { return; }
    let n = P[1];
    let scale = bitcast<f32>(P[3]);
    let lim = row_limit(r, n);
    let base = r * n;
    // exp(scale * (x - mx)) with mx the largest raw score (the smallest where scale < 0), not exp(scale * x - m):
    // a GPU compiler may fuse scale * x - m into one multiply-add, which keeps the product's rounding error; for
    // a padding mask's -1e30 that error is ~1e22, and exp of it overflowed a fully padded row into NaN (H200)
    let sg = select(1.0, -1.0, scale < 0.0);
    var m = bitcast<f32>(0xff800000u);  // -inf: -3.4e38 is above -FLT_MAX
    for (var j = lid; j < lim; j += RWG) { m = max(m, sg * X[base + j]); }
    let mx = sg * wg_max(m, lid);
    var s = 0.0;
    for (var j = lid; j < lim; j += RWG) { s += exp(scale * (X[base + j] - mx)); }
    s = wg_sum(s, lid);
    let inv = 1.0 / s;
    let hashed_seed = pcg(P[6]);
    for (var j = lid; j < n; j += RWG) {
        let y = select(0.0, exp(scale * (X[base + j] - mx)) * inv, j < lim);
        OUT[base + j] = y;
        if (dropping()) { OUT2[base + j] = dropped(y, base + j, hashed_seed); }
    }
}

@compute @workgroup_size(RWG)
fn log_softmax_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let r = row_index(wid, nwg);
    if (r >= P[0]) { return; }
    let n = P[1];
    let base = r * n;
    var m = bitcast<f32>(0xff800000u);  // -inf: -3.4e38 is above -FLT_MAX
    for (var j = lid; j < n; j += RWG) { m = max(m, X[base + j]); }
    m = wg_max(m, lid);
    var s = 0.0;
    for (var j = lid; j < n; j += RWG) { s += exp(X[base + j] - m); }
    s = wg_sum(s, lid);
    let ls = log(s);  // (x - m) - log(s), as numpy's: x - (m + log(s)) loses log(s) when |m| dwarfs it (-FLT_MAX rows)
    for (var j = lid; j < n; j += RWG) { OUT[base + j] = (X[base + j] - m) - ls; }
}

@compute @workgroup_size(RWG)
fn softmax_bwd_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let r = row_index(wid, nwg);
    if (r >= P[0]) { return; }
    let n = P[1];
    let scale = bitcast<f32>(P[3]);
    let base = r * n;
    let hashed_seed = pcg(P[6]);
    var d = 0.0;
    for (var j = lid; j < n; j += RWG) { d += grad_at(base + j, hashed_seed) * X[base + j]; }
    d = wg_sum(d, lid);
    for (var j = lid; j < n; j += RWG) { OUT[base + j] = scale * X[base + j] * (grad_at(base + j, hashed_seed) - d); }
}

// G[i], through dropout's backward when the forward dropped y
fn grad_at(i: u32, hashed_seed: u32) -> f32 {
    if (dropping()) { return dropped(G[i], i, hashed_seed); }
    return G[i];
}

@compute @workgroup_size(RWG)
fn log_softmax_bwd_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let r = row_index(wid, nwg);
    if (r >= P[0]) { return; }
    let n = P[1];
    let base = r * n;
    var s = 0.0;
    for (var j = lid; j < n; j += RWG) { s += G[base + j]; }
    s = wg_sum(s, lid);
    for (var j = lid; j < n; j += RWG) { OUT[base + j] = G[base + j] - exp(X[base + j]) * s; }
}
