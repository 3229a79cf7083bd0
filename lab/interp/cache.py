"""ActivationCache: what run_with_cache kept, by hook name, as float32 arrays, with TransformerLens's helpers to
read the residual stream as a sum of its parts. Shapes: L layers, H heads, B batch, T positions, C width."""
import difflib
from collections.abc import Mapping

import numpy as np

from .. import nn
from ..checks import InputError, integer, show
from ..engine.tensor import no_grad, tensor


class ActivationCache(Mapping):
    """Hook name -> np.ndarray (float32) of the activations run_with_cache kept (only those asked for), and the
    model they came from (.model)."""

    def __init__(self, store, model):
        self._store, self.model = dict(store), model

    def __getitem__(self, name):
        try:
            return self._store[name]
        except KeyError:
            raise KeyError(_missing(self, name)) from None

    def __iter__(self):
        return iter(self._store)

    def __contains__(self, name):   # (Mapping's would build __getitem__'s message for every name it lacks)
        return name in self._store

    def __len__(self):
        return len(self._store)

    def __repr__(self):
        return f"ActivationCache({len(self)} activations, {sum(a.nbytes for a in self._store.values()):,} bytes)"

    @property
    def n_layers(self):
        return len(self.model._hook_layers())

    def _need(self, names, what):
        """The cached arrays of `names`; one KeyError naming those run_with_cache left out."""
        missing = [n for n in names if n not in self._store]
        if missing:
            raise KeyError(f"{what} needs {missing[:4]}{' ...' if len(missing) > 4 else ''} in the cache: "
                           f"run_with_cache with names_filter including them (or None, every name)")
        return [self._store[n] for n in names]

    def _layer(self, layer, what):
        """layer as TransformerLens takes it: up to layer 0..L (None and -1: L, the whole stream)."""
        L = self.n_layers
        if layer is None or (isinstance(layer, (int, np.integer)) and not isinstance(layer, bool) and layer == -1):
            return L
        return integer(f"{what}: layer (0..{L}, or -1 / None for all)", layer, low=0, high=L)

    def accumulated_resid(self, layer=None, incl_mid=False, apply_ln=False, return_labels=False):
        """The residual stream as it stands before each layer up to `layer` (n, B, T, C), as TransformerLens's:
        blocks.i.hook_resid_pre for i = 0..layer (n = layer + 1), the last one's resid_post standing for layer
        L (None, -1 or L: all, n = L + 1), with the resid_mid of each layer before `layer` too when incl_mid.
        apply_ln: each through the final norm with its own statistics, as the unembedding would read it (the
        logit lens). Labels "0_pre", "0_mid", ..., "final_post"."""
        n = self._layer(layer, "accumulated_resid")
        names, labels = [], []
        for i in range(n + 1):
            if i == self.n_layers:
                names.append(f"blocks.{i - 1}.hook_resid_post")
                labels.append("final_post")
                break
            names.append(f"blocks.{i}.hook_resid_pre")
            labels.append(f"{i}_pre")
            if incl_mid and i < n:
                names.append(f"blocks.{i}.hook_resid_mid")
                labels.append(f"{i}_mid")
        stack = np.stack(self._need(names, "accumulated_resid"))
        if apply_ln:
            stack = np.stack([self._final_norm(r) for r in stack])
        return (stack, labels) if return_labels else stack

    def _final_norm(self, resid):
        """The model's final norm (weight and bias) of a residual stream array, on the model's backend."""
        norm = self.model._final_norm()
        with no_grad(), nn.evaluating():
            return norm(tensor(resid, backend=norm.weight.backend)).numpy()

    def stack_head_results(self, layer=None, return_labels=False, apply_ln=False):
        """Each head's write into the residual stream (layers * H, B, T, C): its hook_z through its slice of the
        attention's output projection, z_h @ W_O[h] (no output bias: that is no head's; hook_attn_out minus the
        heads' sum). Labels "L0H0", "L0H1", ... apply_ln: through apply_ln_to_stack."""
        n = self._layer(layer, "stack_head_results")
        zs = self._need([f"blocks.{i}.attn.hook_z" for i in range(n)], "stack_head_results")
        results, labels = [], []
        for i, z in enumerate(zs):                                               # z (B, T, H, D)
            H, D = z.shape[2:]
            w_o = self._out_weight(i).reshape(H, D, -1)                          # (H, D, C)
            results.append(np.einsum("bthd,hdc->hbtc", z, w_o))
            labels += [f"L{i}H{h}" for h in range(H)]
        stack = np.concatenate(results) if results else np.zeros((0,) + self._resid_shape(), np.float32)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack)
        return (stack, labels) if return_labels else stack

    def _out_weight(self, i):
        """Layer i's attention output projection as the (H*D, C) matrix it applies, from the module itself
        (so a LoRA adapter, on or off, or a packed base is what the forward used): proj(I) - proj(0)."""
        attn = self.model._hook_layers()[i][1]
        proj = attn.c_proj if hasattr(attn, "c_proj") else attn.o_proj
        n_in = proj.weight.shape[0]
        with no_grad(), nn.evaluating():
            rows = proj(tensor(np.concatenate([np.eye(n_in), np.zeros((1, n_in))]).astype(np.float32),
                               backend=proj.weight.backend)).numpy()
        return rows[:-1] - rows[-1]

    def _resid_shape(self):
        return self._need([f"blocks.{self.n_layers - 1}.hook_resid_post"], "the residual shape")[0].shape

    def apply_ln_to_stack(self, stack):
        """Components of the final residual stream (..., B, T, C) through the final norm as a linear map, with the
        scale the run's final residual had (TransformerLens's attribution): centred (LayerNorm), divided by that
        scale and times the norm's weight. The norm's bias is no component's: the components' sum plus the bias is
        ln_final.hook_normalized."""
        final = self._need([f"blocks.{self.n_layers - 1}.hook_resid_post"], "apply_ln_to_stack")[0]   # (B, T, C)
        stack = np.asarray(stack, dtype=np.float32)
        if stack.shape[-final.ndim:] != final.shape:
            raise InputError(f"apply_ln_to_stack: the stack's trailing dims must be the residual's {final.shape}, got "
                             f"{stack.shape}")
        norm = self.model._final_norm()
        x = final.astype(np.float64)
        if isinstance(norm, nn.LayerNorm):
            x = x - x.mean(-1, keepdims=True)
            stack = stack - stack.mean(-1, keepdims=True)
        scale = np.sqrt((x * x).mean(-1, keepdims=True) + norm.eps)             # (B, T, 1)
        return (stack / scale * norm.weight.numpy()).astype(np.float32)

    def logit_lens(self, k=5):
        """lab.interp.logit_lens of this cache: each layer's residual stream read by the unembedding."""
        from .lens import logit_lens
        return logit_lens(self.model, self, k)


def _missing(cache, name):
    """Why `name` is not in the cache: not a hook name, or a name names_filter left out."""
    names = cache.model.hook_names()
    if name not in names:
        try:
            check_name(name, names)
        except InputError as e:
            return str(e)
    return (f"{name!r} was not cached: run_with_cache kept only {sorted(cache)[:6]}{' ...' if len(cache) > 6 else ''}"
            f" (pass names_filter that includes it)")


def check_name(name, names):
    """`name` if it is a hook point's; else one InputError listing the valid names, nearest first."""
    if name in names:
        return name
    near = sorted(names, key=lambda n: -difflib.SequenceMatcher(None, name, n).ratio())
    shown = ", ".join(near[:8])
    more = f", ... ({len(names)} names in all: model.hook_names())" if len(names) > 8 else ""
    raise InputError(f"unknown hook name {name!r}; valid names, nearest first: {shown}{more}")


__all__ = ["ActivationCache", "check_name"]
