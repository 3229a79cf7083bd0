// Strided copies and fills: the data movement behind transpose/permute, slicing, concat and their backwards.
//   copy_main: DST[dst_off + sum_k c_k * dst_stride_k] = SRC[src_off + sum_k c_k * src_stride_k]
//              for every coordinate c of `shape` (row-major enumeration).
//   fill_main: DST[i] = value for i < n.
//   pad_main:  DST (batch, R, C) = SRC (batch, r, c) in its top-left corner, zeros elsewhere (one pass: a
//              ragged matmul operand made whole tiles).
// Bindings: @binding(0) P, @binding(1) SRC (copy only), @binding(2) DST.
// Params: copy: [n, ndim, src_off, dst_off, shape[MAXDIM], src_stride[MAXDIM], dst_stride[MAXDIM]];
//         fill: [n, value bits]; pad: [n (= batch R C), R, C, r, c].
// Works on 32-bit words, so it moves int32 tensors too.

#include flat
const MAXDIM: u32 = 6u;

@group(0) @binding(1) var<storage, read> SRC: array<u32>;
@group(0) @binding(2) var<storage, read_write> DST: array<u32>;

@compute @workgroup_size(WG)
fn copy_main(inv: Invocation) {
    let i = flat(inv);
    if (i >= P[0]) { return; }
    let ndim = P[1];
    var rem = i;
    var si = P[2];
    var di = P[3];
    for (var d = 0u; d < ndim; d++) {
        let k = ndim - 1u - d;
        let size = P[4u + k];
        let coord = rem % size;
        rem = rem / size;
        si += coord * P[4u + MAXDIM + k];
        di += coord * P[4u + 2u * MAXDIM + k];
    }
    DST[di] = SRC[si];
}

@compute @workgroup_size(WG)
fn pad_main(inv: Invocation) {
    let i = flat(inv);
    if (i >= P[0]) { return; }
    let R = P[1];
    let C = P[2];
    let r = P[3];
    let c = P[4];
    let b = i / (R * C);
    let row = (i / C) % R;
    let col = i % C;
    var v = 0u;
    if (row < r && col < c) { v = SRC[(b * r + row) * c + col]; }
    DST[i] = v;
}

@compute @workgroup_size(WG)
fn fill_main(inv: Invocation) {
    let i = flat(inv);
    if (i >= P[0]) { return; }
    DST[i] = P[1];
}
