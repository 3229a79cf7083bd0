// SwiGLU's gated unit, elementwise over n = gate's size (Llama's MLP: down(silu(gate) * up)), one thread each:
//   forward_main:  OUT0 = silu(gate) * up,  silu(x) = x * s,  s = sigmoid(x) = 1 / (1 + exp(-x))
//   backward_main: OUT0 = dgate = g * up * (s + silu * (1 - s)),  OUT1 = dup = g * silu
// exp(-x) overflowing to inf for x < -88 gives s = 0, silu = -0: the limits, no NaN (a NaN gate stays NaN).
// Bindings: P = [n], GATE, UP, G, OUT0, OUT1.

#include flat

@group(0) @binding(1) var<storage, read> GATE: array<f32>;
@group(0) @binding(2) var<storage, read> UP: array<f32>;
@group(0) @binding(3) var<storage, read> G: array<f32>;
@group(0) @binding(4) var<storage, read_write> OUT0: array<f32>;
@group(0) @binding(5) var<storage, read_write> OUT1: array<f32>;

@compute @workgroup_size(WG)
fn forward_main(inv: Invocation) {
    let i = flat(inv);
    if (i >= P[0]) { return; }
    let x = GATE[i];
    OUT0[i] = x / (1.0 + exp(-x)) * UP[i];
}

@compute @workgroup_size(WG)
fn backward_main(inv: Invocation) {
    let i = flat(inv);
    if (i >= P[0]) { return; }
    let x = GATE[i];
    let s = 1.0 / (1.0 + exp(-x));
    let silu = x * s;
    let g = G[i];
    OUT0[i] = g * UP[i] * (s + silu * (1.0 - s));
    OUT1[i] = g * silu;
}
