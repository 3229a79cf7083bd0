// Reductions along one axis. The input is viewed as (outer, n, inner), row-major;
// the output (outer, inner) holds  y[o, j] = REDUCE_{k < n} MAP(x[o, k, j]).
// One workgroup per output element: its WG threads stride over k, then a tree reduction in workgroup memory.
// Specialized by {{COMBINE}} (r_add | r_max), {{MAP}} (m_id | m_square) and {{IDENTITY}}.
// Bindings: @binding(0) P = [outer, n, inner, out_offset], @binding(1) X, @binding(2) Y.
// out_offset lets several reductions write into one buffer (per-parameter squared norms for clipping).

const WG: u32 = 256u;

@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> Y: array<f32>;

var<workgroup> partial: array<f32, WG>;

fn r_add(a: f32, b: f32) -> f32 { return a + b; }
fn r_max(a: f32, b: f32) -> f32 { return max(a, b); }
fn m_id(x: f32) -> f32 { return x; }
fn m_square(x: f32) -> f32 { return x * x; }

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let outer = P[0];
    let n = P[1];
    let inner = P[2];
    let o = wid.y * nwg.x + wid.x;          // uniform across the workgroup, so barriers below are safe
    let valid = o < outer * inner;
    var acc: f32 = {{IDENTITY}};
    if (valid) {
        let base = (o / inner) * n * inner + (o % inner);
        for (var k = lid; k < n; k += WG) {
            acc = {{COMBINE}}(acc, {{MAP}}(X[base + k * inner]));
        }
    }
    partial[lid] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid < s) { partial[lid] = {{COMBINE}}(partial[lid], partial[lid + s]); }
        workgroupBarrier();
    }
    if (valid && lid == 0u) { Y[P[3] + o] = partial[0]; }
}
