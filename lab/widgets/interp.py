"""LogitLensPanel and PatchingPanel: issue #24's views inside a model (lab.interp). The logit lens is a layer x
position grid of each layer's top token; the patching panel runs lab.interp.activation_patching between two prompts,
shows the layer x position heatmap of the restored logit difference, and a click on a cell shows that patched run's
top predictions. Arrays travel to the browser as binary buffers."""
import threading

import numpy as np
import traitlets as t

from ..checks import InputError, choice, integer, show
from ..engine.tensor import no_grad
from ..nn import evaluating
from .attention import position_labels, token_labels
from .base import Panel, figure_png, jsonable, panel_css, panel_module, require_model, require_tokenizer

PATCH_HOOKS = ("resid_pre", "attn_out", "mlp_out", "resid_post")
MAX_K = 50   # hover lists; the top-k travels as (rows, T, k) arrays


def _prompt_ids(panel, tokenizer, text, name, limit):
    """A prompt's token ids, or one InputError naming the prompt: empty, or longer than the panel takes."""
    if not isinstance(text, str) or not text:
        raise InputError(f"{panel} needs a non-empty {name} text, got {show(text)}")
    ids = [int(i) for i in tokenizer.encode(text)]
    if not ids:
        raise InputError(f"{panel}: the {name} {show(text)} encodes to no tokens")
    if len(ids) > limit:
        raise InputError(f"{panel}: the {name} is {len(ids)} tokens, more than the {limit} allowed "
                         f"(max_tokens, at most the model's block)")
    return ids


def _one_token(panel, tokenizer, value, name, vocab):
    """A token id from an id or a text of exactly one token (' Paris' under GPT-2's tokenizer)."""
    if isinstance(value, str):
        from ..data.pretrained import PretrainedTokenizer
        # a piece of text, not a prompt: no BOS that a Llama tokenizer would put before it
        ids = [] if not value else tokenizer.encode(value, add_special_tokens=False) \
            if isinstance(tokenizer, PretrainedTokenizer) else tokenizer.encode(value)
        if len(ids) != 1:
            raise InputError(f"{panel}: the {name} must be one token, got {show(value)} = {len(ids)} tokens "
                             f"{[int(i) for i in ids]}")
        value = int(ids[0])
    return integer(f"{panel} {name} token id", value, low=0, high=vocab - 1)


def _softmax(logits):
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max())
    return z / z.sum()


def _top(tokenizer, probs, k):
    """[[label, prob], ...] of the k most probable tokens (a non-finite prob as None: the browser's JSON has none)."""
    ids = np.argsort(-probs, kind="stable")[:k]
    return jsonable([[label, float(probs[i])] for label, i in zip(token_labels(tokenizer, ids), ids)])


class _Runs:
    """A panel's background work: one run at a time (a second click says so), errors shown in the panel."""

    def _start(self, work, wait):
        with self._lock:
            if self.running:
                self.error = "already running: wait for it to finish"
                return False
            self.error, self.running = "", True
            self._begin()
        if wait:
            self._work(work)
            return not self.error
        else:
            self._thread = threading.Thread(target=self._work, args=(work,), daemon=True)
            self._thread.start()
        return True

    def _begin(self):
        """What a run resets as it starts (under the lock: a click refused as 'already running' changes nothing)."""

    def _work(self, work):
        try:
            with no_grad(), evaluating():   # not model.eval(): a training thread may be stepping this model
                work()
        except Exception as e:  # bad prompts from the panel show there; the kernel stays alive
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.running = False

    def wait(self, timeout=None):
        """Block until the panel's background run (if any) has finished."""
        if self._thread is not None:
            self._thread.join(timeout)


class LogitLensPanel(_Runs, Panel):
    """Each layer's residual stream read through the final norm and the unembedding (lab.interp.logit_lens): a
    grid of layers (rows, the embedding first) x positions, each cell the top token and its probability, hover for
    the top-k and the rank there of the model's final prediction. LogitLensPanel(model, tokenizer, prompt), or
    LogitLensPanel(model, tokenizer, cache, tokens=...) for a run_with_cache's cache (tokens: the text or ids run,
    or their labels; batch: the row shown). A new prompt typed in the panel runs in the background."""
    _esm = panel_module("logit_lens.js")
    _css = panel_css()

    prompt = t.Unicode("").tag(sync=True)
    k = t.Int(5).tag(sync=True)
    running = t.Bool(False).tag(sync=True)
    tokens = t.List(t.Unicode()).tag(sync=True)    # the positions (columns)
    labels = t.List(t.Unicode()).tag(sync=True)    # the rows: "embed", "L0", ...
    vocab = t.Dict().tag(sync=True)                # {str(id): text} of every token id in top_ids
    top_ids = t.Bytes(b"").tag(sync=True)          # int32 (rows, T, k)
    top_probs = t.Bytes(b"").tag(sync=True)        # float32 (rows, T, k)
    final_rank = t.Bytes(b"").tag(sync=True)       # int32 (rows, T): rank of the model's final prediction
    _settable = ("prompt",)

    def __init__(self, model, tokenizer, prompt, k=5, max_tokens=48, tokens=None, batch=0, **kwargs):
        super().__init__(**kwargs)
        self.model = require_model("LogitLensPanel", model)
        self.tokenizer = require_tokenizer("LogitLensPanel", tokenizer)
        self.k = integer("k", k, low=1, high=min(MAX_K, model.config.vocab_size))
        self.max_tokens = min(integer("max_tokens", max_tokens, low=1), model.config.block_size)
        self._lock, self._thread = threading.Lock(), None
        if isinstance(prompt, str):
            if tokens is not None or batch != 0:
                raise InputError("LogitLensPanel: tokens= and batch= go with a cache; a prompt text is run as it is")
            self.prompt = prompt
            ids = _prompt_ids("LogitLensPanel", tokenizer, prompt, "prompt", self.max_tokens)
            with no_grad(), evaluating():
                self._lens(ids, token_labels(tokenizer, ids))
            return
        from ..interp import ActivationCache, logit_lens
        if not isinstance(prompt, ActivationCache):
            raise InputError(f"LogitLensPanel needs a prompt text or an ActivationCache "
                             f"(model.run_with_cache), got {show(prompt)}")
        if prompt.model is not model:
            raise InputError("LogitLensPanel: the cache was made by another model than the one given")
        if tokens is None:
            raise InputError("LogitLensPanel(model, tokenizer, cache) needs tokens=: the text or token ids that were "
                             "run, or their labels")
        with no_grad(), evaluating():
            lens = logit_lens(model, prompt, k=self.k)
        batch = integer("batch", batch, low=0, high=lens.top_ids.shape[1] - 1)
        labels = position_labels("LogitLensPanel", tokens, tokenizer, lens.top_ids.shape[2])
        self._show(lens, batch, labels)

    def _commands(self):
        return {"run": lambda message: self.run(wait=False)}

    def run(self, prompt=None, wait=True):
        """The logit lens of `prompt` (default: the panel's); in the background with wait=False."""
        if prompt is not None:
            self.prompt = prompt
        try:
            ids = _prompt_ids("LogitLensPanel", self.tokenizer, self.prompt, "prompt", self.max_tokens)
        except InputError as e:
            self.error = str(e)
            return False
        return self._start(lambda: self._lens(ids, token_labels(self.tokenizer, ids)), wait)

    def _lens(self, ids, labels):
        from ..interp import logit_lens
        self._show(logit_lens(self.model, np.asarray([ids], dtype=np.int32), k=self.k), 0, labels)

    def _show(self, lens, batch, labels):
        top_ids = np.ascontiguousarray(lens.top_ids[:, batch], dtype=np.int32)
        shown = np.unique(top_ids)
        self.result = lens
        with self.hold_sync():
            self.tokens, self.labels = labels, list(lens.labels)
            self.vocab = dict(zip(map(str, shown.tolist()), token_labels(self.tokenizer, shown)))
            self.top_ids = top_ids.tobytes()
            self.top_probs = np.ascontiguousarray(lens.top_probs[:, batch], dtype=np.float32).tobytes()
            self.final_rank = np.ascontiguousarray(lens.final_rank[:, batch], dtype=np.int32).tobytes()

    def arrays(self):
        """(top_ids (rows, T, k), top_probs (rows, T, k), final_rank (rows, T)) as the panel shows them."""
        R, T = len(self.labels), len(self.tokens)
        return (np.frombuffer(self.top_ids, np.int32).reshape(R, T, -1),
                np.frombuffer(self.top_probs, np.float32).reshape(R, T, -1),
                np.frombuffer(self.final_rank, np.int32).reshape(R, T))

    def _static_html(self):
        return (f"<b>LogitLensPanel</b>: top-{self.k} of {len(self.labels)} rows ({self.esc(', '.join(self.labels[:2]))}"
                f" ... {self.esc(self.labels[-1] if self.labels else '')}) x {len(self.tokens)} positions")

    def _static_png(self):
        if not self.tokens:
            return ""
        import matplotlib.pyplot as plt
        ids, probs, _ = self.arrays()
        R, T = probs.shape[:2]
        fig, ax = plt.subplots(figsize=(min(1 + 0.7 * T, 16), 0.8 + 0.32 * R))
        ax.imshow(probs[:, :, 0], cmap="Blues", vmin=0, vmax=1, aspect="auto")
        for r in range(R):
            for p in range(T):
                ax.text(p, r, repr(self.vocab[str(ids[r, p, 0])])[1:-1][:8], ha="center", va="center", fontsize=6,
                        color="white" if probs[r, p, 0] > 0.6 else "black")
        ax.set_xticks(range(T), [repr(x)[1:-1] for x in self.tokens], fontsize=6, rotation=90)
        ax.set_yticks(range(R), self.labels, fontsize=6)
        ax.set_title("logit lens: top token per layer and position (shade: its probability)", fontsize=8)
        fig.tight_layout()
        return figure_png(fig)


class _Stopped(Exception):
    """Raised inside the model's forward to end an experiment that the panel's Stop asked to end."""


class PatchingPanel(_Runs, Panel):
    """Activation patching between a clean and a corrupted prompt (lab.interp.activation_patching): the heatmap of
    (patched - corrupted) / (clean - corrupted) logit difference of answer vs wrong over layers x positions, for the
    activation `hook` patched. Clicking a cell shows the top predictions of that patched run beside the clean and
    corrupted runs'. The experiment runs in the background (one forward per cell): wait=True blocks instead."""
    _esm = panel_module("patching.js")
    _css = panel_css()

    clean = t.Unicode("").tag(sync=True)
    corrupted = t.Unicode("").tag(sync=True)
    answer = t.Unicode("").tag(sync=True)
    wrong = t.Unicode("").tag(sync=True)
    hook = t.Enum(PATCH_HOOKS, "resid_pre").tag(sync=True)
    running = t.Bool(False).tag(sync=True)
    tokens = t.List(t.Unicode()).tag(sync=True)            # the clean prompt's tokens (columns)
    corrupted_tokens = t.List(t.Unicode()).tag(sync=True)
    labels = t.List(t.Unicode()).tag(sync=True)            # rows (layers)
    values = t.Bytes(b"").tag(sync=True)                   # float32 (layers, T); NaN where not patched
    shown_hook = t.Unicode("").tag(sync=True)              # the hook of the run shown (`hook` may have changed since)
    clean_diff = t.Float(None, allow_none=True).tag(sync=True)
    corrupted_diff = t.Float(None, allow_none=True).tag(sync=True)
    clean_top = t.List().tag(sync=True)                    # [[token, prob], ...] at the last position
    corrupted_top = t.List().tag(sync=True)
    cell = t.List().tag(sync=True)                         # [layer row, position] clicked, or []
    cell_top = t.List().tag(sync=True)                     # that patched run's top predictions
    k = t.Int(5).tag(sync=True)
    _settable = ("clean", "corrupted", "answer", "wrong", "hook")

    def __init__(self, model, tokenizer, clean, corrupted, answer, wrong, hook="resid_pre", k=5, max_tokens=32,
                 wait=False, **kwargs):
        super().__init__(clean=clean, corrupted=corrupted, **kwargs)   # (a prompt that is not text: one error)
        self.model = require_model("PatchingPanel", model)
        self.tokenizer = require_tokenizer("PatchingPanel", tokenizer)
        self.k = integer("k", k, low=1, high=min(MAX_K, model.config.vocab_size))
        self.max_tokens = min(integer("max_tokens", max_tokens, low=1), model.config.block_size)
        self.hook = choice("hook", hook, PATCH_HOOKS)
        self._lock, self._thread, self.result, self._stop = threading.Lock(), None, None, threading.Event()
        # an id given is shown as its token's text, which may not encode back to it (a byte of a character):
        # the id stays in use until the text is edited
        self._given = {}
        for name, value in (("answer", answer), ("wrong", wrong)):
            i = _one_token("PatchingPanel", tokenizer, value, name, model.config.vocab_size)
            setattr(self, name, value if isinstance(value, str) else token_labels(tokenizer, [i])[0])
            self._given[name] = (getattr(self, name), i)
        self._inputs()   # bad arguments from Python raise here, as from any call; the panel's own show in it
        self.run(wait=wait)

    def _inputs(self):
        vocab = self.model.config.vocab_size
        clean = _prompt_ids("PatchingPanel", self.tokenizer, self.clean, "clean prompt", self.max_tokens)
        corrupted = _prompt_ids("PatchingPanel", self.tokenizer, self.corrupted, "corrupted prompt", self.max_tokens)
        if len(clean) != len(corrupted):
            raise InputError(f"PatchingPanel: the clean and corrupted prompts must be as many tokens to patch position "
                             f"by position: {len(clean)} {token_labels(self.tokenizer, clean)} != {len(corrupted)} "
                             f"{token_labels(self.tokenizer, corrupted)}")
        answer, wrong = (self._given[name][1] if self._given[name][0] == getattr(self, name) else
                         _one_token("PatchingPanel", self.tokenizer, getattr(self, name), name, vocab)
                         for name in ("answer", "wrong"))
        if answer == wrong:
            raise InputError(f"PatchingPanel: the answer and wrong tokens must differ, both are {self.answer!r}")
        return clean, corrupted, answer, wrong

    def _commands(self):
        return {"run": lambda message: self.run(wait=False), "cell": self._cell_message,
                "stop": lambda message: self.stop()}

    def stop(self):
        """End the running experiment at its next forward; the heatmap keeps the previous run's."""
        self._stop.set()

    def run(self, wait=True):
        """Run the experiment for the panel's prompts, answer, wrong token and hook (in the background with
        wait=False); a bad one is shown in the panel's error line."""
        try:
            inputs = self._inputs()
        except InputError as e:
            self.error = str(e)
            return False
        return self._start(lambda: self._patch(*inputs), wait)

    def _begin(self):
        self._stop.clear()

    def _patch(self, clean, corrupted, answer, wrong):
        from ..interp.experiments import activation_patching

        def check(activation, name):   # each forward of the experiment starts at the embedding: Stop lands there
            if self._stop.is_set():   # (hooks run only in the thread that put them on: this run's)
                raise _Stopped
        try:
            with self.model.hooks([("hook_embed", check)]):
                result = activation_patching(self.model, np.asarray([clean], np.int32),
                                             np.asarray([corrupted], np.int32), answer, wrong, hook=self.hook)
        except _Stopped:
            self.error = "stopped: the heatmap is the previous run's" if self.result else "stopped"
            return
        tops = [_top(self.tokenizer, _softmax(self.model(np.asarray([ids], np.int32)).numpy()[0, -1]), self.k)
                for ids in (clean, corrupted)]
        self.result = result
        with self.hold_sync():
            self.tokens = token_labels(self.tokenizer, clean)
            self.corrupted_tokens = token_labels(self.tokenizer, corrupted)
            self.labels, self.shown_hook = list(result.labels), result.hook
            self.values = np.ascontiguousarray(result.values, dtype=np.float32).tobytes()
            self.clean_diff, self.corrupted_diff = jsonable([float(result.clean_diff), float(result.corrupted_diff)])
            self.clean_top, self.corrupted_top = tops
            self.cell, self.cell_top = [], []

    def _cell_message(self, message):
        self.show_cell(message.get("layer"), message.get("pos"))

    def show_cell(self, layer, pos):
        """The top predictions of the corrupted run with the clean activation patched in at (layer row, pos)."""
        if self.result is None:
            raise InputError("no patching result to show yet: Run the experiment first")
        L, T = np.asarray(self.result.values).shape
        layer, pos = integer("layer", layer, low=0, high=L - 1), integer("pos", pos, low=0, high=T - 1)
        result = self.result
        with self._lock:   # a cell's forward and a new run do not share the model at once
            if self.running:
                raise InputError("a patching run is in progress: wait for it to finish")
            with no_grad(), evaluating():
                logits = np.asarray(result.patched_logits(layer, pos))
        self.cell_top = _top(self.tokenizer, _softmax(logits.reshape(-1, logits.shape[-1])[-1]), self.k)
        self.cell = [layer, pos]

    def _static_html(self):
        return (f"<b>PatchingPanel</b>: patching {self.shown_hook or self.hook} from <code>{self.esc(self.clean)}</code> into "
                f"<code>{self.esc(self.corrupted)}</code>, logit difference {self.esc(self.answer)!s} vs "
                f"{self.esc(self.wrong)}")

    def _static_png(self):
        if not self.values:
            return ""
        import matplotlib.pyplot as plt
        values = np.frombuffer(self.values, np.float32).reshape(len(self.labels), len(self.tokens))
        fig, ax = plt.subplots(figsize=(min(1.5 + 0.5 * len(self.tokens), 16), 0.8 + 0.3 * len(self.labels)))
        lim = max(1.0, float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0)
        im = ax.imshow(values, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        fig.colorbar(im, ax=ax, label="restored logit difference")
        ax.set_xticks(range(len(self.tokens)), [repr(x)[1:-1] for x in self.tokens], fontsize=6, rotation=90)
        ax.set_yticks(range(len(self.labels)), self.labels, fontsize=6)
        ax.set_title(f"patching {self.shown_hook}", fontsize=8)
        fig.tight_layout()
        return figure_png(fig)
