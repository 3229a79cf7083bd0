"""The wgpu backend as a package: WGSL kernels (kernels/) on a WebGPU device, a real GPU or lavapipe on CPU-only
machines.

device.py: adapters, limits, features, shader modules, DeviceLostError. memory.py: GPUArray, the buffer pool,
upload and readback. recorder.py: the params arena, layouts, pipelines, bind groups, dispatch, sync, profiling.
capture.py: step capture and replay. matmul_plan.py: the matmul choice (kernel, tiles, grid, split-K, padding)
as pure arithmetic, with its tuning constants. elementwise.py, matmul.py, nn.py, optim.py: the primitives by kind.
backend.py joins them into WgpuBackend (and says how execution works)."""
from .backend import WgpuBackend
from .device import DeviceLostError, list_adapters
from .memory import GPUArray

__all__ = ["WgpuBackend", "DeviceLostError", "GPUArray", "list_adapters"]
