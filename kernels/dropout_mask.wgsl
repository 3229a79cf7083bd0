// Dropout's keep decision, shared by every kernel that drops (`#include dropout_mask`): element i is kept iff
// u(seed, i) >= p, u = (pcg(i ^ pcg(seed)) >> 8) / 2^24, pcg the PCG-RXS-M-XS 32-bit output permutation.
// u depends only on (seed, i): a backward re-applies the same mask from the same seed without storing it, and
// lab/engine/numpy_backend.py computes the same masks bit for bit. Pass hashed_seed = pcg(seed).

fn pcg(x: u32) -> u32 {
    let s = x * 747796405u + 2891336453u;
    let w = ((s >> ((s >> 28u) + 4u)) ^ s) * 277803737u;
    return (w >> 22u) ^ w;
}

fn keep(i: u32, hashed_seed: u32, p: f32) -> bool {
    return f32(pcg(i ^ hashed_seed) >> 8u) * (1.0 / 16777216.0) >= p;
}
