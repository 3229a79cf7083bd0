"""PlanEstimator: a form for a training plan that recomputes on every change: parameters, a memory breakdown
against the device's capacity, FLOPs, predicted time, whether it fits and why, and suggestions."""
import traitlets as t

from .. import plan as planner
from ..models.transformer import PRESETS, TransformerConfig
from .base import Panel, module_source, panel_css

FORM_KEYS = ("preset", "n_layer", "n_head", "n_embd", "vocab_size", "block_size", "batch", "seq", "tokens",
             "precision", "mode", "lora_rank", "device")


class PlanEstimator(Panel):
    _esm = module_source("plan_estimator.js")
    _css = panel_css()

    presets = t.List(t.Unicode()).tag(sync=True)
    devices = t.List(t.Unicode()).tag(sync=True)
    form = t.Dict({}).tag(sync=True)
    result = t.Dict({}).tag(sync=True)
    error = t.Unicode("").tag(sync=True)

    def __init__(self, preset="tiny", batch=12, tokens=1e6, device="m1", **kwargs):
        super().__init__(**kwargs)
        self.presets = sorted(PRESETS) + ["custom"]
        self.devices = ["this"] + sorted(planner.PROFILES)
        c = PRESETS[preset]
        self.form = {"preset": preset, "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
                     "vocab_size": c.vocab_size, "block_size": c.block_size, "batch": batch, "seq": c.block_size,
                     "tokens": tokens, "precision": "fp32", "mode": "full", "lora_rank": 8, "device": device}
        self.on_msg(self._on_message)

    def _on_message(self, widget, content, buffers):
        try:
            if not isinstance(content, dict):
                raise TypeError(f"expected a message object, got {type(content).__name__}")
            if content.get("cmd") == "set":
                self.update(**content.get("values", {}))
            elif content.get("cmd") is not None:
                raise ValueError(f"unknown command {content.get('cmd')!r}")
        except Exception as e:  # a bad message shows in the panel and never takes the kernel down
            self.error = f"{type(e).__name__}: {e}"

    def update(self, **values):
        """Change form fields (as the browser does); the plan recomputes."""
        unknown = set(values) - set(FORM_KEYS)
        if unknown:
            self.error = f"unknown field(s) {sorted(unknown)}: expected {list(FORM_KEYS)}"
            return
        form = {**self.form, **values}
        if "preset" in values and values["preset"] in PRESETS:
            c = PRESETS[values["preset"]]
            form.update(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, vocab_size=c.vocab_size,
                        block_size=c.block_size, seq=c.block_size)
        elif set(values) & {"n_layer", "n_head", "n_embd", "vocab_size", "block_size"}:
            form["preset"] = "custom"
        self.form = form

    @t.observe("form")
    def _recompute(self, change):
        f = self.form
        try:
            ints = {k: int(float(f[k])) for k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "batch",
                                                  "seq", "lora_rank")}
            for k, v in ints.items():
                if v < 1:
                    raise ValueError(f"{k} must be a positive integer, got {f[k]!r}")
            tokens = float(f["tokens"])
            if not tokens > 0:
                raise ValueError(f"tokens must be > 0, got {f['tokens']!r}")
            cfg = TransformerConfig(vocab_size=ints["vocab_size"], block_size=max(ints["block_size"], ints["seq"]),
                                    n_layer=ints["n_layer"], n_head=ints["n_head"], n_embd=ints["n_embd"])
            p = planner.estimate(cfg, batch=ints["batch"], seq=ints["seq"], tokens=tokens, precision=f["precision"],
                                 lora_rank=ints["lora_rank"] if f["mode"] == "lora" else None, device=f["device"])
        except (ValueError, TypeError, KeyError) as e:
            self.error = str(e)
            return
        self.error = ""
        self.plan = p
        self.result = {
            "params": p.params, "trainable_params": p.trainable_params, "memory": p.memory,
            "device_name": p.device.name, "device_source": p.device.source, "device_memory": p.device.memory_bytes,
            "largest_buffer": list(p.largest_buffer), "flops_per_token": p.flops_per_token,
            "total_flops": p.total_flops, "step_time_s": p.step_time_s, "total_time_s": p.total_time_s,
            "steps": p.steps, "fits": p.fits, "reasons": p.reasons, "suggestions": p.suggestions,
        }

    def _static_html(self):
        if not self.result:
            return ""
        text = repr(self.plan)
        if self.plan.device.source == "measured":  # timings measured on this machine differ from run to run
            text = "\n".join(line for line in text.splitlines() if not line.startswith(("step time", "total time")))
        return "<b>PlanEstimator</b><pre>" + self.esc(text) + "</pre>"
