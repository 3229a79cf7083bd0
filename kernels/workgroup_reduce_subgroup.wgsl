// workgroup_reduce.wgsl's functions through subgroup operations, on devices with the `subgroup` feature whose
// subgroups are consecutive runs of local_invocation_index (the backend checks that once, at start, with
// probe_main below): each subgroup reduces in registers, its first lane leaves the result in shared memory, and
// after one barrier every thread combines the RWG / size partials. Two barriers a reduction where the shared-memory
// tree takes log2(RWG) + 2. Same contract: RWG defined by the including kernel, called from uniform control flow.

var<workgroup> red: array<f32, RWG>;

fn wg_reduce(v: f32, lid: u32, is_max: bool) -> f32 {
    let s = select(subgroupAdd(v), subgroupMax(v), is_max);
    let size = subgroupAdd(1u);
    if (lid % size == 0u) { red[lid / size] = s; }
    workgroupBarrier();
    var r = red[0];
    for (var i = 1u; i < max(RWG / size, 1u); i++) { r = select(r + red[i], max(r, red[i]), is_max); }
    workgroupBarrier();
    return r;
}

fn wg_sum(v: f32, lid: u32) -> f32 { return wg_reduce(v, lid, false); }
fn wg_max(v: f32, lid: u32) -> f32 { return wg_reduce(v, lid, true); }
