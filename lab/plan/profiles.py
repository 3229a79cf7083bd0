"""Device profiles for the plan estimator: what a device sustains for lab's kernels.

A measured profile (measure.profile_device) times lab's own ops on the current backend: matmuls (forward and the
two transposed products of a backward), an elementwise op, a one-element op for the fixed cost of an op, and a small probe training step
from which the cost of the engine's elementwise work per activation float follows. Named profiles come from public specifications and are marked spec-derived; they
assume what the H200 measurements in README.md show for lab's current kernels: 60% of the fp32 peak in matmul,
elementwise work of about 12 bytes per activation float at 60% of the memory bandwidth, and 6 us per op (a
replayed step; an eager step costs 40-60 us of host time per op). Calibrated there: shakespeare-char 44 ms
predicted against 38 measured, gpt2-small 209 against 216, tiny 2.3 against 2.3 (with 24 bytes per activation
float, before the fusions of README.md's items 12-16); now 37.4 against 33.0, 192 against 180, 1.6 against 1.8.
"""
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..checks import InputError, show

MATMUL_EFFICIENCY, BANDWIDTH_EFFICIENCY, SPEC_OP_OVERHEAD_S = 0.60, 0.60, 6e-6


@dataclass
class DeviceProfile:
    name: str
    source: str                   # "measured" or "spec-derived: ..."
    matmul_flops: float           # FLOP/s lab's matmul sustains
    bandwidth: float              # bytes/s an elementwise op sustains (read + write) on arrays beyond the caches
    op_overhead_s: float          # fixed cost of one op (host recording, launch, autograd bookkeeping)
    memory_bytes: int             # memory available to the device
    max_buffer_size: int
    max_binding_size: int
    elementwise_s_per_float: float = 0.0  # training-step time per activation float beyond matmuls and op costs
    dropout_s_per_float: float = 0.0      # one dropout (its mask from the counter-based RNG) per element
    update_slots: int = 1         # parameters one optimizer dispatch updates (wgpu: as many as a stage binds)
    host_temporaries: bool = False  # numpy: an op's whole-array temporaries (a softmax's exp) are memory too
    workgroup_storage: int = 16384  # bytes of workgroup memory a kernel may use (WebGPU's minimum unless known):
    #                                 which heads the fused attention's blocks take (estimator.runs_fused_attention;
    #                                 0 on the numpy backend, which has no fused attention)

    def to_dict(self):
        return asdict(self)


# elementwise work per activation float in a step on a GPU, as the fused kernels measured on the H200 do it:
# about 1 pass moving 3 floats (see estimator.py; 2 before the residual adds, attention's dropout and its head
# copies moved into other kernels); numpy makes about 6 such passes
SPEC_BYTES_PER_ACTIVATION_FLOAT = 1 * 3 * 4
NUMPY_BYTES_PER_ACTIVATION_FLOAT = 6 * 3 * 4
DROPOUT_BYTES_PER_FLOAT = 2 * 4  # on a GPU the mask is computed in registers: one read, one write


GPU_UPDATE_SLOTS = 128  # a GPU's Vulkan driver binds far more buffers per stage than a model has parameters


def _spec(name, tflops, gbs, mem_gib, note, max_buffer=None, max_binding=None, workgroup_storage=49152):
    mem = int(mem_gib * 2 ** 30)
    bandwidth = gbs * 1e9 * BANDWIDTH_EFFICIENCY
    return DeviceProfile(name, f"spec-derived: {note}", tflops * 1e12 * MATMUL_EFFICIENCY, bandwidth,
                         SPEC_OP_OVERHEAD_S, mem, max_buffer or min(mem, 2 ** 32 - 1),
                         max_binding or min(mem, 2 ** 31 - 4), SPEC_BYTES_PER_ACTIVATION_FLOAT / bandwidth,
                         DROPOUT_BYTES_PER_FLOAT / bandwidth, GPU_UPDATE_SLOTS, workgroup_storage=workgroup_storage)


PROFILES = {
    "m1": _spec("Apple M1 8-core GPU (MacBook Air, 8 GB)", 2.6, 68.25, 8 * 0.75,
                "2.6 TFLOP/s fp32, 68 GB/s LPDDR4X, ~75% of 8 GB unified memory usable by the GPU",
                max_buffer=2 ** 32 - 1, max_binding=2 ** 32 - 1, workgroup_storage=32768),
    "rtx4090": _spec("NVIDIA RTX 4090", 82.6, 1008, 24, "82.6 TFLOP/s fp32, 1008 GB/s GDDR6X, 24 GB"),
    "h100": _spec("NVIDIA H100 SXM", 67, 3350, 80, "67 TFLOP/s fp32 (no tensor cores), 3.35 TB/s HBM3, 80 GB"),
    "h200": _spec("NVIDIA H200", 67, 4800, 141, "67 TFLOP/s fp32 (no tensor cores), 4.8 TB/s HBM3e, 141 GB"),
    "cpu-2core": DeviceProfile("2-core x86 CPU (numpy backend)", "spec-derived: 2 cores x 3 GHz x 32 fp32 FLOP/cycle "
                               "= 192 GFLOP/s peak, ~60% in BLAS; ~8 GB/s for numpy temporaries; 24 GB",
                               115e9, 8e9, 25e-6, 24 * 2 ** 30, 2 ** 62, 2 ** 62, NUMPY_BYTES_PER_ACTIVATION_FLOAT / 8e9, 6e-9,
                               host_temporaries=True, workgroup_storage=0),
}



def _read_int(path, key=None):
    """An integer file (/sys/fs/cgroup/memory.max), or a `key: value kB` line's bytes (/proc/meminfo); None if absent."""
    try:
        text = Path(path).read_text()
        if key is None:
            return int(text)
        return next(int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith(key + ":"))
    except (OSError, ValueError, StopIteration, IndexError):   # (no such file, "max": no limit)
        return None


def _host_memory():
    """The memory this process can have at most: what it holds (the weights a plan counts are made already) and what
    the system still has available, within a container's memory limit (cgroup v2 or v1). The physical total counted
    other programs' memory, and a container's limit not at all, as free: a batch planned at 99.6% of the total with
    a quarter of it in use passed the fit check, and the kernel's out-of-memory killer ended the process (a
    notebook's kernel with it)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    held, available = _read_int("/proc/self/status", "VmRSS"), _read_int("/proc/meminfo", "MemAvailable")
    if held is None or available is None:   # (no /proc: not Linux)
        return total
    limits = [total, held + available]
    for limit, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, used = _read_int(limit), _read_int(used)
        if limit is not None and used is not None:
            limits.append(held + max(0, limit - used))
    return min(limits)


def _device_memory_guess(backend):
    """WebGPU does not report device memory; take the matching named profile's, else the host's memory."""
    dev = backend.device_info["device"].lower()
    for key, prof in PROFILES.items():
        if key in dev.replace(" ", ""):
            return prof.memory_bytes
    return _host_memory()


def limits_profile(backend):
    """The memory and buffer limits of a backend's device, without timing anything (the checks before a run use
    it as it is; profile_device adds the timings)."""
    if backend.name == "wgpu":
        limits = backend.device_info["limits"]
        return DeviceProfile(backend.device_info["device"], "limits", math.nan, math.nan, math.nan,
                             int(_device_memory_guess(backend)), int(limits["max-buffer-size"]),
                             int(limits["max-storage-buffer-binding-size"]),
                             workgroup_storage=int(limits.get("max-compute-workgroup-storage-size", 16384)))
    return DeviceProfile("this CPU (numpy backend)", "limits", math.nan, math.nan, math.nan, int(_host_memory()),
                         2 ** 62, 2 ** 62, host_temporaries=True, workgroup_storage=0)


def named_profile(device):
    """A DeviceProfile as it is, or the spec-derived profile of that name (measuring one is plan.measure's)."""
    if isinstance(device, DeviceProfile):
        return device
    if not isinstance(device, str) or device not in PROFILES:
        raise InputError(f"unknown device profile {show(device)}: choose 'this' (measured) or one of "
                         f"{sorted(PROFILES)}")
    return PROFILES[device]
