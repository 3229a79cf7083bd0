// Sums of squares of many arrays in one dispatch: the squared gradient norm of all parameters (grad_norm), where
// one reduction per parameter took a dispatch or two each. As optim_many.wgsl, the backend generates a binding
// per array (the BINDINGS placeholder: G k at binding 3 + k) and a switch case reading it (READS), as many as a
// shader stage binds. Each workgroup sums 256 x PER elements of one array into PARTIAL[workgroup]; the host
// sums the partials.
// Bindings: P = [slots], @binding(1) PARTIAL (one per workgroup), @binding(2) TABLE: per slot [first workgroup,
// elements, 0].

const RWG: u32 = 256u;
const PER: u32 = 16u;   // elements per thread

@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read_write> PARTIAL: array<f32>;
@group(0) @binding(2) var<storage, read> TABLE: array<u32>;
{{BINDINGS}}

#include workgroup_reduce

#include slot_table

// element i of the array in `slot` (the caller keeps i in range)
fn element(slot: u32, i: u32) -> f32 {
    switch slot {
{{READS}}
        default: { return 0.0; }
    }
}

@compute @workgroup_size(RWG)
fn sumsq_many_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let w = wid.y * nwg.x + wid.x;
    let slot = slot_of(w, lid);
    let n = TABLE[3u * slot + 1u];
    let base = (w - TABLE[3u * slot]) * RWG * PER;
    var acc = 0.0;
    for (var t = 0u; t < PER; t++) {
        let i = base + t * RWG + lid;
        if (i < n) {
            let g = element(slot, i);
            acc += g * g;
        }
    }
    let total = wg_sum(acc, lid);
    if (lid == 0u) { PARTIAL[w] = total; }
}
