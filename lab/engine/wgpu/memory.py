"""GPU arrays and their buffers: allocation from the pool, release (through finalizers that only queue the
buffer), upload and readback."""
import math
import os
import sys

import numpy as np

from ...checks import show
from .common import WG, _f32bits, _grid, _round_up, _u32
from .device import _lost

_HOST_DTYPES = {"float32": np.float32, "int32": np.int32, "float16": np.float16}


def _whole_words(x):
    """x's bytes padded to whole 4-byte words (queue writes take multiples of 4: an odd count of float16s)."""
    if x.nbytes % 4 == 0:
        return x
    return x.tobytes() + bytes(-x.nbytes % 4)



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


class MemoryMixin:
    """WgpuBackend's memory: the pool of buffers, uploads, readbacks and the memory counters."""
    _made = None         # trace_peak on: id(buffer) -> (bytes, shape, dtype, the code that allocated it last)
    _peak_arrays = []
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
        if self._made is not None:
            self._made[id(buffer)] = (size, tuple(shape), dtype, _allocated_by())
        self._count_in_use(size)
        return GPUArray(_Storage(buffer, size, self), shape, dtype)

    def _count_in_use(self, size):
        s = self._stats
        s["bytes_in_use"] += size
        if s["bytes_in_use"] > s["peak_bytes_in_use"]:
            s["peak_bytes_in_use"] = s["bytes_in_use"]
            if self._made is not None:
                self._peak_arrays = self._in_use()

    def trace_peak(self, on=True):
        """While on, each new peak of bytes in use keeps what was in use at that moment, for peak_arrays(): to see
        where a step's memory goes. Off by default; off, an allocation pays one attribute check."""
        if not isinstance(on, (bool, np.bool_)):   # ('no', 0.0: their truth would turn tracing on or off unasked)
            raise ValueError(f"trace_peak: on must be True or False, got {show(on)}")
        self._made = {} if on else None
        self._peak_arrays = self._in_use() if on else []

    def peak_arrays(self):
        """The buffers in use at the highest peak since trace_peak() (or reset_peak()), largest first: (bytes, shape,
        dtype, the lab code that allocated it: 'module.function' innermost first). A buffer a capture holds for its
        replays is in use, though no array owns it; one allocated before tracing began shows its bytes only."""
        return list(self._peak_arrays)

    def _in_use(self):
        pooled = {id(b) for pool in (self._pool, self._recent) for buffers in pool.values() for b in buffers}
        return sorted((self._made.get(k) or (b.size, None, None, None) for k, b in self._owned.items()
                       if k not in pooled), key=lambda a: -a[0])

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

    def stats(self):
        return dict(self._stats)

    def reset_peak(self):
        self._stats["peak_bytes_in_use"] = self._stats["bytes_in_use"]
        if self._made is not None:
            self._peak_arrays = self._in_use()


_LAB, _WGPU, _BACKEND = (os.sep + "lab" + os.sep, os.sep + "wgpu" + os.sep,
                        os.path.join("lab", "engine", "backend.py"))


def _allocated_by(depth=3):
    """The lab code outside the backend's own modules that an allocation was made for ('module.function', the
    innermost `depth` frames, joined by ' < '): the op, and what called it."""
    names, f = [], sys._getframe(2)   # (past _alloc)
    while f is not None and len(names) < depth:
        path = f.f_code.co_filename
        if _LAB in path and _WGPU not in path and not path.endswith(_BACKEND):
            names.append(f"{os.path.splitext(os.path.basename(path))[0]}.{f.f_code.co_name}")
        f = f.f_back
    return " < ".join(names)
