// Workgroup-wide reductions, included by kernels that reduce one row per workgroup (`#include workgroup_reduce`).
// The including kernel defines RWG, its workgroup size (a power of two). Call from uniform control flow:
// every invocation of the workgroup must reach the barriers.

var<workgroup> red: array<f32, RWG>;

fn wg_reduce(v: f32, lid: u32, is_max: bool) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = RWG / 2u; s > 0u; s = s / 2u) {
        if (lid < s) {
            if (is_max) { red[lid] = max(red[lid], red[lid + s]); } else { red[lid] = red[lid] + red[lid + s]; }
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn wg_sum(v: f32, lid: u32) -> f32 { return wg_reduce(v, lid, false); }
fn wg_max(v: f32, lid: u32) -> f32 { return wg_reduce(v, lid, true); }
