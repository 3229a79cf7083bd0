// Reductions along one axis, in one or more passes. The input is viewed as (outer, n, inner), row-major.
// A pass splits n into S chunks of `chunk` and writes partial results  Y[o, s, j] = REDUCE_{k in chunk s}
// MAP(x[o, k, j]); the host runs passes (MAP = identity after the first) until S = 1. Chunking keeps
// the device full when the output is small (a bias gradient: 1536 columns summed over 16384 rows) and
// keeps the reduction order fixed, so results are deterministic run to run.
//   rows_main:    inner == 1: one workgroup per (o, s); threads stride over the chunk, then a tree reduction.
//   columns_main: inner > 1:  one thread per (o, s, j); neighbouring threads read neighbouring j (coalesced).
// Specialized by {{COMBINE}} (r_add | r_max), {{MAP}} (m_id | m_square) and {{IDENTITY}}.
// Bindings: @binding(0) P = [outer, n, inner, out_offset, S, chunk, at], @binding(1) X, @binding(2) Y, @binding(3)
// Y2. out_offset lets several reductions write into one buffer (per-parameter squared norms for clipping).
// at < inner (columns_main, a last pass of one row: outer 1, S 1): columns j >= at go to Y2[j - at], so one pass
// sums a product's split-K partials into the product and its column sums into an array of their own.

#include flat

@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> Y: array<f32>;
@group(0) @binding(3) var<storage, read_write> Y2: array<f32>;

var<workgroup> partial: array<f32, WG>;

fn r_add(a: f32, b: f32) -> f32 { return a + b; }
// WGSL leaves max() with a NaN operand to the implementation (lavapipe drops the NaN): a NaN is passed on here, as
// numpy's and PyTorch's max do, so a NaN in a tensor is never reduced away into a finite maximum. NaN is found from
// the bits: the compiler may fold a != a to false (lavapipe does).
fn is_nan(x: f32) -> bool { return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u; }
fn r_max(a: f32, b: f32) -> f32 { return select(max(a, b), a + b, is_nan(a) || is_nan(b)); }
fn m_id(x: f32) -> f32 { return x; }
fn m_square(x: f32) -> f32 { return x * x; }

@compute @workgroup_size(WG)
fn rows_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let outer = P[0];
    let n = P[1];
    let S = P[4];
    let chunk = P[5];
    let g = wid.y * nwg.x + wid.x;          // (o, s); uniform across the workgroup, so barriers below are safe
    let valid = g < outer * S;
    var acc: f32 = {{IDENTITY}};
    if (valid) {
        let o = g / S;
        let k0 = (g % S) * chunk;
        let k1 = min(n, k0 + chunk);
        for (var k = k0 + lid; k < k1; k += WG) {
            acc = {{COMBINE}}(acc, {{MAP}}(X[o * n + k]));
        }
    }
    partial[lid] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid < s) { partial[lid] = {{COMBINE}}(partial[lid], partial[lid + s]); }
        workgroupBarrier();
    }
    if (valid && lid == 0u) { Y[P[3] + g] = partial[0]; }
}

@compute @workgroup_size(WG)
fn columns_main(inv: Invocation) {
    let outer = P[0];
    let n = P[1];
    let inner = P[2];
    let S = P[4];
    let chunk = P[5];
    let e = flat(inv);   // (o, s, j)
    if (e >= outer * S * inner) { return; }
    let j = e % inner;
    let s = (e / inner) % S;
    let o = e / (inner * S);
    let k0 = s * chunk;
    let k1 = min(n, k0 + chunk);
    var acc: f32 = {{IDENTITY}};
    for (var k = k0; k < k1; k++) {
        acc = {{COMBINE}}(acc, {{MAP}}(X[(o * n + k) * inner + j]));
    }
    if (j >= P[6]) {
        Y2[e - P[6]] = acc;
    } else {
        Y[P[3] + e] = acc;
    }
}
