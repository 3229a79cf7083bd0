// Whether this device's subgroups are consecutive runs of local_invocation_index, as
// workgroup_reduce_subgroup.wgsl assumes: OUT[lid] = 1 where the invocation's lane is lid % size and its subgroup
// holds invocations lid - lane .. lid - lane + size - 1 (its first lane's index is lid - lane); 0 elsewhere.
// Bindings: @binding(0) P (unused), @binding(1) OUT (RWG,) u32. One workgroup of RWG.

const RWG: u32 = {{RWG}}u;

@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read_write> OUT: array<u32>;

@compute @workgroup_size(RWG)
fn probe_main(@builtin(local_invocation_index) lid: u32) {
    let size = subgroupAdd(1u);
    let lane = subgroupExclusiveAdd(1u);
    let first = subgroupBroadcastFirst(lid);
    OUT[lid] = select(0u, 1u, lane == lid % size && first == lid - lane && RWG % size == 0u);
}
