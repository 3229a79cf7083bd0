// workgroup_reduce.wgsl's functions through subgroup operations, on devices with the `subgroup` feature whose
// subgroups are consecutive runs of local_invocation_index (the backend checks that once, at start, with
// subgroup_probe.wgsl): each subgroup reduces in registers, its first lane leaves the result in shared memory,
// and after one barrier every thread combines the RWG / size partials. Two barriers a reduction where the
// shared-memory tree takes log2(RWG) + 2. Same contract: RWG defined by the including kernel, called from
// uniform control flow. (Sizes are powers of two: shifts and masks, not divisions by the runtime size.)

var<workgroup> red: array<f32, RWG>;

// Leaves each subgroup's value s in red[subgroup index]; returns how many there are.
fn wg_partials(s: f32, lid: u32) -> u32 {
    let shift = countTrailingZeros(subgroupAdd(1u));
    if ((lid & ((1u << shift) - 1u)) == 0u) { red[lid >> shift] = s; }
    workgroupBarrier();
    return max(RWG >> shift, 1u);
}

fn wg_sum(v: f32, lid: u32) -> f32 {
    let n = wg_partials(subgroupAdd(v), lid);
    var r = red[0];
    for (var i = 1u; i < n; i++) { r += red[i]; }
    workgroupBarrier();
    return r;
}

fn wg_max(v: f32, lid: u32) -> f32 {
    let n = wg_partials(subgroupMax(v), lid);
    var r = red[0];
    for (var i = 1u; i < n; i++) { r = max(r, red[i]); }
    workgroupBarrier();
    return r;
}
