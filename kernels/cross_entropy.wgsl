// Fused cross-entropy from logits, mean over the rows whose target is not ignore_index.
//   rows_main:   lse[r] = logsumexp(x[r, :V]);  loss[r] = lse[r] - x[r, t[r]] (0 if ignored);  valid[r] = 0/1
// Rows are W >= V apart: columns V..W-1 are padding (a product's zero-padded tile columns), never classes.
// The mean and the backward (which recomputes the softmax from lse) are in cross_entropy_reduce.wgsl.
// Bindings: P = [rows, V, ignore_index (i32 bits), W], then per entry (see the declarations).

const RWG: u32 = {{RWG}}u;   // threads per row (the host picks 64 or 256 by row length)

@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> T: array<i32>;
@group(0) @binding(3) var<storage, read_write> LSE: array<f32>;
@group(0) @binding(4) var<storage, read_write> LOSS: array<f32>;
@group(0) @binding(5) var<storage, read_write> VALID: array<f32>;
@group(0) @binding(6) var<storage, read_write> ERR: array<atomic<i32>, 4>;   // out-of-range targets (index_check)

#include workgroup_reduce
#include index_check

@compute @workgroup_size(RWG)
fn rows_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let r = wid.y * nwg.x + wid.x;
    if (r >= P[0]) { return; }
    let V = P[1];
    let base = r * P[3];
    var m = bitcast<f32>(0xff800000u);  // -inf: -3.4e38 is above -FLT_MAX
    for (var j = lid; j < V; j += RWG) { m = max(m, X[base + j]); }
    m = wg_max(m, lid);
    var s = 0.0;
    for (var j = lid; j < V; j += RWG) { s += exp(X[base + j] - m); }
    s = wg_sum(s, lid);
    if (lid == 0u) {
        let lse = m + log(s);
        let t = T[r];
        let ignored = t == bitcast<i32>(P[2]);
        let ok = !ignored && t >= 0 && u32(t) < V;
        if (!ignored && !ok) { record_bad_index(2u, V, t, bitcast<i32>(P[2])); }
        LSE[r] = lse;
        LOSS[r] = select(0.0, lse - X[base + u32(max(t, 0))], ok);
        VALID[r] = select(0.0, 1.0, ok);
    }
}
