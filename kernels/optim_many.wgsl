// AdamW over many parameters in one dispatch (as optim.wgsl's adamw_main does for one): the backend generates a
// binding and a switch case per parameter slot (the BINDINGS and CASES placeholders: W, G, M, V of slot k at
// bindings 3 + 4 k .. 6 + 4 k), as many as the device allows a shader stage (lavapipe: 7; GPUs: a model's all).
// A training step's 76 (shakespeare-char) small update dispatches become one, or a few.
// Bindings: P = [slots, lr, b1, b2, eps, bc1, bc2, max_norm] (f32 bits after slots), @binding(1) GUARD: the
// step's gradient norm, @binding(2) TABLE: per slot [first workgroup, elements, weight decay bits].
// Workgroup w updates elements (w - first) * 256 .. + 255 of the last slot whose first workgroup is <= w.
// Same arithmetic, in the same order, as adamw_main (see optim.wgsl for the update and the guard).

const WG: u32 = 256u;

@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> GUARD: array<f32>;
@group(0) @binding(2) var<storage, read> TABLE: array<u32>;
{{BINDINGS}}

#include slot_table

fn f(k: u32) -> f32 { return bitcast<f32>(P[k]); }

// (p, m, v) after one step from p, the (clipped) gradient g, m and v, with weight decay wd
fn adamw(p0: f32, g: f32, m0: f32, v0: f32, wd: f32) -> vec3<f32> {
    let lr = f(1u);
    let b1 = f(2u);
    let b2 = f(3u);
    var p = p0;
    p -= lr * wd * p;
    let m = b1 * m0 + (1.0 - b1) * g;
    let v = b2 * v0 + (1.0 - b2) * g * g;
    return vec3<f32>(p - lr * (m / f(5u)) / (sqrt(v / f(6u)) + f(4u)), m, v);
}

@compute @workgroup_size(WG)
fn adamw_many_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let w = wid.y * nwg.x + wid.x;
    let slot = slot_of(w, lid);
    let i = (w - TABLE[3u * slot]) * WG + lid;
    // a non-finite norm skips the update (comparisons with NaN are false)
    if (i >= TABLE[3u * slot + 1u] || !(abs(GUARD[0]) <= 3.4028235e38)) { return; }
    let wd = bitcast<f32>(TABLE[3u * slot + 2u]);
    let max_norm = f(7u);
    let clip = min(1.0, max_norm / (GUARD[0] + 1e-6));
    switch slot {
{{CASES}}
        default: {}
    }
}
