"""TrainingPanel: live loss curves, throughput, progress and ETA, learning-rate and grad-norm sparklines, a
generated sample every N steps, hyperparameter inputs, and Start / Pause / Resume / Stop while training runs."""
import threading
import time
from dataclasses import replace

import traitlets as t

from ..checks import choice, integer, parse_number, real, show
from .base import Panel, jsonable, panel_css, panel_module, require_tokenizer

MAX_POINTS = 400  # points of history sent to the browser (the full history stays in trainer.history)


def _downsample(records, limit=MAX_POINTS):
    if len(records) <= limit:
        return list(records)
    stride = len(records) / (limit - 1)
    return [records[int(i * stride)] for i in range(limit - 1)] + [records[-1]]


class TrainingPanel(Panel):
    _esm = panel_module("training_panel.js")
    _css = panel_css()

    history = t.List([]).tag(sync=True)          # logged steps: step, loss, val_loss, lr, grad_norm, tokens_per_s
    status = t.Unicode("idle").tag(sync=True)    # idle, running, paused, stopped, done, error
    step = t.Int(0).tag(sync=True)
    total_steps = t.Int(0).tag(sync=True)
    tokens_per_s = t.Float(0.0).tag(sync=True)
    eta_s = t.Float(0.0).tag(sync=True)
    elapsed_s = t.Float(0.0).tag(sync=True)
    sample = t.Unicode("").tag(sync=True)
    hparams = t.Dict({}).tag(sync=True)          # lr, batch_size, steps (editable); preset, parameters (shown)
    log_scale = t.Bool(False).tag(sync=True)
    error = t.Unicode("").tag(sync=True)
    presets = t.List([]).tag(sync=True)          # non-empty when the panel can rebuild its model (for_preset)

    def __init__(self, trainer, tokenizer=None, sample_every=100, sample_prompt="\n", sample_tokens=120,
                 max_updates_per_s=10.0, preset="", **kwargs):
        super().__init__(**kwargs)
        from ..train import Trainer
        if not isinstance(trainer, Trainer):
            raise ValueError(f"TrainingPanel follows a lab.train.Trainer, got {show(trainer)}")
        self.tokenizer = tokenizer if tokenizer is None else require_tokenizer("TrainingPanel", tokenizer)
        self.sample_every = integer("sample_every", sample_every, low=0)   # 0: no samples
        if not isinstance(sample_prompt, str):
            raise ValueError(f"sample_prompt must be text, got {show(sample_prompt)}")
        self.sample_prompt = sample_prompt
        self.sample_tokens = integer("sample_tokens", sample_tokens, low=1)
        self._min_interval = 1.0 / real("max_updates_per_s", max_updates_per_s, low=0, low_open=True)
        self._last_push = 0.0
        self._thread = None
        self._build = None
        self._lock = threading.Lock()
        self._attach(trainer, preset)

    @classmethod
    def for_preset(cls, preset="tiny", corpus="kjv", steps=600, batch_size=12, lr=1e-3, seed=0, **kwargs):
        """A panel that owns its data and model, so the preset can be switched from the panel between runs."""
        from dataclasses import replace
        from ..data import char_dataset
        from ..engine.random import manual_seed
        from ..models import MODELS, PRESETS
        from ..train import TrainConfig, Trainer
        tok, train_ids, val_ids = char_dataset(corpus)

        def build(preset, steps, batch_size, lr):
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)}")
            manual_seed(seed)
            config = replace(PRESETS[preset], vocab_size=tok.vocab_size)
            model = MODELS[type(config)](config)   # the preset's family
            return Trainer(model, train_ids, val_ids, TrainConfig(steps=steps, batch_size=batch_size, lr=lr))
        panel = cls(build(preset, steps, batch_size, lr), tokenizer=tok, preset=preset, **kwargs)
        panel._build = build
        panel.presets = sorted(PRESETS)
        return panel

    def _attach(self, trainer, preset):
        self.trainer = trainer
        cfg = trainer.cfg
        self.total_steps = cfg.steps
        self.step = trainer.step_num
        self.hparams = {"lr": cfg.lr, "batch_size": cfg.batch_size, "steps": cfg.steps, "preset": preset,
                        "parameters": trainer.model.num_parameters()}
        self.history, self.sample, self.status = [], "", "idle"
        trainer.callbacks.append(self._on_record)

    # -- commands (from Python or from the buttons) --
    def start(self):
        """Train in a background thread: the kernel stays free, and the panel's buttons work meanwhile."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                self.error = "training is already running"
                return False
            self.error = ""
            self.status = "running"  # now, so that a Stop arriving before the thread starts is not ignored
            self._thread = threading.Thread(target=self._run, name="lab-training", daemon=True)
            self._thread.start()
            return True

    def run(self, wait=True):
        """Train; with wait=True block until done (scripts, nbval), else as start()."""
        if not wait:
            return self.start()
        if self._thread is not None and self._thread.is_alive():
            self.error = "training is already running"
            return False
        self._run()
        return True

    # pause/resume/stop take the lock that the run's end takes: a click landing as the run ends either reaches
    # the run or is forgotten with it, never left for the next Start (which then hung paused or stopped at once)
    def pause(self):
        with self._lock:
            if self.status == "running":
                self.trainer.pause()
                self.status = "paused"

    def resume(self):
        with self._lock:
            if self.status == "paused":
                self.trainer.resume_training()
                self.status = "running"

    def stop(self):
        with self._lock:
            if self.status in ("running", "paused"):
                self.trainer.request_stop()

    def wait(self, timeout=None):
        if self._thread is not None:
            self._thread.join(timeout)

    def set_hparams(self, **values):
        """Change lr, batch_size or steps (applied from the next step), or the preset (between runs, on a panel
        made by for_preset: a new model). Numbers may come as text (the browser's inputs). They are checked as any
        TrainConfig is, and a batch by the fit check (Trainer.reconfigure); a refused value raises ValueError and
        changes nothing."""
        unknown = sorted(set(values) - {"lr", "batch_size", "steps", "preset"})
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {show(unknown)}: expected lr, batch_size, steps or preset")
        numbers = {k: parse_number(k, v) for k, v in values.items() if k != "preset"}
        preset = values.get("preset")
        if preset is not None and preset != self.hparams.get("preset"):
            if self._build is None:
                raise ValueError("this panel trains a model it was given; TrainingPanel.for_preset(...) makes one "
                                 "whose preset can be switched")
            if self.status in ("running", "paused"):
                raise ValueError("stop training before switching the preset")
            choice("preset", preset, self.presets)
            cfg = replace(self.trainer.cfg, **numbers)
            self._attach(self._build(preset, cfg.steps, cfg.batch_size, cfg.lr), preset)
        else:
            self.trainer.reconfigure(**numbers)
        cfg = self.trainer.cfg
        self.total_steps = cfg.steps
        self.hparams = {**self.hparams, **{k: getattr(cfg, k) for k in ("lr", "batch_size", "steps")}}

    def _commands(self):
        def set_values(message):
            self.set_hparams(**self._values(message, '{"lr": 0.001}'))
            self.error = ""

        def log_scale(message):
            self.log_scale = choice("log_scale value", message.get("value"), (True, False))
        return {"start": lambda m: self.start(), "pause": lambda m: self.pause(), "resume": lambda m: self.resume(),
                "stop": lambda m: self.stop(), "set": set_values, "log_scale": log_scale}

    # -- the training loop side --
    def _run(self):
        self.status = "running"
        try:
            self.trainer.run(progress=False, log_evals=False)  # the panel shows the numbers itself
            self._push(force=True)
            status, error = self._outcome()
        except Exception as e:
            status, error = "error", f"{type(e).__name__}: {e}"
        with self._lock:
            self.trainer.clear_requests()   # a Pause or Stop that came after the last step
            self.status = status
            if error:
                self.error = error

    def _outcome(self):
        """(status, error line) of a run that returned: a NaN/Inf that stopped it is an error, a time limit or
        early stopping is said (they printed only in the training thread: the panel said 'done' at step 2 of 30)."""
        reason = self.trainer.stop_reason
        if self.trainer.fault is not None:
            return "error", reason
        if reason is None:
            return "done", ""
        return "stopped", "" if reason == "stop requested" else f"stopped early: {reason}"

    def _on_record(self, record):
        if self.sample_every and record["step"] % self.sample_every == 0 and self.tokenizer is not None:
            self._make_sample()
        self._push()

    def _make_sample(self):
        from ..generate import generate
        try:
            self.sample = generate(self.trainer.model, self.sample_prompt, self.sample_tokens,
                                   tokenizer=self.tokenizer, temperature=0.8, top_k=20, seed=0)
        except Exception as e:
            self.sample = f"(no sample: {e})"

    def _push(self, force=False):
        now = time.perf_counter()
        if not force and now - self._last_push < self._min_interval:
            return  # throttled: the browser gets at most max_updates_per_s updates
        self._last_push = now
        h = self.trainer.history
        if not h:
            return
        last = h[-1]
        keys = ("step", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s")
        with self.hold_sync():
            self.history = [{k: jsonable(r.get(k)) for k in keys} for r in _downsample(h)]  # NaN: a gap
            self.step, self.tokens_per_s = last["step"], last["tokens_per_s"]
            self.eta_s, self.elapsed_s = last["eta"], last["elapsed"]

    def _static_html(self):
        return f"<b>TrainingPanel</b>: {self.total_steps} steps of {self.hparams.get('parameters', 0):,} parameters"

    def _static_png(self):
        h = self.trainer.history
        if not h:
            return ""
        import matplotlib.pyplot as plt
        from .base import figure_png
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot([r["step"] for r in h], [r["loss"] for r in h], label="train loss")
        val = [(r["step"], r["val_loss"]) for r in h if r.get("val_loss") is not None]
        if val:
            ax.plot(*zip(*val), "o-", label="val loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        return figure_png(fig)
