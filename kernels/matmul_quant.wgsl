// Products with a quantized frozen weight W (out, in) kept packed on the device (lab/engine/quant.py's layout),
// dequantized as its tile is staged into workgroup memory, so no float copy of W ever exists:
//   forward:  Y (M, out) = X (M, in) @ W^T   (a linear layer's output: B(k, n) = W[n, k], K = in)
//   backward: Y (M, in)  = X (M, out) @ W    (its input gradient:      B(k, n) = W[k, n], K = out)
// KIND ({{KIND}}): 0 q4_0, 1 q4_1: QS (out, nblocks * 4) u32, each block of 32 weights along `in` four words whose
// byte j holds element j in its low nibble and j + 16 in its high one; DM (out, nblocks): unpack2x16float gives
// (d, m), value d q + m (q4_1) or d (q - 8) (q4_0). 2 int8: QS (out, ceil(in / 4)), element k the signed byte k % 4
// of word k / 4; DM (out,) the float32 scale's bits, value scale q.
// Tiles: 64 x 64 of Y per workgroup of 16 x 16 threads (4 x 4 outputs each), TK = 32 along K: one q4 block per
// column of a forward tile, two per row of a backward tile, so each thread stages whole words. Every staged
// element is bounds-checked (M, in, out need not be multiples of the block, of 4 or of the tile: the tail block's
// padding is never read), the inner loop is not.
// Split-K (few tiles: a short batch, generation's single row): workgroup z sums K's chunk z, kc long (a multiple
// of TK), into Y + z M cols; the host sums the slices.
// Bindings: @binding(0) P = [M, in, out, kc, first tile column, first tile row], @binding(1) X, @binding(2) QS,
// @binding(3) DM, @binding(4) Y. Dispatch: (ceil(cols of Y / 64), ceil(M / 64), S), or a part of it from the tile
// (P[4], P[5]) where the grid would exceed the device's workgroups per dimension.

const KIND: u32 = {{KIND}}u;
const TK: u32 = 32u;

@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> QS: array<u32>;
@group(0) @binding(3) var<storage, read> DM: array<u32>;
@group(0) @binding(4) var<storage, read_write> Y: array<f32>;

var<workgroup> Ta: array<vec4<f32>, 512>;   // [m][k / 4]: Ta[m * 8 + q] = X(m0 + m, k0 + 4 q .. + 3)
var<workgroup> Tb: array<vec4<f32>, 512>;   // [k][n / 4]: Tb[k * 16 + j] = B(k0 + k, n0 + 4 j .. + 3)

fn row_words(n_in: u32) -> u32 {
    if (KIND == 2u) { return (n_in + 3u) / 4u; }
    return (n_in + 31u) / 32u * 4u;
}

// (d, m) of block b of row o, value d q + m. For q4_0 m = -8 d: d is a float16 and q < 16, so d q and d q - 8 d
// are exact in float32 and the value equals d (q - 8) as the host computes it.
fn block_dm(o: u32, b: u32, n_in: u32) -> vec2<f32> {
    let v = unpack2x16float(DM[o * ((n_in + 31u) / 32u) + b]);
    if (KIND == 0u) { return vec2<f32>(v.x, -8.0 * v.x); }
    return v;
}

// The four weights of word `w` of row o whose first element is `e` (four elements from e; e + 16 .. + 19 for the
// high nibbles with hi): zeros at and beyond n_in.
fn q4_vals(w: u32, hi: bool, e: u32, dm: vec2<f32>, n_in: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    let shift = select(0u, 4u, hi);
    for (var b = 0u; b < 4u; b++) {
        if (e + b < n_in) { v[b] = dm.x * f32(extractBits(w, 8u * b + shift, 4u)) + dm.y; }
    }
    return v;
}

fn i8_vals(w: u32, scale: f32, e: u32, n_in: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var b = 0u; b < 4u; b++) {
        if (e + b < n_in) { v[b] = scale * f32(extractBits(bitcast<i32>(w), 8u * b, 8u)); }
    }
    return v;
}

// B(k, n) = W[n, k]: thread lid stages column n = lid / 4 of the tile, part p = lid % 4 of its 32 k.
fn stage_forward(n0: u32, k0: u32, lid: u32, n_in: u32, n_out: u32) {
    let n = lid / 4u;
    let p = lid % 4u;
    let o = n0 + n;
    var lo = vec4<f32>(0.0);   // q4: k0 + 4 p .. + 3, int8: k0 + 8 p .. + 3
    var hi = vec4<f32>(0.0);   // q4: k0 + 16 + 4 p .. + 3, int8: k0 + 8 p + 4 .. + 7
    if (o < n_out) {
        let row = o * row_words(n_in);
        if (KIND == 2u) {
            let scale = bitcast<f32>(DM[o]);
            let e = k0 + 8u * p;
            if (e < n_in) { lo = i8_vals(QS[row + e / 4u], scale, e, n_in); }
            if (e + 4u < n_in) { hi = i8_vals(QS[row + e / 4u + 1u], scale, e + 4u, n_in); }
        } else {
            let blk = k0 / 32u;
            let dm = block_dm(o, blk, n_in);
            let w = QS[row + blk * 4u + p];
            lo = q4_vals(w, false, k0 + 4u * p, dm, n_in);
            hi = q4_vals(w, true, k0 + 16u + 4u * p, dm, n_in);
        }
    }
    let first = select(4u * p, 8u * p, KIND == 2u);
    let second = select(16u + 4u * p, 8u * p + 4u, KIND == 2u);
    let j = n / 4u;
    let c = n % 4u;
    for (var b = 0u; b < 4u; b++) {
        Tb[(first + b) * 16u + j][c] = lo[b];
        Tb[(second + b) * 16u + j][c] = hi[b];
    }
}

// B(k, n) = W[k, n]: thread lid stages row r = lid / 8 of the tile (W's row k0 + r), eight of its 64 columns:
// q4: word p = lid % 4 of block (lid % 8) / 4 (columns 32 h + 4 p .. + 3 and 32 h + 16 + 4 p .. + 3);
// int8: words 2 (lid % 8) and + 1 (columns 8 (lid % 8) .. + 7).
fn stage_backward(n0: u32, k0: u32, lid: u32, n_in: u32, n_out: u32) {
    let r = lid / 8u;
    let s = lid % 8u;
    let o = k0 + r;
    var lo = vec4<f32>(0.0);
    var hi = vec4<f32>(0.0);
    var j_lo = 2u * s;
    var j_hi = 2u * s + 1u;
    if (KIND != 2u) {
        j_lo = 8u * (s / 4u) + s % 4u;
        j_hi = j_lo + 4u;
    }
    if (o < n_out) {
        let row = o * row_words(n_in);
        if (KIND == 2u) {
            let scale = bitcast<f32>(DM[o]);
            let e = n0 + 8u * s;
            if (e < n_in) { lo = i8_vals(QS[row + e / 4u], scale, e, n_in); }
            if (e + 4u < n_in) { hi = i8_vals(QS[row + e / 4u + 1u], scale, e + 4u, n_in); }
        } else {
            let e = n0 + 32u * (s / 4u);   // the block's first column
            if (e < n_in) {
                let blk = e / 32u;
                let dm = block_dm(o, blk, n_in);
                let w = QS[row + blk * 4u + s % 4u];
                lo = q4_vals(w, false, e + 4u * (s % 4u), dm, n_in);
                hi = q4_vals(w, true, e + 16u + 4u * (s % 4u), dm, n_in);
            }
        }
    }
    Tb[r * 16u + j_lo] = lo;
    Tb[r * 16u + j_hi] = hi;
}

// X's tile: thread lid stages row lid / 4, columns k0 + 8 (lid % 4) .. + 7 (zeros beyond M or K).
fn stage_x(m0: u32, k0: u32, lid: u32, M: u32, K: u32) {
    let m = m0 + lid / 4u;
    let k = k0 + 8u * (lid % 4u);
    var v = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    if (m < M) {
        for (var i = 0u; i < 8u; i++) {
            if (k + i < K) { v[i] = X[m * K + k + i]; }
        }
    }
    Ta[lid * 2u] = vec4<f32>(v[0], v[1], v[2], v[3]);
    Ta[lid * 2u + 1u] = vec4<f32>(v[4], v[5], v[6], v[7]);
}

fn product(wid: vec3<u32>, lid: u32, backward: bool) {
    let M = P[0];
    let n_in = P[1];
    let n_out = P[2];
    let K = select(n_in, n_out, backward);
    let NC = select(n_out, n_in, backward);
    let m0 = (wid.y + P[5]) * 64u;
    let n0 = (wid.x + P[4]) * 64u;
    let tx = lid % 16u;
    let ty = lid / 16u;
    let k_begin = wid.z * P[3];
    let k_end = min(K, k_begin + P[3]);
    var acc = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    for (var k0 = k_begin; k0 < k_end; k0 += TK) {
        stage_x(m0, k0, lid, M, K);
        if (backward) { stage_backward(n0, k0, lid, n_in, n_out); } else { stage_forward(n0, k0, lid, n_in, n_out); }
        workgroupBarrier();
        for (var q = 0u; q < 8u; q++) {
            let b0 = Tb[(4u * q) * 16u + tx];
            let b1 = Tb[(4u * q + 1u) * 16u + tx];
            let b2 = Tb[(4u * q + 2u) * 16u + tx];
            let b3 = Tb[(4u * q + 3u) * 16u + tx];
            // (one multiply-add a statement, constant indices: FMAs into registers, as in matmul_aligned.wgsl)
            #unroll r < 4
            let a$r = Ta[(4u * ty + ${r}u) * 8u + q];
            acc[$r] += a$r.x * b0;
            acc[$r] += a$r.y * b1;
            acc[$r] += a$r.z * b2;
            acc[$r] += a$r.w * b3;
            #end
        }
        workgroupBarrier();
    }
    let col = n0 + 4u * tx;
    let base = wid.z * M * NC;
    for (var r = 0u; r < 4u; r++) {
        let row = m0 + 4u * ty + r;
        if (row >= M) { break; }
        for (var c = 0u; c < 4u; c++) {
            if (col + c < NC) { Y[base + row * NC + col + c] = acc[r][c]; }
        }
    }
}

@compute @workgroup_size(256)
fn forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    product(wid, lid, false);
}

@compute @workgroup_size(256)
fn backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    product(wid, lid, true);
}
