// Fused causal self-attention, flash-attention style (Dao et al., 2022): the (T, T) weights never reach memory.
// Heads of D = 64 are read straight from the packed projection qkv (B, T, 3C) (q, k, v side by side, as GPT-2's
// c_attn makes it) and written straight to y (B, T, C) and dqkv (B, T, 3C): no head split or merge copies.
//   fwd_main:    y = dropout(softmax(scale q k^T, causal)) v, an online softmax over blocks of 32 keys, for a
//                block of 16 queries; also LSE[bh, t], the row's log-sum-exp of scaled scores, from which the
//                backward recomputes the weights.
//   bwd_kv_main: for a block of 32 keys, over the blocks of 16 queries that see them: dv += Pd^T dy and
//                dk += scale dS^T q.
//   bwd_q_main:  for a block of 16 queries, over the key blocks they see: dq += scale dS k.
//   delta_main:  DR[b, t, h] = sum_d dy y, one thread per (b, t, h) (OUT is y here), before the two above.
//   (P the weights, Pd after dropout, dS = P (dP - DR).)
// Dropout (P[6] = 1) keeps weight (t, s) of head bh as dropout.wgsl keeps element bh T T + t T + s of the
// (B H, T, T) weights: the same decisions as the unfused path, re-derived in the backward from the seed.
// Bindings: P = [B, T, H, C, scale bits, seed, has_dropout, p bits, 1/(1-p) bits], @binding(1) QKV, @binding(2) G
// (dy, (B, T, C)), @binding(3) LSE (B H, T), @binding(4) DR (B, T, H), @binding(5) OUT (y, or dqkv).
// T a multiple of 32. 128 threads, ty = lid / 16, tx = lid % 16. A 16 x 32 score block is held as queries
// 2 ty + e (e < 2) by keys tx + 16 f (f < 2), four scores a thread; a 16 x 64 output block (y, dq) as queries
// 2 ty + e by the vec4 tx of the head row; bwd_kv's 32 x 64 blocks (dk, dv) as keys 4 ty + e (e < 4) by vec4 tx.
// Workgroup memory stays under 32 KiB (lavapipe's limit; the H200's is 48).

const BQ: u32 = 16u;     // queries per block
const BK: u32 = 32u;     // keys per block
const D4: u32 = 16u;     // vec4s per head row (D = 64)
const PAD: u32 = 17u;    // row stride of Ks, Vs in vec4s: lanes reading rows tx, tx + 1, ... hit distinct banks
const NEG: f32 = -1e30;

@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> QKV: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> G: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> LSE: array<f32>;
@group(0) @binding(4) var<storage, read_write> DR: array<f32>;
@group(0) @binding(5) var<storage, read_write> OUT: array<vec4<f32>>;

var<workgroup> Qs: array<vec4<f32>, 256>;   // 16 query rows of q
var<workgroup> Gs: array<vec4<f32>, 256>;   // 16 query rows of dy
var<workgroup> Ks: array<vec4<f32>, 544>;   // 32 key rows of k, stride PAD
var<workgroup> Vs: array<vec4<f32>, 544>;   // 32 key rows of v, stride PAD
var<workgroup> Pw: array<vec2<f32>, 256>;   // fwd: Pd[c * 8 + ty] = (Pd(2 ty, c), Pd(2 ty + 1, c)); bwd_q: dS alike
var<workgroup> Pt: array<vec4<f32>, 128>;   // bwd_kv: Pd^T[q * 8 + c / 4][c % 4] = Pd(q, c)
var<workgroup> St: array<vec4<f32>, 128>;   // bwd_kv: dS^T alike
var<workgroup> red: array<vec4<f32>, 64>;   // [query][tx]: per-thread partials of 16 rows
var<workgroup> Ls: array<f32, 16>;
var<workgroup> Ds: array<f32, 16>;

struct Head { b: u32, h: u32, bh: u32, T: u32, C4: u32, row4: u32 }

fn head(wid: vec3<u32>) -> Head {
    let C4 = P[3] / 4u;
    return Head(wid.y / P[2], wid.y % P[2], wid.y, P[1], C4, 3u * C4);
}

#include dropout_mask

// dropout.wgsl's decision for weight (t, s) of head bh: kept iff u >= p.
fn kept(hd: Head, hashed_seed: u32, t: u32, s: u32) -> bool {
    return keep((hd.bh * hd.T + t) * hd.T + s, hashed_seed, bitcast<f32>(P[7]));
}

// Queries t0 .. t0 + 15 of q into Qs (the backward stages dy, LSE and DR with them: load_queries).
fn stage_queries(hd: Head, t0: u32, lid: u32) {
    for (var n = 0u; n < 2u; n++) {
        let e = lid + 128u * n;
        Qs[e] = QKV[(hd.b * hd.T + t0 + e / D4) * hd.row4 + hd.h * D4 + e % D4];
    }
}

// Keys t0 .. t0 + 31 of k and v into Ks, Vs.
fn stage_keys(hd: Head, t0: u32, lid: u32) {
    store_keys(lid, load_keys(hd, t0, lid));
}

// The loops over blocks fetch the next block into registers before the current block's arithmetic and store
// it into workgroup memory after (load_*, store_*), so its global-memory latency hides behind that arithmetic.
struct KeyRows { k: array<vec4<f32>, 4>, v: array<vec4<f32>, 4> }

fn load_keys(hd: Head, t0: u32, lid: u32) -> KeyRows {
    var out: KeyRows;
    for (var n = 0u; n < 4u; n++) {
        let e = lid + 128u * n;
        let at = (hd.b * hd.T + t0 + e / D4) * hd.row4 + hd.h * D4 + e % D4;
        out.k[n] = QKV[at + hd.C4];
        out.v[n] = QKV[at + 2u * hd.C4];
    }
    return out;
}

fn store_keys(lid: u32, rows: KeyRows) {
    for (var n = 0u; n < 4u; n++) {
        let e = lid + 128u * n;
        Ks[(e / D4) * PAD + e % D4] = rows.k[n];
        Vs[(e / D4) * PAD + e % D4] = rows.v[n];
    }
}

struct QueryRows { q: array<vec4<f32>, 2>, g: array<vec4<f32>, 2>, lse: f32, dr: f32 }

fn load_queries(hd: Head, t0: u32, lid: u32) -> QueryRows {
    var out: QueryRows;
    for (var n = 0u; n < 2u; n++) {
        let e = lid + 128u * n;
        let t = hd.b * hd.T + t0 + e / D4;
        out.q[n] = QKV[t * hd.row4 + hd.h * D4 + e % D4];
        out.g[n] = G[t * hd.C4 + hd.h * D4 + e % D4];
    }
    if (lid < BQ) {
        out.lse = LSE[hd.bh * hd.T + t0 + lid];
        out.dr = DR[(hd.b * hd.T + t0 + lid) * P[2] + hd.h];
    }
    return out;
}

fn store_queries(lid: u32, rows: QueryRows) {
    Qs[lid] = rows.q[0];
    Qs[lid + 128u] = rows.q[1];
    Gs[lid] = rows.g[0];
    Gs[lid + 128u] = rows.g[1];
    if (lid < BQ) {
        Ls[lid] = rows.lse;
        Ds[lid] = rows.dr;
    }
}

// The thread's four dot products of head rows: queries 2 ty + e of Qs (or of Gs) with keys tx + 16 f of Ks (or
// of Vs): [e][f]. With q, k: the scores; with dy, v: the gradient of the dropped weights.
// (Each dot product is kept as four lane sums until the end: dot() per vec4 would compile to a multiply, three
// dependent FMAs and an add.)
fn dots(scores: bool, ty: u32, tx: u32) -> array<vec2<f32>, 2> {
    var a00 = vec4<f32>(0.0);
    var a01 = vec4<f32>(0.0);
    var a10 = vec4<f32>(0.0);
    var a11 = vec4<f32>(0.0);
    for (var d4 = 0u; d4 < D4; d4++) {
        var x0: vec4<f32>;
        var x1: vec4<f32>;
        var y0: vec4<f32>;
        var y1: vec4<f32>;
        if (scores) {
            x0 = Qs[2u * ty * D4 + d4];
            x1 = Qs[(2u * ty + 1u) * D4 + d4];
            y0 = Ks[tx * PAD + d4];
            y1 = Ks[(tx + 16u) * PAD + d4];
        } else {
            x0 = Gs[2u * ty * D4 + d4];
            x1 = Gs[(2u * ty + 1u) * D4 + d4];
            y0 = Vs[tx * PAD + d4];
            y1 = Vs[(tx + 16u) * PAD + d4];
        }
        a00 += x0 * y0;
        a01 += x0 * y1;
        a10 += x1 * y0;
        a11 += x1 * y1;
    }
    let one = vec4<f32>(1.0);
    return array<vec2<f32>, 2>(vec2<f32>(dot(a00, one), dot(a01, one)), vec2<f32>(dot(a10, one), dot(a11, one)));
}

// The 16 partials of query row 2 ty + e (in red) combined: their max, or their sum.
fn row_total(ty: u32, e: u32, is_max: bool) -> f32 {
    let r = 2u * ty + e;
    var acc = red[r * 4u];
    for (var q = 1u; q < 4u; q++) {
        if (is_max) { acc = max(acc, red[r * 4u + q]); } else { acc += red[r * 4u + q]; }
    }
    if (is_max) { return max(max(acc.x, acc.y), max(acc.z, acc.w)); }
    return acc.x + acc.y + acc.z + acc.w;
}

// A score block's values (as dots returns them) into Pw, a column of two queries per key.
fn put_pairs(ty: u32, tx: u32, v: array<vec2<f32>, 2>) {
    Pw[tx * 8u + ty] = vec2<f32>(v[0].x, v[1].x);
    Pw[(tx + 16u) * 8u + ty] = vec2<f32>(v[0].y, v[1].y);
}

// acc0, acc1 (queries 2 ty, 2 ty + 1, vec4 tx of the head row) += Pw's block times the staged rows of v (or k).
fn pairs_times_rows(by_v: bool, ty: u32, tx: u32, acc0: ptr<function, vec4<f32>>, acc1: ptr<function, vec4<f32>>) {
    for (var c = 0u; c < BK; c++) {
        let a = Pw[c * 8u + ty];
        var row: vec4<f32>;
        if (by_v) { row = Vs[c * PAD + tx]; } else { row = Ks[c * PAD + tx]; }
        *acc0 += a.x * row;
        *acc1 += a.y * row;
    }
}

// acc[e] (key 4 ty + e, vec4 tx) += a[e] x: one query's contribution to dk or dv.
fn outer4(acc: ptr<function, array<vec4<f32>, 4>>, a: vec4<f32>, x: vec4<f32>) {
    (*acc)[0] += a.x * x;
    (*acc)[1] += a.y * x;
    (*acc)[2] += a.z * x;
    (*acc)[3] += a.w * x;
}

fn put_partial(ty: u32, tx: u32, e: u32, v: f32) {
    red[(2u * ty + e) * 4u + tx / 4u][tx % 4u] = v;
}

@compute @workgroup_size(128)
fn fwd_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let hd = head(wid);
    let tx = lid % 16u;
    let ty = lid / 16u;
    let i0 = wid.x * BQ;
    let scale = bitcast<f32>(P[4]);
    let drop = P[6] != 0u;
    let hashed_seed = pcg(P[5]);
    let keep_scale = bitcast<f32>(P[8]);
    stage_queries(hd, i0, lid);
    var m = vec2<f32>(NEG);
    var l = vec2<f32>(0.0);
    var o0 = vec4<f32>(0.0);
    var o1 = vec4<f32>(0.0);
    stage_keys(hd, 0u, lid);
    for (var j0 = 0u; j0 < i0 + BQ; j0 += BK) {
        let more = j0 + BK < i0 + BQ;
        var next: KeyRows;
        if (more) { next = load_keys(hd, j0 + BK, lid); }
        workgroupBarrier();
        var s = dots(true, ty, tx);
        for (var e = 0u; e < 2u; e++) {
            let t = i0 + 2u * ty + e;
            s[e] *= scale;
            if (j0 + tx > t) { s[e].x = NEG; }
            if (j0 + tx + 16u > t) { s[e].y = NEG; }
            put_partial(ty, tx, e, max(s[e].x, s[e].y));
        }
        workgroupBarrier();
        var pd = array<vec2<f32>, 2>();
        var alpha = vec2<f32>(0.0);
        for (var e = 0u; e < 2u; e++) {
            let t = i0 + 2u * ty + e;
            let m_new = max(m[e], row_total(ty, e, true));
            alpha[e] = exp(m[e] - m_new);
            let p = exp(s[e] - vec2<f32>(m_new));
            l[e] = l[e] * alpha[e] + p.x + p.y;
            m[e] = m_new;
            pd[e] = p;
            if (drop) {
                pd[e].x = select(0.0, p.x * keep_scale, kept(hd, hashed_seed, t, j0 + tx));
                pd[e].y = select(0.0, p.y * keep_scale, kept(hd, hashed_seed, t, j0 + tx + 16u));
            }
        }
        o0 *= alpha.x;
        o1 *= alpha.y;
        put_pairs(ty, tx, pd);
        workgroupBarrier();
        pairs_times_rows(true, ty, tx, &o0, &o1);
        workgroupBarrier();
        if (more) { store_keys(lid, next); }
    }
    put_partial(ty, tx, 0u, l.x);
    put_partial(ty, tx, 1u, l.y);
    workgroupBarrier();
    let t = hd.b * hd.T + i0 + 2u * ty;
    let total = vec2<f32>(row_total(ty, 0u, false), row_total(ty, 1u, false));
    OUT[t * hd.C4 + hd.h * D4 + tx] = o0 / total.x;
    OUT[(t + 1u) * hd.C4 + hd.h * D4 + tx] = o1 / total.y;
    if (tx == 0u) {
        LSE[hd.bh * hd.T + i0 + 2u * ty] = m.x + log(total.x);
        LSE[hd.bh * hd.T + i0 + 2u * ty + 1u] = m.y + log(total.y);
    }
}

// From the block's scores s and dropped-weight gradients dpd ([e][f]: query i0 + 2 ty + e, key j0 + tx + 16 f):
// the dropped weights Pd and dS = P (dP - DR), P recomputed from LSE (staged in Ls, Ds).
struct Grads { pd: array<vec2<f32>, 2>, ds: array<vec2<f32>, 2> }

fn block_grads(hd: Head, s: array<vec2<f32>, 2>, dpd: array<vec2<f32>, 2>, ty: u32, tx: u32, i0: u32,
               j0: u32) -> Grads {
    let scale = bitcast<f32>(P[4]);
    let drop = P[6] != 0u;
    let hashed_seed = pcg(P[5]);
    let keep_scale = select(1.0, bitcast<f32>(P[8]), drop);
    var out: Grads;
    for (var e = 0u; e < 2u; e++) {
        let t = i0 + 2u * ty + e;
        for (var f = 0u; f < 2u; f++) {
            let u = j0 + tx + 16u * f;
            var p = 0.0;
            if (u <= t) { p = exp(s[e][f] * scale - Ls[2u * ty + e]); }
            var keep = true;
            if (drop) { keep = kept(hd, hashed_seed, t, u); }
            out.pd[e][f] = select(0.0, p * keep_scale, keep);
            out.ds[e][f] = p * (select(0.0, dpd[e][f] * keep_scale, keep) - Ds[2u * ty + e]);
        }
    }
    return out;
}

@compute @workgroup_size(128)
fn bwd_kv_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let hd = head(wid);
    let tx = lid % 16u;
    let ty = lid / 16u;
    let j0 = wid.x * BK;
    stage_keys(hd, j0, lid);
    var dk = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    var dv = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    store_queries(lid, load_queries(hd, j0, lid));
    for (var i0 = j0; i0 < hd.T; i0 += BQ) {
        let more = i0 + BQ < hd.T;
        var next: QueryRows;
        if (more) { next = load_queries(hd, i0 + BQ, lid); }
        workgroupBarrier();
        let gr = block_grads(hd, dots(true, ty, tx), dots(false, ty, tx), ty, tx, i0, j0);
        for (var e = 0u; e < 2u; e++) {
            let q = 2u * ty + e;
            Pt[q * 8u + tx / 4u][tx % 4u] = gr.pd[e].x;
            Pt[q * 8u + 4u + tx / 4u][tx % 4u] = gr.pd[e].y;
            St[q * 8u + tx / 4u][tx % 4u] = gr.ds[e].x;
            St[q * 8u + 4u + tx / 4u][tx % 4u] = gr.ds[e].y;
        }
        workgroupBarrier();
        for (var q = 0u; q < BQ; q++) {
            outer4(&dv, Pt[q * 8u + ty], Gs[q * D4 + tx]);     // keys 4 ty .. + 3
            outer4(&dk, St[q * 8u + ty], Qs[q * D4 + tx]);
        }
        workgroupBarrier();
        if (more) { store_queries(lid, next); }
    }
    let scale = bitcast<f32>(P[4]);
    for (var e = 0u; e < 4u; e++) {
        let at = (hd.b * hd.T + j0 + 4u * ty + e) * hd.row4 + hd.h * D4 + tx;
        OUT[at + hd.C4] = dk[e] * scale;
        OUT[at + 2u * hd.C4] = dv[e];
    }
}

@compute @workgroup_size(128)
fn bwd_q_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let hd = head(wid);
    let tx = lid % 16u;
    let ty = lid / 16u;
    let i0 = wid.x * BQ;
    store_queries(lid, load_queries(hd, i0, lid));
    var dq0 = vec4<f32>(0.0);
    var dq1 = vec4<f32>(0.0);
    stage_keys(hd, 0u, lid);
    for (var j0 = 0u; j0 < i0 + BQ; j0 += BK) {
        let more = j0 + BK < i0 + BQ;
        var next: KeyRows;
        if (more) { next = load_keys(hd, j0 + BK, lid); }
        workgroupBarrier();
        let gr = block_grads(hd, dots(true, ty, tx), dots(false, ty, tx), ty, tx, i0, j0);
        put_pairs(ty, tx, gr.ds);
        workgroupBarrier();
        pairs_times_rows(false, ty, tx, &dq0, &dq1);
        workgroupBarrier();
        if (more) { store_keys(lid, next); }
    }
    let scale = bitcast<f32>(P[4]);
    let t = hd.b * hd.T + i0 + 2u * ty;
    OUT[t * hd.row4 + hd.h * D4 + tx] = dq0 * scale;
    OUT[(t + 1u) * hd.row4 + hd.h * D4 + tx] = dq1 * scale;
}

@compute @workgroup_size(128)
fn delta_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 128u + lid;    // (b T + t) H + h
    let H = P[2];
    if (i >= P[0] * P[1] * H) { return; }
    let at = (i / H) * (P[3] / 4u) + (i % H) * D4;
    var acc = vec4<f32>(0.0);
    for (var d4 = 0u; d4 < D4; d4++) { acc += G[at + d4] * OUT[at + d4]; }
    DR[i] = acc.x + acc.y + acc.z + acc.w;
}
