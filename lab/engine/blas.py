"""float32 products for the numpy backend through Intel MKL's sgemm, when the `mkl` wheel is installed
(`pip install 'lab[mkl]'`).

numpy's PyPI wheels link OpenBLAS, which runs lab's training products 13-20% slower than MKL, the BLAS PyTorch's
CPU build uses, on an AVX-512 core at one thread (768 x 128 x 512: 0.65 against 0.57 ms; 2048 x 384 x 1536: 15.0
against 13.1), and the products are two thirds of a CPU training step. `matmul` takes the float32 products MKL can
read where they lie (every matrix with one unit stride, as BLAS's row- or column-major) and hands everything
else to np.matmul, which stays the definition: same shapes, broadcasting and errors.

LAB_BLAS chooses: unset or `auto` uses MKL, on one thread, when it is installed and numpy's BLAS runs on one thread
too (see mkl()); `numpy` keeps numpy's own BLAS; `mkl` requires MKL, threaded as MKL's own variables say. Its
reproducibility mode is set to AUTO (same bits run to run on one CPU and thread count, whatever the arrays'
alignment), which replays and checkpointing rely on.
"""
import ctypes
import os
import subprocess
import sys
from importlib import metadata

import numpy as np

from ..checks import InputError

CHOICES = ("auto", "numpy", "mkl")
INT_MAX = (1 << 31) - 1   # MKL's LP64 interface: 32-bit dimensions and leading dimensions
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
MKL_CBWR_AUTO, MKL_INTERFACE_LP64, MKL_THREADING_SEQUENTIAL = 2, 0, 1
# products of fewer multiply-adds than this stay numpy's: a call through ctypes costs ~8 us of Python and MKL
# ~1.5 us more than OpenBLAS, against 4 us for a whole 64 x 64 x 64 product; 128 x 128 x 128 is where they
# break even at one thread (1 x 768 x 2304, a decode step's product: 1.15x numpy's time through MKL)
MKL_MIN_WORK = 1 << 21
# arrays whose np.matmul is a plain product: a subclass's own (np.matrix's result type, a masked array's mask and
# its refusal) is numpy's to apply (np.matmul of a memmap is a plain array)
PLAIN = (np.ndarray, np.memmap)


def choice():
    value = os.environ.get("LAB_BLAS", "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise InputError(f"LAB_BLAS={os.environ['LAB_BLAS']!r} is not a choice: use one of {', '.join(CHOICES)} "
                        "(unset means auto: MKL when the mkl package is installed)")
    return value


def _mkl_library_path():
    """libmkl_rt from the installed `mkl` distribution (its files sit under the environment's lib/), or None."""
    try:
        files = metadata.distribution("mkl").files or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        name = f.name
        if name.startswith("libmkl_rt.so") or (name.startswith("mkl_rt") and name.endswith(".dll")) \
                or (name.startswith("libmkl_rt") and name.endswith(".dylib")):
            path = os.path.normpath(f.locate())
            if os.path.exists(path):
                return path
    return None


_PROBE = """import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
lib.MKL_Set_Interface_Layer(0)
x, c = (ctypes.c_float * 1)(2.0), (ctypes.c_float * 1)()
lib.cblas_sgemm(101, 111, 111, 1, 1, 1, ctypes.c_float(1.0), x, 1, x, 1, ctypes.c_float(0.0), c, 1)
sys.exit(0 if c[0] == 4.0 else 3)
"""


def _probe(path, layer_env):
    """One product through mkl_rt in a child process first (0.1 s), in the threading layer this process will use
    (layer_env: MKL_THREADING_LAYER for the child, or None for the environment's): mkl_rt loads its threading layer
    and kernels when first called and ends the whole process, with its own message, when one cannot load
    (MKL_THREADING_LAYER=TBB: libmkl_tbb_thread needs libtbb.so.12, which the tbb wheel puts where the loader does
    not look)."""
    env = dict(os.environ, MKL_THREADING_LAYER=layer_env) if layer_env else None
    try:
        run = subprocess.run([sys.executable or "python", "-S", "-c", _PROBE, path], capture_output=True, text=True,
                             timeout=60, env=env)
    except (OSError, subprocess.SubprocessError) as e:
        raise OSError(f"{path}: a product through it in a child process failed: {e}") from None
    if run.returncode:
        lines = [line.strip() for line in (run.stderr + run.stdout).splitlines() if line.strip()]
        said = lines[-1] if "Traceback (most recent call last):" in lines else " ".join(lines)   # (the exception)
        raise OSError(f"{path} fails in this environment: {said or f'exit status {run.returncode}'}")


class _Mkl:
    def __init__(self, path, sequential):
        sequential = sequential and "MKL_THREADING_LAYER" not in os.environ   # (a user's own layer is kept)
        _probe(path, "SEQUENTIAL" if sequential else None)
        lib = ctypes.CDLL(path)
        # the interface layer must be LP64 (32-bit ints, what the argument types below say); another library that
        # loaded mkl_rt first with ILP64 would make every call misread its arguments, so then MKL is not used
        if lib.MKL_Set_Interface_Layer(MKL_INTERFACE_LP64) != MKL_INTERFACE_LP64:
            raise OSError(f"{path}: its interface layer is not LP64 in this process")
        if sequential:
            # (only the interface layer may be set before this: it fixes itself at MKL's first other call)
            lib.MKL_Set_Threading_Layer(MKL_THREADING_SEQUENTIAL)
        if "MKL_CBWR" not in os.environ:
            lib.MKL_CBWR_Set(MKL_CBWR_AUTO)
        i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
        self.sgemm = lib.cblas_sgemm
        self.sgemm.restype = None
        self.sgemm.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
        self.set_num_threads = lib.MKL_Set_Num_Threads
        self.max_threads = lib.MKL_Get_Max_Threads
        self.version = metadata.version("mkl")


_state = {}


def _one_thread_after_fork():
    # a child forked from a process that ran OpenMP threads (MKL's, or PyTorch's GNU OpenMP, which MKL's calls can
    # land in) hangs in its first threaded MKL product (numpy's OpenBLAS does not): in a forked child MKL runs on the
    # calling thread only, also when it is first loaded there
    _state["forked"] = True
    if _state.get("mkl") is not None:
        _state["mkl"].set_num_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_one_thread_after_fork)


def numpy_blas_threads():
    """The threads numpy's OpenBLAS runs on: what it reads when it loads (OPENBLAS_NUM_THREADS, GOTO_NUM_THREADS,
    OMP_NUM_THREADS), else one per CPU this process may use."""
    for name in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # (not Linux)
        return os.cpu_count() or 1


def mkl():
    """The loaded MKL (or None: not installed, not loadable, LAB_BLAS=numpy, or auto with numpy's BLAS threaded),
    decided once per process.

    auto takes MKL, single-threaded, only where numpy's OpenBLAS runs on one thread (OMP_NUM_THREADS=1, a one-CPU
    machine or container): there it is 13-20% faster. With more threads the pools fight: MKL's OpenMP threads beside
    OpenBLAS's (numpy's stacked and small products) and PyTorch's made a 2-layer 64-wide step 5-8x slower on the
    2-core VM (5 ms -> 40 ms in the test suite), and threaded MKL alone 1.35x slower at those sizes. LAB_BLAS=mkl
    takes MKL whatever the threads, as MKL's own variables (MKL_NUM_THREADS, MKL_THREADING_LAYER) set it up."""
    if "mkl" not in _state:
        how = choice()
        lib = None
        if how == "mkl" or (how == "auto" and numpy_blas_threads() == 1):
            path = _mkl_library_path()
            if path is None and how == "mkl":
                raise InputError("LAB_BLAS=mkl but the mkl package is not installed: pip install 'lab[mkl]' "
                                "(x86-64 only), or unset LAB_BLAS")
            try:
                lib = _Mkl(path, sequential=how == "auto") if path else None
            except (OSError, AttributeError) as e:
                if how == "mkl":
                    raise InputError(f"LAB_BLAS=mkl but MKL cannot be used here: {e}") from None
        if lib is not None and _state.get("forked"):
            lib.set_num_threads(1)
        _state["mkl"] = lib
    return _state["mkl"]


def describe():
    """Which BLAS the numpy backend's float32 products run on, in words (the bench records it)."""
    lib = mkl()
    if lib is not None:
        return f"MKL {lib.version}"
    cfg = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
    return f"numpy's {cfg.get('name', 'BLAS')} {cfg.get('version', '')}".strip()


def _matrix(x):
    """(transposed, leading dimension) of the last two axes of a float32 array as BLAS reads a row-major matrix,
    or None when neither axis has unit stride (or a stride is not a whole number of floats)."""
    rows, cols = x.shape[-2:]
    s_r, s_c = x.strides[-2:]
    if s_r % 4 or s_c % 4:
        return None
    # an axis of length 1 is never stepped along: its stride is whatever makes the layout valid
    s_r = cols if rows == 1 else s_r // 4
    s_c = 1 if cols == 1 else s_c // 4
    if s_c == 1 and s_r >= cols:
        return False, s_r
    if rows == 1 and s_c >= 1:   # one row read as a column-major 1 x cols matrix
        return True, s_c
    if s_r == 1 and s_c >= rows:
        return True, s_c
    return None


def matmul(a, b, out=None):
    """np.matmul(a, b, out=out), through MKL's sgemm for one float32 product (2-D operands, or leading axes of
    length 1) of at least MKL_MIN_WORK multiply-adds whose matrices MKL can read where they lie: C-contiguous or
    transposed, and an output written row by row (a fresh array or a view whose rows are evenly spaced, as a
    column block of a wider array). Stacks of products stay numpy's: MKL's batched sgemm ran attention's
    48 x 64 x 64 head products 1.2-2.5x slower than numpy's loop over OpenBLAS calls."""
    lib = mkl()
    if (lib is None or type(a) not in PLAIN or type(b) not in PLAIN
            or a.dtype != np.float32 or b.dtype != np.float32 or a.ndim < 2 or b.ndim < 2
            or 0 in a.shape or 0 in b.shape or a.shape[-1] != b.shape[-2]
            or a.size != a.shape[-2] * a.shape[-1] or b.size != b.shape[-2] * b.shape[-1]
            or a.size * b.shape[-1] < MKL_MIN_WORK):
        return _numpy(a, b, out)
    shape = (1,) * (max(a.ndim, b.ndim) - 2) + (a.shape[-2], b.shape[-1])
    if out is None:
        c = np.empty(shape, np.float32)
    elif (type(out) in PLAIN and out.shape == shape and out.dtype == np.float32 and out.flags.writeable
          and not np.may_share_memory(out, a) and not np.may_share_memory(out, b)):
        c = out
    else:
        return _numpy(a, b, out)
    a2, b2, c2 = (x if x.ndim == 2 else x.reshape(x.shape[-2:]) for x in (a, b, c))
    la, lb, lc = _matrix(a2), _matrix(b2), _matrix(c2)
    M, K, N = a2.shape[0], a2.shape[1], b2.shape[1]
    # (not aligned: floats off 4-byte boundaries, a view into raw bytes; flags.aligned rather than ctypes.data % 4,
    # as x.ctypes costs a microsecond each, a small product's whole time)
    if (la is None or lb is None or lc is None or lc[0] or not (a2.flags.aligned and b2.flags.aligned
                                                                 and c2.flags.aligned)
            or max(M, N, K, la[1], lb[1], lc[1]) > INT_MAX):
        return _numpy(a, b, out)
    lib.sgemm(ROW_MAJOR, TRANS if la[0] else NO_TRANS, TRANS if lb[0] else NO_TRANS, M, N, K, 1.0,
              a2.ctypes.data, la[1], b2.ctypes.data, lb[1], 0.0, c2.ctypes.data, lc[1])
    return c


def _numpy(a, b, out):
    """numpy's own product: what every layout, dtype or shape MKL is not given falls back to."""
    return np.matmul(a, b) if out is None else np.matmul(a, b, out=out)
