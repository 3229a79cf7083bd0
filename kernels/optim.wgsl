// Optimizer updates, in place on the device, one thread per parameter element.
//   adamw_main: p -= lr * wd * p                      (decoupled weight decay, before the Adam step)
//               m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//               p -= lr * (m / bc1) / (sqrt(v / bc2) + eps)      bc1 = 1 - b1^t, bc2 = 1 - b2^t (host)
//   sgd_main:   g' = g + wd p;  buf = momentum buf + g';  p -= lr buf      (PyTorch's SGD, dampening 0)
//   clip_main:  g *= min(1, max_norm / (sqrt(NORMSQ[0]) + 1e-6))          (global-norm clipping; NORMSQ
//               is the device-side sum of every gradient's squared norm, so no readback is needed)
// adamw_main and sgd_main clip too when given max_norm > 0 (the step's norm is GUARD): g is scaled as clip_main
// would, and stored back, before the update uses it: one dispatch per parameter instead of two.
// Bindings: P = [n, hyperparameters as f32 bits...], then per entry (see the declarations).

#include flat

@group(0) @binding(1) var<storage, read_write> PARAM: array<f32>;   // clip: the gradient being scaled
@group(0) @binding(2) var<storage, read_write> GRAD: array<f32>;    // clip: NORMSQ
@group(0) @binding(3) var<storage, read_write> S1: array<f32>;      // adamw: m;  sgd: momentum buffer
@group(0) @binding(4) var<storage, read_write> S2: array<f32>;      // adamw: v
@group(0) @binding(5) var<storage, read> GUARD: array<f32>;         // adamw, sgd: the gradient norm of the step

// A non-finite gradient norm (NaN or Inf anywhere in any gradient) skips the whole update on the device, so a
// bad step never reaches the weights or the moments, and no readback is needed to protect them.
// (Comparisons with NaN are false, so a NaN norm fails `<=`.)
fn guard_ok() -> bool { return abs(GUARD[0]) <= 3.4028235e38; }

fn f(k: u32) -> f32 { return bitcast<f32>(P[k]); }

// Gradient element i, clipped to the global norm max_norm (0: not clipped) and stored back as clipped.
fn clipped_grad(i: u32, max_norm: f32) -> f32 {
    if (max_norm <= 0.0) { return GRAD[i]; }
    let g = GRAD[i] * min(1.0, max_norm / (GUARD[0] + 1e-6));
    GRAD[i] = g;
    return g;
}

// P = [n, lr, b1, b2, eps, wd, bc1, bc2, max_norm]
@compute @workgroup_size(WG)
fn adamw_main(inv: Invocation) {
    let i = flat(inv);
    if (i >= P[0] || !guard_ok()) { return; }
    let lr = f(1u);
    let b1 = f(2u);
    let b2 = f(3u);
    let g = clipped_grad(i, f(8u));
    var p = PARAM[i];
    p -= lr * f(5u) * p;
    let m = b1 * S1[i] + (1.0 - b1) * g;
    let v = b2 * S2[i] + (1.0 - b2) * g * g;
    S1[i] = m;
    S2[i] = v;
    PARAM[i] = p - lr * (m / f(6u)) / (sqrt(v / f(7u)) + f(4u));
}

// P = [n, lr, momentum, wd, max_norm]
@compute @workgroup_size(WG)
fn sgd_main(inv: Invocation) {
    let i = flat(inv);
    if (i >= P[0] || !guard_ok()) { return; }
    let p = PARAM[i];
    let g = clipped_grad(i, f(4u)) + f(3u) * p;
    let b = f(2u) * S1[i] + g;
    S1[i] = b;
    PARAM[i] = p - f(1u) * b;
}

// P = [n, max_norm]
@compute @workgroup_size(WG)
fn clip_main(inv: Invocation) {
    let i = flat(inv);
    if (i >= P[0]) { return; }
    let coef = min(1.0, f(1u) / (sqrt(GRAD[0]) + 1e-6));
    PARAM[i] = PARAM[i] * coef;
}
