// f16-storage arrays widened to f32, for the kernels that read f32 only (on devices with shader-f16):
//   widen_main: DST[i] = f32(SRC[i]) for i < n.
// The f16-storage path: frozen weights kept as f16 (half the memory) are read as they are by the whole-tile
// matmuls (matmul_aligned.wgsl's A_ELEM / B_ELEM), and through a widened copy by every other product.
// Bindings: @binding(0) P = [n], @binding(1) SRC (n,) f16, @binding(2) DST (n,) f32.
enable f16;

#include flat

@group(0) @binding(1) var<storage, read> SRC: array<f16>;
@group(0) @binding(2) var<storage, read_write> DST: array<f32>;

@compute @workgroup_size(WG)
fn widen_main(inv: Invocation) {
    let i = flat(inv);
    if (i >= P[0]) { return; }
    DST[i] = f32(SRC[i]);
}
