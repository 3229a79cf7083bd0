"""GenerationPanel: a prompt, sampling controls, output streamed token by token, and a base / adapter switch
(or both side by side) when the model carries LoRA adapters. With chat=True (a tokenizer with a chat template) the
prompt is the user's message and the panel keeps the conversation, each reply ending at the turn's end token."""
import threading
import time

import traitlets as t

from ..chat import chat
from ..checks import InputError, integer, show
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
    chat = t.Bool(False).tag(sync=True)
    # the conversation ([{"role", "content"}]) shown in the panel; in "both" mode base_history is the base model's
    # own (its replies differ, so the next turn of each continues its own answers)
    history = t.List().tag(sync=True)
    base_history = t.List().tag(sync=True)
    _settable = ("prompt", "temperature", "top_k", "top_p", "max_tokens", "beams", "adapter_mode")

    def __init__(self, model, tokenizer, prompt="", chat=False, **kwargs):
        self.tokenizer = tokenizer   # (the chat check below reads it)
        super().__init__(prompt=prompt, chat=chat, **kwargs)
        self._check_limits()   # max_tokens=10**9 from Python: refused here as from the panel
        from ..lora import adapters
        self.model = require_model("GenerationPanel", model)
        self.tokenizer = require_tokenizer("GenerationPanel", tokenizer)
        self.has_adapter = bool(adapters(model))
        self._thread = None
        self._lock = threading.Lock()       # two Generate clicks (or calls from two threads): one run
        self._stop = threading.Event()      # set by Stop; the running generation ends at its next token

    @t.validate("chat")
    def _valid_chat(self, proposal):   # at construction and when set later (panel.chat = True)
        chat = proposal["value"]   # (a non-boolean is refused by Panel's trait check first)
        if chat and getattr(self.tokenizer, "chat_template", None) is None:
            raise InputError(f"GenerationPanel(chat=True) needs a tokenizer with a chat template (a pretrained "
                             f"model's, lab.load_tokenizer), got {show(self.tokenizer)}")
        return chat

    def _check_limits(self):
        integer("max_tokens", self.max_tokens, high=MAX_TOKENS)
        integer("beams", self.beams, high=MAX_BEAMS)

    def _commands(self):
        return {"generate": lambda message: self.generate(wait=False), "stop": lambda message: self.stop(),
                "clear": lambda message: self.clear_chat()}

    def clear_chat(self):
        """Start a new conversation (chat mode): the turns so far are dropped."""
        with self._lock:
            if self.running:
                self.error = "a reply is being generated: Stop it before clearing the conversation"
                return
            self.history, self.base_history, self.output, self.base_output, self.error = [], [], "", "", ""

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
                self.error = "enter a message first" if self.chat else "enter a prompt first"
                return
            if self.chat and self.beams > 1:
                self.error = f"beam search (beams {self.beams}) does not chat: set beams to 1"
                return
            try:
                self._check_limits()
            except ValueError as e:
                self.error = str(e)
                return
            # cleared here, not in the thread: a Stop sent right after Generate must not be lost
            self._stop.clear()
            self.error, self.running = "", True
            # the run as sent: a control changed meanwhile (the prompt typed into during the adapter's pass) is
            # the next run's, not the base side's of this one
            how = {"max_new_tokens": self.max_tokens, "temperature": self.temperature, "top_k": self.top_k or None,
                   "top_p": None if self.top_p == 1 else self.top_p}
            sent = (self.prompt, self.beams, how, self.chat, self.adapter_mode)
            if self.chat:   # sent: the box empties for the next message, as a chat's does
                self.prompt = ""
        if wait:
            self._run(seed, sent)
        else:
            self._thread = threading.Thread(target=self._run, args=(seed, sent), daemon=True)
            self._thread.start()

    def _run(self, seed, sent):
        message, beams, how, chat_mode, adapter_mode = sent
        try:
            modes = {"adapter": [True], "base": [False], "both": [True, False]}[adapter_mode] \
                if self.has_adapter else [None]
            for flag in modes:
                if self._stop.is_set():  # stopped during the adapter's pass: no base pass
                    break
                target = "base_output" if flag is False and len(modes) > 1 else "output"
                if chat_mode:
                    self._reply_into(target, flag, seed, message, how)
                else:
                    self._generate_into(target, flag, seed, message, beams, how)
        except Exception as e:  # bad settings show in the panel; the kernel stays alive
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.running = False

    def _generate_into(self, target, adapter, seed, prompt, beams, how):
        setattr(self, target, "")
        if beams > 1:
            setattr(self, target, beam_search(self.model, prompt, how["max_new_tokens"], beams,
                                              tokenizer=self.tokenizer, adapter=adapter,
                                              should_stop=self._stop.is_set))
            return
        push = self._streamer(target)
        text = generate(self.model, prompt, tokenizer=self.tokenizer, on_token=lambda _, piece: push(piece), seed=seed,
                        adapter=adapter, should_stop=self._stop.is_set, **how)
        setattr(self, target, text)

    def _streamer(self, target):
        """A function taking each new text piece that shows the text so far in the trait `target`, at most ~20
        browser updates a second (the caller sets the whole text at the end)."""
        pieces, last = [], [0.0]

        def push(piece):
            pieces.append(piece)
            now = time.perf_counter()
            if now - last[0] > 0.05:
                last[0] = now
                setattr(self, target, "".join(pieces))
        return push

    def _reply_into(self, target, adapter, seed, message, how):
        """One turn: the user's message joins the conversation, the reply streams into `target` and then joins it
        too (a stopped reply as far as it got)."""
        key = "base_history" if target == "base_output" else "history"
        turns = list(getattr(self, key)) + [{"role": "user", "content": message}]
        setattr(self, key, turns)
        setattr(self, target, "")
        try:
            reply = chat(self.model, self.tokenizer, turns, seed=seed, on_token=self._streamer(target), adapter=adapter,
                         should_stop=self._stop.is_set, **how)
        except Exception:
            setattr(self, key, turns[:-1])   # a refused turn (bad settings) is not kept half-made
            raise
        setattr(self, key, turns + [{"role": "assistant", "content": reply}])
        setattr(self, target, "")

    def _static_html(self):
        if self.chat:
            turns = "".join(f"<div><b>{self.esc(m['role'])}</b>: {self.esc(m['content'])}</div>" for m in self.history)
            return f"<b>GenerationPanel</b> (chat, {len(self.history)} turns){turns}"
        return f"<b>GenerationPanel</b>: prompt <code>{self.esc(self.prompt)}</code>"

    def _static_png(self):
        if self.chat:   # the conversation is in the HTML fallback
            return ""
        if not self.output:
            return ""
        import textwrap
        import matplotlib.pyplot as plt
        from .base import figure_png
        text = "\n".join(textwrap.wrap(self.prompt + self.output, 90, replace_whitespace=False)[:20])
        fig = plt.figure(figsize=(7, 0.25 * (text.count("\n") + 2)))
        fig.text(0.01, 0.95, text, va="top", family="monospace", fontsize=8)
        return figure_png(fig)
