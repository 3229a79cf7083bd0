"""Activation checkpointing: a function of one tensor (a transformer block) whose intermediates are not kept for the
backward but recomputed there from its input."""
from ..random import recording_seeds, reusing_seeds
from ..tensor import Tensor, enable_grad, is_grad_enabled, no_grad
from ._common import _shape_str


def checkpoint(fn, x, params=()):
    """fn(x) keeping only x for the backward (torch.utils.checkpoint's name). fn runs under no_grad; the backward
    runs it again from x with gradients on, drawing the forward's dropout seeds again (the same masks), and takes
    the incoming gradient back through that recomputation: the same kernels in the same order, so the gradients
    are the plain graph's. params: the tensors fn reads besides x that gradients must reach (a block's
    parameters; the frozen ones are left out). A block's saved activations shrink to its (B, T, C) input, for one
    more forward of the block in the backward."""
    if not isinstance(x, Tensor):
        raise TypeError(f"checkpoint: x must be a Tensor, got {type(x).__name__}")
    params = tuple(p for p in params if p.requires_grad)
    if not is_grad_enabled() or not (x.requires_grad or params):
        return fn(x)   # nothing to differentiate: no graph to save memory on
    with recording_seeds() as seeds, no_grad():
        y = fn(x)
    if not isinstance(y, Tensor):
        raise TypeError(f"checkpoint: fn must return one Tensor, got {type(y).__name__}")
    B = x.backend

    def backward(g):
        # a new leaf on x's memory: the recomputed graph stops here, and x's gradient comes back as a leaf's
        xr = Tensor(x.data, B, requires_grad=x.requires_grad)
        with reusing_seeds(seeds), enable_grad():
            out = fn(xr)
        if out.shape != y.shape or not out.requires_grad:
            raise RuntimeError(f"checkpoint: the recomputation gave {_shape_str(out.shape)}"
                               f"{'' if out.requires_grad else ' without a graph'}, the forward {_shape_str(y.shape)}")
        grads = {id(leaf): (leaf, lg) for leaf, lg in out._walk(g)}
        own = {id(xr)} | {id(p) for p in params}
        other = [leaf for i, (leaf, _) in grads.items() if i not in own]
        if other:   # its gradient would be lost: fn must name every tensor it differentiates
            raise RuntimeError(f"checkpoint: fn reads {len(other)} tensor(s) requiring gradients that are neither "
                               f"its input nor among params (first: shape {_shape_str(other[0].shape)}); pass them "
                               f"in params")
        return tuple(grads[id(t)][1] if id(t) in grads else None for t in (xr,) + params)
    return Tensor._make(y.data, B, (x,) + params, backward)
