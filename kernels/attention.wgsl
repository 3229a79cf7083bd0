// Fused causal self-attention, flash-attention style (Dao et al., 2022): the (T, T) weights never reach memory.
// Heads of D = 4 D4 are read straight from the packed projection qkv (B, T, (H + 2 Hkv) D) (q, k, v side by side, as
// GPT-2's c_attn makes it) and written straight to y (B, T, H D) and dqkv (alike): no head split or merge copies.
// Grouped-query attention: query head h reads key-value head h / G (G = H / Hkv), the keys never repeated.
// Rotary (P[9] = 1, Llama): rotate_main rotates q and k once into a packed copy (rotate-half form, row t at position
// t, tables COS, SIN (P, D)) that the kernels below read as qkv, and dq, dk are rotated back (the transposed
// rotation) as they are written. (Rotated as they were staged, a key row was rotated again by every query block
// and head that staged it, and each prefetch's rotation waited on its loads before the block's arithmetic.)
//   fwd_main:    y = dropout(softmax(scale q k^T, causal)) v, an online softmax over blocks of BK keys, for a
//                block of BQ queries; also LSE[bh, t], the row's log-sum-exp of scaled scores, from which the
//                backward recomputes the weights.
//   bwd_kv_main: for a block of BK keys of a key-value head, over the G query heads that read it and their
//                blocks of BQ queries that see them: dv += Pd^T dy and dk += scale dS^T q (the group summed in one
//                workgroup's loop: WGSL has no float atomics to sum it across workgroups).
//   bwd_q_main:  for a block of BQ queries, over the key blocks they see: dq += scale dS k.
//   (Both recompute the weights: dq sums over keys and dk, dv over queries, and WGSL has no float atomics to let
//   one of them scatter the other's sums.)
//   delta_main:  DR[b, t, h] = sum_d dy y, one thread per (b, t, h) (OUT is y here), before the two above.
//   (P the weights, Pd after dropout, dS = P (dP - DR).)
// Dropout (P[6] = 1) keeps weight (t, s) of head bh as dropout.wgsl keeps element bh T T + t T + s of the
// (B H, T, T) weights: the same decisions as the unfused path, re-derived in the backward from the seed.
// Bindings: P = [B, T, H, Hkv, scale bits, seed, has_dropout, p bits, 1/(1-p) bits, has_rotary], @binding(1) QKV,
// @binding(2) G (dy, (B, T, H D)), @binding(3) LSE (B H, T), @binding(4) DR (B, T, H), @binding(5) OUT (y, or
// dqkv), @binding(6) COS, @binding(7) SIN (any buffer without rotary: never read then).
// BQ, BK, TY, D4 are template constants (attention_plan.blocks picks the blocks from the device's workgroup
// memory); T is any length: the last blocks' rows past T are staged as zeros, weigh nothing and are not written.
// 16 TY threads, ty = lid / 16, tx = lid % 16. A BQ x BK score block is held as queries EQ ty + e (e < EQ) by
// keys tx + 16 f (f < FK), EQ FK scores a thread; a BQ x D output block (y, dq) as queries EQ ty + e by the
// vec4s tx + 16 j (j < DJ) of the head row; bwd_kv's BK x D blocks (dk, dv) as keys EK ty + e by the same vec4s.

const BQ: u32 = {{BQ}}u;     // queries per block  } attention_plan.blocks: from the device's workgroup memory
const BK: u32 = {{BK}}u;     // keys per block     } and AttentionTuning
const TY: u32 = {{TY}}u;     // rows of 16 threads
const D4: u32 = {{D4}}u;     // vec4s per head row (D = 4 D4)
const THREADS: u32 = 16u * TY;
const EQ: u32 = BQ / TY;     // queries a thread holds of a score block (by FK keys) and of y, dq
const FK: u32 = BK / 16u;    // keys a thread holds of a score block
const EK: u32 = BK / TY;     // keys a thread holds of bwd_kv's dk, dv
const DJ: u32 = (D4 + 15u) / 16u;   // vec4s of a head row a thread holds of y, dq, dk, dv
const QN: u32 = (BQ * D4 + THREADS - 1u) / THREADS;   // vec4s a thread stages of BQ rows
const KN: u32 = (BK * D4 + THREADS - 1u) / THREADS;   // ... of BK rows
const PAD: u32 = D4 + 1u;    // row stride of Ks, Vs in vec4s (odd for even D4): lanes reading rows tx, tx + 1,
//                              ... hit distinct banks
const NEG: f32 = -3.4028234663852886e38;   // the lowest f32: no score is below it

@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> QKV: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> G: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> LSE: array<f32>;
@group(0) @binding(4) var<storage, read_write> DR: array<f32>;
@group(0) @binding(5) var<storage, read_write> OUT: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> COS: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read> SIN: array<vec4<f32>>;

// (attention_plan.workgroup_bytes counts what each entry point uses of these)
var<workgroup> Qs: array<vec4<f32>, BQ * D4>;   // BQ query rows of q
var<workgroup> Gs: array<vec4<f32>, BQ * D4>;   // BQ query rows of dy
var<workgroup> Ks: array<vec4<f32>, BK * PAD>;  // BK key rows of k, stride PAD
var<workgroup> Vs: array<vec4<f32>, BK * PAD>;  // BK key rows of v, stride PAD
// Pw, St in pairs (EQ and EK are even): a thread reads two weights a load
var<workgroup> Pw: array<vec2<f32>, BQ * BK / 2u>;  // fwd: Pd[c BQ + q]; bwd_q: dS alike; bwd_kv: Pd^T[q BK + c]
var<workgroup> St: array<vec2<f32>, BQ * BK / 2u>;  // bwd_kv: dS^T[q BK + c]
var<workgroup> red: array<vec4<f32>, BQ * 4u>;  // [query][tx / 4]: per-thread partials of BQ rows
var<workgroup> Ls: array<f32, BQ>;
var<workgroup> Ds: array<f32, BQ>;

// Query head h of row b and the key-value head it reads; row4: vec4s of a qkv row, C4: of a y row
struct Head { b: u32, h: u32, bh: u32, T: u32, C4: u32, row4: u32, k0: u32, v0: u32 }

fn head_of(b: u32, h: u32) -> Head {
    let H = P[2];
    let kv = h / (H / P[3]);
    let C4 = H * D4;
    return Head(b, h, b * H + h, P[1], C4, C4 + 2u * P[3] * D4, C4 + kv * D4, C4 + (P[3] + kv) * D4);
}

fn head(wid: vec3<u32>) -> Head {
    return head_of(wid.y / P[2], wid.y % P[2]);
}

#include dropout_mask

// vec4 c of a q or k head row (starting at vec4 `at` of QKV) at position t, rotated: x cos + rotate_half(x) sin,
// rotate_half(x) = (-x2, x1) of the row's halves (D4 even).
fn rotated(at: u32, t: u32, c: u32) -> vec4<f32> {
    let x = QKV[at + c];
    let half = D4 / 2u;
    let first = c < half;
    let other = QKV[at + select(c - half, c + half, first)];
    return x * COS[t * D4 + c] + select(other, -other, first) * SIN[t * D4 + c];
}

// The transposed rotation of a gradient row at position t, its vec4 c (g) and the vec4 a half row away (partner):
// g cos + (g2 sin2, -g1 sin1) of the halves, each term with the sine of the column it came from.
fn unrotated(g: vec4<f32>, partner: vec4<f32>, t: u32, c: u32) -> vec4<f32> {
    let half = D4 / 2u;
    let first = c < half;
    let pc = select(c - half, c + half, first);
    return g * COS[t * D4 + c] + select(-partner, partner, first) * SIN[t * D4 + pc];
}

// dropout.wgsl's decision for weight (t, s) of head bh: kept iff u >= p.
fn kept(hd: Head, hashed_seed: u32, t: u32, s: u32) -> bool {
    return keep((hd.bh * hd.T + t) * hd.T + s, hashed_seed, bitcast<f32>(P[7]));
}

// Queries t0 .. t0 + BQ - 1 of q into Qs, zeros past T (the backward stages dy, LSE and DR with them:
// load_queries). (BQ D4 vec4s over 16 TY threads: QN each at most; BK rows of keys: KN each.)
fn stage_queries(hd: Head, t0: u32, lid: u32) {
    for (var n = 0u; n < QN; n++) {
        let e = lid + THREADS * n;
        if (e < BQ * D4) {
            var x = vec4<f32>(0.0);
            let t = t0 + e / D4;
            if (t < hd.T) { x = QKV[(hd.b * hd.T + t) * hd.row4 + hd.h * D4 + e % D4]; }
            Qs[e] = x;
        }
    }
}

// Keys t0 .. t0 + BK - 1 of k and v into Ks, Vs.
fn stage_keys(hd: Head, t0: u32, lid: u32) {
    store_keys(lid, load_keys(hd, t0, lid));
}

// The loops over blocks fetch the next block into registers before the current block's arithmetic and store
// it into workgroup memory after (load_*, store_*), so its global-memory latency hides behind that arithmetic.
struct KeyRows { k: array<vec4<f32>, KN>, v: array<vec4<f32>, KN> }

fn load_keys(hd: Head, t0: u32, lid: u32) -> KeyRows {
    var out: KeyRows;
    for (var n = 0u; n < KN; n++) {
        let e = lid + THREADS * n;
        if (e < BK * D4 && t0 + e / D4 < hd.T) {
            let at = (hd.b * hd.T + t0 + e / D4) * hd.row4;
            out.k[n] = QKV[at + hd.k0 + e % D4];
            out.v[n] = QKV[at + hd.v0 + e % D4];
        }
    }
    return out;
}

fn store_keys(lid: u32, rows: KeyRows) {
    for (var n = 0u; n < KN; n++) {
        let e = lid + THREADS * n;
        if (e < BK * D4) {
            Ks[(e / D4) * PAD + e % D4] = rows.k[n];
            Vs[(e / D4) * PAD + e % D4] = rows.v[n];
        }
    }
}

struct QueryRows { q: array<vec4<f32>, QN>, g: array<vec4<f32>, QN>, lse: f32, dr: f32 }

fn load_queries(hd: Head, t0: u32, lid: u32) -> QueryRows {
    var out: QueryRows;
    for (var n = 0u; n < QN; n++) {
        let e = lid + THREADS * n;
        if (e < BQ * D4 && t0 + e / D4 < hd.T) {
            let t = hd.b * hd.T + t0 + e / D4;
            out.q[n] = QKV[t * hd.row4 + hd.h * D4 + e % D4];
            out.g[n] = G[t * hd.C4 + hd.h * D4 + e % D4];
        }
    }
    if (lid < BQ && t0 + lid < hd.T) {
        out.lse = LSE[hd.bh * hd.T + t0 + lid];
        out.dr = DR[(hd.b * hd.T + t0 + lid) * P[2] + hd.h];
    }
    return out;
}

fn store_queries(lid: u32, rows: QueryRows) {
    for (var n = 0u; n < QN; n++) {
        let e = lid + THREADS * n;
        if (e < BQ * D4) {
            Qs[e] = rows.q[n];
            Gs[e] = rows.g[n];
        }
    }
    if (lid < BQ) {
        Ls[lid] = rows.lse;
        Ds[lid] = rows.dr;
    }
}

// The thread's EQ x FK dot products of head rows: queries EQ ty + e of Qs (or of Gs) with keys tx + 16 f of Ks
// (or of Vs): [e][f]. With q, k: the scores; with dy, v: the gradient of the dropped weights. (Two functions, not
// one with a flag: an entry point reserves every workgroup array its code names, and the forward has no Gs.)
fn scores(ty: u32, tx: u32) -> array<array<f32, FK>, EQ> {
    var acc: array<array<vec4<f32>, FK>, EQ>;
    for (var d4 = 0u; d4 < D4; d4++) {
        var x: array<vec4<f32>, EQ>;
        var y: array<vec4<f32>, FK>;
        for (var e = 0u; e < EQ; e++) { x[e] = Qs[(EQ * ty + e) * D4 + d4]; }
        for (var f = 0u; f < FK; f++) { y[f] = Ks[(tx + 16u * f) * PAD + d4]; }
        accumulate(&acc, x, y);
    }
    return lane_sums(acc);
}

fn dropped_grads(ty: u32, tx: u32) -> array<array<f32, FK>, EQ> {
    var acc: array<array<vec4<f32>, FK>, EQ>;
    for (var d4 = 0u; d4 < D4; d4++) {
        var x: array<vec4<f32>, EQ>;
        var y: array<vec4<f32>, FK>;
        for (var e = 0u; e < EQ; e++) { x[e] = Gs[(EQ * ty + e) * D4 + d4]; }
        for (var f = 0u; f < FK; f++) { y[f] = Vs[(tx + 16u * f) * PAD + d4]; }
        accumulate(&acc, x, y);
    }
    return lane_sums(acc);
}

// (Each dot product is kept as four lane sums until the end: dot() per vec4 would compile to a multiply, three
// dependent FMAs and an add.)
fn accumulate(acc: ptr<function, array<array<vec4<f32>, FK>, EQ>>, x: array<vec4<f32>, EQ>,
              y: array<vec4<f32>, FK>) {
    for (var e = 0u; e < EQ; e++) {
        for (var f = 0u; f < FK; f++) { (*acc)[e][f] += x[e] * y[f]; }
    }
}

fn lane_sums(acc: array<array<vec4<f32>, FK>, EQ>) -> array<array<f32, FK>, EQ> {
    var out: array<array<f32, FK>, EQ>;
    for (var e = 0u; e < EQ; e++) {
        for (var f = 0u; f < FK; f++) { out[e][f] = dot(acc[e][f], vec4<f32>(1.0)); }
    }
    return out;
}

// The 16 partials of query row EQ ty + e (in red) combined: their max, or their sum.
fn row_total(ty: u32, e: u32, is_max: bool) -> f32 {
    let r = EQ * ty + e;
    var acc = red[r * 4u];
    for (var q = 1u; q < 4u; q++) {
        if (is_max) { acc = max(acc, red[r * 4u + q]); } else { acc += red[r * 4u + q]; }
    }
    if (is_max) { return max(max(acc.x, acc.y), max(acc.z, acc.w)); }
    return acc.x + acc.y + acc.z + acc.w;
}

// A score block's values (as scores returns them) into Pw, a column of BQ queries per key.
fn put_block(ty: u32, tx: u32, v: array<array<f32, FK>, EQ>) {
    for (var f = 0u; f < FK; f++) {
        for (var e = 0u; e < EQ; e += 2u) {
            Pw[((tx + 16u * f) * BQ + EQ * ty + e) / 2u] = vec2(v[e][f], v[e + 1u][f]);
        }
    }
}

// acc[e DJ + j] (query EQ ty + e, vec4 tx + 16 j of the head row) += Pw's block times the staged rows of v (or k).
fn block_times_rows(by_v: bool, ty: u32, tx: u32, acc: ptr<function, array<vec4<f32>, EQ * DJ>>) {
    for (var c = 0u; c < BK; c++) {
        for (var j = 0u; j < DJ; j++) {
            let col = tx + 16u * j;
            if (col >= D4) { break; }
            var row: vec4<f32>;
            if (by_v) { row = Vs[c * PAD + col]; } else { row = Ks[c * PAD + col]; }
            for (var e = 0u; e < EQ; e += 2u) {
                let a = Pw[(c * BQ + EQ * ty + e) / 2u];
                (*acc)[e * DJ + j] += a.x * row;
                (*acc)[(e + 1u) * DJ + j] += a.y * row;
            }
        }
    }
}

fn put_partial(ty: u32, tx: u32, e: u32, v: f32) {
    red[(EQ * ty + e) * 4u + tx / 4u][tx % 4u] = v;
}

@compute @workgroup_size(THREADS)
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
    var m: array<f32, EQ>;
    var l: array<f32, EQ>;
    var o: array<vec4<f32>, EQ * DJ>;
    for (var e = 0u; e < EQ; e++) { m[e] = NEG; }
    stage_keys(hd, 0u, lid);
    let end = min(i0 + BQ, hd.T);   // (keys past the block's last query, or past T, weigh nothing)
    for (var j0 = 0u; j0 < end; j0 += BK) {
        let more = j0 + BK < end;
        var next: KeyRows;
        if (more) { next = load_keys(hd, j0 + BK, lid); }
        workgroupBarrier();
        var s = scores(ty, tx);
        for (var e = 0u; e < EQ; e++) {
            let t = i0 + EQ * ty + e;
            var top = NEG;
            for (var f = 0u; f < FK; f++) {
                s[e][f] *= scale;
                if (j0 + tx + 16u * f > t) { s[e][f] = NEG; }
                top = max(top, s[e][f]);
            }
            put_partial(ty, tx, e, top);
        }
        workgroupBarrier();
        // (key 0 is in every row's first block, so m is a visible key's score from there on; masked weights are 0
        // by selection: as exp(NEG - m) they weighed where the scores were below a sentinel of -1e30)
        for (var e = 0u; e < EQ; e++) {
            let t = i0 + EQ * ty + e;
            let m_new = max(m[e], row_total(ty, e, true));
            let alpha = select(exp(m[e] - m_new), 0.0, j0 == 0u);
            var sum = 0.0;
            for (var f = 0u; f < FK; f++) {
                let p = select(exp(s[e][f] - m_new), 0.0, j0 + tx + 16u * f > t);
                sum += p;
                s[e][f] = p;    // now Pd
                if (drop) { s[e][f] = select(0.0, p * keep_scale, kept(hd, hashed_seed, t, j0 + tx + 16u * f)); }
            }
            l[e] = l[e] * alpha + sum;
            m[e] = m_new;
            for (var j = 0u; j < DJ; j++) { o[e * DJ + j] *= alpha; }
        }
        put_block(ty, tx, s);
        workgroupBarrier();
        block_times_rows(true, ty, tx, &o);
        workgroupBarrier();
        if (more) { store_keys(lid, next); }
    }
    for (var e = 0u; e < EQ; e++) { put_partial(ty, tx, e, l[e]); }
    workgroupBarrier();
    for (var e = 0u; e < EQ; e++) {
        let t = i0 + EQ * ty + e;
        let total = row_total(ty, e, false);
        if (t >= hd.T) { continue; }
        for (var j = 0u; j < DJ; j++) {
            let col = tx + 16u * j;
            if (col < D4) { OUT[(hd.b * hd.T + t) * hd.C4 + hd.h * D4 + col] = o[e * DJ + j] / total; }
        }
        if (tx == 0u) { LSE[hd.bh * hd.T + t] = m[e] + log(total); }
    }
}

// From the block's scores s and dropped-weight gradients dpd ([e][f]: query i0 + EQ ty + e, key j0 + tx + 16 f):
// the dropped weights Pd and dS = P (dP - DR), P recomputed from LSE (staged in Ls, Ds).
struct Grads { pd: array<array<f32, FK>, EQ>, ds: array<array<f32, FK>, EQ> }

fn block_grads(hd: Head, s: array<array<f32, FK>, EQ>, dpd: array<array<f32, FK>, EQ>, ty: u32, tx: u32, i0: u32,
               j0: u32) -> Grads {
    let scale = bitcast<f32>(P[4]);
    let drop = P[6] != 0u;
    let hashed_seed = pcg(P[5]);
    let keep_scale = select(1.0, bitcast<f32>(P[8]), drop);
    var out: Grads;
    for (var e = 0u; e < EQ; e++) {
        let t = i0 + EQ * ty + e;
        for (var f = 0u; f < FK; f++) {
            let u = j0 + tx + 16u * f;
            var p = 0.0;
            if (u <= t && t < hd.T) { p = exp(s[e][f] * scale - Ls[EQ * ty + e]); }
            var keep = true;
            if (drop) { keep = kept(hd, hashed_seed, t, u); }
            out.pd[e][f] = select(0.0, p * keep_scale, keep);
            out.ds[e][f] = p * (select(0.0, dpd[e][f] * keep_scale, keep) - Ds[EQ * ty + e]);
        }
    }
    return out;
}

@compute @workgroup_size(THREADS)
fn bwd_kv_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    // wid.y: b Hkv + key-value head; its G query heads h = kv G + g (GQA) summed here
    let G = P[2] / P[3];
    let b = wid.y / P[3];
    let kv = wid.y % P[3];
    let tx = lid % 16u;
    let ty = lid / 16u;
    let j0 = wid.x * BK;
    stage_keys(head_of(b, kv * G), j0, lid);
    var dk: array<vec4<f32>, EK * DJ>;
    var dv: array<vec4<f32>, EK * DJ>;
    let first = j0 - j0 % BQ;    // the first query block that sees key j0
    for (var g = 0u; g < G; g++) {
        let hd = head_of(b, kv * G + g);
        store_queries(lid, load_queries(hd, first, lid));
        for (var i0 = first; i0 < hd.T; i0 += BQ) {
            let more = i0 + BQ < hd.T;
            var next: QueryRows;
            if (more) { next = load_queries(hd, i0 + BQ, lid); }
            workgroupBarrier();
            let gr = block_grads(hd, scores(ty, tx), dropped_grads(ty, tx), ty, tx, i0, j0);
            for (var e = 0u; e < EQ; e++) {
                for (var f = 0u; f < FK; f++) {
                    let at = (EQ * ty + e) * BK + tx + 16u * f;
                    Pw[at / 2u][at % 2u] = gr.pd[e][f];
                    St[at / 2u][at % 2u] = gr.ds[e][f];
                }
            }
            workgroupBarrier();
            for (var q = 0u; q < BQ; q++) {
                for (var j = 0u; j < DJ; j++) {
                    let col = tx + 16u * j;
                    if (col >= D4) { break; }
                    let dy = Gs[q * D4 + col];
                    let x = Qs[q * D4 + col];
                    for (var e = 0u; e < EK; e += 2u) {     // keys EK ty + e, + 1
                        let at = (q * BK + EK * ty + e) / 2u;
                        let pd = Pw[at];
                        let ds = St[at];
                        dv[e * DJ + j] += pd.x * dy;
                        dv[(e + 1u) * DJ + j] += pd.y * dy;
                        dk[e * DJ + j] += ds.x * x;
                        dk[(e + 1u) * DJ + j] += ds.y * x;
                    }
                }
            }
            workgroupBarrier();
            if (more) { store_queries(lid, next); }
        }
    }
    let hd = head_of(b, kv * G);
    let scale = bitcast<f32>(P[4]);
    // with rotary, dk rotated back: each vec4 needs its partner's, which another thread holds (through Ks, read by
    // the loop above no more after its last barrier)
    for (var e = 0u; e < EK; e++) {
        for (var j = 0u; j < DJ; j++) {
            let col = tx + 16u * j;
            if (col < D4) { Ks[(EK * ty + e) * PAD + col] = dk[e * DJ + j] * scale; }
        }
    }
    workgroupBarrier();
    for (var e = 0u; e < EK; e++) {
        let t = j0 + EK * ty + e;
        if (t >= hd.T) { break; }
        for (var j = 0u; j < DJ; j++) {
            let col = tx + 16u * j;
            if (col >= D4) { break; }
            let at = (hd.b * hd.T + t) * hd.row4 + col;
            var g = Ks[(EK * ty + e) * PAD + col];
            if (P[9] != 0u) { g = unrotated(g, Ks[(EK * ty + e) * PAD + (col + D4 / 2u) % D4], t, col); }
            OUT[at + hd.k0] = g;
            OUT[at + hd.v0] = dv[e * DJ + j];
        }
    }
}

@compute @workgroup_size(THREADS)
fn bwd_q_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let hd = head(wid);
    let tx = lid % 16u;
    let ty = lid / 16u;
    let i0 = wid.x * BQ;
    store_queries(lid, load_queries(hd, i0, lid));
    var dq: array<vec4<f32>, EQ * DJ>;
    stage_keys(hd, 0u, lid);
    let end = min(i0 + BQ, hd.T);
    for (var j0 = 0u; j0 < end; j0 += BK) {
        let more = j0 + BK < end;
        var next: KeyRows;
        if (more) { next = load_keys(hd, j0 + BK, lid); }
        workgroupBarrier();
        let gr = block_grads(hd, scores(ty, tx), dropped_grads(ty, tx), ty, tx, i0, j0);
        put_block(ty, tx, gr.ds);
        workgroupBarrier();
        block_times_rows(false, ty, tx, &dq);
        workgroupBarrier();
        if (more) { store_keys(lid, next); }
    }
    let scale = bitcast<f32>(P[4]);
    for (var e = 0u; e < EQ; e++) {   // (through Qs, as bwd_kv_main's dk)
        for (var j = 0u; j < DJ; j++) {
            let col = tx + 16u * j;
            if (col < D4) { Qs[(EQ * ty + e) * D4 + col] = dq[e * DJ + j] * scale; }
        }
    }
    workgroupBarrier();
    for (var e = 0u; e < EQ; e++) {
        let t = i0 + EQ * ty + e;
        if (t >= hd.T) { break; }
        for (var j = 0u; j < DJ; j++) {
            let col = tx + 16u * j;
            if (col >= D4) { break; }
            var g = Qs[(EQ * ty + e) * D4 + col];
            if (P[9] != 0u) { g = unrotated(g, Qs[(EQ * ty + e) * D4 + (col + D4 / 2u) % D4], t, col); }
            OUT[(hd.b * hd.T + t) * hd.row4 + hd.h * D4 + col] = g;
        }
    }
}

@compute @workgroup_size(128)
fn delta_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 128u + lid;    // (b T + t) H + h
    let H = P[2];
    if (i >= P[0] * P[1] * H) { return; }
    let at = i * D4;   // (dy and y rows are H D4 vec4s)
    var acc = vec4<f32>(0.0);
    for (var d4 = 0u; d4 < D4; d4++) { acc += G[at + d4] * OUT[at + d4]; }
    DR[i] = acc.x + acc.y + acc.z + acc.w;
}

// With rotary, before the other kernels: OUT = qkv with q and k rotated (v copied), one thread per vec4.
@compute @workgroup_size(128)
fn rotate_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 128u + lid;    // (b T + t) row4 + c
    let row4 = (P[2] + 2u * P[3]) * D4;
    if (i >= P[0] * P[1] * row4) { return; }
    let c = i % row4;
    if (c >= (P[2] + P[3]) * D4) { OUT[i] = QKV[i]; return; }
    OUT[i] = rotated(i - c % D4, (i / row4) % P[1], c % D4);
}
