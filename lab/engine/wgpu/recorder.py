"""Recording dispatches: the params arena, bind group layouts, pipelines, bind groups, the open compute pass,
submits (sync), the device-side index check, and per-dispatch profiling."""
import math
import re
import struct
import threading

import numpy as np

from ..backend import index_range_error
from ..kernels import specialize
from .common import WG, _grid, _u32
from .device import _lost

ARENA_BYTES = 4 << 20
PARAMS_BYTES = 256   # the window of the params arena a dispatch sees (its offset is dynamic)
# storage bindings a kernel module declares: (binding number, access)
_BINDING_RE = re.compile(r"@group\(0\)\s*@binding\((\d+)\)\s*var<storage,\s*(read_write|read)>")
_HALF_BINDING_RE = re.compile(r"@group\(0\)\s*@binding\((\d+)\)\s*var<storage,\s*\w+>\s*\w+\s*:\s*array<[^;]*f16")
_NO_INDEX_ERROR = np.array([0, 2**31 - 1, -2**31, 0], dtype=np.int32).tobytes()  # index_check.wgsl's ERR, clear
_INDEX_OPS = {1: "embedding", 2: "cross_entropy"}                                # its op codes


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


class RecorderMixin:
    """WgpuBackend's recording: layouts, pipelines, bind groups, dispatch, sync and profiling."""
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

    # ------------------------------------------------------------------ elementwise
    def _flat(self, kernel, entry, params, bindings, n, subs=()):
        self._dispatch(kernel, entry, params, bindings, _grid(math.ceil(n / WG)), n, subs)
