// Batched matrix product for shapes that fill whole tiles: M and N multiples of 64, K (or the split-K chunk)
// a multiple of 16, every row a whole number of vec4s. Same contract as matmul.wgsl (16 x 16 threads, TK = 16,
// split-K through workgroup z), but the operands are bound as vec4 arrays: each thread stages 16-byte loads,
// with no bounds checks at all. Entry points by layout (the contiguous axis decides how a tile is staged):
//   nn: A (M, K) rows along k, B (K, N) rows along n.  Ar[m][k / 4], Bs[k][n / 4]; outer products.
//   tn: A (K, M) rows along m, B (K, N).               As[k][m / 4], Bs[k][n / 4]; outer products.
// nn, tn: 64 x 64 tiles, 4 x 4 outputs per thread. nn128, tn128 (M a multiple of 128): 128 x 64 tiles, 8 x 4
// outputs per thread: half the shared-memory reads of B per multiply-add, 8-17% faster on the H200 on every
// model shape measured. nn_wide, tn_wide (M and N multiples of 128, at the end of this file): 128 x 128 tiles,
// 8 x 8 per thread, for products with enough tiles (benchmarks/matmul_variants.py; prefetching the next tile
// into registers was no faster there). The backend compiles these without naga's index clamps, which is what
// made the 8 x 8 tiles pay (they ran slower than 8 x 4 with the clamps).
// (A B-transposed entry with both tiles along k and 4-wide dot products measured 6.9 TFLOP/s on the H200 against
// 17.6 for matmul.wgsl's main_rows, so transposed B stays there.)
// One function per tiling, narrow (narrow4, narrow8) and wide, takes the layout as constant flags; the entry
// points are a call each. Every multiply-add is a statement of its own with constant indices (acc[0] += a0.x * b0;
// acc[0] += a0.y * b1; ..., written out by #unroll, lab/engine/kernels.py): written as one sum of four products
// added to c, it compiles to a multiply, three FMAs and an add, five ops for four (nn128 on the H200:
// 32.1 TFLOP/s that way, 35.8 this way).
// Bindings: @binding(0) P = [M, N, K, outer_a, outer_b, outer_c, batch, kc, has_bias, triangle, gelu, lda, ldb,
// ldc, heads, inner_a, inner_b, inner_c, offset_a, offset_b, offset_c, split_c] (all in floats, multiples of 4),
// @binding(1) A, @binding(2) B, @binding(3) C, @binding(4) BIAS (N,): with has_bias, added to every row as the tile
// is stored (a Linear layer's bias, without a pass of its own), @binding(5) PRE: with gelu, the product (+ bias)
// before the activation (see put); P[22]: B's column sums wanted too (SUMS, see put_sums): 1, into C after each
// split chunk's product, 2 (no split) into PRE. Dispatch: (N / 64, M / 64, batch * S).
// Operand X's matrix of batch b starts at offset_x + (b / heads) outer_x + (b % heads) inner_x, its rows ld_x
// apart (split-K chunk s of C adds s split_c): plain stacks (heads 1, ld the row's length) and attention's
// per-head matrices read and written in place inside the (B, T, 3C) and (B, T, C) activations (heads H, ld the
// row width, inner the head's width), which saves the copies that split and merge the heads.

{{ENABLE}}
const TN: u32 = 64u;
const TK: u32 = 16u;

// A and B as stored: vec4<f32>, or vec4<f16> for the f16-storage products (ENABLE `enable f16;`, on devices with
// shader-f16): read through a(), b(), which widen to f32 as they load, so tiles, products and sums stay f32.
@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> A: array<vec4<{{A_ELEM}}>>;
@group(0) @binding(2) var<storage, read> B: array<vec4<{{B_ELEM}}>>;
@group(0) @binding(3) var<storage, read_write> C: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> BIAS: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> PRE: array<vec4<f32>>;

#include activation

fn a_at(i: u32) -> vec4<f32> { return vec4<f32>(A[i]); }
fn b_at(i: u32) -> vec4<f32> { return vec4<f32>(B[i]); }

var<workgroup> Ta: array<vec4<f32>, 512>;
var<workgroup> Tb: array<vec4<f32>, 512>;   // (the wide kernels double-buffer 256)
// A thread's outputs: every index into acc is a constant (#unroll), so acc lives in registers.
var<private> acc: array<vec4<f32>, 16>;

// SUMS (B (K, N) as stored, batch 1): the product also gives B's column sums, a Linear layer's bias gradient
// (the output gradient's rows summed) beside its weight gradient A^T B, from the tiles of B the product stages
// anyway instead of a reduction pass of its own. Each thread adds up the vec4 of B it loads each step; after the
// loop the first row tile's workgroups (m0 = 0) sum those over the tile's rows of k (put_sums, a fixed order).
// A split product's chunks each store their partial sums as row M of their chunk of C, so the pass that sums the
// chunks sums both. The other pipelines compile without any of it (a constant).
const SUMS: bool = {{SUMS}};
var<private> sums: vec4<f32>;

// cols4: vec4s per row of B's staged tile (16 for the 64-wide tiles, 32 for the 128-wide), 256 / cols4 rows.
fn put_sums(t: Tile, lid: u32, cols4: u32) {
    Tb[lid] = sums;
    workgroupBarrier();
    if (lid < cols4) {
        var s = vec4<f32>(0.0);
        for (var r = 0u; r < 256u / cols4; r++) { s += Tb[r * cols4 + lid]; }
        if (P[22] == 2u) {
            PRE[t.n0 / 4u + lid] = s;
        } else {
            C[t.c + t.M * t.ldc + t.n0 / 4u + lid] = s;
        }
    }
}

struct Tile { M: u32, N: u32, K: u32, a: u32, b: u32, c: u32, k_begin: u32, k_end: u32, m0: u32, n0: u32,
              lda: u32, ldb: u32, ldc: u32 }   // a, b, c, ld*: in vec4s

// Causal attention's products skip the work a triangle makes zero (triangle, P[9]; square products, tiles of
// whole TK steps): 1, only C's lower triangle is wanted: tiles wholly above the diagonal are stored as zeros;
// 2, A (M, K) is lower triangular: row m sums k <= m only; 3, A stored (K, M) is lower triangular: column m of
// it (row m of the product) sums k >= m only.
fn tile(wid: vec3<u32>, tm: u32) -> Tile {
    return tile_of(wid, tm, TN);
}

fn tile_of(wid: vec3<u32>, tm: u32, tn: u32) -> Tile {
    let batch = wid.z % P[6];
    let m0 = wid.y * tm;
    let n0 = wid.x * tn;
    var k_begin = (wid.z / P[6]) * P[7];
    var k_end = min(P[2], k_begin + P[7]);
    let triangle = P[9];
    if (triangle == 1u && n0 >= m0 + tm) { k_end = k_begin; }
    if (triangle == 2u) { k_end = min(k_end, m0 + tm); }
    if (triangle == 3u) { k_begin = max(k_begin, m0); }
    let outer = batch / P[14];
    let inner = batch % P[14];
    let a = P[18] + outer * P[3] + inner * P[15];
    let b = P[19] + outer * P[4] + inner * P[16];
    let c = P[20] + outer * P[5] + inner * P[17] + (wid.z / P[6]) * P[21];
    return Tile(P[0], P[1], P[2], a / 4u, b / 4u, c / 4u, k_begin, k_end, m0, n0, P[11] / 4u, P[12] / 4u, P[13] / 4u);
}

// The bias to add to columns n0 + 4 tx .. + 3 (zero without one).
fn bias(t: Tile, tx: u32) -> vec4<f32> {
    if (P[8] != 0u) { return BIAS[t.n0 / 4u + tx]; }
    return vec4<f32>(0.0);
}

// GELU_GRAD: C gets v * gelu'(PRE), PRE read: the gradient of an MLP's hidden pre-activation taken as the
// product g W^T that makes it is stored, instead of a gelu_bwd pass over it (a constant: the other pipelines carry
// none of it; the bare tanh as in u_gelu, see activation.wgsl).
const GELU_GRAD: bool = {{GELU_GRAD}};

fn gelu_grad(x: vec4<f32>) -> vec4<f32> {
    let t = vec4<f32>(tanh_clamped(SQRT_2_OVER_PI * (x.x + GELU_C * x.x * x.x * x.x)),
                      tanh_clamped(SQRT_2_OVER_PI * (x.y + GELU_C * x.y * x.y * x.y)),
                      tanh_clamped(SQRT_2_OVER_PI * (x.z + GELU_C * x.z * x.z * x.z)),
                      tanh_clamped(SQRT_2_OVER_PI * (x.w + GELU_C * x.w * x.w * x.w)));
    let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x);
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du;
}

// C row `row`, columns n0 + 4 tx .. + 3. With the GELU epilogue (P[10] = 1) C gets gelu(v) and PRE gets v (the
// backward's input): an MLP's first layer without a pass of its own for the activation.
fn put(t: Tile, row: u32, tx: u32, v: vec4<f32>) {
    let i = t.c + row * t.ldc + t.n0 / 4u + tx;
    if (GELU_GRAD) {
        C[i] = v * gelu_grad(PRE[i]);
    } else if (P[10] == 1u) {
        PRE[i] = v;
        C[i] = vec4<f32>(u_gelu(v.x), u_gelu(v.y), u_gelu(v.z), u_gelu(v.w));
    } else {
        C[i] = v;
    }
}

// The narrow tiles, 16 R x 64 (R = 4: nn, tn; R = 8: nn128, tn128), TK = 16, R rows x 4 columns per thread (rows
// m0 + R ty .. + R - 1 in acc[0 .. R - 1], columns n0 + 4 tx .. + 3). a_along_k: A stored (M, K), staged along its
// rows (Ta[m * 4 + q] = A(m0 + m, k0 + 4 q .. + 3)), each row's k in steps of four against Tb's rows k .. k + 3;
// else A stored (K, M), staged as it stands (Ta[k * 4 R + i] = A(k0 + k, m0 + 4 i .. + 3)). Tb[k * 16 + j] =
// B(k0 + k, n0 + 4 j .. + 3). A's tile takes R / 4 loads per thread, 256 vec4s apart. Each entry point passes a
// constant a_along_k, so the compiler drops the untaken branch.
#unroll R in 4 8
fn narrow$R(wid: vec3<u32>, lid: u32, a_along_k: bool) {
    let t = tile(wid, 16u * ${R}u);
    let tx = lid % 16u;
    let ty = lid / 16u;
    #unroll r < $R
    acc[$r] = vec4<f32>(0.0);
    #end
    var ia = t.a + (lid / (4u * ${R}u)) * t.lda + t.m0 / 4u + lid % (4u * ${R}u);  // k rows lid / 4 R (+ 64 / R)
    if (a_along_k) { ia = t.a + (t.m0 + lid / 4u) * t.lda + lid % 4u; }        // rows lid / 4 (+ 64)
    let ib = t.b + (lid / 16u) * t.ldb + t.n0 / 4u + lid % 16u;
    for (var k0 = t.k_begin; k0 < t.k_end; k0 += TK) {
        #unroll j < $R / 4
        Ta[lid + 256u * ${j}u] = a_at(ia + select((k0 + 64u * ${j}u / ${R}u) * t.lda, 64u * ${j}u * t.lda + k0 / 4u,
                                                  a_along_k));
        #end
        let bv = b_at(ib + k0 * t.ldb);
        Tb[lid] = bv;
        if (SUMS) { sums += bv; }
        workgroupBarrier();
        if (a_along_k) {
            for (var q = 0u; q < 4u; q++) {
                let b0 = Tb[(4u * q) * 16u + tx];
                let b1 = Tb[(4u * q + 1u) * 16u + tx];
                let b2 = Tb[(4u * q + 2u) * 16u + tx];
                let b3 = Tb[(4u * q + 3u) * 16u + tx];
                #unroll r < $R
                let a$r = Ta[(${R}u * ty + ${r}u) * 4u + q];
                acc[$r] += a$r.x * b0;
                acc[$r] += a$r.y * b1;
                acc[$r] += a$r.z * b2;
                acc[$r] += a$r.w * b3;
                #end
            }
        } else {
            for (var k = 0u; k < TK; k++) {
                let b = Tb[k * 16u + tx];
                #unroll i < $R / 4
                let a$i = Ta[k * 4u * ${R}u + ${R}u / 4u * ty + ${i}u];
                acc[4 * $i] += a$i.x * b;
                acc[4 * $i + 1] += a$i.y * b;
                acc[4 * $i + 2] += a$i.z * b;
                acc[4 * $i + 3] += a$i.w * b;
                #end
            }
        }
        workgroupBarrier();
    }
    let b = bias(t, tx);
    #unroll r < $R
    put(t, t.m0 + ${R}u * ty + ${r}u, tx, acc[$r] + b);
    #end
    if (SUMS && t.m0 == 0u) { put_sums(t, lid, 16u); }
}
#end

@compute @workgroup_size(256)
fn nn(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    narrow4(wid, lid, true);
}

@compute @workgroup_size(256)
fn tn(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    narrow4(wid, lid, false);
}

@compute @workgroup_size(256)
fn nn128(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    narrow8(wid, lid, true);
}

@compute @workgroup_size(256)
fn tn128(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    narrow8(wid, lid, false);
}

// 128 x 128 tiles, 8 x 8 outputs per thread, TK = 8 (nn_wide, tn_wide; M and N multiples of 128): a quarter of
// the shared-memory reads per multiply-add of the 64 x 64 tiles. Both stage A's tile as (k, m) (nn transposes
// it as it stores it), so both run one inner loop (wide_step) of 16 multiply-adds per three shared-memory
// reads. The tiles are double-buffered: the next tile's global loads are issued before the current tile's
// arithmetic and stored into the other half after it, one barrier per step. On the H200: 47.2 TFLOP/s for nn
// and 48.3 for tn at 4096 (32.1 and 37.3 with the 128 x 64 tiles); 42-48 on the model's shapes.
// A thread's rows are 4 ty .. + 3 and 64 + 4 ty .. + 3 (wide_row), its columns 4 tx .. + 3 and 64 + 4 tx .. + 3:
// the halves keep a warp's shared-memory reads on distinct banks. acc[2 i], acc[2 i + 1]: row i's two column
// vec4s.
const TKW: u32 = 8u;

fn wide_row(ty: u32, i: u32) -> u32 {
    return select(4u * ty + i, 60u + 4u * ty + i, i >= 4u);
}

fn wide_store(t: Tile, tx: u32, ty: u32) {
    var b0 = vec4<f32>(0.0);
    var b1 = vec4<f32>(0.0);
    if (P[8] != 0u) {
        b0 = BIAS[t.n0 / 4u + tx];
        b1 = BIAS[t.n0 / 4u + 16u + tx];
    }
    if (GELU_GRAD) {
        // unrolled by the template: left a loop, NVIDIA's compiler keeps it one once this long epilogue is in it,
        // and acc indexed by the loop variable then lives in local memory (nt_wide ran 19x slower on the H200).
        // The other epilogues stay a loop: unrolled, they made every wide product about 35% slower there
        #unroll i < 8
        put(t, t.m0 + wide_row(ty, ${i}u), tx, acc[2 * $i] + b0);
        put(t, t.m0 + wide_row(ty, ${i}u), tx + 16u, acc[2 * $i + 1] + b1);
        #end
        return;
    }
    for (var i = 0u; i < 8u; i++) {
        let row = t.m0 + wide_row(ty, i);
        put(t, row, tx, acc[2u * i] + b0);
        put(t, row, tx + 16u, acc[2u * i + 1u] + b1);
    }
}

// One TKW step from the buffer half at `half`: Ta[half + k * 32 + i] = A(m0 + 4 i .. + 3, k),
// Tb[half + k * 32 + j] = B(k, n0 + 4 j .. + 3).
fn wide_step(half: u32, tx: u32, ty: u32) {
    for (var k = 0u; k < TKW; k++) {
        let lo = Ta[half + k * 32u + ty];
        let hi = Ta[half + k * 32u + 16u + ty];
        let b0 = Tb[half + k * 32u + tx];
        let b1 = Tb[half + k * 32u + 16u + tx];
        #unroll i < 4
        acc[2 * $i] += lo[$i] * b0;
        acc[2 * $i + 1] += lo[$i] * b1;
        #end
        #unroll i < 4
        acc[8 + 2 * $i] += hi[$i] * b0;
        acc[9 + 2 * $i] += hi[$i] * b1;
        #end
    }
}

// Staging: an operand stored with k contiguous (A (M, K), or B stored transposed as (N, K)) is loaded by thread
// lid as the vec4 (row o0 + lid / 2, k0 + 4 (lid % 2) .. + 3) and stored down column lid / 2 of its (k, m|n)
// tile; one stored with m|n contiguous (A stored (K, M), B (K, N)) as the vec4 (k0 + lid / 32, o0 + 4 (lid % 32)
// .. + 3), which is a vec4 of the tile as it stands.
fn wide_start(base: u32, along_k: bool, stride4: u32, o0: u32, lid: u32) -> u32 {
    if (along_k) { return base + (o0 + lid / 2u) * stride4 + lid % 2u; }
    return base + (lid / 32u) * stride4 + o0 / 4u + lid % 32u;
}

fn wide_offset(along_k: bool, stride4: u32, k0: u32) -> u32 {
    return select(k0 * stride4, k0 / 4u, along_k);
}

fn wide_stage(is_a: bool, along_k: bool, half: u32, lid: u32, v: vec4<f32>) {
    if (along_k) {
        let o = lid / 2u;
        let at = half + 4u * (lid % 2u) * 32u + o / 4u;
        if (is_a) {
            Ta[at][o % 4u] = v.x;
            Ta[at + 32u][o % 4u] = v.y;
            Ta[at + 64u][o % 4u] = v.z;
            Ta[at + 96u][o % 4u] = v.w;
        } else {
            Tb[at][o % 4u] = v.x;
            Tb[at + 32u][o % 4u] = v.y;
            Tb[at + 64u][o % 4u] = v.z;
            Tb[at + 96u][o % 4u] = v.w;
        }
    } else if (is_a) {
        Ta[half + lid] = v;
    } else {
        Tb[half + lid] = v;
    }
}

// The whole product of one 128 x 128 tile; a_along_k: A stored (M, K) (else (K, M)); b_along_k: B stored (N, K)
// (else (K, N)). Each entry point passes constants, so the compiler drops the untaken branches.
fn wide(t: Tile, lid: u32, a_along_k: bool, b_along_k: bool) {
    let tx = lid % 16u;
    let ty = lid / 16u;
    let sa = t.lda;
    let sb = t.ldb;
    let ia = wide_start(t.a, a_along_k, sa, t.m0, lid);
    let ib = wide_start(t.b, b_along_k, sb, t.n0, lid);
    for (var i = 0u; i < 16u; i++) { acc[i] = vec4<f32>(0.0); }
    if (t.k_begin < t.k_end) {    // (uniform: the same for the whole workgroup)
        wide_stage(true, a_along_k, 0u, lid, a_at(ia + wide_offset(a_along_k, sa, t.k_begin)));
        let b0 = b_at(ib + wide_offset(b_along_k, sb, t.k_begin));
        wide_stage(false, b_along_k, 0u, lid, b0);
        if (SUMS) { sums = b0; }
    }
    workgroupBarrier();
    var half = 0u;
    for (var k0 = t.k_begin; k0 < t.k_end; k0 += TKW) {
        let more = k0 + TKW < t.k_end;
        var a = vec4<f32>(0.0);
        var b = vec4<f32>(0.0);
        if (more) {
            a = a_at(ia + wide_offset(a_along_k, sa, k0 + TKW));
            b = b_at(ib + wide_offset(b_along_k, sb, k0 + TKW));
        }
        wide_step(half, tx, ty);
        half = 256u - half;
        if (more) {
            wide_stage(true, a_along_k, half, lid, a);
            wide_stage(false, b_along_k, half, lid, b);
            if (SUMS) { sums += b; }
        }
        workgroupBarrier();
    }
    wide_store(t, tx, ty);
    if (SUMS && !b_along_k && t.m0 == 0u) { put_sums(t, lid, 32u); }
}

@compute @workgroup_size(256)
fn nn_wide(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    wide(tile_of(wid, 128u, 128u), lid, true, false);
}

@compute @workgroup_size(256)
fn tn_wide(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    wide(tile_of(wid, 128u, 128u), lid, false, false);
}

@compute @workgroup_size(256)
fn nt_wide(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    wide(tile_of(wid, 128u, 128u), lid, true, true);
}

@compute @workgroup_size(256)
fn tt_wide(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    wide(tile_of(wid, 128u, 128u), lid, false, true);
}
