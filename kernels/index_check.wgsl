// Out-of-range indices recorded for the host (included by embedding.wgsl and cross_entropy.wgsl, which declare
// ERR: array<atomic<i32>, 4> and clamp or skip the bad index themselves, so it is never used to address memory).
//   ERR[0]: 0, or the first recording's tag (limit << 2 | op: 1 embedding, 2 cross_entropy); ERR[1], ERR[2]: the
//   lowest and highest bad index with that tag (the host resets them to i32 max and min); ERR[3]: ignore_index.
// The host reads ERR at its next readback after a dispatch given unchecked indices (WgpuBackend.check_indices),
// so a training step whose indices were checked on the host reads nothing more.

fn record_bad_index(op: u32, limit: u32, index: i32, ignore_index: i32) {
    let tag = i32((limit << 2u) | op);
    loop {
        let r = atomicCompareExchangeWeak(&ERR[0], 0, tag);
        if (r.exchanged) { atomicStore(&ERR[3], ignore_index); }
        if (r.exchanged || r.old_value == tag) {
            atomicMin(&ERR[1], index);
            atomicMax(&ERR[2], index);
            return;
        }
        if (r.old_value != 0) { return; }   // another op's error came first: that one is reported
    }
}
