// Rotary position embedding in transformers' rotate-half form over x (..., T, D), one thread per element; row t
// of x takes row p = pos + t of the tables (a KV cache's new tokens start at pos), h = D / 2:
//   forward_main: out[t, d] = x[d] * cos[p, d] + (d < h ? -x[d + h] : x[d - h]) * sin[p, d]
//   inverse_main: the transposed rotation, the forward's backward (a rotation by -theta where the tables' halves
//                 are equal, as Llama's are):
//                 out[t, d] = x[d] * cos[p, d] + (d < h ? x[d + h] * sin[p, d + h] : -x[d - h] * sin[p, d - h])
// Bindings: P = [n, T, D, pos], X, COS, SIN (P, D) row-major, OUT.

#include flat
// (select picks the partner's index: the other branch's u32 may wrap, but is never read)

@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> COS: array<f32>;
@group(0) @binding(3) var<storage, read> SIN: array<f32>;
@group(0) @binding(4) var<storage, read_write> OUT: array<f32>;

@compute @workgroup_size(WG)
fn forward_main(inv: Invocation) {
    let i = flat(inv);
    if (i >= P[0]) { return; }
    let D = P[2];
    let h = D / 2u;
    let d = i % D;
    let row = ((i / D) % P[1] + P[3]) * D;
    let low = d < h;
    let sign = select(1.0, -1.0, low);
    OUT[i] = X[i] * COS[row + d] + sign * X[select(i - h, i + h, low)] * SIN[row + d];
}

@compute @workgroup_size(WG)
fn inverse_main(inv: Invocation) {
    let i = flat(inv);
    if (i >= P[0]) { return; }
    let D = P[2];
    let h = D / 2u;
    let d = i % D;
    let row = ((i / D) % P[1] + P[3]) * D;
    let low = d < h;
    let sign = select(1.0, -1.0, low);
    OUT[i] = X[i] * COS[row + d] - sign * X[select(i - h, i + h, low)] * SIN[row + select(d - h, d + h, low)];
}
