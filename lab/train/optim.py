"""Optimizers whose updates run on the device: one fused kernel per parameter, no readback.

State (moments, momentum) lives in backend arrays next to the parameters; gradient clipping computes the
global norm on the device and scales the gradients there, so a training step never waits on the host.
"""
import math
from collections import Counter

import numpy as np

from ..checks import InputError

from ..engine.tensor import Tensor


class Optimizer:
    """`params` is a list of tensors or of (name, tensor) pairs (model.named_parameters()), or of groups
    {"params": [...], "weight_decay": x} holding either (as in PyTorch). With names, the state is keyed by them
    (m.h.0.attn.c_attn.weight), so a checkpoint that does not fit says which parameters differ; without, by
    position (m.0)."""

    def __init__(self, params, lr, weight_decay):
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.params, self.decay, self.names = [], [], []
        for group in groups:
            for p in group["params"]:
                name, p = p if isinstance(p, tuple) else (None, p)
                if p.requires_grad:
                    self.names.append(str(len(self.params)) if name is None else name)
                    self.params.append(p)
                    self.decay.append(group.get("weight_decay", weight_decay))
        repeated = sorted(n for n, c in Counter(self.names).items() if c > 1)
        if repeated:
            raise InputError(f"optimizer got these parameter names more than once: {repeated}")
        # (a tensor listed twice would be stepped twice a step, silently; PyTorch warns of it and will refuse it)
        first = {}
        for name, p in zip(self.names, self.params):
            if first.setdefault(id(p), name) != name:
                raise InputError(f"optimizer got the same tensor twice, as {first[id(p)]!r} and {name!r}: "
                                 "each parameter may be listed once (model.parameters() lists a shared one once)")
        if not self.params:
            raise InputError("optimizer got no parameters that require gradients")
        self.lr = lr
        self.step_count = 0
        self.backend = self.params[0].backend

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    # the kinds of state (the prefix of state_arrays' names) that can never be negative
    nonnegative = ()

    def state_arrays(self):
        """Named backend arrays of the optimizer state (for checkpoints and memory accounting)."""
        return {}

    def load_state_array(self, name, value):
        """Replace the state array called `name` (as state_arrays() names it) with host values."""
        kind, param = name.split(".", 1)
        getattr(self, kind)[self.names.index(param)] = self.backend.from_numpy(np.asarray(value, dtype=np.float32))

    def state_bytes(self):
        return sum(math.prod(a.shape) * 4 for a in self.state_arrays().values())


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW."""
    nonnegative = ("v",)   # averages of squared gradients: a negative one makes sqrt(v) NaN in the next update

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, lr, weight_decay)
        self.b1, self.b2 = betas
        self.eps = eps
        B = self.backend
        self.m = [B.full(p.shape, 0.0) for p in self.params]
        self.v = [B.full(p.shape, 0.0) for p in self.params]

    def step(self, lr=None, guard=None, max_norm=None):
        """One update. `guard`: a one-element tensor (the gradient norm); if it is NaN or Inf the update is skipped
        on the device, leaving weights and moments as they were. With max_norm, the gradients are first clipped
        (in place, as clip_grad_norm_ would) to that global norm, given as `guard`, inside the update's kernel."""
        lr = self.lr if lr is None else lr
        self.step_count += 1
        B = self.backend
        g = guard.data if guard is not None else None
        clip = _max_norm(max_norm, guard)
        slots = [(p.data, p.grad.data, m, v, wd) for p, m, v, wd in zip(self.params, self.m, self.v, self.decay)
                 if p.grad is not None]
        # the whole update in one dispatch, or a few (wgpu); one adamw_ per parameter where a backend has no more
        B.adamw_many_(slots, lr, self.b1, self.b2, self.eps, self.step_count, guard=g, max_norm=clip)
        mark_stepped(self.params)

    def state_arrays(self):
        out = {}
        for name, m, v in zip(self.names, self.m, self.v):
            out[f"m.{name}"], out[f"v.{name}"] = m, v
        return out


class SGD(Optimizer):
    """SGD with momentum and (coupled) weight decay, as torch.optim.SGD with dampening 0."""

    def __init__(self, params, lr=1e-2, momentum=0.0, weight_decay=0.0):
        super().__init__(params, lr, weight_decay)
        self.momentum = momentum
        self.buf = [self.backend.full(p.shape, 0.0) for p in self.params]

    def step(self, lr=None, guard=None, max_norm=None):
        lr = self.lr if lr is None else lr
        self.step_count += 1
        g = guard.data if guard is not None else None
        clip = _max_norm(max_norm, guard)
        for p, buf, wd in zip(self.params, self.buf, self.decay):
            if p.grad is not None:
                self.backend.sgd_(p.data, p.grad.data, buf, lr, self.momentum, wd, guard=g, max_norm=clip)
        mark_stepped(self.params)

    def state_arrays(self):
        return {f"buf.{name}": b for name, b in zip(self.names, self.buf)}


def mark_stepped(params):
    # the weights changed in place: a checkpointed block's pending backward must not recompute with them
    for p in params:
        if p.grad is not None:
            p._version += 1


def _max_norm(max_norm, guard):
    if max_norm is None or max_norm <= 0:
        return 0.0
    if guard is None:
        raise InputError("step(max_norm=...) clips to the global gradient norm: pass it as guard (grad_norm(params))")
    return float(max_norm)


def _sumsq(params, what):
    params = [p for p in params if p.grad is not None]
    if not params:
        raise InputError(f"{what}: no parameter has a gradient")
    B = params[0].backend
    return params, B, B.sumsq_many([p.grad.data for p in params])  # every gradient in one dispatch, or a few (wgpu)


def grad_norm(params):
    """The global L2 norm of all gradients, a one-element tensor on the device (no readback)."""
    _, B, normsq = _sumsq(params, "grad_norm")
    return Tensor(B.unary("sqrt", normsq), B)


def clip_grad_norm_(params, max_norm):
    """Scale all gradients so their global L2 norm is at most max_norm. Returns the norm before clipping as a
    one-element tensor on the device (reading it is a sync point; training reads it only when logging).
    (The trainer instead passes the norm and max_norm to the optimizer's step, which clips in its own kernel.)"""
    params, B, normsq = _sumsq(params, "clip_grad_norm_")
    if max_norm is not None and max_norm > 0:
        for p in params:
            B.clip_(p.grad.data, normsq, max_norm)
    return Tensor(B.unary("sqrt", normsq), B)
