// Rotary position embedding in transformers' rotate-half form, one thread per element of x seen as (B, H, T, D);
// row t takes row p = pos + t of the tables (a KV cache's new tokens start at pos), h = D / 2:
//   forward_main: out[t, d] = x[d] * cos[p, d] + (d < h ? -x[d + h] : x[d - h]) * sin[p, d]
//   inverse_main: the transposed rotation, the forward's backward (a rotation by -theta where the tables' halves
//                 are equal, as Llama's are):
//                 out[t, d] = x[d] * cos[p, d] + (d < h ? x[d + h] * sin[p, d + h] : -x[d - h] * sin[p, d - h])
// Layouts (P[5]): 0, x and out (..., T, D) alike (H = 1); 1, x is the packed projection (B, T, H * D) and out
// its heads (B, H, T, D): the head split's copy done in the same pass; 2, the reverse (the backward of 1).
// Bindings: P = [n, T, D, pos, H, layout], X, COS, SIN (P, D) row-major, OUT.

#include flat

@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> COS: array<f32>;
@group(0) @binding(3) var<storage, read> SIN: array<f32>;
@group(0) @binding(4) var<storage, read_write> OUT: array<f32>;

struct Element { src: u32, dst: u32, row: u32, d: u32, low: bool }

// Element e of the (B, H, T, D) view: where it is read and written, its table row and column, its half.
fn element(e: u32) -> Element {
    let T = P[1];
    let D = P[2];
    let H = P[4];
    let d = e % D;
    let t = (e / D) % T;
    let bh = e / (D * T);
    let packed = ((bh / H * T + t) * H + bh % H) * D + d;
    let src = select(e, packed, P[5] == 1u);
    let dst = select(e, packed, P[5] == 2u);
    return Element(src, dst, (t + P[3]) * D, d, d < D / 2u);
}

// x's partner in the rotation (select picks the index: the other branch's u32 may wrap, but is never read)
fn partner(el: Element) -> f32 {
    let h = P[2] / 2u;
    return X[select(el.src - h, el.src + h, el.low)];
}

@compute @workgroup_size(WG)
fn forward_main(inv: Invocation) {
    let e = flat(inv);
    if (e >= P[0]) { return; }
    let el = element(e);
    let sign = select(1.0, -1.0, el.low);
    OUT[el.dst] = X[el.src] * COS[el.row + el.d] + sign * partner(el) * SIN[el.row + el.d];
}

@compute @workgroup_size(WG)
fn inverse_main(inv: Invocation) {
    let e = flat(inv);
    if (e >= P[0]) { return; }
    let el = element(e);
    let h = P[2] / 2u;
    let sign = select(1.0, -1.0, el.low);
    OUT[el.dst] = X[el.src] * COS[el.row + el.d] - sign * partner(el) * SIN[el.row + select(el.d - h, el.d + h, el.low)];
}
