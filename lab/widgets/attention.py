"""AttentionHeatmap: the attention weights of every layer and head for a text, as a heatmap per head with a grid
of thumbnails; the weights travel to the browser as one binary float32 buffer, not as JSON lists."""
import codecs

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


class AttentionHeatmap(Panel):
    _esm = panel_module("attention_heatmap.js")
    _css = panel_css()

    tokens = t.List(t.Unicode()).tag(sync=True)
    n_layer = t.Int(0).tag(sync=True)
    n_head = t.Int(0).tag(sync=True)              # query heads: one panel each
    n_kv_head = t.Int(0).tag(sync=True)           # key-value heads (GQA, fewer than n_head): see kv_head()
    weights = t.Bytes(b"").tag(sync=True)        # float32, shape (n_layer, n_head, T, T), row = query
    layer = t.Int(0).tag(sync=True)
    head = t.Int(0).tag(sync=True)
    _settable = ("layer", "head")

    def __init__(self, model, text, tokenizer, layer=0, head=0, max_tokens=256, **kwargs):
        super().__init__(**kwargs)
        self._check_traits({"layer": layer, "head": head})   # set once the counts they are clamped to are known
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
        self.array = att
        with self.hold_sync():
            self.tokens = token_labels(tokenizer, ids)
            self.n_layer, self.n_head = att.shape[0], att.shape[1]
            self.n_kv_head = getattr(model.config, "num_key_value_heads", self.n_head)
            self.weights = att.tobytes()
            self.layer, self.head = layer, head

    @t.validate("layer")
    def _valid_layer(self, proposal):
        return min(max(int(proposal["value"]), 0), max(self.n_layer - 1, 0))

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
        return (f"<b>AttentionHeatmap</b>: {self.n_layer} layers x {heads} over {over}, "
                f"showing layer {self.layer}, head {self.head}")

    def _static_png(self):
        if self.n_layer == 0:
            return ""
        import matplotlib.pyplot as plt
        from .base import figure_png
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.imshow(self.array[self.layer, self.head], cmap="Blues")
        ticks = range(len(self.tokens))
        ax.set_xticks(ticks, [repr(t)[1:-1] for t in self.tokens], fontsize=6)
        ax.set_yticks(ticks, [repr(t)[1:-1] for t in self.tokens], fontsize=6)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        shared = f" (kv head {self.kv_head(self.head)})" if self.n_kv_head != self.n_head else ""
        ax.set_title(f"layer {self.layer}, head {self.head}{shared}")
        return figure_png(fig)
