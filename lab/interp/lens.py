"""The logit lens: the residual stream after the embedding and after each layer, read by the model's final norm and
unembedding as if the model ended there. Only the top-k of each read is kept (a vocabulary of 49152 over every
layer and position would not fit); layer_logits gives one layer's full log-probabilities."""
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .. import nn
from ..checks import InputError, integer, show
from ..engine.tensor import Tensor, no_grad, tensor


@dataclass
class LogitLens:
    """Per read-out (L + 1: the embedding, then each layer's output) and position: top_ids and top_probs
    (L + 1, B, T, k), the k likeliest tokens, likeliest first; final_rank (L + 1, B, T): the rank at that read-out
    of the token the model finally predicts (0: it is the top already); labels ["embed", "L0", ...]."""
    top_ids: np.ndarray
    top_probs: np.ndarray
    final_rank: np.ndarray
    labels: list


def _residuals(model):
    """The read-outs' hook names: the embedding's output (layer 0's input), then each layer's output."""
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(len(model._hook_layers()))]


def _tokens(model, tokens, name):
    """tokens as int64 (B, T): a sequence (T,) is one row; every id must be in the model's vocabulary."""
    try:
        arr = np.asarray(tokens.numpy() if isinstance(tokens, Tensor) else tokens)
    except ValueError:   # rows of different lengths
        arr = np.zeros(0)
    if arr.ndim == 1:
        arr = arr[None]
    vocab = model.config.vocab_size
    if arr.ndim != 2 or 0 in arr.shape or arr.dtype.kind not in "iu":
        got = f"an array of dtype {arr.dtype} and shape {arr.shape}" if isinstance(tokens, np.ndarray) else show(tokens)
        raise InputError(f"{name} must be integer token ids of shape (T,) or (B, T), got {got}")
    bad = arr[(arr < 0) | (arr >= vocab)]
    if bad.size:
        raise InputError(f"{name}: token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1})")
    return arr.astype(np.int64)


def _cache_of(model, cache_or_tokens, what):
    """An ActivationCache holding the residual stream the lens reads: the one given, or one made from tokens."""
    names = _residuals(model)
    if isinstance(cache_or_tokens, Mapping):   # (an ActivationCache: lab.interp.cache imports this module)
        if getattr(cache_or_tokens, "model", None) is not model:
            raise InputError(f"{what}: the cache was made by another model than the one given (or is not a "
                             f"run_with_cache cache): {show(cache_or_tokens)}")
        cache_or_tokens._need(names, what)
        return cache_or_tokens
    # (ids checked against the vocabulary here: the embedding's own error would not name the argument)
    tokens = _tokens(model, cache_or_tokens, f"{what}: tokens (or an ActivationCache)")
    with no_grad(), nn.evaluating():
        return model.run_with_cache(tokens, names_filter=names)[1]


def _log_probs(model, resid):
    """log-softmax of the unembedded final norm of a residual stream (B, T, C) -> (B, T, vocab) float32."""
    norm = model._final_norm()
    with no_grad(), nn.evaluating():
        logits = model._head(norm(tensor(resid, backend=norm.weight.backend))).numpy().astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    return (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)


def layer_logits(model, cache, layer):
    """The full log-probabilities (B, T, vocab) of one read-out: layer 0 the embedding's, layer i + 1 layer i's
    output (L the model's own, as its logits give them); -1 the last."""
    names = _residuals(model)
    layer = integer("layer_logits: layer (0 the embedding, i + 1 after layer i)", layer, low=-len(names),
                    high=len(names) - 1)
    cache = _cache_of(model, cache, "layer_logits")
    return _log_probs(model, cache[names[layer]])


def logit_lens(model, cache_or_tokens, k=5):
    """The logit lens of a run: its residual stream after the embedding and after each layer, through the final
    norm (each with its own statistics) and the unembedding. cache_or_tokens: an ActivationCache of this model
    holding blocks.0.hook_resid_pre and each blocks.i.hook_resid_post, or token ids to run. Returns a LogitLens."""
    k = integer("logit_lens: k", k, low=1, high=model.config.vocab_size)
    cache = _cache_of(model, cache_or_tokens, "logit_lens")
    names = _residuals(model)
    final = None   # (B, T): the model's prediction, from the last read-out (read first: one vocab-wide array held)
    ids, probs, ranks = [None] * len(names), [None] * len(names), [None] * len(names)
    for j in [len(names) - 1] + list(range(len(names) - 1)):
        lp = _log_probs(model, cache[names[j]])                                  # (B, T, vocab)
        final = lp.argmax(-1) if final is None else final
        top = np.argpartition(-lp, k - 1, axis=-1)[..., :k]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(lp, top, -1), axis=-1, kind="stable"), -1)
        ids[j], probs[j] = top, np.exp(np.take_along_axis(lp, top, -1))
        ranks[j] = (lp > np.take_along_axis(lp, final[..., None], -1)).sum(-1)
    return LogitLens(np.stack(ids).astype(np.int64), np.stack(probs).astype(np.float32),
                     np.stack(ranks).astype(np.int64), ["embed"] + [f"L{i}" for i in range(len(names) - 1)])


__all__ = ["LogitLens", "logit_lens", "layer_logits"]
