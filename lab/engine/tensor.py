"""Tensor and reverse-mode autograd.

A Tensor wraps one backend array. Ops (lab/engine/ops/) build new tensors with `Tensor._make`, recording
their parents and a backward closure; `backward()` walks that graph in reverse topological order.
"""
import contextlib
import math
import numbers
import threading

import numpy as np

from . import quant
from .backend import backend_instance, contiguous_strides, get_backend, np_dtype, require_half_storage

_grad_state = threading.local()
_DTYPE_NAMES = {}   # numpy dtype -> its name (Tensor.dtype)
_accumulating = threading.Lock()  # held while backward() adds into leaves' .grad (see Tensor.backward)


def is_grad_enabled():
    return getattr(_grad_state, "enabled", True)


@contextlib.contextmanager
def no_grad():
    """Within this context, ops record no graph (inference, optimizer updates)."""
    prev = is_grad_enabled()
    _grad_state.enabled = False
    try:
        yield
    finally:
        _grad_state.enabled = prev


@contextlib.contextmanager
def enable_grad():
    """Within this context ops record the graph again (a checkpointed block's recomputation, run inside a backward
    that may itself run under no_grad)."""
    prev = is_grad_enabled()
    _grad_state.enabled = True
    try:
        yield
    finally:
        _grad_state.enabled = prev


class Tensor:
    __slots__ = ("data", "backend", "_requires_grad", "grad", "_parents", "_backward", "_absorbs", "name",
                 "_version", "_read", "_gelu_input", "__weakref__")
    __array_priority__ = 1000  # so numpy_array * tensor calls Tensor.__rmul__

    def __init__(self, data, backend, requires_grad=False, name=None):
        self.data = data
        self.backend = backend
        self._requires_grad = requires_grad   # (set directly: a new tensor has no graph for the setter to guard)
        self.grad = None
        self._parents = ()
        self._backward = None
        self._absorbs = None
        self.name = name
        self._version = 0   # counts in-place updates of data (optimizer steps): see F.checkpoint
        self._read = ()     # a node's leaf parents: (leaf, _version, data, requires_grad) when the forward read them
        self._gelu_input = None   # F.linear(..., activation="gelu")'s output: its pre-activation (see there)

    @classmethod
    def _make(cls, data, backend, parents, backward, absorbs=None):
        """The result of an op. Records the graph only when a parent needs gradients and grad is enabled.
        absorbs=i: backward(g, acc) takes parent i's gradient accumulated so far from its other uses (None if
        none) and returns that parent's gradient with acc added (in its own kernel: no pass to add them)."""
        out = cls(data, backend)
        if is_grad_enabled() and any(p.requires_grad for p in parents):
            out._requires_grad = True
            out._parents = parents
            out._backward = backward
            out._absorbs = absorbs
            # the backward closures read the leaves' arrays as they are then: an optimizer step in between updates
            # them in place, a load (load_state_dict, a LoRA merge) swaps their array, and the gradient would
            # silently mix old and new weights (_walk refuses both); frozen leaves too (LayerNorm's dx reads its
            # weight). Whether each required grad then decides whether it gets one (as PyTorch's graph does)
            out._read = [(p, p._version, p.data, p.requires_grad) for p in parents if p._backward is None]
        return out

    # -- properties --
    @property
    def shape(self):
        return tuple(self.data.shape)

    @property
    def ndim(self):
        return len(self.data.shape)

    @property
    def size(self):
        return math.prod(self.data.shape)

    @property
    def dtype(self):
        # str() of a numpy dtype costs ~6 us and every op reads it (its float check): a tenth of a numpy decode
        # step's host time went there
        d = self.data.dtype
        name = _DTYPE_NAMES.get(d)
        if name is None:
            name = _DTYPE_NAMES[d] = str(d)
        return name

    def __len__(self):
        if not self.shape:
            raise TypeError("len() of a 0-D tensor (it has no first axis)")
        return self.shape[0]

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, backend={self.backend.name}{grad})"

    # -- host transfer (sync points) --
    def numpy(self):
        return self.backend.to_numpy(self.data)

    def item(self):
        if self.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.numpy().reshape(-1)[0].item()

    def tolist(self):
        return self.numpy().tolist()

    def detach(self):
        return Tensor(self.data, self.backend)

    @property
    def requires_grad(self):
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, flag):
        if not flag and getattr(self, "_backward", None) is not None:
            # an op's output: the walk would skip it, and every leaf below would lose its gradient through it, in
            # the uses before too (a detach of all of them, silently); PyTorch refuses it as well
            raise RuntimeError(f"requires_grad = False on a tensor of shape {self.shape} that an op made (not a "
                               f"leaf); use .detach() for a copy outside the graph")
        self._requires_grad = flag

    def requires_grad_(self, flag=True):
        if flag and self.dtype not in ("float32", "float64"):  # the same rule as tensor(requires_grad=True)
            raise ValueError(f"only floating-point tensors can require gradients, this one is {self.dtype}"
                             + (" (float16 is storage for frozen weights)" if self.dtype == "float16" else ""))
        self.requires_grad = bool(flag)
        return self

    def to(self, backend):
        """This tensor's values on another backend ('numpy', 'wgpu', or a Backend). The copy is a new leaf (it keeps
        requires_grad): gradients reach it, not this tensor, so move tensors before building a graph on them."""
        target = backend_instance(backend)
        if target is self.backend:
            return self
        return Tensor(target.from_numpy(self.numpy()), target, requires_grad=self.requires_grad)

    # -- autograd --
    def backward(self, grad=None, retain_graph=False):
        """Accumulate d(self)/d(leaf) into every leaf's .grad. `grad` (a Tensor or array of self's shape) defaults
        to 1 for a one-element tensor. Without retain_graph the graph is freed as it is walked: a second
        backward() through any of its nodes raises rather than silently dropping their share of the gradient."""
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad (no input had requires_grad=True)")
        B = self.backend
        given = isinstance(grad, Tensor)  # the caller's array: memory a leaf must not take over
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a one-element tensor, got shape {self.shape}")
            grad = B.full(self.shape, 1.0, self.dtype)
        else:
            grad = self._check_grad(grad)
        # Backwards may hand one array to several parents (add gives g to both sides, reshape a view of it) and the
        # caller keeps `grad`: a leaf gets a copy of any memory already handed out, since clipping and the
        # optimizers scale .grad in place and must scale each gradient once.
        claimed = {id(B.storage(grad)): grad} if given else {}
        # Leaves get their gradients only once every node's backward has run: an exception (a Ctrl-C, a backend's error)
        # in the middle then changes no .grad, rather than leaving some leaves with this call's
        # share and others without. (Nodes walked before it are freed as usual, so that their saved activations go
        # as the walk proceeds: a retry without retain_graph says the graph was freed.)
        done = self._walk(grad, retain_graph)
        # Reading a leaf's .grad, adding and storing the sum is one step for concurrent backward() calls into shared
        # leaves (threads lost each other's contributions: 389 of 8000 on numpy). The backend is taken first, in the
        # order a trainer's step (holding it, then calling backward) takes them, so the two locks cannot deadlock.
        with B.exclusive(), _accumulating:
            before = [(node, node.grad) for node, _ in done]
            sums = []
            for node, g in done:
                if str(g.dtype) != node.dtype:   # a float32 leaf that met a float64 tensor (numpy promotes, as PyTorch):
                    # its gradient in its own dtype, as PyTorch's (a float64 .grad refused the next backward's sum)
                    g = B.from_numpy(B.to_numpy(g).astype(np_dtype(node.dtype)))
                if node.grad is not None:
                    g = B.binary("add", node.grad.data, g)
                elif id(B.storage(g)) in claimed:
                    g = B.copy_view(g, 0, g.shape, contiguous_strides(g.shape))
                claimed[id(B.storage(g))] = g
                sums.append((node, Tensor(g, B)))
            try:
                for node, g in sums:
                    node.grad = g
            except BaseException:  # a Ctrl-C between two of these assignments: all or none of the leaves take theirs
                for node, g in before:
                    node.grad = g
                raise

    def _walk(self, grad, retain_graph=False):
        """The backward pass from this tensor with gradient `grad` (an array): every node's backward run in reverse
        topological order, each node freed after it unless retain_graph. Returns [(leaf, its gradient)], assigning
        nothing (backward() does, all at once; a recomputed block's backward hands them to its own parents)."""
        B = self.backend
        topo, seen = [], set()
        unrecorded = {}   # id(node) -> ids of its leaf parents that required no grad at its forward but do now
        stack = [(self, False)]
        while stack:  # iterative DFS: deep graphs (many layers, long sequences) must not hit the recursion limit
            node, done = stack.pop()
            if done:
                topo.append(node)
                continue
            if id(node) in seen:
                continue
            if node._backward is _freed:  # checked before any .grad changes: nothing half-accumulated
                raise RuntimeError(
                    f"backward() through a graph that was already freed: an intermediate tensor of shape "
                    f"{node.shape} took part in an earlier backward() without retain_graph=True, which freed what "
                    f"its gradient needs. Pass retain_graph=True to the earlier backward(), or add the losses "
                    f"and call backward() once")
            if node._backward is None and node.grad is not None:
                node._check_own_grad()
            skip = ()
            for leaf, version, data, wanted in node._read:
                if not wanted and leaf.requires_grad:   # (set after the forward: no gradient through this node, as
                    skip += (id(leaf),)                 # in PyTorch; the op's backward may still hand one, or a part)
                if leaf._version != version or leaf.data is not data:
                    raise RuntimeError(
                        f"backward() after an in-place update of a tensor of shape {leaf.shape} that the forward "
                        f"read (an optimizer step, or its values replaced by load_state_dict or a LoRA merge, between "
                        f"the forward and this backward): its gradient would mix the old values and the new. Run the "
                        f"forward again after the change, or make the change after backward()")
            seen.add(id(node))
            stack.append((node, True))
            if skip:
                unrecorded[id(node)] = skip
            for p in node._parents:
                if p.requires_grad and id(p) not in seen and id(p) not in skip:
                    stack.append((p, False))
        grads = {id(self): grad}
        done = []
        while topo:   # popped: a node walked goes, its output with it, once no later node or caller holds it
            node = topo.pop()
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if node._backward is None:  # a leaf: its .grad is updated once the walk is done
                done.append((node, g))
                continue
            skip = unrecorded.get(id(node), ())
            if node._absorbs is None:
                parent_grads = node._backward(g)
            else:  # the parent's gradient so far goes into the node's backward, which returns the sum
                p = node._parents[node._absorbs]
                parent_grads = node._backward(g, grads.pop(id(p), None) if p.requires_grad and id(p) not in skip
                                              else None)
            for p, pg in zip(node._parents, parent_grads):
                if pg is None or not p.requires_grad or id(p) in skip:
                    continue
                prev = grads.get(id(p))
                grads[id(p)] = pg if prev is None else B.binary("add", prev, pg)
            if not retain_graph:  # requires_grad stays: a later use of the node must reach the check above
                node._backward, node._parents, node._absorbs, node._read = _freed, (), None, ()
        return done

    def _check_own_grad(self):
        """A .grad the caller assigned must be one this leaf's gradient can be added to: the same shape (else the
        add broadcasts it to another shape), dtype and backend, as a Tensor. Checked before any .grad changes."""
        g = self.grad
        if not isinstance(g, Tensor) or g.backend is not self.backend or g.shape != self.shape or g.dtype != self.dtype:
            got = (f"a {type(g).__name__}" if not isinstance(g, Tensor) else
                   f"shape {g.shape}, dtype {g.dtype} on {g.backend.name}")
            raise ValueError(f"backward(): a leaf's .grad holds {got}; a leaf of shape {self.shape}, dtype {self.dtype} "
                             f"on {self.backend.name} needs a Tensor of that shape, dtype and backend (or None)")

    def _check_grad(self, grad):
        """backward()'s `grad` as an array on this tensor's backend, checked against this tensor."""
        if isinstance(grad, Tensor):
            if grad.backend is not self.backend:
                raise ValueError(f"backward(): the gradient lives on the {grad.backend.name} backend and the tensor "
                                 f"on {self.backend.name}; move it with .to(...)")
            if grad.dtype != self.dtype:
                raise ValueError(f"backward(): the gradient has dtype {grad.dtype}, the tensor {self.dtype}: they "
                                 "must match")
            data = grad.data
        else:
            arr = np.asarray(grad)
            if arr.dtype.kind not in "fiu":
                raise ValueError(f"backward(): the gradient must hold numbers, got dtype {arr.dtype}")
            data = arr  # converted to the tensor's dtype below, once the shape is known to fit
        if tuple(data.shape) != self.shape:
            raise ValueError(f"backward(): the gradient has shape {tuple(data.shape)}, the tensor {self.shape}: "
                             "they must match")
        return data if isinstance(grad, Tensor) else self.backend.from_numpy(data.astype(np_dtype(self.dtype)))


def _freed(*_):
    """The backward of a node whose graph a backward() without retain_graph freed (never called: see backward)."""
    raise RuntimeError("backward() through a freed graph")


def tensor(data, requires_grad=False, dtype=None, backend=None):
    """A tensor from array-like data. Floats become float32 and integers int32 unless `dtype` says otherwise."""
    if isinstance(data, Tensor):
        data = data.numpy()
    arr = np.asarray(data)
    if dtype is None:
        if arr.dtype.kind in "iub":
            dtype = "int32"
        elif arr.dtype.kind == "f":
            dtype = "float32"
        else:
            raise ValueError(f"cannot make a tensor from dtype {arr.dtype}: expected numbers")
    b = backend_instance(backend) if backend is not None else get_backend()
    if dtype == "float64" and b.name != "numpy":
        raise ValueError("float64 tensors exist on the numpy backend only (WGSL has no portable f64)")
    if requires_grad and dtype == "int32":
        raise ValueError("only floating-point tensors can require gradients")
    if dtype == "float16":
        if requires_grad:
            raise ValueError("float16 tensors are storage for frozen weights (read by linear in float32 "
                             "arithmetic) and cannot require gradients: train float32 tensors")
        require_half_storage(b, "keep the weights float32")
    if np_dtype(dtype) is np.int32 and arr.dtype.kind in "iu" and arr.size:
        lo, hi = int(arr.min()), int(arr.max())  # astype would wrap them silently (2**40 -> 0, 2**31 + 5 negative)
        if lo < -2 ** 31 or hi >= 2 ** 31:
            raise ValueError(f"integers {lo}..{hi} do not fit an int32 tensor (allowed -2147483648..2147483647)")
    return Tensor(b.from_numpy(arr.astype(np_dtype(dtype), copy=False)), b, requires_grad=requires_grad)


def _filled(name, shape, value, requires_grad, dtype):
    """zeros/ones: the shape and dtype checked as tensor() checks its data (the GPU made a tensor of shape (-1,) or
    (2.5,), and an int32 or float16 one that required gradients)."""
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else tuple(shape)
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0 for s in shape):
        raise ValueError(f"{name}: sizes must be integers >= 0, got {shape}")
    dtype = str(np.dtype(np_dtype(dtype)))
    if requires_grad and dtype not in ("float32", "float64"):
        raise ValueError(f"{name}: only floating-point tensors can require gradients, got dtype {dtype}")
    b = get_backend()
    if dtype == "float64" and b.name != "numpy":
        raise ValueError("float64 tensors exist on the numpy backend only (WGSL has no portable f64)")
    if dtype == "float16":
        require_half_storage(b, "keep the weights float32")
    return Tensor(b.full(tuple(int(s) for s in shape), value, dtype), b, requires_grad=requires_grad)


def zeros(*shape, requires_grad=False, dtype="float32"):
    return _filled("zeros", shape, 0, requires_grad, dtype)


def ones(*shape, requires_grad=False, dtype="float32"):
    return _filled("ones", shape, 1, requires_grad, dtype)


class QuantizedWeight(Tensor):
    """A frozen linear weight held packed (qa, a QuantizedArray (out, in)) on `backend` (upload_quantized's
    handle in .data): it reads as the (in, out) weight of an nn.Linear (shape, numpy() dequantized), so code
    that lists, saves or sizes parameters takes it as one; only quantized_linear multiplies by it."""
    __slots__ = ("packed",)

    def __init__(self, qa, backend):
        super().__init__(backend.upload_quantized(qa), backend)
        self.packed = qa

    @property
    def shape(self):
        return self.packed.shape[::-1]

    @property
    def ndim(self):
        return 2

    @property
    def size(self):
        return self.packed.shape[0] * self.packed.shape[1]

    @property
    def dtype(self):
        return self.packed.kind

    @property
    def nbytes(self):
        return self.packed.nbytes

    def numpy(self):
        return np.ascontiguousarray(quant.dequantize(self.packed).T)

    def detach(self):
        return self

    def assign(self, values):
        """Hold `values` (in, out) quantized as this weight's kind (a QuantizedArray as it is). Values that are a
        packed weight's dequantized ones (a checkpoint's) pack again to those same values."""
        qa = (values if isinstance(values, quant.QuantizedArray) else
              quant.quantize(np.asarray(values, np.float32).T, self.packed.kind))
        if qa.shape != self.packed.shape:
            raise ValueError(f"QuantizedWeight.assign: a ({qa.shape[1]}, {qa.shape[0]}) weight for one of shape "
                             f"{self.shape}")
        self.data, self.packed = self.backend.upload_quantized(qa), qa

    @property
    def requires_grad(self):
        return False

    @requires_grad.setter
    def requires_grad(self, flag):
        # `p.requires_grad = True` (unfreezing a model) took the flag, and an optimizer then held the weight
        # without ever stepping it: the base silently stayed frozen
        if flag:
            raise ValueError(f"a {self.dtype} weight is frozen: gradients reach its layer's input and adapters "
                             f"only (load the base with base_dtype='float32' to train it)")

    def requires_grad_(self, flag=True):
        self.requires_grad = flag
        return self

    def to(self, backend):
        target = backend_instance(backend)
        return self if target is self.backend else QuantizedWeight(self.packed, target)

    def __repr__(self):
        return f"QuantizedWeight(shape={self.shape}, kind={self.dtype}, nbytes={self.nbytes}, backend={self.backend.name})"
