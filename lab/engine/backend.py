"""The backend interface and backend selection.

A backend owns raw arrays (numpy ndarrays, or GPU buffers) and implements a small set of primitives on them.
Everything above it (Tensor, autograd, ops, models) is written once against these primitives, so a
backend adds primitives, never model logic. Every primitive of the wgpu backend is checked against the numpy
one (lab/engine/opcheck.py, tests/test_ops.py).
"""
import contextlib
import os
import sys

import numpy as np

from ..checks import InputError, show
from . import quant

MAXDIM = 6  # the strided kernels (broadcast, copy) index at most this many dimensions


class IndexRangeError(IndexError, ValueError):
    """An embedding index or cross-entropy target outside its table or classes: an IndexError as numpy and torch
    raise for one, and a ValueError as lab raises for bad input."""


INDEXED = {"embedding": ("index", "indices", "a table of {} rows"), "cross_entropy": ("target", "targets", "{} classes"),
           "linear_cross_entropy": ("target", "targets", "{} classes")}


def index_range_error(op, lowest, highest, limit, ignore_index=None):
    """The one error for out-of-range indices, worded alike whichever backend (or the host) found them: the op
    (of INDEXED), the lowest and highest bad index, the size they index."""
    noun, nouns, what = INDEXED[op]
    allowed = f"allowed 0..{limit - 1}" + (f", or ignore_index={ignore_index}" if ignore_index is not None else "")
    if lowest == highest:
        return IndexRangeError(f"{op}: {noun} {lowest} is out of range for {what.format(limit)} ({allowed})")
    return IndexRangeError(f"{op}: {nouns} out of range for {what.format(limit)}, the lowest {lowest} and the highest "
                           f"{highest} ({allowed})")


def check_index_range(idx, limit, op, ignore_index=None):
    """Raise index_range_error for host indices `idx` (a numpy array) outside 0..limit-1 (ignore_index exempt)."""
    if idx.size == 0 or (idx.min() >= 0 and idx.max() < limit):
        return
    bad = (idx < 0) | (idx >= limit)
    if ignore_index is not None:
        bad &= idx != ignore_index
    if bad.any():
        raise index_range_error(op, int(idx[bad].min()), int(idx[bad].max()), limit, ignore_index)


def check_column_sums(a, b, trans_a):
    """One error for operands matmul_column_sums does not take: one product, a (1, M, K) (or (1, K, M)), b (1, K, N)."""
    k = a.shape[1] if trans_a else a.shape[-1]
    if len(a.shape) != 3 or len(b.shape) != 3 or a.shape[0] != 1 or b.shape[0] != 1 or k != b.shape[1]:
        raise ValueError(f"matmul_column_sums: a {tuple(a.shape)}{' (transposed)' if trans_a else ''} and b "
                         f"{tuple(b.shape)} do not fit: want a ({'1, K, M' if trans_a else '1, M, K'}) and b (1, K, N)")


def check_gelu_grad(g, w, pre):
    """One error for operands matmul_gelu_grad does not take: g (1, M, N), w (1, K, N), pre (1, M, K) (the kernel
    reads pre where it stores the product: a wrong size would read past it)."""
    if not (len(g.shape) == len(w.shape) == 3 and g.shape[0] == w.shape[0] == 1 and g.shape[2] == w.shape[2]
            and tuple(pre.shape) == (1, g.shape[1], w.shape[1])):
        raise ValueError(f"matmul_gelu_grad: g {tuple(g.shape)}, w {tuple(w.shape)} and pre {tuple(pre.shape)} do not "
                         f"fit: want g (1, M, N), w (1, K, N) and pre (1, M, K)")


class Backend:
    """Primitives every backend implements. Arrays are contiguous, row-major; `shape` is a tuple."""

    name = "abstract"
    _instance = None

    @classmethod
    def instance(cls):
        """The one backend of this class (a device, a pool, caches), created on first use."""
        if cls.__dict__.get("_instance") is None:
            cls._instance = cls()
        return cls._instance

    # -- memory --
    def from_numpy(self, x): raise NotImplementedError
    def to_numpy(self, a): raise NotImplementedError
    def full(self, shape, value, dtype="float32"): raise NotImplementedError
    def empty(self, shape, dtype="float32"): raise NotImplementedError     # contents undefined: for full overwrites
    def write(self, a, x): raise NotImplementedError               # a's values := host array x (a's size), in place,
    # landing before work recorded and not yet submitted (sync() first where that work touches a)
    def reshape(self, a, shape): raise NotImplementedError          # a view: shares storage
    def storage(self, a): raise NotImplementedError                # the object a and its views share: memory identity
    def sync(self, wait=False): pass
    def exclusive(self): return contextlib.nullcontext()   # held across a block, other threads' ops wait for its end
    def stats(self): return {}
    def reset_peak(self): pass

    def trace_peak(self, on=True):   # (wgpu: the buffers in use at each new peak, for peak_arrays())
        raise NotImplementedError(self._untraced("trace_peak"))

    def peak_arrays(self):
        raise NotImplementedError(self._untraced("peak_arrays"))

    def _untraced(self, op):
        return (f"{op}: the {self.name} backend keeps no count of its memory (its arrays are host memory: trace them "
                f"with tracemalloc); the wgpu backend traces its peaks")

    # -- elementwise --
    def unary(self, op, a): raise NotImplementedError               # neg exp log sqrt tanh relu gelu
    def scalar(self, op, a, c): raise NotImplementedError           # add mul rsub rdiv pow
    def binary(self, op, a, b): raise NotImplementedError           # add sub mul div maximum eq *_bwd, broadcasting
    def add_(self, dst, src): raise NotImplementedError             # dst += src in place (same size): a running sum

    # -- reductions and data movement --
    def reduce(self, op, a, axis): raise NotImplementedError        # sum max sumsq; removes `axis`
    def copy_view(self, a, offset, shape, strides): raise NotImplementedError
    def write_view(self, dst, offset, strides, src): raise NotImplementedError  # in place into dst

    # -- fused --
    def matmul(self, a, b, trans_a=False, trans_b=False, bias=None, triangle=None, out=None, residual=None):
        raise NotImplementedError
    # 3D, batch may broadcast; bias (N,) is added to every row of the product (fused where the kernel allows), then
    # residual (the product's shape: a layer's input to the residual stream) to it, fused likewise.
    # triangle, a hint for causal attention's square products that a backend may ignore: "out", only the lower
    # triangle of the product is used (the rest may come back as zeros); "a", A as stored is lower triangular.
    # a and b may be HeadViews, and out= a HeadView the product is written into (then returned): attention's
    # per-head matrices read and written in place in the activations (gather_heads / scatter_heads copy them,
    # for a backend or a kernel that cannot)
    def heads_in_place(self, seq, dim): return False
    # whether attention's products over heads of `dim` and sequences of `seq` take HeadViews without copying them
    # (where not, attention copies each head stack once rather than each product copying its operands)
    def softmax(self, a, scale=1.0, causal=False, dropout=None, length=None): raise NotImplementedError
    # dropout=(p, seed): -> (y, dropout(y, p, seed)) (attention's weights, and the dropped ones its product uses)
    def softmax_bwd(self, y, g, scale=1.0, dropout=None, dropped=None): raise NotImplementedError
    # dropout=(p, seed): g is the gradient of dropout(y), taken back through the same mask first. dropped: that
    # dropout(y) (softmax's second result) where the caller still holds it: g dropped is all the backward needs of
    # the mask, so a backend may read it rather than make the mask again
    def log_softmax(self, a): raise NotImplementedError
    def log_softmax_bwd(self, y, g): raise NotImplementedError
    def layernorm(self, x, w, b, eps, residual=None): raise NotImplementedError
    # -> y, mean, rstd; with residual, the LayerNorm of x + residual -> y, mean, rstd, x + residual
    def layernorm_bwd(self, x, w, mean, rstd, g, acc=None): raise NotImplementedError
    # -> dx, dw, db; with acc (x's gradient from its other uses) dx + acc
    def embedding(self, w, idx, checked=False): raise NotImplementedError
    # embedding and cross_entropy raise index_range_error for an index outside the table or the classes: at once
    # (host memory) or at the next read from the device. checked=True: the host has checked these indices already
    def embedding_bwd(self, idx, g, num_embeddings): raise NotImplementedError
    def cross_entropy(self, logits, targets, ignore_index, checked=False, classes=None): raise NotImplementedError
    # -> loss, saved = (lse (rows,), valid (rows,), count (1,) float: the rows not ignored; F.linear_cross_entropy
    # reads it). classes < logits' width: the columns past it are padding (zero tile columns), not classes
    def cross_entropy_bwd(self, logits, targets, saved, g, ignore_index, classes=None, in_place=False):
        raise NotImplementedError
    # (the padding columns' gradient is 0); in_place: written over the logits (the caller's last use of them)
    def padded_width(self, M, N, K): return N
    # the width an (M, K) @ (K, N) product is best given, zero columns added (wgpu: whole tiles where its plan would
    # pad the operands and cut the result back on every call): F.linear_cross_entropy pads its weight once to it
    def dropout(self, x, p, seed): raise NotImplementedError
    def lora_down(self, x, a): raise NotImplementedError           # x (M, K) @ a (r, K)^T -> (M, r)
    def lora_up_add(self, base, h, b, scale): raise NotImplementedError  # base + scale * h @ b^T, b (N, r)

    # -- optimizers (in place) --
    # guard: a one-element array (the step's gradient norm); when it is not finite the update is skipped;
    # max_norm > 0 first clips g in place to that global norm (as clip_ would), in the same pass
    def adamw_(self, p, g, m, v, lr, b1, b2, eps, wd, step, guard=None, max_norm=0.0): raise NotImplementedError
    def sgd_(self, p, g, buf, lr, momentum, wd, guard=None, max_norm=0.0): raise NotImplementedError
    def sumsq_into(self, a, out, slot): raise NotImplementedError   # out[slot] = sum(a * a)
    def clip_(self, g, normsq, max_norm): raise NotImplementedError

    # -- optional capabilities --
    # Declared here, so the layers above ask the interface and never probe a backend with hasattr. A flag says
    # whether the methods under it exist (the caller composes the result from the primitives above where not);
    # a method with a body is a composed fallback a backend overrides with a faster one.
    half_storage = True       # float16 arrays hold frozen weights that linear and matmul read (wgpu: shader-f16)
    gelu_keeps_grad = False   # gelu_and_grad: keeping the derivative beats recomputing it in the backward
    def gelu_and_grad(self, x): raise NotImplementedError           # -> gelu(x), gelu'(x)
    fused_matmul_gelu = False  # matmul_gelu: the product's store applies the activation (an MLP's first layer)
    def matmul_gelu(self, a, b, bias=None, keep_pre=True, residual=None): raise NotImplementedError
    # -> gelu(a @ b + bias) (+ residual), and a @ b + bias when keep_pre (for the backward) else None
    def matmul_column_sums(self, a, b, trans_a=False):
        """(a @ b, b's column sums (N,)) for b (1, K, N) (a stored (1, K, M) where trans_a): a Linear layer's weight
        and bias gradients, x^T g and g's rows summed. wgpu takes the sums from the product's own pass over b."""
        check_column_sums(a, b, trans_a)
        return self.matmul(a, b, trans_a), self.reduce("sum", self.reshape(b, b.shape[1:]), 0)

    fused_gelu_grad = False   # matmul_gelu_grad applies gelu' as the product stores (wgpu with
    # Tuning.GELU_GRAD_FUSED): only then does a linear reading a GELU output take its pre-activation's node
    def matmul_gelu_grad(self, g, w, pre):
        """gelu'(pre) * (g @ w^T) for g (1, M, N), w (1, K, N), pre (1, M, K): the gradient of a GELU's input from
        the gradient g of the linear layer (weight w) that reads its output. wgpu applies gelu' as it stores."""
        check_gelu_grad(g, w, pre)
        return self.binary("gelu_bwd", pre, self.matmul(g, w, False, True))
    def linears_fit(self, rows, weights, how): return False
    # whether linears takes a product of `rows` rows by these weights in one pass (else F.linears composes)
    def linears(self, a, weights, biases, how): raise NotImplementedError
    # a (1, M, K) by weights (K, N_i) (+ biases[i] or None), inference only: how "concat" -> (1, M, sum N_i) side
    # by side; "swiglu" (two of one N) -> silu(a W0 + b0) * (a W1 + b1)
    def flash_attention_fits(self, qkv_shape, n_head, n_kv_head=None, rotary=False): return False
    # whether flash_attention(qkv, n_head, scale, p, seed, n_kv_head, rope) -> (y, saved) and flash_attention_bwd(qkv,
    # y, saved, g, n_head, scale, p, seed, n_kv_head, rope) -> dqkv, causal self-attention fused with the composed
    # ops' result (query head h reading key-value head h // (n_head / n_kv_head); rope: None or the rotary tables
    # (cos, sin) arrays, q and k rotated at positions 0 .. T - 1), take this shape
    def flash_attention(self, qkv, n_head, scale, p, seed, n_kv_head=None, rope=None): raise NotImplementedError
    def flash_attention_bwd(self, qkv, y, saved, g, n_head, scale, p, seed, n_kv_head=None, rope=None):
        raise NotImplementedError
    def decode_attention_fits(self, head_dim): return False
    # whether decode_attention takes heads of head_dim: a one-token step's attention through the KV cache in one
    # pass (no gradient). parts: ((q, offset), (k, offset), (v, offset)), arrays (B, 1, W) whose heads start at
    # that column (the packed projection thrice, or three); cache_k, cache_v (B, Hkv, block, D) get this step's
    # key and value at slot pos (rotated by cos, sin (P, D) where given); pad (B,) int32 or None: row b's keys
    # are slots pad[b]..pos, its rotary position pos - pad[b]. -> y (B, 1, n_head * D), the heads merged
    def decode_attention(self, parts, cache_k, cache_v, pos, n_head, scale, pad=None, cos=None, sin=None):
        raise NotImplementedError
    fused_rms_norm = False   # rms_norm / rms_norm_bwd: RMSNorm (residual add fused in) in one pass over the rows
    def rms_norm(self, x, w, eps, residual=None): raise NotImplementedError
    # -> y, rstd; with residual, the RMSNorm of x + residual -> y, rstd, x + residual
    def rms_norm_bwd(self, x, w, rstd, g, acc=None): raise NotImplementedError
    # -> dx, dw; with acc (x's gradient from its other uses) dx + acc
    fused_swiglu = False     # swiglu / swiglu_bwd: silu(gate) * up (Llama's MLP) in one elementwise pass
    def swiglu(self, gate, up): raise NotImplementedError
    def swiglu_bwd(self, gate, up, g): raise NotImplementedError   # -> dgate, dup
    fused_rotary = False     # rotary: rotate-half rotary embedding of x (..., T, D) in one pass
    def rotary(self, x, cos, sin, pos, inverse=False, heads=None): raise NotImplementedError
    # x's rows t use rows pos + t of cos, sin (P, D); inverse: the transposed rotation (the backward, by -theta).
    # heads: x is the packed projection (B, T, heads * D) and the result its heads (B, heads, T, D), the head
    # split in the same pass (with inverse, from the heads back to the packed layout)
    # Quantized frozen weights (lab/engine/quant.py's QuantizedArray, (out, in)): upload_quantized(qa) -> the
    # handle quantized_matmul(x, qw, transpose) reads. x (N, in) -> x @ W^T (N, out) (the forward); transpose=True:
    # g (N, out) -> g @ W (N, in) (the input's gradient). The composed fallback keeps the packed array on the host
    # and dequantizes a chunk of W's rows at a time for matmul: one chunk's floats beside the packed bytes
    def upload_quantized(self, qa): return qa

    def quantized_matmul(self, x, qw, transpose=False):
        n_out, n_in = qw.shape
        N = x.shape[0]
        out = self.full((N, n_in), 0.0) if transpose else self.empty((N, n_out))
        step = quant.chunk_rows(qw)
        for o in range(0, n_out, step):
            c = min(step, n_out - o)
            w = self.reshape(self.from_numpy(quant.dequantize(qw, o, o + c)), (1, c, n_in))
            if transpose:   # g @ W = the sum over chunks of g's columns o..o+c-1 times W's rows o..o+c-1
                g = self.reshape(self.copy_view(x, o, (N, c), (n_out, 1)), (1, N, c))
                out = self.binary("add", out, self.reshape(self.matmul(g, w), (N, n_in)))
            else:
                part = self.reshape(self.matmul(self.reshape(x, (1, N, n_in)), w, False, True), (N, c))
                self.write_view(out, o, (n_out, 1), part)
        return out

    device_sampling = False  # sample_tokens runs on the device (a kernel); generation then reads back ids only
    def sample_tokens(self, logits, seen, temperature, top_k, top_p, penalty, greedy, seed, step, feed=None,
                      ring=None):
        """The next token of each row of logits (rows, n): penalty on the tokens whose bits are set in seen
        (rows, ceil(n / 32) int32, updated with the chosen ids), greedy's argmax or a draw after temperature,
        top-k, top-p with the uniform of (seed, step, row). -> (rows, 2) int32 [id, float32 bits of log p], the
        filtered probabilities (rows, n). With ring (slots, rows, 2) int32, the result also goes into its slot
        step % slots and the ids into feed (rows, 1) int32 (0 for a row where none could be drawn): a decode step's
        next input (lab.decode). This fallback computes it on the host (engine/sampling.py)."""
        from .sampling import sample_rows
        out, probs, words = sample_rows(self.to_numpy(logits), self.to_numpy(seen), temperature, top_k, top_p,
                                        penalty, greedy, seed, step)
        self.write(seen, words)
        if ring is not None:
            slots = self.to_numpy(ring)
            slots[step % ring.shape[0]] = out
            self.write(ring, slots)
            self.write(feed, np.where(out[:, 0] < logits.shape[1], out[:, 0], 0))
        return self.from_numpy(out), self.from_numpy(probs)

    supports_capture = False  # capture_begin / capture_end / replay: a training step recorded once, replayed
    # (train/replay.py)

    def optimizer_slots(self): return 1                             # parameters one adamw_many_ call updates at once

    def adamw_many_(self, slots, lr, b1, b2, eps, step, guard=None, max_norm=0.0):
        """adamw_ on every (p, g, m, v, wd) of `slots` (wgpu: one dispatch for as many as a shader stage binds)."""
        for p, g, m, v, wd in slots:
            self.adamw_(p, g, m, v, lr, b1, b2, eps, wd, step, guard=guard, max_norm=max_norm)

    def sumsq_many(self, arrays):
        """The sum of squares of all `arrays` together, a (1,) array (a gradient norm's square)."""
        partial = self.full((len(arrays),), 0.0)
        for i, a in enumerate(arrays):
            self.sumsq_into(a, partial, i)
        return self.reshape(self.reduce("sum", partial, 0), (1,))


class HeadView:
    """Attention's per-head matrices where they lie inside an activation: the (B * heads, T, dim) stack whose matrix
    b * heads + h is columns offset + h * dim .. + dim - 1 of rows (b, 0 .. T - 1) of `data`, a (B, T, W) array
    (q, k or v inside the packed (B, T, 3C) projection; y or its gradient inside (B, T, C))."""
    __slots__ = ("data", "offset", "heads", "dim")

    def __init__(self, data, offset, heads, dim):
        Bsz, T, W = data.shape
        if offset < 0 or offset + heads * dim > W:
            raise ValueError(f"HeadView: {heads} heads of {dim} from column {offset} do not fit rows of width {W}")
        self.data, self.offset, self.heads, self.dim = data, offset, heads, dim

    @property
    def shape(self):
        Bsz, T, _ = self.data.shape
        return (Bsz * self.heads, T, self.dim)

    @property
    def width(self):
        return self.data.shape[2]

    def strides(self):
        """Element strides of the (B, heads, T, dim) view."""
        T, W = self.data.shape[1], self.data.shape[2]
        return (T * W, self.dim, W, 1)

    def shape4(self):
        Bsz, T, _ = self.data.shape
        return (Bsz, self.heads, T, self.dim)


def gather_heads(backend, x):
    """x as a contiguous (B * heads, T, dim) array (a copy) if it is a HeadView, else x."""
    if not isinstance(x, HeadView):
        return x
    return backend.reshape(backend.copy_view(x.data, x.offset, x.shape4(), x.strides()), x.shape)


def scatter_heads(backend, view, src):
    """Write the (B * heads, T, dim) array src into the HeadView `view`; returns the view."""
    backend.write_view(view.data, view.offset, view.strides(), backend.reshape(src, view.shape4()))
    return view


def broadcast_strides(shape, out_shape):
    """Element strides that read a contiguous `shape` array while iterating over `out_shape` (0 = broadcast)."""
    shape = (1,) * (len(out_shape) - len(shape)) + tuple(shape)
    strides, acc = [0] * len(shape), 1
    for k in range(len(shape) - 1, -1, -1):
        strides[k] = acc if shape[k] != 1 else 0
        acc *= shape[k]
    return strides


def contiguous_strides(shape):
    strides, acc = [0] * len(shape), 1
    for k in range(len(shape) - 1, -1, -1):
        strides[k] = acc
        acc *= shape[k]
    return strides


# ---------------------------------------------------------------------------------------------------------
# selection

_state = {"backend": None, "reason": None}
_ANNOUNCED = set()
_held = []   # while held_notices() runs: the lists its notices go to instead of stderr


def _announce(line):
    if line not in _ANNOUNCED:
        _ANNOUNCED.add(line)
        if _held:
            _held[-1].append(f"lab: {line}")
        else:
            print(f"lab: {line}", file=sys.stderr)


@contextlib.contextmanager
def held_notices():
    """Collect the backend's notices ("lab: using numpy ...") in the list yielded instead of printing them: the
    command line prints them once a command is under way, so a refused argument stays one line on stderr."""
    notices = []
    _held.append(notices)
    try:
        yield notices
    finally:
        _held.remove(notices)


def _auto_choice():
    """wgpu on a real GPU, numpy when the only adapter is a CPU one (lavapipe is far slower than numpy)."""
    try:
        from .wgpu.device import list_adapters
        adapters = list_adapters()
    except Exception as e:  # wgpu missing or no Vulkan loader
        return "numpy", f"no wgpu adapter available ({type(e).__name__}: {e}); using numpy"
    gpus = [a for a in adapters if a["adapter_type"] != "CPU"]
    if gpus:
        return "wgpu", f"using wgpu on {gpus[0]['device']} ({gpus[0]['adapter_type']}, {gpus[0]['backend_type']})"
    if adapters:
        return "numpy", (f"only a CPU adapter is available ({adapters[0]['device']}); numpy is faster there, "
                         "using numpy (set LAB_BACKEND=wgpu to force it)")
    return "numpy", "no wgpu adapter found; using numpy"


def set_backend(name="auto"):
    """Select the backend for new tensors: 'wgpu', 'numpy' or 'auto'. Returns the backend."""
    if name not in ("wgpu", "numpy", "auto"):
        raise InputError(f"unknown backend {name!r}: expected 'wgpu', 'numpy' or 'auto'")
    if name == "auto":
        name, reason = _auto_choice()
    else:
        reason = f"using {name} (requested)"
    backend = backend_instance(name)
    if name == "wgpu" and "requested" in reason:
        reason = f"using wgpu on {backend.device_info['device']} (requested)"
    _state["backend"], _state["reason"] = backend, reason
    _announce(reason)
    return backend


def backend_instance(name):
    """The backend called `name` ('wgpu' or 'numpy'), created on first use, without making it the active one."""
    if isinstance(name, Backend):
        return name
    if name == "wgpu":
        from .wgpu import WgpuBackend
        return WgpuBackend.instance()
    if name == "numpy":
        from .numpy_backend import NumpyBackend
        return NumpyBackend.instance()
    raise InputError(f"unknown backend {name!r}: expected 'wgpu' or 'numpy'")


@contextlib.contextmanager
def using_backend(backend):
    """Make `backend` (a Backend or a name) the active one inside the block, then restore the previous one."""
    previous = dict(_state)
    _state.update(backend=backend_instance(backend), reason=_state.get("reason"))
    try:
        yield _state["backend"]
    finally:
        _state.update(previous)


def get_backend():
    if _state["backend"] is None:
        name = os.environ.get("LAB_BACKEND", "auto").strip().lower() or "auto"
        if name not in ("wgpu", "numpy", "auto"):  # say where the name came from: no argument named it
            raise InputError(f"environment variable LAB_BACKEND={show(name)}: unknown backend, expected 'wgpu', "
                             f"'numpy' or 'auto'")
        set_backend(name)
    return _state["backend"]


def backend_reason():
    get_backend()
    return _state["reason"]


def require_half_storage(backend, instead):
    """Raise, saying what to do `instead`, where `backend` cannot store float16 arrays (wgpu without shader-f16)."""
    if not backend.half_storage:
        raise InputError(f"float16 storage needs the shader-f16 feature, which this device "
                         f"({backend.device_info['device']}) does not have: {instead}")


def np_dtype(dtype):
    if dtype in ("float32", np.float32):
        return np.float32
    if dtype in ("int32", np.int32):
        return np.int32
    if dtype in ("float64", np.float64):
        return np.float64
    if dtype in ("float16", np.float16):
        return np.float16
    raise ValueError(f"unsupported dtype {dtype!r}: expected 'float32' or 'int32' ('float64' on numpy only, "
                     f"'float16' as storage for frozen weights)")
