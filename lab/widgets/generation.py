"""GenerationPanel: a prompt, sampling controls, output streamed token by token, and a base / adapter switch
(or both side by side) when the model carries LoRA adapters."""
import threading
import time

import traitlets as t

from ..generate import beam_search, generate
from .base import Panel, module_source, panel_css


class GenerationPanel(Panel):
    _esm = module_source("generation_panel.js")
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
        from ..lora import adapters
        self.model, self.tokenizer = model, tokenizer
        self.has_adapter = bool(adapters(model))
        self._thread = None

    def _commands(self):
        return {"generate": lambda message: self.generate(wait=False)}

    def generate(self, wait=True, seed=None):
        """Generate from the current prompt and controls; streams into `output` (and `base_output`)."""
        if self.running:
            self.error = "generation is already running"
            return
        if not self.prompt:
            self.error = "enter a prompt first"
            return
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
                                              tokenizer=self.tokenizer, adapter=adapter))
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
                        top_p=None if self.top_p == 1 else self.top_p, on_token=on_token, seed=seed, adapter=adapter)
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
