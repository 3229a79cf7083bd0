"""The WebGPU device: adapter choice, the limits and features asked for, shader modules (trusted: compiled
without naga's runtime checks), the subgroup probe, and DeviceLostError. Imports no other part of lab, so the
backend factory can list adapters without loading the backend."""
import os
import tempfile

_ADAPTER_RANK = {"DiscreteGPU": 0, "IntegratedGPU": 1, "VirtualGPU": 2, "CPU": 3}
_FEATURES_WANTED = ("shader-f16", "timestamp-query", "subgroup")
_LIMITS_WANTED = (
    "max-buffer-size", "max-storage-buffer-binding-size", "max-storage-buffers-per-shader-stage",
    "max-compute-workgroup-storage-size", "max-compute-invocations-per-workgroup",
    "max-compute-workgroup-size-x", "max-compute-workgroup-size-y", "max-compute-workgroup-size-z",
    "max-compute-workgroups-per-dimension", "max-bindings-per-bind-group",
)
INSTALL_HINT = ("no WebGPU adapter found. On a CPU-only Debian/Ubuntu machine install Mesa's software Vulkan "
                "driver: `apt-get install mesa-vulkan-drivers` (as root); on a GPU machine install the vendor's "
                "Vulkan driver. Or use the numpy backend: LAB_BACKEND=numpy / lab.set_backend('numpy').")


def _import_wgpu():
    # Mesa's WSI layers complain on stderr when XDG_RUNTIME_DIR is unset, although compute never needs it.
    if not os.environ.get("XDG_RUNTIME_DIR"):
        d = os.path.join(tempfile.gettempdir(), f"lab-xdg-{os.getuid()}")
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = d
    import wgpu
    return wgpu


def list_adapters():
    """Every adapter wgpu can see, best first (discrete GPU, integrated, virtual, CPU)."""
    wgpu = _import_wgpu()
    infos = []
    for adapter in wgpu.gpu.enumerate_adapters_sync():
        info = dict(adapter.info)
        info["_adapter"] = adapter
        infos.append(info)
    infos.sort(key=lambda i: _ADAPTER_RANK.get(i.get("adapter_type"), 4))
    return infos



class DeviceLostError(RuntimeError):
    """The WebGPU device is gone (driver reset, GPU removed, or destroyed); its buffers went with it."""


def _lost(backend, error):
    """A DeviceLostError when `error` says the device was lost (then every later call would fail the same way)."""
    if "lost" not in str(error).lower():
        return error
    backend.lost = True
    return DeviceLostError(
        f"lab: the GPU device {backend.device_info['device']!r} was lost ({str(error).strip().splitlines()[-1].strip()}). "
        f"Tensors and models on it are gone. To continue on the CPU: lab.set_backend('numpy'), then reload the last "
        f"checkpoint (Trainer.resume(dir, ...) or lab.TransformerLM.from_pretrained(dir)); or restart the kernel for "
        f"a new device.")


class DeviceMixin:
    """WgpuBackend's device-level parts: the subgroup probe and shader module creation."""

    # LAB_SUBGROUPS=1: the row kernels (softmax, LayerNorm, cross-entropy, sums of squares) reduce through subgroup
    # operations where the device has them, two barriers a reduction instead of the shared-memory tree's 7 (RWG 64)
    # or 9 (256). Off by default: on the H200 they measured slower, softmax 0.72 against 0.69 ms and LayerNorm
    # 0.49 against 0.47 ms a shakespeare-char step (interleaved runs: README, Performance); other GPUs may differ.
    SUBGROUPS = os.environ.get("LAB_SUBGROUPS", "0") not in ("", "0")

    def _subgroups_usable(self):
        """Whether workgroup_reduce_subgroup.wgsl may stand in for the tree: the `subgroup` feature, and subgroups
        laid over consecutive invocation indices at both row widths (subgroup_probe.wgsl; Vulkan allows other
        layouts, so it is asked rather than assumed)."""
        if not self.SUBGROUPS or "subgroup" not in self.features:
            return False
        for rwg in (64, 256):
            out = self._alloc((rwg,), "int32")
            self._dispatch("subgroup_probe", "probe_main", [0], [out], (1, 1, 1), rwg, (("RWG", rwg),))
            usable = self.to_numpy(out).all()
            self._stats.update(dispatches=0, submits=0, readbacks=0, pipelines=0)   # (not the user's work)
            if not usable:
                return False
        return True

    # naga adds runtime checks to every shader it compiles: a clamp on each index into a fixed-size array and a
    # counter on each loop. The kernels here keep their indices in range by construction (their callers check
    # the shapes each one accepts) and every one is tested against numpy, so they are compiled without them;
    # LAB_SHADER_CHECKS=1 puts them back, to tell whether a kernel being written reads out of range. In the
    # matmuls' inner loops the clamps cost an integer op per shared-memory read and keep the compiler from
    # folding offsets into the loads: a shakespeare-char step on the H200 took 58.0 ms with them, 47.3 without.
    # Buffer reads and writes are guarded by the kernels themselves (and kept inside their bindings by Vulkan's
    # robust buffer access either way).
    SHADER_CHECKS = os.environ.get("LAB_SHADER_CHECKS", "") not in ("", "0")

    def _shader_module(self, source, kernel):
        if not self.SHADER_CHECKS:
            module = self._trusted_module(source, kernel)
            if module is not None:
                return module
        return self.device.create_shader_module(code=source, label=kernel)

    def _trusted_module(self, source, label):
        """A shader module made by wgpu-native's wgpuDeviceCreateShaderModuleTrusted with no runtime checks;
        None where this wgpu does not expose it (as 0.32 with wgpu-native 29 does). Called through wgpu's
        error-capturing wrappers, so a kernel that does not compile raises wgpu's error with naga's message."""
        try:
            from wgpu.backends.wgpu_native import _api
            create = _api.libf.wgpuDeviceCreateShaderModuleTrusted
            ffi, new_struct_p, string_view, module = (_api.ffi, _api.new_struct_p, _api.to_c_string_view,
                                                      _api.GPUShaderModule)
        except (ImportError, AttributeError):
            return None
        wgsl = new_struct_p("WGPUShaderSourceWGSL *", code=string_view(source))
        wgsl[0].chain.next = ffi.NULL
        wgsl[0].chain.sType = _api.lib.WGPUSType_ShaderSourceWGSL
        descriptor = new_struct_p("WGPUShaderModuleDescriptor *", nextInChain=ffi.cast("WGPUChainedStruct *", wgsl),
                                  label=string_view(label))
        handle = create(self.device._internal, descriptor, 0)  # WGPUShaderRuntimeChecks_None
        if handle == ffi.NULL:
            raise RuntimeError(f"{label}: shader module creation failed")
        return module(label, handle, self.device)
