// A decode step's attention (one new token per row) in one dispatch, one workgroup per (row b, query head h):
// q, k, v read where the projections left them (row b of an array of rows of width W, from a column offset:
// the packed q|k|v or three separate projections, no split copy), rotary at the row's position p = pos - pad[b]
// where asked (Llama), this position's key and value written into the cache slot pos (by the first query head
// of each key-value head: GQA's head h reads key-value head h / (H / Hkv), never a repeated copy), then softmax
// (scale * q.k) over slots pad[b] .. pos and its weighted sum of values, written as y (B, 1, H * D), the heads
// merged. Slots past pos (the rest of a decode window) and a row's left padding are never read. The slots go by
// in chunks of RWG with a running max and sum (online softmax), so workgroup memory does not grow with the
// window, and the grid and the loop bounds come from params alone: a captured step replays at every position.
// The slot pos is taken from workgroup memory, not the cache: another workgroup may be writing it.
// Bindings: P = [B, H, Hkv, D, block, pos, q offset, k offset, v offset, q width, k width, v width, scale bits,
// rotary, padded], Q, K, V, COS, SIN (rows of D), PAD (B,) i32, CK, CV (B, Hkv, block, D), Y.

const RWG: u32 = 64u;
const D: u32 = {{D}}u;
const DPT: u32 = {{DPT}}u;   // dimensions per thread: ceil(D / RWG)

@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> Q: array<f32>;
@group(0) @binding(2) var<storage, read> K: array<f32>;
@group(0) @binding(3) var<storage, read> V: array<f32>;
@group(0) @binding(4) var<storage, read> COS: array<f32>;
@group(0) @binding(5) var<storage, read> SIN: array<f32>;
@group(0) @binding(6) var<storage, read> PAD: array<i32>;
@group(0) @binding(7) var<storage, read_write> CK: array<f32>;
@group(0) @binding(8) var<storage, read_write> CV: array<f32>;
@group(0) @binding(9) var<storage, read_write> Y: array<f32>;

#include workgroup_reduce

var<workgroup> qs: array<f32, D>;
var<workgroup> ks: array<f32, D>;
var<workgroup> vs: array<f32, D>;
var<workgroup> ps: array<f32, RWG>;

// rotary.wgsl's forward at table row p for element d of x, given x[d] and its rotate-half partner x[d +- D / 2]
fn rotate(x: f32, other: f32, d: u32, p: u32) -> f32 {
    let sign = select(1.0, -1.0, d < D / 2u);
    return x * COS[p * D + d] + sign * other * SIN[p * D + d];
}

fn partner(d: u32) -> u32 { return select(d - D / 2u, d + D / 2u, d < D / 2u); }

@compute @workgroup_size(RWG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let H = P[1];
    let r = wid.y * nwg.x + wid.x;
    if (r >= P[0] * H) { return; }
    let b = r / H;
    let h = r % H;
    let G = H / P[2];
    let kvh = h / G;
    let pos = P[5];
    let pad = select(0u, u32(PAD[b]), P[14] == 1u);
    for (var d = lid; d < D; d += RWG) {
        qs[d] = Q[b * P[9] + P[6] + h * D + d];
        ks[d] = K[b * P[10] + P[7] + kvh * D + d];
        vs[d] = V[b * P[11] + P[8] + kvh * D + d];
    }
    workgroupBarrier();
    if (P[13] == 1u) {
        let p = pos - pad;
        var qr: array<f32, DPT>;
        var kr: array<f32, DPT>;
        for (var i = 0u; i < DPT; i++) {
            let d = lid + i * RWG;
            if (d < D) {
                qr[i] = rotate(qs[d], qs[partner(d)], d, p);
                kr[i] = rotate(ks[d], ks[partner(d)], d, p);
            }
        }
        workgroupBarrier();
        for (var i = 0u; i < DPT; i++) {
            let d = lid + i * RWG;
            if (d < D) { qs[d] = qr[i]; ks[d] = kr[i]; }
        }
        workgroupBarrier();
    }
    let base = (b * P[2] + kvh) * P[4] * D;
    if (h % G == 0u) {
        for (var d = lid; d < D; d += RWG) {
            CK[base + pos * D + d] = ks[d];
            CV[base + pos * D + d] = vs[d];
        }
    }
    let scale = bitcast<f32>(P[12]);
    var m = bitcast<f32>(0xff800000u);  // -inf
    var l = 0.0;
    var acc: array<f32, DPT>;
    for (var c = pad; c <= pos; c += RWG) {
        let j = c + lid;
        var s = bitcast<f32>(0xff800000u);
        if (j < pos) {
            var dot = 0.0;
            for (var d = 0u; d < D; d++) { dot += qs[d] * CK[base + j * D + d]; }
            s = scale * dot;
        } else if (j == pos) {
            var dot = 0.0;
            for (var d = 0u; d < D; d++) { dot += qs[d] * ks[d]; }
            s = scale * dot;
        }
        let mn = max(m, wg_max(s, lid));
        let e = select(0.0, exp(s - mn), j <= pos);
        ps[lid] = e;
        let alpha = exp(m - mn);   // 0 at the first chunk (m = -inf)
        l = l * alpha + wg_sum(e, lid);   // (its barrier also publishes ps)
        let n = min(RWG, pos + 1u - c);
        for (var i = 0u; i < DPT; i++) {
            let d = lid + i * RWG;
            if (d < D) {
                var a = acc[i] * alpha;
                for (var t = 0u; t < n; t++) {
                    let jj = c + t;
                    var val: f32;
                    if (jj == pos) { val = vs[d]; } else { val = CV[base + jj * D + d]; }
                    a += ps[t] * val;
                }
                acc[i] = a;
            }
        }
        m = mn;
        workgroupBarrier();   // every thread done with ps before the next chunk writes it
    }
    for (var i = 0u; i < DPT; i++) {
        let d = lid + i * RWG;
        if (d < D) { Y[(b * H + h) * D + d] = acc[i] / l; }
    }
}
