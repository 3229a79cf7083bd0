"""AttentionHeatmap: the attention weights of every layer and head for a text, as a heatmap per head with a grid
of thumbnails; the weights travel to the browser as one binary float32 buffer, not as JSON lists. From an
ActivationCache (lab.interp) it shows the cached blocks.{i}.attn.hook_pattern instead, as circuitsvis does."""
import codecs
import re

import numpy as np
import traitlets as t

from ..checks import integer, show
from ..engine.tensor import no_grad
from ..generate import _token_bytes
from ..nn import evaluating
from .base import Panel, panel_css, panel_module, require_model, require_tokenizer


def attention_weights(model, ids):
    """(L, H, T, T) float32 attention weights of the model on token ids (T <= block_size), in eval mode."""
    ids = np.asarray(ids, dtype=np.int32).reshape(1, -1)
    with no_grad(), evaluating():  # not model.eval(): a panel's training thread may be stepping this model
        _, att = model(ids, return_attention=True)
    return np.stack([a.numpy()[0] for a in att]).astype(np.float32)


# A byte-level tokenizer splits a multi-byte character across tokens (emoji, CJK, accents): each piece is shown as
# the bytes it holds, in sentencepiece's <0xNN> spelling, where decoding it alone would show U+FFFD.
codecs.register_error("lab_byte_tokens", lambda e: ("".join(f"<0x{b:02X}>" for b in e.object[e.start:e.end]), e.end))


def token_labels(tokenizer, ids):
    """Each token's text as it stands in the sequence (a sentencepiece '▁the' keeps its space), or its bytes."""
    return [_token_bytes(tokenizer, int(i)).decode("utf-8", errors="lab_byte_tokens") for i in ids]


def position_labels(panel, tokens, tokenizer, n):
    """The n labels of a cached run's positions from what the user has: the text or token ids that were run (with
    their tokenizer), or the labels themselves (circuitsvis' str_tokens)."""
    if isinstance(tokens, str):
        require_tokenizer(panel, tokenizer)
        labels = token_labels(tokenizer, tokenizer.encode(tokens))
    elif isinstance(tokens, (list, tuple)) and tokens and all(isinstance(x, str) for x in tokens):
        labels = list(tokens)
    else:
        ids = np.asarray(tokens)
        if ids.ndim == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{panel}: tokens must be the text or the token ids (T,) that were run, or a list of "
                             f"labels, got {show(tokens)}")
        require_tokenizer(panel, tokenizer)
        labels = token_labels(tokenizer, ids)
    if len(labels) != n:
        raise ValueError(f"{panel}: the cache holds {n} positions but the tokens given are {len(labels)}: pass the "
                         f"tokens that were run")
    return labels


PATTERN = re.compile(r"blocks\.(\d+)\.attn\.hook_pattern")


def cached_patterns(cache, hook, batch):
    """({layer: (H, T, T) float32}) of a cache's hook_pattern entries named by `hook` (a name, a list of names, or
    None for every one cached), for batch row `batch`."""
    cached = sorted((n for n in cache if PATTERN.fullmatch(n)), key=lambda n: int(PATTERN.fullmatch(n).group(1)))
    if not cached:
        raise ValueError("AttentionHeatmap: the cache holds no attention pattern: run_with_cache with names_filter "
                         "including 'blocks.{i}.attn.hook_pattern'")
    names = cached if hook is None else [hook] if isinstance(hook, str) else hook
    if not isinstance(names, (list, tuple)) or not names:
        raise ValueError(f"AttentionHeatmap: hook must be a blocks.{{i}}.attn.hook_pattern name or a list of them, "
                         f"got {show(hook)}")
    for name in names:
        if not isinstance(name, str) or not PATTERN.fullmatch(name):
            raise ValueError(f"AttentionHeatmap shows attention patterns: hook must be a blocks.{{i}}.attn.hook_pattern "
                             f"name, got {show(name)}")
        if name not in cached:
            raise ValueError(f"AttentionHeatmap: {name!r} is not in the cache; cached patterns: {cached}")
    first = np.asarray(cache[names[0]])
    batch = integer("batch", batch, low=0, high=first.shape[0] - 1)
    return {int(PATTERN.fullmatch(n).group(1)): np.asarray(cache[n][batch], dtype=np.float32)
            for n in sorted(set(names), key=cached.index)}   # in layer order, once each


class AttentionHeatmap(Panel):
    _esm = panel_module("attention_heatmap.js")
    _css = panel_css()

    tokens = t.List(t.Unicode()).tag(sync=True)
    n_layer = t.Int(0).tag(sync=True)             # layers shown
    layers = t.List(t.Int()).tag(sync=True)       # the model's layer number of each one shown (a cache: those cached)
    n_head = t.Int(0).tag(sync=True)              # query heads: one panel each
    n_kv_head = t.Int(0).tag(sync=True)           # key-value heads (GQA, fewer than n_head): see kv_head()
    weights = t.Bytes(b"").tag(sync=True)        # float32, shape (n_layer, n_head, T, T), row = query
    layer = t.Int(0).tag(sync=True)               # a model layer number, one of `layers`
    head = t.Int(0).tag(sync=True)
    _settable = ("layer", "head")

    def __init__(self, model, text, tokenizer=None, layer=None, head=0, max_tokens=256, hook=None, batch=0, **kwargs):
        """AttentionHeatmap(model, text, tokenizer) runs the model on the text. AttentionHeatmap(cache, tokens,
        tokenizer, hook=None) shows the blocks.{i}.attn.hook_pattern entries of an ActivationCache (hook: one name,
        a list, or None for all cached) for batch row `batch`; tokens: the text or ids that were run (with their
        tokenizer), or the position labels. layer: the model layer shown first."""
        super().__init__(**kwargs)
        self._check_traits({"layer": layer or 0, "head": head})   # set once the counts they are clamped to are known
        from ..interp import ActivationCache
        if isinstance(model, ActivationCache):
            self._from_cache(model, text, tokenizer, layer, head, integer("max_tokens", max_tokens, low=1), hook, batch)
            return
        if hook is not None or batch != 0:
            raise ValueError(f"AttentionHeatmap: hook= and batch= pick from an ActivationCache; with a model "
                             f"(got {show(model, 40)}) it runs the text, one row, every layer")
        if not isinstance(text, str):
            raise ValueError(f"AttentionHeatmap needs a text, got {show(text)}")
        require_model("AttentionHeatmap", model)
        require_tokenizer("AttentionHeatmap", tokenizer)
        # the weights are n_layer x n_head x T x T floats in the kernel and the browser: a pretrained model's
        # block (8192 positions for SmolLM2) would be tens of GB, so at most max_tokens of it
        max_tokens = integer("max_tokens", max_tokens, low=1)
        ids = tokenizer.encode(text)
        if len(ids) == 0:
            raise ValueError("AttentionHeatmap needs a non-empty text")
        self.n_text_tokens = len(ids)
        ids = ids[-min(model.config.block_size, max_tokens):]  # the model attends over at most block_size: the last
        att = attention_weights(model, ids)
        self._show(token_labels(tokenizer, ids), list(range(att.shape[0])), att, model, layer or 0, head)

    def _from_cache(self, cache, tokens, tokenizer, layer, head, max_tokens, hook, batch):
        patterns = cached_patterns(cache, hook, batch)
        T = next(iter(patterns.values())).shape[-1]
        labels = position_labels("AttentionHeatmap", tokens, tokenizer, T)
        self.n_text_tokens = T
        keep = slice(T - min(T, max_tokens), T)   # the last max_tokens queries and those keys: what fits the browser
        att = np.ascontiguousarray(np.stack([p[:, keep, keep] for p in patterns.values()]))
        self.hook_names = [f"blocks.{i}.attn.hook_pattern" for i in patterns]
        self._show(labels[keep], list(patterns), att, cache.model, min(patterns) if layer is None else layer, head)

    def _show(self, labels, layers, att, model, layer, head):
        self.array = att
        with self.hold_sync():
            self.tokens = labels
            self.layers, self.n_layer, self.n_head = layers, att.shape[0], att.shape[1]
            self.n_kv_head = getattr(getattr(model, "config", None), "num_key_value_heads", None) or self.n_head
            self.weights = att.tobytes()
            self.layer, self.head = layer, head

    @t.validate("layer")
    def _valid_layer(self, proposal):
        if not self.layers:
            return 0
        value = int(proposal["value"])   # the nearest layer shown (a cache may hold a few)
        return min(self.layers, key=lambda i: (abs(i - value), i))

    @t.validate("head")
    def _valid_head(self, proposal):
        return min(max(int(proposal["value"]), 0), max(self.n_head - 1, 0))

    def kv_head(self, head):
        """The key-value head a query head reads (transformers' repeat_kv: consecutive query heads share one)."""
        return integer("head", head, low=0, high=self.n_head - 1) // (self.n_head // self.n_kv_head)

    def _static_html(self):
        heads = f"{self.n_head} heads"
        if self.n_kv_head != self.n_head:
            shared = ("one key-value head shared by all" if self.n_kv_head == 1 else
                      f"{self.n_kv_head} key-value heads, each shared by {self.n_head // self.n_kv_head}")
            heads = f"{self.n_head} query heads ({shared})"
        T = len(self.tokens)
        over = f"{T} tokens" if T == self.n_text_tokens else f"the last {T} of {self.n_text_tokens} tokens"
        layers = f"{self.n_layer} layers" if self.layers == list(range(self.n_layer)) else \
            f"layer{'s' if self.n_layer > 1 else ''} {', '.join(map(str, self.layers))}"
        return (f"<b>AttentionHeatmap</b>: {layers} x {heads} over {over}, "
                f"showing layer {self.layer}, head {self.head}")

    def _static_png(self):
        if self.n_layer == 0:
            return ""
        import matplotlib.pyplot as plt
        from .base import figure_png
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.imshow(self.array[self.layers.index(self.layer), self.head], cmap="Blues")
        ticks = range(len(self.tokens))
        ax.set_xticks(ticks, [repr(t)[1:-1] for t in self.tokens], fontsize=6)
        ax.set_yticks(ticks, [repr(t)[1:-1] for t in self.tokens], fontsize=6)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        shared = f" (kv head {self.kv_head(self.head)})" if self.n_kv_head != self.n_head else ""
        ax.set_title(f"layer {self.layer}, head {self.head}{shared}")
        return figure_png(fig)
