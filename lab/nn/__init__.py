"""Layers: Module, Linear, Embedding, LayerNorm, Dropout."""

import contextlib
import threading
import weakref

import numpy as np

from ..engine import ops as F
from ..engine.locks import FairLock
from ..engine.random import generator
from ..engine.backend import get_backend
from ..engine.quant import quantize
from ..engine.quant import zeros as quant_zeros
from ..checks import InputError, show
from ..engine.tensor import QuantizedWeight, Tensor, tensor


_modes = threading.local()


@contextlib.contextmanager
def evaluating():
    """Every module called in this thread inside the block runs as in eval() (no dropout), without switching the
    mode other threads see: generating from a model that a training thread is stepping leaves its steps as they
    were."""
    previous, _modes.evaluating = getattr(_modes, "evaluating", False), True
    try:
        yield
    finally:
        _modes.evaluating = previous


def checkpoint_interval(name, value, blocks=None):
    """An activation-checkpointing setting as the block interval k it means: True every block (1), False none
    (0), an integer k >= 1 every k-th block (blocks 0, k, 2k, ...), at most `blocks` (the model's count)."""
    allowed = "True (every block), False (none) or an integer k >= 1 (every k-th block)"
    if isinstance(value, (bool, np.bool_)):
        value = int(value)
    elif not isinstance(value, (int, np.integer)) or value < 0:
        raise InputError(f"{name} must be {allowed}, got {show(value)}")
    if blocks is not None and value > blocks:
        raise InputError(f"{name}={value}: the model has {blocks} blocks, so k must be 1..{blocks} (every k-th "
                         f"block) or True/False")
    return int(value)


@contextlib.contextmanager
def checkpointing(every):
    """In this thread inside the block, models of blocks (Blocks) checkpoint every `every`-th block while they
    train, whatever their own setting (a Trainer's TrainConfig.checkpoint_activations); 0 leaves each its own."""
    previous, _modes.checkpoint_every = getattr(_modes, "checkpoint_every", 0), checkpoint_interval("every", every)
    try:
        yield
    finally:
        _modes.checkpoint_every = previous


_users = weakref.WeakKeyDictionary()   # model -> [thread that has it in use (training or changing it), depth]
_users_lock = threading.Lock()


_step_locks = weakref.WeakKeyDictionary()   # model -> the lock its trainers hold across each step


def step_lock(model):
    """The re-entrant lock every Trainer of `model` holds across each of its steps. A save from another thread
    (save_pretrained, save_checkpoint, save_adapter beside a TrainingPanel's run) takes it to read the weights of
    one step boundary, not some parameters before a step and the others after it."""
    with _users_lock:
        return _step_locks.setdefault(model, FairLock())


@contextlib.contextmanager
def in_use(model, what, hint=""):
    """Hold `model` for this thread inside the block: a Trainer's run or step, or a change of the model's
    parameters (lora.apply/merge/unmerge/load_adapter/use_adapter, load_state_dict, train()/eval()). Another
    thread that tries either meanwhile gets one clear error naming what it tried, instead of changing the
    parameters or their set under a step in progress (a TrainingPanel's training thread: it stopped with 'no
    parameter has a gradient' after lora.apply, or trained on with other weights or without dropout). Re-entrant
    in the holding thread (a training callback may still change the model). Reading the model stays free: saves
    and generation's forwards take the step lock (step_lock), so each sees the weights of one step boundary;
    other reads (a plain model(x), attention weights) may see a step half applied."""
    me = threading.current_thread()
    with _users_lock:
        user = _users.get(model)
        if user is not None and user[0] is not me:
            raise RuntimeError(
                f"{what}: the model is in use in thread {user[0].name!r} (a Trainer running there, e.g. a "
                f"TrainingPanel's training); stop it first (panel.stop(); panel.wait(), or trainer.request_stop()) "
                f"and try again{hint}")
        if user is None:
            user = _users[model] = [me, 0]
        user[1] += 1
    try:
        yield model
    finally:
        with _users_lock:
            user[1] -= 1
            if user[1] == 0:
                del _users[model]


def parameter(values, backend=None):
    """A trainable tensor on `backend` (default: the active one)."""
    return tensor(np.asarray(values, dtype=np.float32), requires_grad=True, backend=backend)


_unset = weakref.WeakSet()   # parameters of a built_and_loaded build its load has not yet written


def normal(shape, std):
    """A parameter drawn from N(0, std^2); inside built_and_loaded's build, zeros its load overwrites: a draw
    there is wasted time, and made in float64 it held twice the model's size (1 GB for a 135M model)."""
    if getattr(_modes, "unset", False):
        b = get_backend()
        p = Tensor(b.full(shape, 0.0), b, requires_grad=True)
        _unset.add(p)
        return p
    return parameter(generator().normal(0.0, std, size=shape))


def built_and_loaded(build, load):
    """build() with its random draws skipped (normal()'s parameters hold zeros), then load(module), which must
    write every parameter (load_state_dict): the module, loaded. It is never handed out before: a load that fails
    drops it, so no model of zeros is trained or run by accident. Its parameters are read straight into their
    storage (load_state_dict), one at a time: a loader's peak is about the model's own size."""
    previous, _modes.unset = getattr(_modes, "unset", False), True
    try:
        module = build()
    finally:
        _modes.unset = previous
    load(module)
    left = [name for name, p in module.named_parameters() if p in _unset]
    if left:
        raise RuntimeError(f"built_and_loaded: the load left {len(left)} parameters unwritten ({left[:5]})")
    return module


@contextlib.contextmanager
def packed_weights(kind):
    """Linear layers that built_and_loaded builds inside the block hold their weights packed as `kind` (quant's
    q4_1, int8; None: float32 as usual), and its load packs each tensor as it is read: a model loaded so never
    holds its float32 linear weights, only one of them at a time."""
    previous, _modes.packed = getattr(_modes, "packed", None), kind
    try:
        yield
    finally:
        _modes.packed = previous


def _packed_placeholder(kind, n_in, n_out):
    p = QuantizedWeight(quant_zeros(kind, (n_out, n_in)), get_backend())
    _unset.add(p)
    return p


def setting(module, name):
    """The value of the module's attribute `name` as its forward sees it: one stored as `_x` behind a property `x`
    is read through the property, as a thread's override (lora.adapter_enabled) changes what the module computes
    and leaves `_x` as it was."""
    prop = name[:1] == "_" and isinstance(getattr(type(module), name[1:], None), property)
    return getattr(module, name[1:]) if prop else vars(module)[name]


def _settings(module):
    """What a module's computation depends on besides its tensors: every submodule's mode and plain settings
    (dropout rates, LoRA's scale and switches)."""
    return [(m.training, [(k, setting(m, k)) for k, v in vars(m).items()
                          if isinstance(v, (bool, int, float, str, type(None)))]) for m in module.modules()]


class Blocks:
    """A model whose residual stream runs through a list of blocks (GPT-2's h, Llama's model.layers): activation
    checkpointing by transformers' names. A checkpointed block keeps only its (B, T, C) input for the backward and
    runs again there (F.checkpoint), with the same dropout masks and the same gradients."""
    _checkpoint_every = 0   # 0: off; k: blocks 0, k, 2k, ...

    def blocks(self):
        raise NotImplementedError

    def gradient_checkpointing_enable(self, every=1):
        """Checkpoint every block while training (every=k: every k-th, blocks 0, k, 2k, ...)."""
        self._checkpoint_every = checkpoint_interval("every", every, len(self.blocks()))
        return self

    def gradient_checkpointing_disable(self):
        self._checkpoint_every = 0
        return self

    @property
    def is_gradient_checkpointing(self):
        return bool(self._checkpoint_every)

    @property
    def checkpoint_every(self):
        """The block interval gradient_checkpointing_enable set (0: none)."""
        return self._checkpoint_every

    def run_block(self, i, block, x, *args, **kwargs):
        """block(x, *args, **kwargs), checkpointed when this thread's setting (checkpointing()) or the model's
        own says so for block i and the block trains (gradients on: F.checkpoint runs it plainly otherwise)."""
        every = getattr(_modes, "checkpoint_every", 0) or self._checkpoint_every
        if not (every and block.training and i % every == 0):
            return block(x, *args, **kwargs)
        settings = _settings(block)

        def run(h):
            if _settings(block) != settings:   # (model.eval(), a dropout rate or a LoRA switch changed meanwhile)
                raise RuntimeError(f"checkpointed block {i}: its settings changed between the forward and the "
                                   f"backward, so recomputing it would not give the forward's activations; "
                                   f"change a model's mode or settings between steps, not within one")
            if any(getattr(m, "_hooks", None) for m in block.modules()):   # lab.interp's, on in this thread (a
                # hooked forward is not checkpointed: these came after it)
                raise RuntimeError(f"checkpointed block {i}: hooks were put on between the forward and the backward, "
                                   f"so recomputing it would call them on activations the forward never had; put "
                                   f"hooks on before the forward (a hooked model's blocks are not checkpointed)")
            return block(h, *args, **kwargs)
        return F.checkpoint(run, x, block.parameters())


class Module:
    """Every public Tensor attribute is a parameter, trainable or frozen (requires_grad False); tensors that are
    constants of the computation (fixed position tables, masks) live in attributes named with a leading '_'."""
    _training = True

    @property
    def training(self):
        """The mode set by train()/eval(), except inside evaluating() in the calling thread."""
        return self._training and not getattr(_modes, "evaluating", False)

    @training.setter
    def training(self, mode):
        self._training = mode

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def residual_forward(self, x, r):
        """(x + r, self(x + r)): a block's residual add and the norm after it. A norm layer with a kernel doing
        both in one pass (LayerNorm) overrides it."""
        s = x + r
        return s, self(s)

    def named_modules(self, prefix=""):
        yield prefix.rstrip("."), self
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield from value.named_modules(f"{prefix}{name}.")
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, Module):
                        yield from item.named_modules(f"{prefix}{name}.{i}.")

    def modules(self):
        return (m for _, m in self.named_modules())

    def named_parameters(self, prefix=""):
        """(name, tensor) of every parameter, each tensor once under its first name (as PyTorch's): a layer reached
        by two attributes was stepped twice per optimizer step and counted twice."""
        seen = set()
        for path, module in self.named_modules(prefix):
            for name, value in vars(module).items():
                if isinstance(value, Tensor) and not name.startswith("_") and id(value) not in seen:
                    seen.add(id(value))
                    yield (f"{path}.{name}" if path else name), value

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode=True):
        # not under a training thread's step: dropout would go off (or on) for it mid-run; evaluating() is the
        # per-thread way to run without dropout
        with in_use(self, f"model.{'train' if mode else 'eval'}()",
                    "; to run without dropout in this thread only, use `with lab.nn.evaluating(): ...`"):
            for m in self.modules():
                m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def optimizer_groups(self, weight_decay):
        """Weight decay on matrices and embedding tables (2D and up), never on biases or LayerNorm gains (nanoGPT).
        The parameters come named, so the optimizer's state is keyed by name."""
        params = list(self.named_parameters())
        return [{"params": [(n, p) for n, p in params if p.ndim >= 2], "weight_decay": weight_decay},
                {"params": [(n, p) for n, p in params if p.ndim < 2], "weight_decay": 0.0}]

    def num_parameters(self, trainable_only=False):
        return sum(p.size for p in (self.trainable_parameters() if trainable_only else self.parameters()))

    def state_dict(self):
        """Parameter name -> numpy array (a copy; a sync point on the GPU)."""
        return {name: p.numpy() for name, p in self.named_parameters()}

    def load_state_dict(self, state, source="state dict", error=ValueError):
        """Copy arrays into this module's parameters, each in the parameter's dtype (float32, or float16 for a
        frozen base stored so), copied once (the caller's arrays are never shared); names and shapes must match
        exactly (else `error`, naming `source` and the tensor). Nothing is copied unless everything matches. Values
        may be LazyTensors (lab.io): a module being built (built_and_loaded) reads each straight into its
        parameter's storage, one at a time; any other reads all of them before it changes one."""
        with in_use(self, "load_state_dict"), step_lock(self):   # (not under another thread's save)
            self._load_state_dict(state, source, error)

    def _load_state_dict(self, state, source, error):
        own = dict(self.named_parameters())
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise error(f"{source}: " + ", ".join(f"{what} tensors {names}" for what, names in
                                                  (("missing", missing), ("unexpected", unexpected)) if names))
        for name, p in own.items():
            if tuple(np.shape(state[name])) != p.shape:
                raise error(f"{source}: tensor {name!r} has shape {tuple(np.shape(state[name]))}, the model expects {p.shape}")

        def host(name, p):   # (no copy when the dtype is right already: the write or upload is the one copy)
            value = np.asarray(state[name])
            if value.shape != p.shape:   # a LazyTensor whose values are not of the shape it declared
                raise error(f"{source}: tensor {name!r} was read with shape {value.shape}, the model expects {p.shape}")
            if isinstance(p, QuantizedWeight):   # packed before any parameter changes: values it cannot take
                try:                             # (quantize's errors) left the weights before them loaded
                    return quantize(value.T, p.packed.kind)
                except ValueError as e:
                    raise error(f"{source}: tensor {name!r}: {e}") from None
            return value.astype(np.float16 if p.dtype == "float16" else np.float32, copy=False)
        building = any(p in _unset for p in own.values())   # nothing to keep if a later read fails
        values = {} if building else {name: host(name, p) for name, p in own.items()}
        for backend in {p.backend for p in own.values() if p in _unset}:
            backend.sync()   # (a write lands before work recorded and not yet submitted: the zeros' fill)
        for name, p in own.items():
            value = host(name, p) if building else values.pop(name)
            if isinstance(p, QuantizedWeight):   # packed again as its kind (a save holds the dequantized values)
                p.assign(value)   # (a QuantizedArray: host packed it)
                _unset.discard(p)
            elif p in _unset:
                p.backend.write(p.data, value)
                _unset.discard(p)
            else:
                p.data = p.backend.from_numpy(value)


class Linear(Module):
    """y = x @ W + b with W stored (in, out): GPT-2's Conv1D layout, so checkpoints map one to one. forward takes
    the activation that follows the layer (MLP's GELU) and the residual added after it (a block's x + layer(h)), so
    a layer applies them the fastest way it has: a subclass overriding forward accepts `activation` and `residual`
    too (F.activate applies the activation after the layer's own output, then the residual is added)."""

    def __init__(self, n_in, n_out, bias=True, std=0.02):
        kind = getattr(_modes, "packed", None) if getattr(_modes, "unset", False) else None
        self.weight = _packed_placeholder(kind, n_in, n_out) if kind else normal((n_in, n_out), std)
        self.bias = parameter(np.zeros(n_out)) if bias else None

    def forward(self, x, activation=None, residual=None):
        # activation="gelu" and residual (x + layer(h)): applied as the matmul stores the product where the
        # backend can (F.linear)
        return F.linear(x, self.weight, self.bias, activation=activation, residual=residual)

    @property
    def plain(self):
        """Whether its output is F.linear of its weight and bias alone, so fused_linears, Llama's packed q|k|v product
        and the chunked loss may take the weight in its place: not where a forward of its own (a subclass's, a
        patched one) makes the output, which they would bypass."""
        return not own_forward(self, Linear)

    def cross_entropy(self, x, targets):
        """F.cross_entropy(self(x), targets), an output layer's loss: through F.linear_cross_entropy (the (..., out)
        output never whole) where the output is a float32 (float64) weight's product alone; a frozen base's packed
        or float16 weight's, or an adapter's, output whole."""
        if not self.plain or self.weight.dtype not in ("float32", "float64"):
            return F.cross_entropy(self(x), targets)
        return F.linear_cross_entropy(x, self.weight, targets, self.bias, transpose_b=False)


def own_forward(module, cls):
    """Whether module's forward is other than cls's: a subclass's, or one patched onto the instance."""
    return type(module).forward is not cls.forward or "forward" in vars(module)


def fused_linears(x, layers, how="concat"):
    """F.linears(x, ...) of these Linear layers where it is one pass of the backend (every layer plain: no active
    adapter, no packed weight; a decode step's few rows; no gradient wanted), else None (the caller runs the
    layers itself): how "concat", their outputs side by side; "swiglu", silu(first) * second."""
    if not all(isinstance(layer, Linear) and layer.plain for layer in layers):
        return None
    weights, biases = [layer.weight for layer in layers], [layer.bias for layer in layers]
    return F.linears(x, weights, biases, how) if F.linears_fused(x, weights, biases, how) else None


class QuantizedLinear(Linear):
    """A frozen Linear whose weight stays packed (quant.QuantizedWeight of a QuantizedArray (out, in): q4_0, q4_1,
    int8), dequantized by the backend as it multiplies. It reads as a Linear (weight.shape (in, out); state_dict
    and hf_weights give the dequantized values), so LoRA wraps it as any Linear."""

    def __init__(self, qa, bias=None, backend=None):
        self.weight = QuantizedWeight(qa, backend or get_backend())
        self.bias = bias

    @classmethod
    def from_linear(cls, linear, kind):
        """`linear`'s weight quantized as `kind` (quant.quantize along `in`: GPT-2's Conv1D (in, out) weight is
        quantized per output column, its transpose's rows), its bias kept as it is."""
        return cls(quantize(linear.weight.numpy().T, kind), linear.bias, linear.weight.backend)

    def dequantized(self):
        """The weight as a float32 (in, out) Tensor: what a float32 base holding the same values would hold."""
        return Tensor(self.weight.backend.from_numpy(self.weight.numpy()), self.weight.backend)


class Embedding(Module):
    def __init__(self, num, dim, std=0.02):
        self.weight = normal((num, dim), std)

    def forward(self, idx):
        return F.embedding(idx, self.weight)


class LayerNorm(Module):
    def __init__(self, dim, bias=True, eps=1e-5):
        self.weight = parameter(np.ones(dim))
        self.bias = parameter(np.zeros(dim)) if bias else None
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, self.eps)

    def residual_forward(self, x, r):
        """(x + r, this norm of x + r) in one pass over the rows (F.add_layer_norm): a block's residual add and
        the LayerNorm after it."""
        if type(self).forward is not LayerNorm.forward or "forward" in vars(self):
            # a forward of its own (a subclass's, a patched one) must not be bypassed by the fused kernel
            return super().residual_forward(x, r)
        return F.add_layer_norm(x, r, self.weight, self.bias, self.eps)


class Dropout(Module):
    def __init__(self, p):
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)


def sinusoidal_positions(n_pos, dim):
    """The fixed position encodings of 'Attention Is All You Need'."""
    pos = np.arange(n_pos)[:, None]
    i = np.arange(dim)[None, :]
    angle = pos / np.power(10000.0, (2 * (i // 2)) / dim)
    return np.where(i % 2 == 0, np.sin(angle), np.cos(angle)).astype(np.float32)


__all__ = ["Module", "Linear", "Embedding", "LayerNorm", "Dropout", "parameter", "normal", "built_and_loaded",
           "sinusoidal_positions"]
