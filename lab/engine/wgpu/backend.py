"""The wgpu backend: WGSL kernels on a WebGPU device (a real GPU, or lavapipe on CPU-only machines).

Execution model: every primitive records a dispatch into one open compute pass; nothing is submitted until a
sync point (to_numpy, sync) or until the params arena fills. Small per-dispatch parameters (sizes, strides,
hyperparameters) are appended to a host-side arena that is uploaded once per submit. Pipelines are cached per
(kernel file, entry point, specialization); bind groups are cached per exact binding set; buffers are pooled.

Buffer reuse rule: dispatches run in recording order, so a buffer released while recording may at once hold
the output of a later dispatch. Uploads are different: queue.write_buffer lands before the unsubmitted
dispatches run, so an upload only takes a buffer that no unsubmitted dispatch references: buffers released
during recording wait in `_recent` (usable by kernel outputs) and join the upload-safe pool at the next submit.

Step capture (capture_begin / capture_end / replay): a training step's dispatches, recorded once with their
pipelines, bind groups and params, can be recorded again into a new pass without running any Python op: the
host's cost per dispatch falls from the op's Python (autograd, shape checks, packing) to three wgpu calls. The
buffers such a capture binds are held out of the pool while it lives, so replays find them as they left them.
"""
import collections
import functools
import inspect

from ..backend import Backend
from ..locks import FairLock
from . import device
from .capture import CaptureMixin
from .device import _FEATURES_WANTED, _LIMITS_WANTED, INSTALL_HINT, DeviceMixin
from .elementwise import ElementwiseOps
from .matmul import MatmulOps
from .memory import GPUArray, MemoryMixin, _Storage
from .nn import NNOps
from .optim import OptimizerOps
from .quant import QuantOps
from .recorder import _NO_INDEX_ERROR, ARENA_BYTES, RecorderMixin
from .sampling import SamplingOps


class WgpuBackend(DeviceMixin, MemoryMixin, RecorderMixin, CaptureMixin, ElementwiseOps, MatmulOps, NNOps,
                  OptimizerOps, QuantOps, SamplingOps, Backend):
    name = "wgpu"
    fused_matmul_gelu = supports_capture = fused_rms_norm = fused_swiglu = fused_rotary = True
    def __init__(self):
        wgpu = device._import_wgpu()
        self.wgpu = wgpu
        adapters = device.list_adapters()
        if not adapters:
            raise RuntimeError("lab: " + INSTALL_HINT)
        chosen = adapters[0]
        adapter = chosen.pop("_adapter")
        features = [f for f in _FEATURES_WANTED if f in adapter.features]
        limits = {k: adapter.limits[k] for k in _LIMITS_WANTED if k in adapter.limits}
        self.device = adapter.request_device_sync(required_features=features, required_limits=limits)
        self.queue = self.device.queue
        self.limits = dict(self.device.limits)
        self.features = sorted(str(f) for f in self.device.features)
        self.half_storage = "shader-f16" in self.features   # float16 arrays: storage for frozen weights
        self._half_made = False    # whether any float16 array was made (only then do dispatches check for them)
        self.device_info = {
            "device": chosen.get("device", ""), "vendor": chosen.get("vendor", ""),
            "adapter_type": chosen.get("adapter_type", ""), "backend_type": chosen.get("backend_type", ""),
            "description": chosen.get("description", ""),
            "features": [f for f in _FEATURES_WANTED if f in self.features],
            "limits": {k: self.limits.get(k) for k in _LIMITS_WANTED},
        }
        self.max_binding = self.limits["max-storage-buffer-binding-size"]
        self.max_buffer = self.limits["max-buffer-size"]
        self.align = max(256, self.limits.get("min-storage-buffer-offset-alignment", 256))
        self._usage = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC | wgpu.BufferUsage.COPY_DST
        # Every buffer the backend creates stays referenced here until empty_cache destroys it. Without this, a
        # garbage-collected reference cycle holding a tensor's storage and its buffer would let wgpu release the
        # buffer while the storage's finalizer returns it to the pool, and a later upload would hit a dead buffer.
        self._owned = {}           # id -> buffer
        self._pool = {}            # rounded size -> [buffers] referenced by no unsubmitted dispatch
        self._recent = {}          # rounded size -> [buffers] released while recording (outputs only)
        self._pipelines = {}       # (kernel, entry, specialization) -> (pipeline, bind group layout, slots)
        self._layouts = {}
        self._dummies = {}
        self._tables, self._opt_subs = {}, {}  # adamw_many_'s slot tables (by layout) and generated sources
        self._bind_groups = {}
        self._arena = self.device.create_buffer(size=ARENA_BYTES, usage=self._usage)
        self._arena_host = bytearray(ARENA_BYTES)
        self._arena_used = 0
        self._arena_index = {}     # params bytes -> offset: a repeated op reuses its params, and so its bind group
        self._encoder = None
        self._pass = None
        self._profile = None       # a _Profile while lab.profile() is active
        self._no_guard = None      # the finite stand-in for an optimizer update without a guard
        self._capture = None       # a Capture while a step is being captured
        self._patch = None         # how the next dispatch's params follow the step (set by adamw_, sgd_, dropout)
        self._reserved = {}        # id(buffer) -> number of live captures binding it: kept out of the pool
        self._held = {}            # id(buffer) -> (buffer, size): reserved buffers no array owns any more
        # Two Python threads (a panel's training thread, generation in the kernel's) share the recording: the open
        # encoder and pass, the params arena, the pools, the caches. Every public method holds this lock, so each
        # op records whole; a capture holds it from capture_begin to capture_end, a trainer's step through
        # exclusive() (see there).
        self._lock = FairLock()   # (fair: a panel's training step after step must not starve the kernel's cells)
        self._freed = collections.deque()  # (buffer, size) of arrays freed since the last locked call
        self.lost = False
        # Indices that live on the device are checked there: embedding.wgsl and cross_entropy.wgsl clamp a bad one
        # and record it in this buffer (index_check.wgsl); check_indices reads it at the next readback after a
        # dispatch given unchecked indices. Reading the indices back at every op instead would stall each step,
        # and host indices (every training batch, replays included) are checked before their upload.
        self._index_errors = GPUArray(_Storage(self.device.create_buffer(size=256, usage=self._usage), 256, self),
                                      (4,), "int32")
        self.queue.write_buffer(self._index_errors.buffer, 0, _NO_INDEX_ERROR)
        # threads that gave a kernel unchecked indices since they last read ERR: a bad index is raised in the
        # thread that used it (a panel's training thread must not stop for an index the kernel's cell got wrong)
        self._indices_unchecked = set()
        self._stats = dict(dispatches=0, submits=0, readbacks=0, uploads=0, pipelines=0,
                           bind_group_hits=0, bind_group_misses=0,
                           bytes_in_use=0, peak_bytes_in_use=0, bytes_reserved=0)
        self._includes = ()        # include swaps for every kernel (kernels.source): the device's variants
        self.subgroup_reductions = self._subgroups_usable()
        if self.subgroup_reductions:
            self._includes = (("workgroup_reduce", "workgroup_reduce_subgroup"),)


def _locked(method):
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            if self._freed:
                self._take_back_freed()
            return method(self, *args, **kwargs)
    return locked


# every public method the runtime's parts define (not the Backend interface's composed fallbacks, which call them)
for _name in {n for c in WgpuBackend.__mro__[:WgpuBackend.__mro__.index(Backend)] for n in vars(c)}:
    _method = getattr(WgpuBackend, _name)
    if inspect.isfunction(_method) and not _name.startswith("_"):
        setattr(WgpuBackend, _name, _locked(_method))
