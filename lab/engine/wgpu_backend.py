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
import math
import os
import re
import struct
import tempfile
import threading

import numpy as np

from .backend import (MAXDIM, Backend, HeadView, broadcast_strides, contiguous_strides, gather_heads, index_range_error,
                      scatter_heads)
from .kernels import specialize
from .locks import FairLock

_ADAPTER_RANK = {"DiscreteGPU": 0, "IntegratedGPU": 1, "VirtualGPU": 2, "CPU": 3}
_FEATURES_WANTED = ("shader-f16", "timestamp-query", "subgroup")
_LIMITS_WANTED = (
    "max-buffer-size", "max-storage-buffer-binding-size", "max-storage-buffers-per-shader-stage",
    "max-compute-workgroup-storage-size", "max-compute-invocations-per-workgroup",
    "max-compute-workgroup-size-x", "max-compute-workgroup-size-y", "max-compute-workgroup-size-z",
    "max-compute-workgroups-per-dimension", "max-bindings-per-bind-group",
)
WG = 256
ARENA_BYTES = 4 << 20
PARAMS_BYTES = 256   # the window of the params arena a dispatch sees (its offset is dynamic)
# storage bindings a kernel module declares: (binding number, access)
_BINDING_RE = re.compile(r"@group\(0\)\s*@binding\((\d+)\)\s*var<storage,\s*(read_write|read)>")
_HALF_BINDING_RE = re.compile(r"@group\(0\)\s*@binding\((\d+)\)\s*var<storage,\s*\w+>\s*\w+\s*:\s*array<[^;]*f16")
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


def _u32(x):
    return int(x) & 0xFFFFFFFF


def _round_up(n, m):
    return -(-n // m) * m


_HOST_DTYPES = {"float32": np.float32, "int32": np.int32, "float16": np.float16}
_NO_INDEX_ERROR = np.array([0, 2**31 - 1, -2**31, 0], dtype=np.int32).tobytes()  # index_check.wgsl's ERR, clear
_INDEX_OPS = {1: "embedding", 2: "cross_entropy"}                                # its op codes


def _whole_words(x):
    """x's bytes padded to whole 4-byte words (queue writes take multiples of 4: an odd count of float16s)."""
    if x.nbytes % 4 == 0:
        return x
    return x.tobytes() + bytes(-x.nbytes % 4)


def _storage(x):
    """The buffer behind an operand (a HeadView's activation)."""
    return x.data if isinstance(x, HeadView) else x


def _aligned_subs(a, b):
    """matmul_aligned.wgsl's operand types: f32, or f16 for a float16 array (the f16-storage products)."""
    elems = ["f16" if getattr(x, "dtype", None) == "float16" else "f32" for x in (a, b)]
    return (("ENABLE", "enable f16;" if "f16" in elems else ""), ("A_ELEM", elems[0]), ("B_ELEM", elems[1]))


def _operand_layout(x, heads):
    """(offset, outer, inner, row stride) in floats of matmul_aligned.wgsl's operand addressing (see its header):
    matrix b at offset + (b / heads) outer + (b % heads) inner, rows `row stride` apart."""
    if isinstance(x, HeadView):
        outer, inner, row, _ = x.strides()
        return x.offset, outer, inner, row
    n, rows, cols = x.shape
    if n == 1:  # one matrix for the whole batch
        return 0, 0, 0, cols
    return 0, heads * rows * cols, rows * cols, cols


def _f32bits(x):
    """The bits of x as a float32 (rounded to nearest; beyond float32's range, +-inf)."""
    try:
        return _U32.unpack(_F32.pack(x))[0]
    except OverflowError:
        with np.errstate(over="ignore"):
            return int(np.array([x], dtype=np.float32).view(np.uint32)[0])


_F32, _U32 = struct.Struct("<f"), struct.Struct("<I")


def _row_subs(n):
    """Threads per row for the row kernels (softmax, layernorm, cross-entropy): a short row gets 64, so a
    workgroup's reductions take fewer steps and four times as many rows are in flight."""
    return (("RWG", 64 if n <= 1024 else 256),)


def _split(n, min_chunk, max_pieces):
    """Cut n items into S chunks of `chunk` (the last may be short): as many as max_pieces allows, each at least
    min_chunk long. Returns (S, chunk); the kernels that sum partial results over such chunks use it."""
    S = max(1, min(math.ceil(n / min_chunk), max_pieces))
    chunk = max(1, math.ceil(n / S))
    return max(1, math.ceil(n / chunk)), chunk


def _grid(n_groups):
    """Split a 1D count of workgroups into a 2D grid that respects the 65535-per-dimension limit."""
    if n_groups <= 65535:
        return (max(n_groups, 1), 1, 1)
    y = math.ceil(n_groups / 65535)
    return (math.ceil(n_groups / y), y, 1)


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


class _Storage:
    """One GPU buffer owned by one or more arrays (reshape views share it); returns to the pool when freed."""
    __slots__ = ("buffer", "nbytes", "backend", "__weakref__")

    def __init__(self, buffer, nbytes, backend):
        self.buffer, self.nbytes, self.backend = buffer, nbytes, backend

    def __del__(self):
        # No lock here: a finalizer runs in whichever thread drops the last reference, at any point of it (inside
        # other locks; interruptible while it waited); the backend takes the buffer back at its next locked call.
        try:
            self.backend._freed.append((self.buffer, self.nbytes))
        except Exception:  # interpreter shutdown
            pass


class GPUArray:
    __slots__ = ("storage", "shape", "dtype")

    def __init__(self, storage, shape, dtype):
        self.storage, self.shape, self.dtype = storage, tuple(shape), dtype

    @property
    def size(self):
        return math.prod(self.shape)

    @property
    def buffer(self):
        return self.storage.buffer

    def __repr__(self):
        return f"GPUArray(shape={self.shape}, dtype={self.dtype})"


class _Profile:
    """Per-dispatch GPU times from timestamp queries: records of (kernel:entry, detail, nanoseconds)."""
    capacity = 4096  # queries in the set: two per dispatch

    def __init__(self, backend):
        wgpu = backend.wgpu
        self.backend = backend
        self.query_set = backend.device.create_query_set(type=wgpu.QueryType.timestamp, count=self.capacity)
        self.resolved = backend.device.create_buffer(
            size=self.capacity * 8, usage=wgpu.BufferUsage.QUERY_RESOLVE | wgpu.BufferUsage.COPY_SRC)
        self.used, self.pending, self.records = 0, [], []

    def resolve(self, encoder):
        if self.used:
            encoder.resolve_query_set(self.query_set, 0, self.used, self.resolved, 0)

    def collect(self):
        if not self.used:
            return
        ticks = np.frombuffer(self.backend.queue.read_buffer(self.resolved, 0, self.used * 8), dtype=np.uint64)
        # Vulkan timestamps count in units of the device's timestamp period, which wgpu converts to nanoseconds.
        ns = (ticks[1::2].astype(np.int64) - ticks[0::2].astype(np.int64)).clip(min=0)
        self.records.extend((name, label, t) for (name, label), t in zip(self.pending, ns.tolist()))
        self.used, self.pending = 0, []


class Capture:
    """One step's dispatches as recorded: (pipeline, bind group, params offset, grid) each, with the key
    (kernel, entry, specialization, grid, params bytes) that says what it computed, the patches (dispatch index ->
    function of the step giving its new params), every buffer it binds, and its uploads in order."""

    def __init__(self):
        self.dispatches, self.keys, self.patches = [], [], {}
        self.buffers, self.uploads = {}, []
        self.arena = b""
        self.broken = None  # why it cannot be replayed
        self.native = None  # the dispatches' arguments for wgpu-native's C functions (made at the first replay)

    def add(self, pipeline, bind_group, offset, grid, key, patch, buffers):
        if patch is not None:
            self.patches[len(self.dispatches)] = patch
        self.dispatches.append((pipeline, bind_group, offset, tuple(grid) + (1,) * (3 - len(grid))))  # x, y, z
        self.keys.append(key)
        self.buffers.update((id(b), b) for b in buffers)

    def difference(self, later, step, inputs=()):
        """Why replaying this capture with `step` would not record what `later` (the next step, captured too)
        recorded, or None: the same kernels and grids, the same params once patched, the same uploads except
        those at the indices `inputs` (the batches)."""
        if len(self.keys) != len(later.keys):
            return f"the step recorded {len(self.keys)} dispatches, the next one {len(later.keys)}"
        for i, (a, b) in enumerate(zip(self.keys, later.keys)):
            if a[:4] != b[:4]:
                return f"dispatch {i} was {a[0]}:{a[1]} {a[3]}, then {b[0]}:{b[1]} {b[3]}"
            want = a[4] if i not in self.patches else struct.pack(f"<{len(a[4]) // 4}I", *map(_u32, self.patches[i](step)))
            if want != b[4]:
                return f"the params of dispatch {i} ({a[0]}:{a[1]}) change from step to step"
        if len(self.uploads) != len(later.uploads):
            return f"the step uploaded {len(self.uploads)} arrays, the next one {len(later.uploads)}"
        for k, ((_, x), (_, y)) in enumerate(zip(self.uploads, later.uploads)):
            if k not in inputs and x != y:
                return f"upload {k} of the step changes from step to step"
        return None


class WgpuBackend(Backend):
    name = "wgpu"
    fused_matmul_gelu = supports_capture = True
    def __init__(self):
        wgpu = _import_wgpu()
        self.wgpu = wgpu
        adapters = list_adapters()
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

    # ------------------------------------------------------------------ memory
    def _alloc(self, shape, dtype, upload=False):
        if dtype == "float16":
            self._half_made = True
        nbytes = max(4, _round_up(math.prod(shape) * (2 if dtype == "float16" else 4), 4))
        if nbytes > self.max_binding:
            raise ValueError(
                f"tensor of shape {tuple(shape)} needs {nbytes} bytes, more than this device's "
                f"max-storage-buffer-binding-size of {self.max_binding} bytes ({self.device_info['device']})")
        size = (nbytes + 255) // 256 * 256
        self._take_back_freed()  # (an op's own temporaries, freed since the op began)
        free = self._pool.get(size) if upload else (self._recent.get(size) or self._pool.get(size))
        if free:
            buffer = free.pop()
        else:
            try:
                buffer = self.device.create_buffer(size=size, usage=self._usage)
            except self.wgpu.GPUError as e:
                raise _lost(self, e) from None
            self._owned[id(buffer)] = buffer
            self._stats["bytes_reserved"] += size
        s = self._stats
        s["bytes_in_use"] += size
        s["peak_bytes_in_use"] = max(s["peak_bytes_in_use"], s["bytes_in_use"])
        return GPUArray(_Storage(buffer, size, self), shape, dtype)

    def _take_back_freed(self):
        while self._freed:
            self._release(*self._freed.popleft())

    def _release(self, buffer, size):
        if id(buffer) in self._reserved:  # a capture binds it: still in use, keeping what the step left there
            self._held[id(buffer)] = (buffer, size)
            return
        self._stats["bytes_in_use"] -= size
        pool = self._recent if self._encoder is not None else self._pool
        pool.setdefault(size, []).append(buffer)

    def empty_cache(self):
        """Destroy pooled buffers (memory held for reuse) and cached bind groups."""
        self.sync()
        self._bind_groups.clear()
        for size, buffers in self._pool.items():
            for b in buffers:
                b.destroy()
                del self._owned[id(b)]
                self._stats["bytes_reserved"] -= size
        self._pool.clear()

    def from_numpy(self, x):
        x = np.ascontiguousarray(x).reshape(np.shape(x))  # (ascontiguousarray makes a 0-D array 1-D)
        dtype = {np.dtype(np.float32): "float32", np.dtype(np.int32): "int32"}.get(x.dtype)
        if x.dtype == np.float16 and self.half_storage:
            dtype = "float16"
        if dtype is None:
            raise ValueError(f"wgpu backend stores float32 and int32 tensors (and float16 on devices with "
                             f"shader-f16), got dtype {x.dtype}")
        a = self._alloc(x.shape, dtype, upload=True)
        if x.size:
            self.queue.write_buffer(a.buffer, 0, _whole_words(x))
            self._stats["uploads"] += 1
        if self._capture is not None:
            self._capture.uploads.append((a, x.tobytes()))
        return a

    def write(self, a, x):
        """Overwrite array `a` with host values x (same size) before the work recorded next runs."""
        x = np.ascontiguousarray(x, dtype=_HOST_DTYPES[a.dtype])
        if x.size != a.size:
            raise ValueError(f"write: {x.size} values for an array of shape {a.shape}")
        if x.size:
            self.queue.write_buffer(a.buffer, 0, _whole_words(x))
            self._stats["uploads"] += 1

    def to_numpy(self, a):
        if self._capture is not None:
            self._capture.broken = "the step reads a value back from the device"
        self.sync()
        if self.check_indices():
            self._stats["readbacks"] += 1  # (in sync(wait=True) the same read stands in for the wait's own)
        dt = _HOST_DTYPES[a.dtype]
        if a.size == 0:
            return np.zeros(a.shape, dtype=dt)
        try:
            data = self.queue.read_buffer(a.buffer, 0, _round_up(a.size * np.dtype(dt).itemsize, 4))
        except self.wgpu.GPUError as e:
            raise _lost(self, e) from None
        self._stats["readbacks"] += 1
        return np.frombuffer(data, dtype=dt)[:a.size].reshape(a.shape).copy()

    def full(self, shape, value, dtype="float32"):
        a = self._alloc(shape, dtype)
        bits = _f32bits(value) if dtype == "float32" else _u32(value)
        self._dispatch("copy", "fill_main", [a.size, bits], [None, a], _grid(math.ceil(a.size / WG)), a.size)
        return a

    def empty(self, shape, dtype="float32"):
        return self._alloc(shape, dtype)

    def reshape(self, a, shape):
        return GPUArray(a.storage, shape, a.dtype)

    def storage(self, a):
        return a.storage

    # ------------------------------------------------------------------ recording
    def _layout(self, kernel, subs):
        """A module's explicit bind group layout: every storage binding it declares, the params (binding 0) with a
        dynamic offset. Fixed layouts let one bind group serve a dispatch whatever its params' place in the arena,
        so a training step's bind groups are created once and then found in the cache."""
        key = (kernel, subs)
        layout = self._layouts.get(key)
        if layout is None:
            wgpu = self.wgpu
            source = specialize(kernel, self._includes, **dict(subs))
            slots = sorted({(int(b), mode) for b, mode in _BINDING_RE.findall(source)})
            entries = [{"binding": b, "visibility": wgpu.ShaderStage.COMPUTE,
                        "buffer": {"type": wgpu.BufferBindingType.read_only_storage if mode == "read"
                                   else wgpu.BufferBindingType.storage, "has_dynamic_offset": b == 0}}
                       for b, mode in slots]
            bgl = self.device.create_bind_group_layout(entries=entries)
            layout = (source, bgl, self.device.create_pipeline_layout(bind_group_layouts=[bgl]),
                      tuple(b for b, _ in slots if b > 0), {int(b) for b in _HALF_BINDING_RE.findall(source)})
            self._layouts[key] = layout
        return layout

    def _dummy(self, slot):
        """A small buffer for a declared binding a dispatch does not use (one per binding number, so it never
        aliases another binding of the same dispatch)."""
        d = self._dummies.get(slot)
        if d is None:
            d = self._dummies[slot] = self.device.create_buffer(size=256, usage=self._usage)
        return d

    def _pipeline(self, kernel, entry, subs):
        key = (kernel, entry, subs)
        p = self._pipelines.get(key)
        if p is None:
            source, bgl, pipeline_layout, slots, half_slots = self._layout(kernel, subs)
            module = self._shader_module(source, kernel)
            p = self.device.create_compute_pipeline(layout=pipeline_layout,
                                                    compute={"module": module, "entry_point": entry},
                                                    label=f"{kernel}:{entry}")
            p = (p, bgl, slots, half_slots)
            self._pipelines[key] = p
            self._stats["pipelines"] += 1
        return p

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

    def _dispatch(self, kernel, entry, params, bindings, grid, work=1, subs=(), label=None):
        """Record one dispatch. bindings[i] is bound at @binding(i + 1); None skips a binding number.
        `label` details the dispatch in lab.profile() tables (e.g. a matmul's shape)."""
        if work == 0:
            self._patch = None
            return
        params = struct.pack(f"<{len(params)}I", *map(_u32, params))
        if len(params) > PARAMS_BYTES:
            raise ValueError(f"{kernel}:{entry}: {len(params)} bytes of params, more than the {PARAMS_BYTES} a dispatch sees")
        capture = self._capture
        # while capturing every dispatch gets its own params slot: a replay rewrites some of them (lr, seeds)
        offset = None if capture is not None else self._arena_index.get(params)
        if offset is None:
            if self._arena_used + PARAMS_BYTES > ARENA_BYTES:
                if capture is not None:
                    capture.broken = f"the step has more than {ARENA_BYTES // PARAMS_BYTES} dispatches"
                self.sync()
            offset = self._arena_used
            self._arena_host[offset:offset + len(params)] = params
            self._arena_used = offset + PARAMS_BYTES
            self._arena_index[params] = offset
        pipeline, bgl, slots, half_slots = self._pipeline(kernel, entry, subs)
        if self._half_made:  # (a float16 binding is chosen only for a float16 array, so none can be wrong before)
            self._check_half(kernel, entry, bindings, half_slots)
        key = (id(pipeline),) + tuple(id(a.storage.buffer) if a is not None else 0 for a in bindings)
        bg = self._bind_groups.get(key)
        if bg is None:
            entries = [{"binding": 0, "resource": {"buffer": self._arena, "offset": 0, "size": PARAMS_BYTES}}]
            for slot in slots:
                a = bindings[slot - 1] if slot - 1 < len(bindings) else None
                entries.append({"binding": slot, "resource": {
                    "buffer": a.buffer if a is not None else self._dummy(slot), "offset": 0,
                    "size": a.storage.nbytes if a is not None else 256}})
            try:
                bg = self.device.create_bind_group(layout=bgl, entries=entries)
            except self.wgpu.GPUError as e:
                raise _lost(self, e) from None
            if len(self._bind_groups) > 8192:
                self._bind_groups.clear()
            # The cached entry keeps its buffers alive, so their ids cannot be reused by new buffers.
            self._bind_groups[key] = (bg, [a.storage.buffer for a in bindings if a is not None])
            self._stats["bind_group_misses"] += 1
        else:
            bg = bg[0]
            self._stats["bind_group_hits"] += 1
        if self._encoder is None:
            self._encoder = self.device.create_command_encoder()
            self._pass = None if self._profile else self._encoder.begin_compute_pass()
        if self._profile:
            self._profiled_dispatch(pipeline, bg, offset, grid, f"{kernel}:{entry}", label)
            return
        if capture is not None:
            capture.add(pipeline, bg, offset, grid, (kernel, entry, subs, tuple(grid), params), self._patch,
                        [a.storage.buffer for a in bindings if a is not None])
        self._patch = None
        self._pass.set_pipeline(pipeline)
        self._pass.set_bind_group(0, bg, [offset])
        self._pass.dispatch_workgroups(*grid)
        self._stats["dispatches"] += 1

    @staticmethod
    def _check_half(kernel, entry, bindings, half_slots):
        """Every float16 array bound where the kernel declares f16 values, and only there."""
        for i, a in enumerate(bindings):
            if a is not None and (a.dtype == "float16") != (i + 1 in half_slots):
                holds = "float16" if i + 1 in half_slots else "32-bit"
                raise ValueError(f"{kernel}:{entry} binding {i + 1} holds {holds} values, given a {a.dtype} array: "
                                 f"float16 tensors are storage for frozen weights, read by linear and matmul only")

    def _profiled_dispatch(self, pipeline, bg, offset, grid, name, label):
        # Timestamps can only be written at pass boundaries (without a native extension), so a profiled dispatch
        # runs in a compute pass of its own: the table measures kernels, not the cost of one shared pass.
        prof = self._profile
        if prof.used + 2 > prof.capacity:
            self.sync()
            self._encoder = self.device.create_command_encoder()
        i = prof.used
        cpass = self._encoder.begin_compute_pass(timestamp_writes={
            "query_set": prof.query_set, "beginning_of_pass_write_index": i, "end_of_pass_write_index": i + 1})
        cpass.set_pipeline(pipeline)
        cpass.set_bind_group(0, bg, [offset])
        cpass.dispatch_workgroups(*grid)
        cpass.end()
        prof.used += 2
        prof.pending.append((name, label or name))
        self._stats["dispatches"] += 1

    @property
    def profiling(self):
        return self._profile is not None

    def profile_begin(self):
        if "timestamp-query" not in self.features:
            raise RuntimeError(f"lab.profile() needs the timestamp-query feature, which "
                               f"{self.device_info['device']} does not offer")
        self.sync()
        self._profile = _Profile(self)

    def profile_end(self):
        self.sync(wait=True)
        prof, self._profile = self._profile, None
        return prof.records

    # ------------------------------------------------------------------ step capture
    def capture_begin(self):
        """Start recording a step for replay (its dispatches still run as usual). The calling thread owns the
        backend until capture_end: another thread's ops wait for the step boundary, as they must not be recorded
        into the capture nor submit half of it (a per-op lock would allow both between two of the step's ops)."""
        if self._profile is not None:
            raise RuntimeError("cannot capture a step while lab.profile() is active")
        if self._capture is not None:
            raise RuntimeError("a step is already being captured: capture_end() it first")
        self.sync()
        self._lock.acquire()
        self._capture = Capture()

    def capture_end(self):
        """Stop recording and submit the step. Returns the Capture; its buffers stay out of the pool until
        release_capture (check capture.broken before replaying it)."""
        if self._capture is None:
            raise RuntimeError("capture_end() without capture_begin()")
        capture, self._capture = self._capture, None
        self._lock.release()  # capture_begin's hold (this method's own keeps the backend until it returns)
        self._patch = None
        capture.arena = bytes(self._arena_host[:self._arena_used])
        self.sync()
        for key, buffer in capture.buffers.items():
            self._reserved[key] = self._reserved.get(key, 0) + 1
        stats = self._stats
        for pool in (self._pool, self._recent):  # buffers the step freed again: back in use, held for replays
            for size, buffers in pool.items():
                taken = [b for b in buffers if id(b) in capture.buffers]
                if taken:
                    buffers[:] = [b for b in buffers if id(b) not in capture.buffers]
                    self._held.update((id(b), (b, size)) for b in taken)
                    stats["bytes_in_use"] += size * len(taken)
        stats["peak_bytes_in_use"] = max(stats["peak_bytes_in_use"], stats["bytes_in_use"])
        return capture

    def release_capture(self, capture):
        """Give a capture's buffers back: those no array owns return to the pool."""
        for key in capture.buffers:
            n = self._reserved.get(key, 0) - 1
            if n > 0:
                self._reserved[key] = n
                continue
            self._reserved.pop(key, None)
            if key in self._held:
                buffer, size = self._held.pop(key)
                self._stats["bytes_in_use"] -= size
                (self._recent if self._encoder is not None else self._pool).setdefault(size, []).append(buffer)
        capture.buffers = {}

    def replay(self, capture, step):
        """Record a captured step again, its params updated for this step: step = {"lr": ..., "step": ...,
        "seeds": {captured seed: new seed}}. Work recorded after it joins the same submit."""
        if capture.broken:
            raise RuntimeError(f"this capture cannot be replayed: {capture.broken}")
        if self._profile is not None:
            raise RuntimeError("replay under lab.profile(): run the step itself to profile it")
        self.sync()
        arena = self._arena_host
        arena[:len(capture.arena)] = capture.arena
        for i, patch in capture.patches.items():
            offset = capture.dispatches[i][2]
            params = struct.pack(f"<{len(capture.keys[i][4]) // 4}I", *map(_u32, patch(step)))
            arena[offset:offset + len(params)] = params
        self._arena_used = len(capture.arena)
        self._encoder = self.device.create_command_encoder()
        cpass = self._pass = self._encoder.begin_compute_pass()
        native = self._native_entry_points(cpass) if self.NATIVE_REPLAY else None
        last = None
        if native is not None:
            handle, set_pipeline, set_bind_group, dispatch, ffi = native
            if capture.native is None:  # the C arguments of every dispatch, made once per capture
                capture.native = [(p._internal, bg._internal, ffi.new("uint32_t[]", [offset])) + tuple(grid)
                                  for p, bg, offset, grid in capture.dispatches]
            for pipeline, bg, offsets, x, y, z in capture.native:
                if pipeline is not last:
                    set_pipeline(handle, pipeline)
                    last = pipeline
                set_bind_group(handle, 0, bg, 1, offsets)
                dispatch(handle, x, y, z)
        else:
            for pipeline, bg, offset, grid in capture.dispatches:
                if pipeline is not last:
                    cpass.set_pipeline(pipeline)
                    last = pipeline
                cpass.set_bind_group(0, bg, [offset])
                cpass.dispatch_workgroups(*grid)
        self._stats["dispatches"] += len(capture.dispatches)

    NATIVE_REPLAY = True  # replays call wgpu-native's recording functions directly where wgpu exposes them

    @staticmethod
    def _native_entry_points(cpass):
        """wgpu-native's C functions for recording into `cpass`, with its handle: a replay records hundreds of
        dispatches whose arguments never change, and the Python wrappers' argument handling and error capture
        cost 2.5x the calls themselves (1.8 against 0.7 ms for 412 dispatches on lavapipe's host). These
        dispatches validated when they were captured; errors at submit are still caught. None where this wgpu
        version does not expose them as 0.32 does (the wrappers are used then)."""
        try:
            from wgpu.backends.wgpu_native._api import ffi, lib
            return (cpass._internal, lib.wgpuComputePassEncoderSetPipeline, lib.wgpuComputePassEncoderSetBindGroup,
                    lib.wgpuComputePassEncoderDispatchWorkgroups, ffi)
        except (ImportError, AttributeError):
            return None

    def sync(self, wait=False):
        """Submit everything recorded so far; with wait=True also block until the device has finished it (and
        raise for an out-of-range index it met: check_indices)."""
        if self._encoder is None:
            if wait and not self.check_indices():
                self._wait()
            return
        # Detach the recording first: an exception or KeyboardInterrupt below must not leave an ended pass in
        # place for the next dispatch (at worst the unsubmitted work is dropped).
        if self._capture is not None:
            self._capture.broken = self._capture.broken or "the step submits its work in more than one part"
        encoder, cpass, used = self._encoder, self._pass, self._arena_used
        self._encoder = self._pass = None
        self._arena_used = 0
        self._arena_index.clear()
        if cpass is not None:
            cpass.end()
        if self._profile:
            self._profile.resolve(encoder)
        try:
            self.queue.write_buffer(self._arena, 0, self._arena_host, 0, used)
            self.queue.submit([encoder.finish()])
        except self.wgpu.GPUError as e:
            raise _lost(self, e) from None
        if self._profile:
            self._profile.collect()
        self._stats["submits"] += 1
        for size, buffers in self._recent.items():
            self._pool.setdefault(size, []).extend(buffers)
        self._recent.clear()
        if wait and not self.check_indices():
            self._wait()

    def check_indices(self):
        """Raise index_range_error for an out-of-range index an embedding or cross-entropy kernel met (recorded in
        ERR: index_check.wgsl) since the last check. Reads ERR (which waits for the submitted work) only when a
        dispatch was given indices the host had not checked; returns whether it read. Raised in the thread that gave
        the unchecked indices (where two threads both did since the last read, in the first of them to read)."""
        me = threading.get_ident()
        if me not in self._indices_unchecked:
            return False
        self._indices_unchecked.discard(me)
        try:
            err = np.frombuffer(self.queue.read_buffer(self._index_errors.buffer, 0, 16), dtype=np.int32)
        except self.wgpu.GPUError as e:
            raise _lost(self, e) from None
        tag, lowest, highest, ignore_index = (int(v) for v in err)
        tag &= 0xFFFFFFFF  # (written as i32: a limit of 2^29 or more sets the sign bit)
        if tag:
            self.queue.write_buffer(self._index_errors.buffer, 0, _NO_INDEX_ERROR)
            op = _INDEX_OPS[tag & 3]
            raise index_range_error(op, lowest, highest, tag >> 2, ignore_index if op == "cross_entropy" else None)
        return True

    def exclusive(self):
        """Hold the backend across a block: a trainer's step, recorded as one submit and captured or replayed
        after checks (profiling, the capture's signature) that must still hold when it records. Another thread's
        op waits for the step boundary rather than joining or splitting the step's recording."""
        return self._lock

    def _wait(self):
        # A 4-byte readback completes only after all earlier submitted work (wgpu 0.32's
        # queue.on_submitted_work_done_sync fails with a callback signature mismatch).
        self.queue.read_buffer(self._arena, 0, 4)

    def stats(self):
        return dict(self._stats)

    def reset_peak(self):
        self._stats["peak_bytes_in_use"] = self._stats["bytes_in_use"]

    # ------------------------------------------------------------------ elementwise
    def _flat(self, kernel, entry, params, bindings, n, subs=()):
        self._dispatch(kernel, entry, params, bindings, _grid(math.ceil(n / WG)), n, subs)

    _SUBS_DEFAULT = (("UNARY", "u_neg"), ("SCALAR", "s_add"), ("BINARY", "b_add"))

    def _ew_subs(self, key, fn):
        return tuple((k, fn if k == key else v) for k, v in self._SUBS_DEFAULT)

    def unary(self, op, a):
        out = self._alloc(a.shape, "float32")
        self._flat("elementwise", "unary_main", [a.size], [a, None, out], a.size, self._ew_subs("UNARY", "u_" + op))
        return out

    def scalar(self, op, a, c):
        out = self._alloc(a.shape, "float32")
        self._flat("elementwise", "scalar_main", [a.size, _f32bits(c)], [a, None, out], a.size,
                   self._ew_subs("SCALAR", "s_" + op))
        return out

    def binary(self, op, a, b):
        shape = tuple(np.broadcast_shapes(a.shape, b.shape))
        out = self._alloc(shape, "float32")
        if a.shape == b.shape:  # the common case: one flat dimension
            dims, sa, sb = [out.size], [1], [1]
        else:
            dims, sa, sb = list(shape), broadcast_strides(a.shape, shape), broadcast_strides(b.shape, shape)
            if len(dims) > MAXDIM:
                raise ValueError(f"broadcasting supports at most {MAXDIM} dimensions, got shape {shape}")
        pad = [0] * (MAXDIM - len(dims))
        params = [out.size, len(dims)] + dims + pad + sa + pad + sb + pad
        self._flat("elementwise", "binary_main", params, [a, b, out], out.size, self._ew_subs("BINARY", "b_" + op))
        return out

    # ------------------------------------------------------------------ reductions and data movement
    # max starts from -inf (bits 0xff800000): -3.4e38 is above -FLT_MAX and came back as the maximum of -inf entries
    _REDUCE = {"sum": ("r_add", "m_id", "0.0"), "max": ("r_max", "m_id", "bitcast<f32>(0xff800000u)"),
               "sumsq": ("r_add", "m_square", "0.0")}

    def _reduce_into(self, op, a, axis, out, out_offset):
        outer, n, inner = math.prod(a.shape[:axis]), a.shape[axis], math.prod(a.shape[axis + 1:])
        if outer * inner == 0:  # an empty result (a (2, 0) summed over axis 0): nothing to compute or to write
            return
        self._reduce_passes(op, a, outer, n, inner, out, out_offset)

    def _reduce_passes(self, op, src, outer, n, inner, out, out_offset):
        """Reduce src viewed as (outer, n, inner) along n into out[out_offset:], chunking n while the output
        alone is too small to fill the device (see reduce.wgsl)."""
        combine, fmap, ident = self._REDUCE[op]
        while True:
            if inner == 1:  # a workgroup per (o, chunk): chunks of up to 4096 elements, 16 per thread
                S, chunk = _split(n, 4096, math.ceil(4096 / max(outer, 1)))
            else:           # a thread per (o, chunk, j): aim for ~128K threads, chunks of at least 16 rows
                S, chunk = _split(n, 16, math.ceil(131072 / (outer * inner)))
            last = S == 1
            dst, dst_off = (out, out_offset) if last else (self._alloc((outer * S * inner,), "float32"), 0)
            params = [outer, n, inner, dst_off, S, chunk]
            subs = (("COMBINE", combine), ("MAP", fmap), ("IDENTITY", ident))
            if inner == 1:
                self._dispatch("reduce", "rows_main", params, [src, dst], _grid(outer * S), outer * S, subs)
            else:
                self._flat("reduce", "columns_main", params, [src, dst], outer * S * inner, subs)
            if last:
                return
            src, n, fmap = dst, S, "m_id"

    def reduce(self, op, a, axis):
        out = self._alloc(a.shape[:axis] + a.shape[axis + 1:], "float32")
        self._reduce_into(op, a, axis, out, 0)
        return out

    def _copy(self, src, src_off, src_strides, dst, dst_off, dst_strides, shape):
        if len(shape) > MAXDIM:
            raise ValueError(f"strided copy supports at most {MAXDIM} dimensions, got shape {tuple(shape)}")
        pad = [0] * (MAXDIM - len(shape))
        n = math.prod(shape)
        params = [n, len(shape), src_off, dst_off] + list(shape) + pad + list(src_strides) + pad + list(dst_strides) + pad
        self._flat("copy", "copy_main", params, [src, dst], n)

    def copy_view(self, a, offset, shape, strides):
        out = self._alloc(shape, a.dtype)
        self._copy(a, offset, strides, out, 0, contiguous_strides(shape), shape)
        return out

    def write_view(self, dst, offset, strides, src):
        self._copy(src, 0, contiguous_strides(src.shape), dst, offset, strides, src.shape)

    # ------------------------------------------------------------------ fused
    SPLIT_K_TILES = 1024   # split K while the output has fewer tiles than this (enough to fill a large GPU)
    ROW128_MIN_TILES = 256  # 128-row tiles only for products that make at least this many of them
    WIDE_MIN_TILES = 256    # 128 x 128 tiles for products that make at least this many of them (on the H200
    # 270 of them still ran faster than 540 of 128 x 64; fewer leave most of its 132 multiprocessors idle)
    MATMUL_ROWS = True     # row-major A staged along rows (matmul.wgsl main_rows)
    MATMUL_ALIGNED = True  # whole-tile shapes take matmul_aligned.wgsl (vec4 loads, no bounds checks)

    def matmul_gelu(self, a, b, bias=None, keep_pre=True):
        """gelu(a @ b + bias) and, with keep_pre, a @ b + bias (the backward's input): the activation applied as the
        tiles are stored where the product takes the whole-tile kernel in one piece, else by a pass of its own."""
        out, pre, fused = self._matmul(a, b, bias=bias, gelu="keep" if keep_pre else "drop")
        if fused:
            return out, pre
        return self.unary("gelu", out), out if keep_pre else None

    def matmul(self, a, b, trans_a=False, trans_b=False, bias=None, triangle=None, out=None):
        return self._matmul(a, b, trans_a, trans_b, bias, triangle, into=out)[0]

    def _matmul(self, a, b, trans_a=False, trans_b=False, bias=None, triangle=None, gelu=None, into=None):
        """(out, pre, fused): gelu None, the product (+ bias); "keep" or "drop", where the whole-tile kernel takes the
        product in one piece, its GELU with fused=True (and with "keep" the product in pre), else the product.
        a, b may be HeadViews and `into` a HeadView to write the product into (out is then that view): read and
        written in place by the whole-tile kernels, gathered and scattered by copies for the others."""
        views = [x for x in (a, b, into) if isinstance(x, HeadView)]
        heads = views[0].heads if views else 1
        if any(v.heads != heads or v.shape[0] != views[0].shape[0] for v in views) or (
                views and (bias is not None or gelu is not None)):
            raise ValueError("matmul: HeadView operands must share batch and heads, and take no bias or activation")
        ba, bb = a.shape[0], b.shape[0]
        M, K = (a.shape[2], a.shape[1]) if trans_a else (a.shape[1], a.shape[2])
        N = b.shape[1] if trans_b else b.shape[2]
        batch = max(ba, bb)
        if K == 0 and views:
            return self._matmul_gathered(a, b, trans_a, trans_b, triangle, into)
        if K == 0:
            out = self._alloc((batch, M, N), "float32")
            self._flat("copy", "fill_main", [out.size, 0], [None, out], out.size)
            return (out if bias is None else self.binary("add", out, bias)), None, False
        padded = None if views or gelu is not None else self._padded_to_tiles(M, N, K, batch)
        if padded:
            return self._matmul_padded(a, b, trans_a, trans_b, bias, M, N, padded), None, False
        if not views and gelu is None and bias is None and ba == bb == 1 and M * N * K >= self.THIN_MIN_VOLUME:
            if min(M, N) <= self.THIN_MAX:
                return self._matmul_thin(self._f32(a), self._f32(b), trans_a, trans_b, M, N, K), None, False
            if K <= self.THIN_MAX and not trans_a and not trans_b:
                out = self._alloc((1, M, N), "float32")
                self._flat("lora", "up_add_t_main", [M, 0, N, K, _f32bits(1.0), 1],
                           [self._f32(a), self._f32(b), None, out], M * N)
                return out, None, False
        tiles = math.ceil(M / 64) * math.ceil(N / 64) * batch
        wide_shape = M % 128 == 0 and N % 128 == 0 and K % 16 == 0  # whole 128 x 128 tiles
        S = 1
        if tiles < self.SPLIT_K_TILES and K >= 256 and into is None:  # chunks of at least 128 along K
            # as many chunks as fill the device with tiles of 64 x 64 or, where M and N allow, of 128 x 128:
            # the weight gradients' long K then runs at the 128 x 128 tiles' full rate (45.9 TFLOP/s in 32
            # chunks against 34.0 in 8 for 384 x 1536 x 16384 on the H200), well worth summing the chunks after
            S = min(math.ceil(self.SPLIT_K_TILES / (tiles // 4 if wide_shape else tiles)), K // 128)
        kc = math.ceil(math.ceil(K / S) / 16) * 16   # chunks of whole TK steps
        S = math.ceil(K / kc)
        aligned = self.MATMUL_ALIGNED and M % 64 == 0 and N % 64 == 0 and K % 16 == 0
        if not aligned:
            a, b = self._f32(a), self._f32(b)
        wide = self.MATMUL_ALIGNED and wide_shape and M * N * batch * S >= self.WIDE_MIN_TILES << 14
        if views and not (aligned and all(v.offset % 4 == 0 and v.width % 4 == 0 and v.dim % 4 == 0
                                          for v in views)):
            return self._matmul_gathered(a, b, trans_a, trans_b, triangle, into)
        out = self._alloc((S * batch, M, N), "float32") if into is None else into
        label = f"matmul {'T' if trans_a else 'N'}{'T' if trans_b else 'N'} {batch}x{M}x{N}x{K}" + (
            f" split {S}" if S > 1 else "")
        grid = (math.ceil(N / 64), math.ceil(M / 64), batch * S)
        layout = ("t" if trans_a else "n") + ("t" if trans_b else "n")
        if aligned and not wide and layout in ("nt", "tt"):
            # A transposed B is staged badly by the 64-column kernels (its rows run along k); transposing it first
            # costs one copy of B, far less than the product it speeds up (measured: README, Performance). The
            # 128 x 128 kernels transpose it as they stage it.
            if isinstance(b, HeadView):
                outer, inner, row, _ = b.strides()
                b = self.reshape(self.copy_view(b.data, b.offset, (bb // heads, heads, K, N), (outer, inner, 1, row)),
                                 (bb, K, N))
            else:
                b = self.copy_view(self._f32(b), 0, (bb, K, N), (N * K, 1, K))
            layout = layout[0] + "n"
        if aligned:
            # whole tiles, vec4 rows: the unchecked vec4 kernel (strides are multiples of 4 here); a bias is added
            # as the tile is stored, unless split-K partial products are summed afterwards
            fused = bias is not None and S == 1
            act = int(gelu is not None and S == 1)  # the GELU epilogue, for a product in one piece
            pre = self._alloc(out.shape, "float32") if act and gelu == "keep" else None
            entry = layout
            if wide:
                entry, grid = layout + "_wide", (N // 128, M // 128, grid[2])  # 128 x 128 tiles, 8 x 8 per thread
            elif M % 128 == 0 and tiles * S >= 2 * self.ROW128_MIN_TILES:  # 128-row tiles (8 x 4 outputs per
                # thread) where they still leave enough workgroups to fill the device
                entry, grid = layout + "128", (grid[0], M // 128, grid[2])
            tri = 0
            if triangle == "out" and M == N:
                tri = 1
            elif triangle == "a" and M == K:
                tri = 3 if trans_a else 2
            la, lb, lc = (_operand_layout(x, heads) for x in (a, b, out))
            params = [M, N, K, la[1], lb[1], lc[1], batch, kc, int(fused), tri, act, la[3], lb[3], lc[3], heads,
                      la[2], lb[2], lc[2], la[0], lb[0], lc[0], batch * M * N]
            self._dispatch("matmul_aligned", entry, params,
                           [_storage(a), _storage(b), _storage(out), bias if fused else None, pre], grid,
                           batch * M * N * S, _aligned_subs(a, b),
                           label=label + " aligned" + (" +bias" if fused else "") + (" +gelu" if act else "")
                           + (f" {triangle}-triangle" if tri else "") + (" in place" if views else ""))
            if act:
                return out, pre, True
            if fused:
                return out, None, False
        else:
            entry = "main_rows" if self.MATMUL_ROWS and not trans_a else "main"
            params = [M, N, K, M * K if ba > 1 else 0, K * N if bb > 1 else 0, M * N, batch, kc]
            subs = (("TRANS_A", "true" if trans_a else "false"), ("TRANS_B", "true" if trans_b else "false"))
            self._dispatch("matmul", entry, params, [a, b, out], grid, out.size, subs, label=label)
        if S > 1:
            out = self.reshape(self.reduce("sum", self.reshape(out, (S, batch * M * N)), 0), (batch, M, N))
        return (out if bias is None else self.binary("add", out, bias)), None, False

    THIN_MAX = 16              # products with M, N or K up to this take the thin kernels (matmul_thin.wgsl; K:
    THIN_MIN_VOLUME = 1 << 20  # lora.wgsl up_add_t_main) when M N K is at least this
    PAD_MIN_VOLUME = 1 << 28  # M N K from which a ragged product is padded to whole tiles (see _padded_to_tiles)
    PAD_MAX_WORK = 1.05       # ... if the padded product is at most this much more work

    def _matmul_thin(self, a, b, trans_a, trans_b, M, N, K):
        """A single product with N (or M) <= 16: matmul_thin.wgsl on the operands as stored (a thin M computes
        C^T = B^T A^T, written through C's strides), K split into chunks while too few row blocks fill the GPU."""
        a_row, a_k = (1, M) if trans_a else (K, 1)    # element strides of A (m, k) and B (k, n) as stored
        b_k, b_col = (1, K) if trans_b else (N, 1)
        if N <= self.THIN_MAX:
            first, second, rows, cols = a, b, M, N
            strides = [a_row, a_k, b_k, b_col, N, 1]
        else:
            first, second, rows, cols = b, a, N, M
            strides = [b_col, b_k, a_k, a_row, 1, N]
        blocks = math.ceil(rows / 64)
        S = min(math.ceil(1024 / blocks), max(K // 128, 1)) if blocks < 1024 else 1
        kc = math.ceil(math.ceil(K / S) / 32) * 32
        S = math.ceil(K / kc)
        out = self._alloc((S, M, N), "float32")
        params = [rows, cols, K, kc, 0, strides[0], strides[1], 0, strides[2], strides[3], 0, strides[4], strides[5],
                  M * N]
        label = f"matmul {'T' if trans_a else 'N'}{'T' if trans_b else 'N'} 1x{M}x{N}x{K} thin" + (
            f" split {S}" if S > 1 else "")
        self._dispatch("matmul_thin", "main", params, [first, second, out], (blocks, 1, S), M * N * K, label=label)
        if S > 1:
            out = self.reshape(self.reduce("sum", self.reshape(out, (S, M * N)), 0), (1, M, N))
        return out

    def _padded_to_tiles(self, M, N, K, batch):
        """(Mp, Np, Kp), M and N rounded up to 128 and K to 16, where a ragged product is to run as its zero-padded
        whole-tile one (else None): large (a GPT-2 output layer, 8192 x 50257 x 768: the bounds-checked kernels ran
        its three products at about 25 TFLOP/s, 76 of a 209 ms step), and padding adds at most 5% to the work
        (PAD_MAX_WORK); the copies in and out cost far less than the rate gained."""
        if not self.MATMUL_ALIGNED or (M % 128 == 0 and N % 128 == 0 and K % 16 == 0):
            return None
        Mp, Np, Kp = _round_up(M, 128), _round_up(N, 128), _round_up(K, 16)
        if batch * M * N * K >= self.PAD_MIN_VOLUME and Mp * Np * Kp <= self.PAD_MAX_WORK * M * N * K:
            return Mp, Np, Kp
        return None

    def _matmul_padded(self, a, b, trans_a, trans_b, bias, M, N, padded):
        """a @ b through zero-padded copies of sizes `padded` (zeros add nothing to the product), the result cut
        back to (batch, M, N): a view of its first rows where only M was padded."""
        Mp, Np, Kp = padded
        a = self._zero_padded(self._f32(a), (Kp, Mp) if trans_a else (Mp, Kp))
        b = self._zero_padded(self._f32(b), (Np, Kp) if trans_b else (Kp, Np))
        bias = self._zero_padded(self.reshape(bias, (1, 1, N)), (1, Np)) if bias is not None else None
        out = self._matmul(a, b, trans_a, trans_b, self.reshape(bias, (Np,)) if bias is not None else None)[0]
        batch = out.shape[0]
        if Np == N and (batch == 1 or Mp == M):  # the wanted rows are a prefix of the padded result
            return GPUArray(out.storage, (batch, M, N), out.dtype)
        return self.copy_view(out, 0, (batch, M, N), (Mp * Np, Np, 1))

    def _f32(self, x):
        """x, or a float32 copy of a float16 array (for the kernels that read float32 only: everything but the
        whole-tile matmuls)."""
        if isinstance(x, HeadView) or x.dtype != "float16":
            return x
        out = self._alloc(x.shape, "float32")
        self._flat("cast", "widen_main", [x.size], [x, out], x.size)
        return out

    def _zero_padded(self, x, rows_cols):
        """x (n, r, c) in the top-left corner of a zeroed (n, R, C) array (x itself when it is that size)."""
        n, r, c = x.shape
        R, C = rows_cols
        if (r, c) == (R, C):
            return x
        out = self._alloc((n, R, C), "float32")
        self._flat("copy", "pad_main", [out.size, R, C, r, c], [x, out], out.size)
        return out

    def heads_in_place(self, seq, dim):
        """Attention's six products all take the whole-tile kernels: T (M, N or K) a multiple of 64, and the head
        width (N or K) too."""
        return self.MATMUL_ALIGNED and seq % 64 == 0 and dim % 64 == 0

    def _matmul_gathered(self, a, b, trans_a, trans_b, triangle, into):
        """A product with HeadViews through contiguous copies of them (for the kernels that take plain stacks)."""
        out = self.matmul(gather_heads(self, a), gather_heads(self, b), trans_a, trans_b, triangle=triangle)
        return (out if into is None else scatter_heads(self, into, out)), None, False

    def _rows(self, shape):
        return math.prod(shape[:-1]), shape[-1]

    def _softmax_params(self, head, dropout):
        """softmax.wgsl's params: head = [rows, n, T, scale bits, causal], then the dropout riding along (p, seed)
        or none; while capturing, a replay's new seed is patched in."""
        if dropout is None:
            return head + [0, 0, 0, 0]
        p, seed = dropout

        def params(seed):
            return head + [1, seed, _f32bits(p), _f32bits(1.0 / (1.0 - p))]
        if self._capture is not None:  # a replay draws the step's seeds anew: the captured seed maps to its new one
            self._patch = lambda step: params(step["seeds"].get(seed, seed))
        return params(seed)

    def softmax(self, a, scale=1.0, causal=False, dropout=None):
        rows, n = self._rows(a.shape)
        out = self._alloc(a.shape, "float32")
        dropped = self._alloc(a.shape, "float32") if dropout is not None else None
        T = a.shape[-2] if causal else 1
        self._dispatch("softmax", "softmax_main", self._softmax_params([rows, n, T, _f32bits(scale), int(causal)],
                                                                       dropout),
                       [a, None, out, dropped], _grid(rows), rows * n, _row_subs(n))
        return out if dropout is None else (out, dropped)

    def softmax_bwd(self, y, g, scale=1.0, dropout=None):
        rows, n = self._rows(y.shape)
        out = self._alloc(y.shape, "float32")
        self._dispatch("softmax", "softmax_bwd_main", self._softmax_params([rows, n, 1, _f32bits(scale), 0], dropout),
                       [y, g, out], _grid(rows), rows * n, _row_subs(n))
        return out

    def log_softmax(self, a):
        rows, n = self._rows(a.shape)
        out = self._alloc(a.shape, "float32")
        self._dispatch("softmax", "log_softmax_main", self._softmax_params([rows, n, 1, 0, 0], None), [a, None, out],
                       _grid(rows), rows * n, _row_subs(n))
        return out

    def log_softmax_bwd(self, y, g):
        rows, n = self._rows(y.shape)
        out = self._alloc(y.shape, "float32")
        self._dispatch("softmax", "log_softmax_bwd_main", self._softmax_params([rows, n, 1, 0, 0], None), [y, g, out],
                       _grid(rows), rows * n, _row_subs(n))
        return out

    def layernorm(self, x, w, b, eps, residual=None):
        rows, n = self._rows(x.shape)
        y = self._alloc(x.shape, "float32")
        mean = self._alloc(x.shape[:-1], "float32")
        rstd = self._alloc(x.shape[:-1], "float32")
        total = self._alloc(x.shape, "float32") if residual is not None else None
        self._dispatch("layernorm", "forward_main", [rows, n, _f32bits(eps), int(residual is not None)],
                       [x, w, b, y, mean, rstd, residual, total], _grid(rows), rows * n, _row_subs(n))
        return (y, mean, rstd) if residual is None else (y, mean, rstd, total)

    def layernorm_bwd(self, x, w, mean, rstd, g, acc=None):
        rows, n = self._rows(x.shape)
        dx = self._alloc(x.shape, "float32")
        self._dispatch("layernorm_backward", "backward_x_main", [rows, n, 1, rows, int(acc is not None)],
                       [x, w, mean, rstd, g, dx, None, acc], _grid(rows), rows * n, _row_subs(n))
        # dw, db are column sums over all rows: partial sums over row chunks first, so that enough threads run.
        S, chunk = _split(rows, 16, math.ceil(131072 / max(n, 1)))
        dw_parts, db_parts = self._alloc((S, n), "float32"), self._alloc((S, n), "float32")
        self._flat("layernorm_backward", "backward_wb_main", [rows, n, S, chunk],
                   [x, None, mean, rstd, g, dw_parts, db_parts], S * n, _row_subs(n))
        if S == 1:
            return dx, self.reshape(dw_parts, (n,)), self.reshape(db_parts, (n,))
        return dx, self.reduce("sum", dw_parts, 0), self.reduce("sum", db_parts, 0)

    def embedding(self, w, idx, checked=False):
        V, C = w.shape
        N = idx.size
        out = self._alloc(idx.shape + (C,), "float32")
        self._flat("embedding", "forward_main", [N, C, V], [idx, w, out, None, self._index_errors], N * C)
        if not checked and N > 0:
            self._indices_unchecked.add(threading.get_ident())
        return out

    def embedding_bwd(self, idx, g, num_embeddings):
        C, V, N = g.shape[-1], num_embeddings, idx.size
        if V * C <= (1 << 20):  # small vocabulary: a thread per (chunk, row, column), then sum the chunks
            S, chunk = _split(N, 64, (1 << 21) // max(V * C, 1))
            parts = self._alloc((S, V, C), "float32")
            self._flat("embedding", "backward_vocab_main", [N, C, V, S, chunk], [idx, g, parts], S * V * C)
            return self.reshape(parts, (V, C)) if S == 1 else self.reduce("sum", parts, 0)
        dw = self.full((V, C), 0.0)   # rows of tokens not in the batch
        links = self._alloc((N,), "int32")
        self._flat("embedding", "links_main", [N, C, V, 0, 0], [idx, None, None, links], N)
        self._flat("embedding", "chain_main", [N, C, V, 0, 0], [idx, g, dw, links], N * C)
        return dw

    def cross_entropy(self, logits, targets, ignore_index, checked=False):
        rows, V = logits.shape
        lse = self._alloc((rows,), "float32")
        loss_rows = self._alloc((rows,), "float32")
        valid = self._alloc((rows,), "float32")
        loss = self._alloc((), "float32")
        count = self._alloc((1,), "float32")
        params = [rows, V, ignore_index]
        self._dispatch("cross_entropy", "rows_main", params,
                       [logits, targets, lse, loss_rows, valid, self._index_errors], _grid(rows), rows, _row_subs(V))
        if not checked and rows > 0:
            self._indices_unchecked.add(threading.get_ident())
        self._dispatch("cross_entropy_reduce", "mean_main", params, [None, None, None, loss_rows, valid, loss, count],
                       (1, 1, 1))
        return loss, (lse, valid, count)

    def cross_entropy_bwd(self, logits, targets, saved, g, ignore_index):
        lse, valid, count = saved
        rows, V = logits.shape
        dx = self._alloc(logits.shape, "float32")
        self._flat("cross_entropy_reduce", "backward_main", [rows, V, ignore_index],
                   [logits, targets, lse, None, valid, dx, count, g], rows * V)
        return dx

    def dropout(self, x, p, seed):
        out = self._alloc(x.shape, "float32")

        def params(seed):
            return [x.size, seed, _f32bits(p), _f32bits(1.0 / (1.0 - p))]
        if self._capture is not None:  # a replay draws the step's seeds anew: the captured seed maps to its new one
            self._patch = lambda step: params(step["seeds"].get(seed, seed))
        self._flat("dropout", "main", params(seed), [x, out], x.size)
        return out

    # Causal self-attention by attention.wgsl's fused kernels where they apply, for the shapes whose (B, H, T, T)
    # weights cannot be one buffer (above the device's max-storage-buffer-binding-size: the composed path cannot
    # run them at all), and for every shape with LAB_FLASH_ATTENTION=1. They keep the weights out of memory
    # (gpt2-small's are 400 MB a layer, several times over in the composed backward) but are not faster: on the
    # H200 a shakespeare-char step (T = 256) takes 35.7 ms with them against 33.0 composed, gpt2-small (T = 1024)
    # 0.69x PyTorch against 0.89x (their 16 x 32 score blocks, set by lavapipe's 32 KiB of workgroup memory, run
    # at a quarter of the tiled matmuls' rate).
    FLASH_ATTENTION = os.environ.get("LAB_FLASH_ATTENTION", "") not in ("", "0")

    def flash_attention_fits(self, qkv_shape, n_head):
        """Whether attention.wgsl's kernels take this packed qkv (B, T, 3C) (heads of 64, T a multiple of 32, at
        most 65535 heads in all: one workgroup row each) and are to: asked for, or the weights too big a buffer."""
        Bsz, T, C3 = qkv_shape
        takes = C3 == 3 * 64 * n_head and T % 32 == 0 and Bsz * n_head <= 65535
        return takes and (self.FLASH_ATTENTION or Bsz * n_head * T * T * 4 > self.max_binding)

    def flash_attention(self, qkv, n_head, scale, p, seed):
        """Causal self-attention from the packed qkv (B, T, 3C) by attention.wgsl's fused kernels: (y (B, T, C),
        lse (B H, T)), the weights never in memory (flash_attention_fits says where they apply)."""
        Bsz, T, C3 = qkv.shape
        C = C3 // 3
        y = self._alloc((Bsz, T, C), "float32")
        lse = self._alloc((Bsz * n_head, T), "float32")
        self._attention("fwd_main", qkv, n_head, scale, p, seed, [qkv, None, lse, None, y], (T // 16, Bsz * n_head),
                        f"attention fwd {Bsz}x{n_head}x{T}")
        return y, lse

    def flash_attention_bwd(self, qkv, y, lse, g, n_head, scale, p, seed):
        """dqkv (B, T, 3C) for flash_attention's y = f(qkv) and its output gradient g (B, T, C)."""
        Bsz, T, C3 = qkv.shape
        n = Bsz * T * n_head
        dr = self._alloc((n,), "float32")
        self._dispatch("attention", "delta_main", self._attention_params(qkv.shape, n_head, scale, p, None),
                       [qkv, g, lse, dr, y], _grid(math.ceil(n / 128)), n)
        dqkv = self._alloc(qkv.shape, "float32")  # the two kernels write disjoint parts, every element
        binds = [qkv, g, lse, dr, dqkv]
        self._attention("bwd_kv_main", qkv, n_head, scale, p, seed, binds, (T // 32, Bsz * n_head),
                        f"attention bwd dk dv {Bsz}x{n_head}x{T}")
        self._attention("bwd_q_main", qkv, n_head, scale, p, seed, binds, (T // 16, Bsz * n_head),
                        f"attention bwd dq {Bsz}x{n_head}x{T}")
        return dqkv

    @staticmethod
    def _attention_params(shape, n_head, scale, p, seed):
        Bsz, T, C3 = shape
        drop = seed is not None and p > 0
        return [Bsz, T, n_head, C3 // 3, _f32bits(scale), seed if drop else 0, int(drop), _f32bits(p),
                _f32bits(1.0 / (1.0 - p))]

    def _attention(self, entry, qkv, n_head, scale, p, seed, binds, grid, label):
        shape = qkv.shape
        if self._capture is not None and seed is not None:  # a replay draws the step's seeds anew
            self._patch = lambda step: self._attention_params(shape, n_head, scale, p, step["seeds"].get(seed, seed))
        self._dispatch("attention", entry, self._attention_params(shape, n_head, scale, p, seed), binds, grid,
                       qkv.size, label=label)

    LORA_DOWN_MATMUL = True  # H = x A^T by the matmul kernels (tiled, split along K), not lora.wgsl's down_main

    def lora_down(self, x, a):
        (M, K), r = x.shape, a.shape[0]
        if self.LORA_DOWN_MATMUL:
            # one thread per output reading a whole row of x (down_main) ran 2-3x slower on the H200 than the
            # tiled kernels on the same shapes (the backward's rank-r products)
            return self.reshape(self.matmul(self.reshape(x, (1, M, K)), self.reshape(a, (1, r, K)), False, True),
                                (M, r))
        out = self._alloc((M, r), "float32")
        self._flat("lora", "down_main", [M, K, 0, r, 0], [x, a, None, out], M * r)
        return out

    LORA_UP_TRANSPOSED = True  # the up-projection reads B transposed (lora.wgsl up_add_t_main)

    def lora_up_add(self, base, h, b, scale):
        (M, N), r = base.shape, h.shape[1]
        out = self._alloc((M, N), "float32")
        if self.LORA_UP_TRANSPOSED:
            bt = self.copy_view(b, 0, (r, N), (1, r))
            self._flat("lora", "up_add_t_main", [M, 0, N, r, _f32bits(scale), 0], [h, bt, base, out], M * N)
        else:
            self._flat("lora", "up_add_main", [M, 0, N, r, _f32bits(scale), 0], [h, b, base, out], M * N)
        return out

    # ------------------------------------------------------------------ optimizers (in place)
    def _guard(self, guard):
        if guard is None:  # no guard: any finite one-element value passes
            if self._no_guard is None:
                self._no_guard = self.from_numpy(np.zeros(1, np.float32))
            return self._no_guard
        return guard

    def adamw_(self, p, g, m, v, lr, b1, b2, eps, wd, step, guard=None, max_norm=0.0):
        if max_norm > 0 and guard is None:
            raise ValueError("adamw_: clipping to max_norm needs the gradient norm as guard")

        def params(lr, step):
            return [p.size] + [_f32bits(x) for x in (lr, b1, b2, eps, wd, 1 - b1 ** step, 1 - b2 ** step, max_norm)]
        if self._capture is not None:
            self._patch = lambda s: params(s["lr"], s["step"])
        self._flat("optim", "adamw_main", params(lr, step), [p, g, m, v, self._guard(guard)], p.size)

    def optimizer_slots(self):
        """Parameters one adamw_many_ dispatch updates: four bindings each, beside the params, guard and table."""
        bindings = min(self.limits.get("max-storage-buffers-per-shader-stage", 8),
                       self.limits.get("max-bindings-per-bind-group", 1000) - 1)
        return max(1, min(self.MAX_OPTIMIZER_SLOTS, (bindings - 2) // 4))

    MAX_OPTIMIZER_SLOTS = 128

    def adamw_many_(self, slots, lr, b1, b2, eps, step, guard=None, max_norm=0.0):
        """adamw_ on every (p, g, m, v, wd) of `slots` in as few dispatches as the device's bindings allow
        (optim_many.wgsl), with the same arithmetic."""
        if max_norm > 0 and guard is None:
            raise ValueError("adamw_many_: clipping to max_norm needs the gradient norm as guard")
        if len(slots) < 2:  # one parameter: the plain kernel, without a table of slots to build and upload
            return super().adamw_many_(slots, lr, b1, b2, eps, step, guard, max_norm)
        per = self.optimizer_slots()
        for start in range(0, len(slots), per):
            chunk = slots[start:start + per]
            table, rows, first = self._slot_table([(p.size, wd) for p, _, _, _, wd in chunk], WG)

            def params(lr, step, n=len(chunk)):
                return [n] + [_f32bits(x) for x in (lr, b1, b2, eps, 1 - b1 ** step, 1 - b2 ** step, max_norm)]
            if self._capture is not None:
                self._patch = lambda s, params=params: params(s["lr"], s["step"])
            arrays = [a for p, g, m, v, _ in chunk for a in (p, g, m, v)]
            self._dispatch("optim_many", "adamw_many_main", params(lr, step),
                           [self._guard(guard), table] + arrays, _grid(first), rows,
                           subs=self._optimizer_subs(len(chunk)), label=f"adamw x{len(chunk)}")

    SUMSQ_PER_WORKGROUP = WG * 16  # sumsq_many.wgsl: 256 threads x PER elements

    def sumsq_many(self, arrays):
        """sum(a * a) over all of `arrays` as a (1,) array: per-workgroup partial sums of as many arrays per
        dispatch as the device binds (sumsq_many.wgsl), then one reduction of the partials."""
        if len(arrays) < 2:  # one array: the plain kernel, without a table of slots to build and upload
            return super().sumsq_many(arrays)
        per = self.optimizer_slots() * 4   # one binding per array here
        parts = []
        for start in range(0, len(arrays), per):
            chunk = arrays[start:start + per]
            table, _, groups = self._slot_table([(a.size, 0.0) for a in chunk], self.SUMSQ_PER_WORKGROUP)
            partial = self._alloc((groups,), "float32")
            self._dispatch("sumsq_many", "sumsq_many_main", [len(chunk)], [partial, table] + list(chunk),
                           _grid(groups), sum(a.size for a in chunk), subs=self._sumsq_subs(len(chunk)),
                           label=f"sumsq x{len(chunk)}")
            parts.append(partial)
        total = parts[0] if len(parts) == 1 else self._concat_flat(parts)
        return self.reshape(self.reduce("sum", total, 0), (1,))

    def _concat_flat(self, parts):
        out = self._alloc((sum(p.size for p in parts),), "float32")
        at = 0
        for p in parts:
            self.write_view(out, at, [1], p)
            at += p.size
        return out

    def _sumsq_subs(self, n):
        """sumsq_many.wgsl's generated declarations and switch cases for n arrays."""
        key = ("sumsq", n)
        if key not in self._opt_subs:
            bindings = [f"@group(0) @binding({3 + k}) var<storage, read> G{k}: array<f32>;" for k in range(n)]
            reads = [f"        case {k}u: {{ return G{k}[i]; }}" for k in range(n)]
            self._opt_subs[key] = (("BINDINGS", "\n".join(bindings)), ("READS", "\n".join(reads)))
        return self._opt_subs[key]

    def _slot_table(self, sizes_and_decays, per_workgroup):
        """The slots' [first workgroup, elements, weight decay] table on the device (made once per layout), the
        elements in all and the workgroups in all (each workgroup taking per_workgroup elements)."""
        key = (per_workgroup,) + tuple((n, float(wd)) for n, wd in sizes_and_decays)
        hit = self._tables.get(key)
        if hit is None:
            rows, first, entries = 0, 0, []
            for n, wd in key[1:]:
                entries += [first, n, _f32bits(wd)]
                first += math.ceil(n / per_workgroup)
                rows += n
            table = self._alloc((len(entries),), "int32", upload=True)  # (not a buffer recorded work still reads)
            self.queue.write_buffer(table.buffer, 0, np.array(entries, dtype=np.uint32))
            hit = self._tables[key] = (table, rows, first)
        return hit

    def _optimizer_subs(self, n):
        """optim_many.wgsl's generated declarations and switch cases for n slots."""
        if n in self._opt_subs:
            return self._opt_subs[n]
        bindings, cases = [], []
        for k in range(n):
            for j, name in enumerate("WGMV"):
                bindings.append(f"@group(0) @binding({3 + 4 * k + j}) var<storage, read_write> {name}{k}: array<f32>;")
            cases.append(f"        case {k}u: {{ var g = G{k}[i]; if (max_norm > 0.0) {{ g = g * clip; G{k}[i] = g; }} "
                         f"let r = adamw(W{k}[i], g, M{k}[i], V{k}[i], wd); W{k}[i] = r.x; M{k}[i] = r.y; V{k}[i] = r.z; }}")
        subs = self._opt_subs[n] = (("BINDINGS", "\n".join(bindings)), ("CASES", "\n".join(cases)))
        return subs

    def sgd_(self, p, g, buf, lr, momentum, wd, guard=None, max_norm=0.0):
        if max_norm > 0 and guard is None:
            raise ValueError("sgd_: clipping to max_norm needs the gradient norm as guard")

        def params(lr):
            return [p.size] + [_f32bits(x) for x in (lr, momentum, wd, max_norm)]
        if self._capture is not None:
            self._patch = lambda s: params(s["lr"])
        self._flat("optim", "sgd_main", params(lr), [p, g, buf, None, self._guard(guard)], p.size)

    def sumsq_into(self, a, out, slot):
        self._reduce_into("sumsq", self.reshape(a, (a.size,)), 0, out, slot)

    def clip_(self, g, normsq, max_norm):
        self._flat("optim", "clip_main", [g.size, _f32bits(max_norm)], [g, normsq], g.size)


def _locked(method):
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            if self._freed:
                self._take_back_freed()
            return method(self, *args, **kwargs)
    return locked


for _name, _method in list(vars(WgpuBackend).items()):
    if inspect.isfunction(_method) and not _name.startswith("_"):
        setattr(WgpuBackend, _name, _locked(_method))
