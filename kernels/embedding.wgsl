// Embedding lookup and its backward.
//   forward_main:  out[i, c] = W[idx[i], c]                       (one thread per output element)
//   links_main, chain_main: dW[v, c] = sum_{i : idx[i] == v} g[i, c] for large tables. links_main (a thread per
//                  position i) links each position to the next one with its token (LINK[i], N at the end) and
//                  marks the first (bit 31); chain_main (a thread per (i, c)) walks the chain from each first
//                  position in order and writes its token's row (the rest of dW is zero-filled before). Rows
//                  hold no state between positions, so 8192 positions x 768 columns of GPT-2 run in parallel
//                  (a thread per column walking every position took 3.9 ms of a gpt2-small step on the H200).
//   backward_vocab_main: partial sums over chunks of positions, one thread per (chunk s, row v, column c):
//                  OUT[s, v, c] = sum_{i in chunk s, idx[i] == v} g[i, c]; the host sums the chunks.
//                  Threads of a warp share v and i, so the index reads are uniform; used when S * V * C
//                  threads fit (small vocabularies), because it runs V * S times more threads in parallel.
// The backward is a scatter-add; WGSL has no float atomics, so each thread owns its outputs and walks
// positions in order: race-free and deterministic (same sum order on every run).
// Out-of-range indices are clamped (forward) or skipped (backward), so a bad index can never read or write outside
// the buffers; the forward records them in ERR for the host to raise (index_check.wgsl).
// Bindings: P = [N, C, V, S, chunk], @binding(1) IDX (i32), @binding(2) SRC (W or g), @binding(3) DST (out or dW),
// @binding(4) LINK (N,) u32, @binding(5) ERR (4,) i32.

#include flat

@group(0) @binding(1) var<storage, read> IDX: array<i32>;
@group(0) @binding(2) var<storage, read> SRC: array<f32>;
@group(0) @binding(3) var<storage, read_write> DST: array<f32>;
@group(0) @binding(4) var<storage, read_write> LINK: array<u32>;
@group(0) @binding(5) var<storage, read_write> ERR: array<atomic<i32>, 4>;

#include index_check

const FIRST: u32 = 0x80000000u;

@compute @workgroup_size(WG)
fn forward_main(inv: Invocation) {
    let e = flat(inv);
    let N = P[0];
    let C = P[1];
    let V = P[2];
    if (e >= N * C) { return; }
    let i = e / C;
    let c = e % C;
    let t = IDX[i];
    if (c == 0u && (t < 0 || u32(t) >= V)) { record_bad_index(1u, V, t, 0); }
    let v = u32(clamp(t, 0, i32(V) - 1));
    DST[e] = SRC[v * C + c];
}

@compute @workgroup_size(WG)
fn links_main(inv: Invocation) {
    let i = flat(inv);
    let N = P[0];
    if (i >= N) { return; }
    let v = IDX[i];
    if (v < 0 || u32(v) >= P[2]) {   // skipped: neither first nor on any chain
        LINK[i] = N;
        return;
    }
    var first = FIRST;
    for (var j = 0u; j < i; j++) {
        if (IDX[j] == v) { first = 0u; break; }
    }
    var next = N;
    for (var j = i + 1u; j < N; j++) {
        if (IDX[j] == v) { next = j; break; }
    }
    LINK[i] = next | first;
}

@compute @workgroup_size(WG)
fn chain_main(inv: Invocation) {
    let e = flat(inv);
    let N = P[0];
    let C = P[1];
    if (e >= N * C) { return; }
    let i = e / C;
    let c = e % C;
    if ((LINK[i] & FIRST) == 0u) { return; }
    var acc = 0.0;
    var j = i;
    loop {
        acc += SRC[j * C + c];
        j = LINK[j] & ~FIRST;
        if (j >= N) { break; }
    }
    DST[u32(IDX[i]) * C + c] = acc;
}

@compute @workgroup_size(WG)
fn backward_vocab_main(inv: Invocation) {
    let e = flat(inv);
    let N = P[0];
    let C = P[1];
    let V = P[2];
    let S = P[3];
    let chunk = P[4];
    if (e >= S * V * C) { return; }
    let c = e % C;
    let v = i32((e / C) % V);
    let s = e / (C * V);
    let i1 = min(N, (s + 1u) * chunk);
    var acc = 0.0;
    for (var i = s * chunk; i < i1; i++) {
        if (IDX[i] == v) { acc += SRC[i * C + c]; }
    }
    DST[e] = acc;
}
