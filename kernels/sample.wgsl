// The next token of each row drawn from its logits on the device, so that a decode step reads back ids, not a
// vocabulary of logits: CTRL's repetition penalty, then greedy's argmax (ties: the lowest id, as np.argmax), or
// temperature, top-k, top-p and one draw from what is left. The distribution is lab.generate's
// sample_distribution after apply_repetition_penalty, in float32 (lab/sampling.py holds the host's equivalent).
// One workgroup per row. Thresholds are found by bisection over the bits of the values (ordered as unsigned keys),
// a workgroup count or sum per bit: no sort, so a 152k vocabulary costs a few dozen passes over the row.
// The draw's uniform depends only on (seed, step, row): a replayed decode step patches the step, and the host
// recomputes the same number (lab.sampling.uniforms).
// Bindings: @binding(0) P = [rows, n, greedy, top_k (n: none), top_p target bits (0: none), temperature bits,
// penalty bits, seed, step], @binding(1) X logits (rows, n), @binding(2) SEEN (rows, ceil(n / 32)): bit j % 32 of
// word j / 32 says token j is in the row's text (the chosen token's bit is set here), @binding(3) PROBS (rows, n):
// the filtered probabilities drawn from (not written by greedy), @binding(4) OUT (rows, 2): [id, log p bits],
// log p of the id under the distribution drawn from (greedy: the penalized logits' softmax); id n: none could be
// drawn (NaN logits, or only -inf ones when sampling). Ids and counts pass through f32: n < 2^24.
// A decode step that samples inside itself (lab.decode) also gives P[9] = ring slots (0: none): the id goes into
// @binding(5) FEED (rows), the next step's token ids (0 where none was drawn, an id the embedding accepts), and
// [id, log p bits] into slot step % P[9] of @binding(6) RING (slots, rows, 2), read back every few steps.
// Uniformity: every branch around a reduction depends on P only; what reductions find steers data, not control.

const RWG: u32 = {{RWG}}u;

@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> SEEN: array<u32>;
@group(0) @binding(3) var<storage, read_write> PROBS: array<f32>;
@group(0) @binding(4) var<storage, read_write> OUT: array<u32>;
@group(0) @binding(5) var<storage, read_write> FEED: array<u32>;
@group(0) @binding(6) var<storage, read_write> RING: array<u32>;

#include workgroup_reduce
#include dropout_mask

var<workgroup> chunk_pre: array<f32, 257>;   // exclusive prefix sums of the threads' chunks of the row (RWG <= 256)

fn neg_inf() -> f32 { return bitcast<f32>(0xff800000u); }
// (by the bits: max() may drop a NaN, and v != v may be folded away)
fn nan_count(v: f32) -> f32 { return select(0.0, 1.0, (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u); }
fn pos_inf() -> f32 { return bitcast<f32>(0x7f800000u); }

// the logit after the penalty: a seen token's positive logit divided, a negative one multiplied (Hugging Face's)
fn score(r: u32, j: u32) -> f32 {
    let n = P[1];
    let v = X[r * n + j];
    let seen = (SEEN[r * ((n + 31u) / 32u) + j / 32u] >> (j % 32u)) & 1u;
    let pen = bitcast<f32>(P[6]);
    return select(v, select(v * pen, v / pen, v > 0.0), seen == 1u);
}

// score / temperature; where some are +inf (a tiny penalty), those alone, evenly: 0 for them, -inf for the rest
fn zval(r: u32, j: u32, any_inf: bool) -> f32 {
    let v = score(r, j) / bitcast<f32>(P[5]);
    return select(v, select(neg_inf(), 0.0, v == pos_inf()), any_inf);
}

// float -> unsigned key of the same order (-0 as +0, as the comparisons take them)
fn key(f: f32) -> u32 {
    let b = select(bitcast<u32>(f), 0u, bitcast<u32>(f) == 0x80000000u);
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

// the uniform in [0, 1) of (seed, step, row), 24 bits
fn uniform(r: u32) -> f32 {
    return f32(pcg(pcg(pcg(P[7]) ^ P[8]) ^ r) >> 8u) * (1.0 / 16777216.0);
}

// (called by one thread, after a storageBarrier: every thread's reads of SEEN for the penalty come first)
fn put(r: u32, j: u32, logp: u32) {
    OUT[2u * r] = j;
    OUT[2u * r + 1u] = logp;
    if (P[9] > 0u) {
        let at = 2u * ((P[8] % P[9]) * P[0] + r);
        RING[at] = j;
        RING[at + 1u] = logp;
        FEED[r] = select(j, 0u, j >= P[1]);
    }
}

fn choose(r: u32, j: u32, logp: f32) {
    put(r, j, bitcast<u32>(logp));
    let w = r * ((P[1] + 31u) / 32u) + j / 32u;
    SEEN[w] = SEEN[w] | (1u << (j % 32u));
}

@compute @workgroup_size(RWG)
fn sample_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let r = wid.y * nwg.x + wid.x;
    if (r >= P[0]) { return; }
    let n = P[1];
    let base = r * n;
    if (lid == 0u) { put(r, n, 0u); }  // no token: what a row of NaN (or, drawing, of -inf only) leaves
    if (P[2] == 1u) {  // greedy: the first index of the maximum (an index as -f32 in a max: exact below 2^24)
        var m = neg_inf();
        for (var j = lid; j < n; j += RWG) { m = max(m, score(r, j)); }
        m = wg_max(m, lid);
        var s = 0.0;
        var first = neg_inf();
        var nans = 0.0;
        for (var j = lid; j < n; j += RWG) {
            let v = score(r, j);
            nans += nan_count(v);
            s += exp(v - m);
            first = max(first, select(neg_inf(), -f32(j), v == m));
        }
        s = wg_sum(s, lid);
        first = wg_max(first, lid);
        nans = wg_sum(nans, lid);
        storageBarrier();
        if (lid == 0u && nans == 0.0) { choose(r, u32(-first), -log(s)); }
        return;
    }
    var infs = 0.0;
    var nans = 0.0;
    for (var j = lid; j < n; j += RWG) {
        let v = score(r, j);
        infs += select(0.0, 1.0, v / bitcast<f32>(P[5]) == pos_inf());
        nans += nan_count(v);
    }
    let any_inf = wg_sum(infs, lid) > 0.0;
    nans = wg_sum(nans, lid);
    // top-k: the k-th largest key c, the largest with at least k keys >= c; ties at it are all kept (as the host)
    var c = 0u;
    if (P[3] < n) {
        let k = f32(P[3]);
        for (var b = 0u; b < 32u; b++) {
            let cand = c | (1u << (31u - b));
            var cnt = 0.0;
            for (var j = lid; j < n; j += RWG) { cnt += select(0.0, 1.0, key(zval(r, j, any_inf)) >= cand); }
            if (wg_sum(cnt, lid) >= k) { c = cand; }
        }
    }
    var m = neg_inf();
    for (var j = lid; j < n; j += RWG) {
        let z = zval(r, j, any_inf);
        m = max(m, select(neg_inf(), z, key(z) >= c));
    }
    m = wg_max(m, lid);
    var s = 0.0;
    for (var j = lid; j < n; j += RWG) {
        let z = zval(r, j, any_inf);
        s += select(0.0, exp(z - m), key(z) >= c);
    }
    s = wg_sum(s, lid);
    for (var j = lid; j < n; j += RWG) {
        let z = zval(r, j, any_inf);
        PROBS[base + j] = select(0.0, exp(z - m) / s, key(z) >= c);
    }
    storageBarrier();
    if (P[4] != 0u) {
        // top-p: the smallest set by descending p (ties: lower ids first) whose mass reaches the target. t = the
        // largest p with mass(p >= t) >= target is the last one taken; of the ties at t, the `need` lowest ids
        let goal_p = bitcast<f32>(P[4]);
        var t = 0u;
        for (var b = 0u; b < 31u; b++) {
            let cand = t | (1u << (30u - b));
            var mass = 0.0;
            for (var j = lid; j < n; j += RWG) {
                let p = PROBS[base + j];
                mass += select(0.0, p, bitcast<u32>(p) >= cand);
            }
            if (wg_sum(mass, lid) >= goal_p) { t = cand; }
        }
        let tf = bitcast<f32>(t);
        var above = 0.0;
        var ties = 0.0;
        for (var j = lid; j < n; j += RWG) {
            let p = PROBS[base + j];
            above += select(0.0, p, p > tf);
            ties += select(0.0, 1.0, p == tf);
        }
        above = wg_sum(above, lid);
        ties = wg_sum(ties, lid);
        let need = clamp(ceil((goal_p - above) / tf), 1.0, ties);
        // the need-th tie's index: the largest `last` with fewer than `need` ties below it
        var last = 0u;
        for (var b = 32u - countLeadingZeros(n); b > 0u; b--) {
            let cand = last | (1u << (b - 1u));
            var cnt = 0.0;
            for (var j = lid; j < min(cand, n); j += RWG) { cnt += select(0.0, 1.0, PROBS[base + j] == tf); }
            if (wg_sum(cnt, lid) < need) { last = cand; }
        }
        var kept = 0.0;
        for (var j = lid; j < n; j += RWG) {
            let p = PROBS[base + j];
            kept += select(0.0, p, p > tf || (p == tf && tf > 0.0 && j <= last));
        }
        kept = wg_sum(kept, lid);
        storageBarrier();
        for (var j = lid; j < n; j += RWG) {
            let p = PROBS[base + j];
            PROBS[base + j] = select(0.0, p / kept, p > tf || (p == tf && tf > 0.0 && j <= last));
        }
        storageBarrier();
    }
    // the draw: the first id whose running mass passes u * total, each thread walking its own chunk of the row
    let chunk = (n + RWG - 1u) / RWG;
    let lo = min(lid * chunk, n);
    let hi = min(lo + chunk, n);
    var cs = 0.0;
    for (var j = lo; j < hi; j++) { cs += PROBS[base + j]; }
    chunk_pre[lid + 1u] = cs;
    workgroupBarrier();
    if (lid == 0u) {
        chunk_pre[0] = 0.0;
        for (var i = 1u; i <= RWG; i++) { chunk_pre[i] = chunk_pre[i - 1u] + chunk_pre[i]; }
    }
    workgroupBarrier();
    let total = chunk_pre[RWG];
    // u * total may round up to total: the float below it still falls in the last chunk with mass
    let goal = min(uniform(r) * total, bitcast<f32>(bitcast<u32>(total) - 1u));
    storageBarrier();
    if (nans == 0.0 && chunk_pre[lid] <= goal && goal < chunk_pre[lid + 1u]) {
        var acc = chunk_pre[lid];
        var pick = n;
        var nonzero = lo;
        for (var j = lo; j < hi; j++) {
            let p = PROBS[base + j];
            if (p > 0.0) {
                nonzero = j;
                acc += p;
                if (pick == n && goal < acc) { pick = j; }
            }
        }
        if (pick == n) { pick = nonzero; }  // (the walk's own rounding fell short of the chunk's sum)
        choose(r, pick, log(PROBS[base + pick]));
    }
}
