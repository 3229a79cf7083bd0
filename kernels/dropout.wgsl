// Dropout with a counter-based RNG (dropout_mask.wgsl): element i is kept iff u(seed, i) >= p, and kept values
// are scaled by 1/(1-p); the backward re-applies the same mask from the same seed.
// Bindings: P = [n, seed, p bits, scale bits], @binding(1) X, @binding(2) Y.

#include flat

@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> Y: array<f32>;

#include dropout_mask

@compute @workgroup_size(WG)
fn main(inv: Invocation) {
    let i = flat(inv);
    if (i >= P[0]) { return; }
    Y[i] = select(0.0, X[i] * bitcast<f32>(P[3]), keep(i, pcg(P[1]), bitcast<f32>(P[2])));
}
