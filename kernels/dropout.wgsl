// Dropout with a counter-based RNG: element i is kept iff u(seed, i) >= p, and kept values are scaled by
// 1/(1-p). u depends only on (seed, i), so the backward re-applies the same mask from the same seed
// without storing it, and lab/engine/numpy_backend.py computes bit-identical masks on the CPU.
//   h = pcg(i ^ pcg(seed)),  u = (h >> 8) / 2^24   (pcg: the PCG-RXS-M-XS 32-bit output permutation)
// Bindings: P = [n, seed, p bits, scale bits], @binding(1) X, @binding(2) Y.

const WG: u32 = 256u;

@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> Y: array<f32>;

fn pcg(x: u32) -> u32 {
    let s = x * 747796405u + 2891336453u;
    let w = ((s >> ((s >> 28u) + 4u)) ^ s) * 277803737u;
    return (w >> 22u) ^ w;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid;
    if (i >= P[0]) { return; }
    let u = f32(pcg(i ^ pcg(P[1])) >> 8u) * (1.0 / 16777216.0);
    Y[i] = select(0.0, X[i] * bitcast<f32>(P[3]), u >= bitcast<f32>(P[2]));
}
