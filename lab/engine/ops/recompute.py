"""Activation checkpointing: a function of one tensor (a transformer block) whose intermediates are not kept for the
backward but recomputed there from its input."""
import weakref

from ..random import recording_seeds, reusing_seeds
from ..tensor import Tensor, enable_grad, is_grad_enabled
from ._common import _shape_str


def checkpoint(fn, x, params=()):
    """fn(x) keeping only x for the backward (torch.utils.checkpoint's name). fn's graph is dropped as soon as it
    returns; the backward runs it again from x, drawing the forward's dropout seeds again (the same masks), and
    takes the incoming gradient back through that recomputation: the same kernels in the same order, so the
    gradients are the plain graph's. params: the tensors fn reads besides x that gradients must reach (a block's
    parameters; the frozen ones are left out). A block's saved activations shrink to its (B, T, C) input, for one
    more forward of the block in the backward."""
    params = tuple(params)
    if not isinstance(x, Tensor) or not all(isinstance(p, Tensor) for p in params):
        raise TypeError(f"checkpoint: x and params must be Tensors, got x {type(x).__name__}, params "
                        f"{[type(p).__name__ for p in params]}")
    # what the forward read, to refuse a recomputation from other weights (an optimizer step, a load in between)
    stamps = [(t, t.data, t._version) for t in (x,) + params]
    wanted = [(p, p.requires_grad) for p in params]
    # once each: a tensor named twice (a tied weight, a list built carelessly) is one parent, else its gradient
    # would be handed back once per mention and summed
    params = tuple({id(p): p for p in params if p.requires_grad}.values())
    if not is_grad_enabled() or not (x.requires_grad or params):
        return fn(x)   # nothing to differentiate: no graph to save memory on
    # gradients on, not no_grad: ops pick kernels by whether a gradient is wanted (an inference kernel's sums may
    # round otherwise), and whether y needs one at all (LoRA switched off) is the plain forward's answer. The
    # graph lives for this block only (its activations, as the recomputation's will)
    with recording_seeds() as seeds:
        y = fn(x)
    if not isinstance(y, Tensor):
        raise TypeError(f"checkpoint: fn must return one Tensor, got {type(y).__name__}")
    if not y.requires_grad:
        return y
    B, shape = x.backend, y.shape   # (y itself is not kept: its graph holds the block's activations)
    # the graph's inner nodes, weakly: those alive at the backward were made outside fn (w2 = w * 2 before it),
    # nodes of the outer graph that the recomputation's walk passes through and must leave for the outer walk
    # (a GELU linear's output stands for itself in a linear reading it by its pre-activation node: that node is the
    # outer graph's too, and walking past it took every outer node for one of fn's, kept the recomputation whole
    # through its walk and walked the whole graph below at each checkpointed forward)
    interior = [weakref.ref(n) for n in _inner_nodes(y, {id(s) for t in (x,) + params for s in (t, t._gelu_input)
                                                         if s is not None})]

    def backward(g):
        changed = [t for t, data, version in stamps if t.data is not data or t._version != version]
        if changed:
            raise RuntimeError(f"checkpoint: {len(changed)} tensor(s) the block read changed between its forward and "
                               f"its backward (first: shape {_shape_str(changed[0].shape)}; an optimizer step or a "
                               f"load in between), so recomputing it would not give the forward's activations; "
                               f"step the optimizer after backward(), not between a forward and its backward")
        switched = [p for p, requires in wanted if p.requires_grad != requires]
        if switched:   # (the forward's graph decided which of them get a gradient, the recomputation would again)
            raise RuntimeError(f"checkpoint: {len(switched)} parameter(s) of the block were frozen or unfrozen "
                               f"between its forward and its backward (first: shape {_shape_str(switched[0].shape)}, "
                               f"requires_grad now {switched[0].requires_grad}); change requires_grad before the "
                               f"forward")
        # a new leaf on x's memory: the recomputed graph stops here, and x's gradient comes back as a leaf's
        xr = Tensor(x.data, B, requires_grad=x.requires_grad)
        with reusing_seeds(seeds), enable_grad():
            out = fn(xr)
        if out.shape != shape:
            raise RuntimeError(f"checkpoint: the recomputation gave {_shape_str(out.shape)}, the forward "
                               f"{_shape_str(shape)}")
        if not out.requires_grad:   # (the forward had a graph: only changed settings, refused above, get here)
            raise RuntimeError("checkpoint: the recomputation has no graph, the forward had one")
        outer = any(r() is not None for r in interior)
        grads = {id(leaf): (leaf, lg) for leaf, lg in out._walk(g, retain_graph=outer)}
        own = {id(xr)} | {id(p) for p in params}
        other = [leaf for i, (leaf, _) in grads.items() if i not in own]
        if other:   # its gradient would be lost: fn must name every tensor it differentiates
            raise RuntimeError(f"checkpoint: fn reads {len(other)} tensor(s) requiring gradients that are neither "
                               f"its input nor among params (first: shape {_shape_str(other[0].shape)}); pass them "
                               f"in params")
        return tuple(grads[id(t)][1] if id(t) in grads else None for t in (xr,) + params)
    return Tensor._make(y.data, B, (x,) + params, backward)


def _inner_nodes(y, stop):
    """The non-leaf tensors of y's graph below y, not walking past the tensors whose ids are in `stop`."""
    out, stack, seen = [], [y], set(stop) | {id(y)}
    while stack:
        for p in stack.pop()._parents:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                if p._backward is not None:
                    out.append(p)
                    stack.append(p)
    return out
