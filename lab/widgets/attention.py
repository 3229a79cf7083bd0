"""AttentionHeatmap: the attention weights of every layer and head for a text, as a heatmap per head with a grid
of thumbnails; the weights travel to the browser as one binary float32 buffer, not as JSON lists."""
import numpy as np
import traitlets as t

from ..checks import show
from ..engine.tensor import no_grad
from ..nn import evaluating
from .base import Panel, panel_css, panel_module, require_model, require_tokenizer


def attention_weights(model, ids):
    """(L, H, T, T) float32 attention weights of the model on token ids (T <= block_size), in eval mode."""
    ids = np.asarray(ids, dtype=np.int32).reshape(1, -1)
    with no_grad(), evaluating():  # not model.eval(): a panel's training thread may be stepping this model
        _, att = model(ids, return_attention=True)
    return np.stack([a.numpy()[0] for a in att]).astype(np.float32)


class AttentionHeatmap(Panel):
    _esm = panel_module("attention_heatmap.js")
    _css = panel_css()

    tokens = t.List(t.Unicode()).tag(sync=True)
    n_layer = t.Int(0).tag(sync=True)
    n_head = t.Int(0).tag(sync=True)
    weights = t.Bytes(b"").tag(sync=True)        # float32, shape (n_layer, n_head, T, T), row = query
    layer = t.Int(0).tag(sync=True)
    head = t.Int(0).tag(sync=True)
    _settable = ("layer", "head")

    def __init__(self, model, text, tokenizer, layer=0, head=0, **kwargs):
        super().__init__(**kwargs)
        self._check_traits({"layer": layer, "head": head})   # set once the counts they are clamped to are known
        if not isinstance(text, str):
            raise ValueError(f"AttentionHeatmap needs a text, got {show(text)}")
        require_model("AttentionHeatmap", model)
        require_tokenizer("AttentionHeatmap", tokenizer)
        ids = tokenizer.encode(text)
        block = model.config.block_size
        if len(ids) == 0:
            raise ValueError("AttentionHeatmap needs a non-empty text")
        if len(ids) > block:
            ids = ids[-block:]  # the model attends over at most block_size tokens: show the last ones
        att = attention_weights(model, ids)
        self.array = att
        with self.hold_sync():
            self.tokens = [tokenizer.decode([int(i)]) for i in ids]
            self.n_layer, self.n_head = att.shape[0], att.shape[1]
            self.weights = att.tobytes()
            self.layer, self.head = layer, head

    @t.validate("layer")
    def _valid_layer(self, proposal):
        return min(max(int(proposal["value"]), 0), max(self.n_layer - 1, 0))

    @t.validate("head")
    def _valid_head(self, proposal):
        return min(max(int(proposal["value"]), 0), max(self.n_head - 1, 0))

    def _static_html(self):
        return (f"<b>AttentionHeatmap</b>: {self.n_layer} layers x {self.n_head} heads over {len(self.tokens)} tokens, "
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
        ax.set_title(f"layer {self.layer}, head {self.head}")
        return figure_png(fig)
