"""Hook points: TransformerLens's names on both model families, run_with_hooks, run_with_cache, `with model.hooks()`.

A hooked module holds a `_hooks` (a _Points: its hook functions by point) only while hooks are on; each point in a
forward is one `if hook:` test on a local, so a model without hooks runs its fused kernels at no measurable cost.
Attention modules with hooked insides (q, k, v, scores, pattern, z) and a GPT-2 MLP with hooks take their
composed paths, as only those hold these activations. While hooked (has_hooks), every step calls the hooks: a
Trainer's steps and lab.decode's steps run eagerly (a replay would skip the hook functions) and no block is
checkpointed (its backward would run it again, maybe after the hooks are gone). A _Points is callable, so
lab.train.replay.module_signature also sees its identity.

Hooks belong to the thread that put them on: a forward in another thread (a TrainingPanel's training steps, a
panel's background run) neither calls them nor takes their composed paths, and has_hooks is False there.

This module imports no model family: the families import it (the mixin below).
"""
import contextlib
import threading

import numpy as np

from .. import nn
from ..checks import InputError, show
from ..engine.tensor import Tensor, is_grad_enabled, tensor
from .cache import ActivationCache, check_name

# the points of layer i, in forward order: (module key, prefix under blocks.{i}., point names)
ATTN_INTERNALS = ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z")
LAYER_POINTS = (("block", "", ("hook_resid_pre", "ln1.hook_normalized")),
                ("attn", "attn.", ATTN_INTERNALS),
                ("block", "", ("hook_attn_out", "hook_resid_mid", "ln2.hook_normalized")),
                ("mlp", "mlp.", ("hook_pre", "hook_post")),
                ("block", "", ("hook_mlp_out", "hook_resid_post")))


class _Points:
    """The hook functions of one module's points (point -> [(thread id, fn)]); `hook(point, x)` runs the calling
    thread's in order at a point and gives back the activation the forward goes on with. It is true, and holds a
    point, only for a thread with hooks on it."""

    def __init__(self, prefix, fns):
        self.prefix, self.fns = prefix, fns

    def __bool__(self):
        me = threading.get_ident()
        return any(owner == me for pairs in self.fns.values() for owner, _ in pairs)

    def __contains__(self, point):
        me = threading.get_ident()
        return any(owner == me for owner, _ in self.fns.get(point, ()))

    def __call__(self, point, x):
        me = threading.get_ident()
        for owner, fn in self.fns.get(point, ()):
            if owner != me:
                continue
            key = (id(fn), self.prefix + point)
            if key in _running.keys:
                # the hook ran the model, whose hooks (its own among them) are still on: it would call itself
                # again without end (a RecursionError thousands of frames deep)
                raise InputError(f"{_who(fn, self.prefix + point)} runs the model while that model's hooks are on, "
                                 f"so the model calls the hook again inside itself without end; run the model outside "
                                 f"the hook (e.g. cache what it needs beforehand with run_with_cache)")
            _running.keys.add(key)
            try:
                out = fn(x, self.prefix + point)
            finally:
                _running.keys.discard(key)
            if out is not None:
                x = _replacement(out, x, self.prefix + point, fn)
        return x


class _Running(threading.local):
    """The (hook fn, point) pairs whose fn is running in this thread."""

    def __init__(self):
        self.keys = set()


_running = _Running()
_stack_lock = threading.Lock()


def _who(fn, name):
    return f"hook {getattr(fn, '__name__', type(fn).__name__)} at {name}"


def _replacement(out, x, name, fn):
    """A hook's return value as the activation that replaces x: a Tensor or array of x's shape."""
    who = _who(fn, name)
    if isinstance(out, Tensor):
        if out.shape != x.shape:
            raise InputError(f"{who} returned shape {out.shape}, the activation's shape is {x.shape}: return None "
                             f"to keep it or an activation of the same shape")
        if out.dtype != x.dtype:   # (no op casts with a gradient; a float16 Tensor would be read as float32 bits)
            raise InputError(f"{who} returned a {out.dtype} Tensor, the activation is {x.dtype}: return a Tensor of "
                             f"its dtype, or a numpy array (cast to it)")
        if out.backend is x.backend:
            return out
        if out.requires_grad and is_grad_enabled():   # Tensor.to makes a new leaf: the gradient would stop there
            raise InputError(f"{who} returned a Tensor on {out.backend.name} that needs a gradient, the activation "
                             f"is on {x.backend.name}: gradients do not cross backends; compute the replacement on "
                             f"{x.backend.name} (the parameters it uses moved there with .to('{x.backend.name}')), "
                             f"or run under lab.no_grad() when no gradient is wanted")
        return out.to(x.backend)
    try:
        arr = np.asarray(out)
    except Exception:
        arr = None
    # (booleans are refused: a mask returned in place of the masked activation is the likely mistake)
    if arr is None or arr.dtype.kind not in "fiu":
        raise InputError(f"{who} returned {show(out)}: a hook returns None (keep the activation) or a Tensor or "
                         f"numpy array of the activation's shape {x.shape}")
    if arr.shape != x.shape:
        raise InputError(f"{who} returned shape {arr.shape}, the activation's shape is {x.shape}: return None to "
                         f"keep it or an activation of the same shape")
    return tensor(arr, dtype=x.dtype, backend=x.backend)


class HookedModel:
    """TransformerLens's interface on a model family. The family gives _hook_layers() (per layer: the block, its
    attention and its MLP module), _final_norm() and _unembed(x) (logits of the final norm's output), and sets
    has_pos_embed. Hook names, layer i (B batch, T positions, C width, H query heads, Hkv key-value heads, D head
    width):

        hook_embed (B, T, C)              token embeddings; hook_pos_embed (B, T, C) position embeddings (GPT-2)
        blocks.i.hook_resid_pre           the residual stream into layer i (B, T, C)
        blocks.i.ln1.hook_normalized      the attention's input norm (B, T, C)
        blocks.i.attn.hook_q              queries (B, T, H, D); Llama's after rotary (TransformerLens's hook_rot_q)
        blocks.i.attn.hook_k, hook_v      keys (after rotary in Llama) and values (B, T, Hkv, D)
        blocks.i.attn.hook_attn_scores    scaled scores before the softmax (B, H, T, S), masked slots at -1e30
        blocks.i.attn.hook_pattern        attention weights (B, H, T, S); S = T in a forward, pos + T (the slots
                                          filled so far) in a forward_cached step
        blocks.i.attn.hook_z              each head's weighted values (B, T, H, D), before the output projection
        blocks.i.hook_attn_out            the attention's output (B, T, C)
        blocks.i.hook_resid_mid           the residual after the attention (B, T, C)
        blocks.i.ln2.hook_normalized      the MLP's input norm (B, T, C)
        blocks.i.mlp.hook_pre             the MLP's pre-activation (B, T, d_mlp; Llama: the gate's)
        blocks.i.mlp.hook_post            the activation into the down projection (B, T, d_mlp)
        blocks.i.hook_mlp_out, hook_resid_post
        ln_final.hook_normalized          the final norm's output, into the unembedding (B, T, C)

    A hook fn(activation, name) gets a lab Tensor and returns None (keep it) or a replacement Tensor or array of
    the same shape; gradients flow through a returned Tensor computed from the activation."""

    has_pos_embed = False
    _hooks = None      # the model's own points (embeddings, final norm) while hooked
    _hook_stack = ()   # (thread id, fwd_hooks) of each `with model.hooks(...)` on now, outermost first

    def hook_names(self):
        """Every hook point's name, in forward order."""
        return [name for name, _, _, _ in self._point_table()]

    def _point_table(self):
        """(name, module, prefix, point) of every hook point, in forward order."""
        rows = [(p, self, "", p) for p in ("hook_embed",) + (("hook_pos_embed",) if self.has_pos_embed else ())]
        for i, layer in enumerate(self._hook_layers()):
            for key, sub, points in LAYER_POINTS:
                module = layer[("block", "attn", "mlp").index(key)]
                prefix = f"blocks.{i}.{sub}"
                rows += [(prefix + p, module, prefix, p) for p in points]
        return rows + [("ln_final.hook_normalized", self, "", "ln_final.hook_normalized")]

    def _normalized(self, x):
        """The final norm of the residual stream x, through ln_final.hook_normalized."""
        h = self._final_norm()(x)
        return self._hooks("ln_final.hook_normalized", h) if self._hooks else h

    def run_block(self, i, block, x, *args, **kwargs):
        # while hooked, no block is checkpointed (nn.Blocks): its backward would run it again, after the hooks may
        # be gone (run_with_hooks(..., targets=y) then loss.backward()), and call each hook a second time
        if self.has_hooks:
            return block(x, *args, **kwargs)
        return super().run_block(i, block, x, *args, **kwargs)

    @property
    def has_hooks(self):
        """Whether hook functions are on (within `with model.hooks(...)`, run_with_hooks or run_with_cache)."""
        me = threading.get_ident()
        return any(owner == me for owner, _ in self._hook_stack)

    def _resolve(self, fwd_hooks, table):
        """[(name, fn)] for fwd_hooks [(name or predicate, fn)], each name checked against the table."""
        names = [row[0] for row in table]
        if isinstance(fwd_hooks, tuple) and len(fwd_hooks) == 2 and callable(fwd_hooks[1]):
            fwd_hooks = [fwd_hooks]   # one (name, fn) pair
        if isinstance(fwd_hooks, dict):   # (iterated, its first name was reported as the bad pair)
            raise InputError(f"fwd_hooks must be a list of (hook name or predicate, fn) pairs, got a dict "
                             f"{show(fwd_hooks)}: pass list(fwd_hooks.items())")
        try:
            pairs = None if isinstance(fwd_hooks, str) else list(fwd_hooks)
        except TypeError:
            pairs = None
        out = []
        for pair in pairs if pairs is not None else [fwd_hooks]:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and callable(pair[1])):
                raise InputError(f"fwd_hooks must be a list of (hook name or predicate, fn) pairs, fn(activation, "
                                 f"name) -> None or a replacement; got {show(pair)}")
            key, fn = pair
            if isinstance(key, str):
                out.append((check_name(key, names), fn))
            elif callable(key):
                out += [(n, fn) for n in _picked(key, names, "a fwd_hooks predicate")]
            else:
                raise InputError(f"a hook's name must be a hook name (model.hook_names()) or a predicate on names, "
                                 f"got {show(key)}")
        return out

    def _install(self, table):
        """Set every hooked module's _Points from the hooks on now; clear the others'."""
        by_name = {}
        for owner, hooks in self._hook_stack:
            for name, fn in hooks:
                by_name.setdefault(name, []).append((owner, fn))
        points = {}   # id(module) -> (module, its prefix, point -> [(thread id, fn)])
        for name, module, prefix, point in table:
            if name in by_name:
                points.setdefault(id(module), (module, prefix, {}))[2][point] = by_name[name]
        for module in {id(m): m for _, m, _, _ in table}.values():
            if id(module) in points:
                module._hooks = _Points(*points[id(module)][1:])
            else:
                vars(module).pop("_hooks", None)

    @contextlib.contextmanager
    def hooks(self, fwd_hooks):
        """Hooks on for a block of code in this thread: training steps, lab.generate (which runs every decode
        step eagerly, through them). Forwards in other threads (a TrainingPanel training meanwhile) do not see
        them. Blocks nest; each removes its own hooks on leaving, on an error too."""
        table = self._point_table()
        entry = (threading.get_ident(), self._resolve(fwd_hooks, table))
        try:
            with _stack_lock:   # (threads putting hooks on and off at once: each change made whole)
                self._hook_stack = self._hook_stack + (entry,)
                self._install(table)
            yield self
        finally:
            with _stack_lock:
                stack = list(self._hook_stack)
                stack.remove(entry)
                self._hook_stack = tuple(stack)
                self._install(table)

    def run_with_hooks(self, tokens, fwd_hooks=(), **forward_kwargs):
        """model(tokens, **forward_kwargs) with fwd_hooks [(name or predicate, fn)] on; they are removed after it,
        whether it returns or raises. It runs between two steps of a Trainer training this model in another
        thread (the step lock, as generation does): those steps never run these hooks."""
        with nn.step_lock(self), self.hooks(fwd_hooks):
            return self(tokens, **forward_kwargs)

    def run_with_cache(self, tokens, names_filter=None, **forward_kwargs):
        """(what model(tokens, **forward_kwargs) returns, ActivationCache): the logits, or with targets= /
        return_attention= / return_hidden= the forward's tuple (logits, loss, ...), and the activations of the
        hook points names_filter picks (None: all; a name; a list of names; a predicate on names) as float32 numpy
        arrays. Only those are kept (a model's every activation may not fit in memory)."""
        table = self._point_table()
        names = [row[0] for row in table]
        if names_filter is None:
            wanted = names
        elif isinstance(names_filter, str):
            wanted = [check_name(names_filter, names)]
        elif callable(names_filter):
            wanted = _picked(names_filter, names, "names_filter")
        elif isinstance(names_filter, (list, tuple, set, frozenset)):
            wanted = [check_name(n, names) if isinstance(n, str) else _bad_filter(n) for n in names_filter]
        else:
            wanted = _bad_filter(names_filter)
        store = {}

        def keep(activation, name):
            store[name] = activation.numpy().astype(np.float32, copy=False)

        # (the forward's whole result: a loss asked for with targets= is not dropped)
        out = self.run_with_hooks(tokens, [(n, keep) for n in dict.fromkeys(wanted)], **forward_kwargs)
        return out, ActivationCache({n: store[n] for n in names if n in store}, self)


def _picked(predicate, names, what):
    """The names predicate(name) is True for; one InputError for an answer that is no boolean (a string, an
    array: their truth would pick names silently, or fail deep inside numpy)."""
    picked = []
    for n in names:
        yes = predicate(n)
        if not isinstance(yes, (bool, np.bool_)):
            raise InputError(f"{what} {getattr(predicate, '__name__', show(predicate))} returned {show(yes)} for "
                             f"{n!r}: a predicate on hook names returns True or False")
        picked += [n] if yes else []
    return picked


def _bad_filter(value):
    raise InputError(f"names_filter must be None, a hook name, a list of hook names or a predicate on names, got "
                     f"{show(value)}")


__all__ = ["HookedModel", "ATTN_INTERNALS"]
