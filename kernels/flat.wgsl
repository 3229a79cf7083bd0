// The flat kernels' common part (`#include flat`): WG threads a workgroup, the params P at binding 0, and an
// invocation's flat index on the 2D grid the host dispatches (x * y workgroups, so that n may exceed
// 65535 * WG). An entry point takes `inv: Invocation`, starts `let i = flat(inv);` and returns for i past its n.

const WG: u32 = 256u;

@group(0) @binding(0) var<storage, read> P: array<u32>;

struct Invocation {
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
}

fn flat(inv: Invocation) -> u32 { return (inv.wid.y * inv.nwg.x + inv.wid.x) * WG + inv.lid; }
