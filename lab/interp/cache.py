"""ActivationCache: what run_with_cache kept, by hook name, as float32 arrays, with TransformerLens's helpers to
read the residual stream as a sum of its parts. Shapes: L layers, H heads, B batch, T positions, C width."""
import difflib
from collections.abc import Mapping

import numpy as np

from ..checks import InputError


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

    def __len__(self):
        return len(self._store)

    def __repr__(self):
        return f"ActivationCache({len(self)} activations, {sum(a.nbytes for a in self._store.values()):,} bytes)"


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
