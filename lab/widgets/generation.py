"""GenerationPanel: a prompt, sampling controls, output streamed token by token, and a base / adapter switch
(or both side by side) when the model carries LoRA adapters."""
import threading
import time

import traitlets as t

from ..checks import integer
from ..generate import beam_search, generate
from .base import Panel, panel_css, panel_module, require_model, require_tokenizer

# The most a panel generates in one go: the browser's number field takes anything, and 10**9 tokens is days of
# work holding the backend; past a few thousand tokens a script (lab.generate) is the better tool anyway.
MAX_TOKENS = 10_000
MAX_BEAMS = 64   # each step runs all beams as one batch and ranks beams**2 candidates


class GenerationPanel(Panel):
    _esm = panel_module("generation_panel.js")
    _css = panel_css()

    prompt = t.Unicode("").tag(sync=True)
    temperature = t.Float(0.8).tag(sync=True)
    top_k = t.Int(0).tag(sync=True)             # 0: off
    top_p = t.Float(1.0).tag(sync=True)
    max_tokens = t.Int(120).tag(sync=True)
    beams = t.Int(1).tag(sync=True)             # > 1: beam search
    has_adapter = t.Bool(False).tag(sync=True)
    adapter_mode = t.Enum(("adapter", "base", "both"), "adapter").tag(sync=True)
    output = t.Unicode("").tag(sync=True)
    base_output = t.Unicode("").tag(sync=True)
    running = t.Bool(False).tag(sync=True)
    error = t.Unicode("").tag(sync=True)
    _settable = ("prompt", "temperature", "top_k", "top_p", "max_tokens", "beams", "adapter_mode")

    def __init__(self, model, tokenizer, prompt="", **kwargs):
        super().__init__(prompt=prompt, **kwargs)
        self._check_limits()   # max_tokens=10**9 from Python: refused here as from the panel
        from ..lora import adapters
        self.model = require_model("GenerationPanel", model)
        self.tokenizer = require_tokenizer("GenerationPanel", tokenizer)
        self.has_adapter = bool(adapters(model))
        self._thread = None
        self._lock = threading.Lock()       # two Generate clicks (or calls from two threads): one run
        self._stop = threading.Event()      # set by Stop; the running generation ends at its next token

    def _check_limits(self):
        integer("max_tokens", self.max_tokens, high=MAX_TOKENS)
        integer("beams", self.beams, high=MAX_BEAMS)

    def _commands(self):
        return {"generate": lambda message: self.generate(wait=False), "stop": lambda message: self.stop()}

    def stop(self):
        """End the running generation at its next token; the text made so far stays in the output."""
        self._stop.set()

    def generate(self, wait=True, seed=None):
        """Generate from the current prompt and controls; streams into `output` (and `base_output`)."""
        with self._lock:
            if self.running:
                self.error = "generation is already running (Stop ends it)"
                return
            if not self.prompt:
                self.error = "enter a prompt first"
                return
            try:
                self._check_limits()
            except ValueError as e:
                self.error = str(e)
                return
            # cleared here, not in the thread: a Stop sent right after Generate must not be lost
            self._stop.clear()
            self.error, self.running = "", True
        if wait:
            self._run(seed)
        else:
            self._thread = threading.Thread(target=self._run, args=(seed,), daemon=True)
            self._thread.start()

    def _run(self, seed):
        try:
            modes = {"adapter": [True], "base": [False], "both": [True, False]}[self.adapter_mode] \
                if self.has_adapter else [None]
            for flag in modes:
                if self._stop.is_set():  # stopped during the adapter's pass: no base pass
                    break
                target = "base_output" if flag is False and len(modes) > 1 else "output"
                self._generate_into(target, flag, seed)
        except Exception as e:  # bad settings show in the panel; the kernel stays alive
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.running = False

    def _generate_into(self, target, adapter, seed):
        setattr(self, target, "")
        if self.beams > 1:
            setattr(self, target, beam_search(self.model, self.prompt, self.max_tokens, self.beams,
                                              tokenizer=self.tokenizer, adapter=adapter,
                                              should_stop=self._stop.is_set))
            return
        pieces, last = [], [0.0]

        def on_token(_, piece):
            pieces.append(piece)
            now = time.perf_counter()
            if now - last[0] > 0.05:  # at most ~20 browser updates a second
                last[0] = now
                setattr(self, target, "".join(pieces))
        text = generate(self.model, self.prompt, self.max_tokens, tokenizer=self.tokenizer,
                        temperature=self.temperature, top_k=self.top_k or None,
                        top_p=None if self.top_p == 1 else self.top_p, on_token=on_token, seed=seed, adapter=adapter,
                        should_stop=self._stop.is_set)
        setattr(self, target, text)

    def _static_html(self):
        return f"<b>GenerationPanel</b>: prompt <code>{self.esc(self.prompt)}</code>"

    def _static_png(self):
        if not self.output:
            return ""
        import textwrap
        import matplotlib.pyplot as plt
        from .base import figure_png
        text = "\n".join(textwrap.wrap(self.prompt + self.output, 90, replace_whitespace=False)[:20])
        fig = plt.figure(figsize=(7, 0.25 * (text.count("\n") + 2)))
        fig.text(0.01, 0.95, text, va="top", family="monospace", fontsize=8)
        return figure_png(fig)
