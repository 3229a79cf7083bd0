// Which slot a workgroup serves, for the kernels over many arrays (optim_many.wgsl, sumsq_many.wgsl;
// `#include slot_table`): P[0] slots, TABLE[3 s] the first workgroup of slot s (ascending). Call from uniform
// control flow (it has a barrier): every invocation gets the last slot whose first workgroup is <= w.

var<workgroup> wg_slot: u32;

fn slot_of(w: u32, lid: u32) -> u32 {
    if (lid == 0u) {   // a binary search, once per workgroup
        var lo = 0u;
        var hi = P[0] - 1u;
        while (lo < hi) {
            let mid = (lo + hi + 1u) / 2u;
            if (TABLE[3u * mid] <= w) { lo = mid; } else { hi = mid - 1u; }
        }
        wg_slot = lo;
    }
    return workgroupUniformLoad(&wg_slot);
}
