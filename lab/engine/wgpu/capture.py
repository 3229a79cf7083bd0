"""Step capture and replay: a training step's dispatches recorded once, then recorded again with patched params
without running any Python op."""
import struct

import numpy as np

from .common import _u32

class Capture:
    """One step's dispatches as recorded: (pipeline, bind group, params offset, grid) each, with the key
    (kernel, entry, specialization, grid, params bytes) that says what it computed, the patches (dispatch index ->
    function of the step giving its new params), every buffer it binds, and its uploads in order."""

    def __init__(self):
        self.dispatches, self.keys, self.patches = [], [], {}
        self.buffers, self.uploads = {}, []
        self.upload_patches = {}  # upload index -> function of the step giving its new values (int32)
        self.arena = b""
        self.broken = None  # why it cannot be replayed
        self.native = None  # the dispatches' arguments for wgpu-native's C functions (made at the first replay)

    def add(self, pipeline, bind_group, offset, grid, key, patch, buffers):
        if patch is not None:
            self.patches[len(self.dispatches)] = patch
        self.dispatches.append((pipeline, bind_group, offset, tuple(grid) + (1,) * (3 - len(grid))))  # x, y, z
        self.keys.append(key)
        self.buffers.update((id(b), b) for b in buffers)

    def _unlike(self, later):
        """Why `later` is not this step recorded again whatever its params and upload values (other dispatch
        counts, kernels or grids, another count of uploads), or None: what difference() and follow() both ask."""
        if len(self.keys) != len(later.keys):
            return f"the step recorded {len(self.keys)} dispatches, the next one {len(later.keys)}"
        for i, (a, b) in enumerate(zip(self.keys, later.keys)):
            if a[:4] != b[:4]:
                return f"dispatch {i} was {a[0]}:{a[1]} {a[3]}, then {b[0]}:{b[1]} {b[3]}"
        if len(self.uploads) != len(later.uploads):
            return f"the step uploaded {len(self.uploads)} arrays, the next one {len(later.uploads)}"
        return None

    def difference(self, later, step, inputs=()):
        """Why replaying this capture with `step` would not record what `later` (the next step, captured too)
        recorded, or None: the same kernels and grids, the same params once patched, the same uploads except
        those at the indices `inputs` (the batches)."""
        why = self._unlike(later)
        if why is not None:
            return why
        for i, (a, b) in enumerate(zip(self.keys, later.keys)):
            want = a[4] if i not in self.patches else struct.pack(f"<{len(a[4]) // 4}I", *map(_u32, self.patches[i](step)))
            if want != b[4]:
                return f"the params of dispatch {i} ({a[0]}:{a[1]}) change from step to step"
        for k, ((_, x), (_, y)) in enumerate(zip(self.uploads, later.uploads)):
            if k in self.upload_patches:
                x = self.upload_patches[k](step).tobytes()
            if k not in inputs and x != y:
                return f"upload {k} of the step changes from step to step"
        return None

    def follow(self, later, key, start):
        """Patch every dispatch whose params differ in `later` (the same step recorded with step[key] one more than
        `start`) as linear in step[key]: a decode step's position and cache length (offsets into the cache, the
        rotary position, the softmax's length), and every int32 upload that differs likewise (a padded batch's
        per-row positions, slot - pad). Returns why it cannot, or None; the patches are checked by difference()
        against a third capture before use."""
        why = self._unlike(later)
        if why is not None:   # (checked whole first: no patch is made for a step that cannot follow)
            return why
        for i, (a, b) in enumerate(zip(self.keys, later.keys)):
            if a[4] != b[4]:
                if i in self.patches:
                    return f"the params of dispatch {i} ({a[0]}:{a[1]}) are patched already"
                x = [int(v) for v in struct.unpack(f"<{len(a[4]) // 4}I", a[4])]
                d = [int(w) - v for v, w in zip(x, struct.unpack(f"<{len(b[4]) // 4}I", b[4]))]
                self.patches[i] = lambda s, x=x, d=d: [v + dv * (s[key] - start) for v, dv in zip(x, d)]
        for k, ((a, x), (_, y)) in enumerate(zip(self.uploads, later.uploads)):
            if x != y:
                if a.dtype != "int32" or len(x) != len(y):   # (float values are no position)
                    return f"upload {k} of the step ({a.dtype} {a.shape}) changes from step to step"
                x = np.frombuffer(x, np.int32).astype(np.int64)
                d = np.frombuffer(y, np.int32) - x
                self.upload_patches[k] = lambda s, x=x, d=d: (x + d * (s[key] - start)).astype(np.int32)
        return None


class CaptureMixin:
    """WgpuBackend's capture_begin / capture_end / release_capture / replay."""
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
        for pool in (self._pool, self._recent):  # buffers the step freed again: back in use, held for replays
            for size, buffers in pool.items():
                taken = [b for b in buffers if id(b) in capture.buffers]
                if taken:
                    buffers[:] = [b for b in buffers if id(b) not in capture.buffers]
                    self._held.update((id(b), (b, size)) for b in taken)
                    self._count_in_use(size * len(taken))
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
        for k, patch in capture.upload_patches.items():   # (after the sync: earlier work read the old values)
            self.write(capture.uploads[k][0], patch(step))
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
