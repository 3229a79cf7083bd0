"""PlanEstimator: a form for a training plan that recomputes on every change: parameters, a memory breakdown
against the device's capacity, FLOPs, predicted time, whether it fits and why, and suggestions."""
import traitlets as t

from .. import plan as planner
from ..checks import choice, integer, parse_number, real, show
from ..models.transformer import PRESETS, TransformerConfig
from ..plan.estimator import MAX_SIZE, MAX_TOKENS
from .base import Panel, panel_css, panel_module

FORM_KEYS = ("preset", "n_layer", "n_head", "n_embd", "vocab_size", "block_size", "batch", "seq", "tokens",
             "precision", "mode", "lora_rank", "device")


class PlanEstimator(Panel):
    _esm = panel_module("plan_estimator.js")
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
        c = PRESETS[choice("preset", preset, sorted(PRESETS))]
        # a bad argument raises here (ValueError), where a bad value from the browser shows in `error`
        self.form = self._checked({"preset": preset, "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
                                   "vocab_size": c.vocab_size, "block_size": c.block_size, "batch": batch,
                                   "seq": c.block_size, "tokens": tokens, "precision": "fp32", "mode": "full",
                                   "lora_rank": 8, "device": device}, {})
        self._recompute(strict=True)

    def _commands(self):
        return {"set": lambda message: self.update(**self._values(message, '{"batch": 8}'))}

    def update(self, **values):
        """Change form fields (as the browser does, numbers possibly as text); the plan recomputes. A value refused
        on its own (not a number, out of range, unknown) shows in `error` and leaves the form as it was; a form
        whose fields do not go together (n_embd not divisible by n_head) is kept, as typed, with the error shown."""
        try:
            self.form = self._checked({**self.form, **values}, values)
        except ValueError as e:
            self.error = str(e)
            return
        self._recompute()

    def _checked(self, form, changed):
        unknown = set(changed) - set(FORM_KEYS)
        if unknown:
            raise ValueError(f"unknown field(s) {show(sorted(unknown, key=str))}: expected {list(FORM_KEYS)}")
        form["preset"] = choice("preset", form["preset"], self.presets)
        if "preset" in changed and form["preset"] in PRESETS:
            c = PRESETS[form["preset"]]
            form.update(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, vocab_size=c.vocab_size,
                        block_size=c.block_size, seq=c.block_size)
        elif set(changed) & {"n_layer", "n_head", "n_embd", "vocab_size", "block_size"}:
            form["preset"] = "custom"
        for k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "batch", "seq", "lora_rank"):
            form[k] = integer(k, parse_number(k, form[k]), 1, MAX_SIZE)
        form["tokens"] = real("tokens", parse_number("tokens", form["tokens"]), 0, MAX_TOKENS, low_open=True)
        choice("precision", form["precision"], ("fp32",))
        choice("mode", form["mode"], ("full", "lora"))
        choice("device", form["device"], self.devices)
        return form

    def _recompute(self, strict=False):
        f = self.form
        try:
            cfg = TransformerConfig(vocab_size=f["vocab_size"], block_size=max(f["block_size"], f["seq"]),
                                    n_layer=f["n_layer"], n_head=f["n_head"], n_embd=f["n_embd"])
            p = planner.estimate(cfg, batch=f["batch"], seq=f["seq"], tokens=f["tokens"], precision=f["precision"],
                                 lora_rank=f["lora_rank"] if f["mode"] == "lora" else None, device=f["device"])
        except ValueError as e:
            if strict:
                raise
            self.error = str(e)
            return
        with self.hold_sync():
            self.plan, self.error = p, ""
            self.result = {
                "params": p.params, "trainable_params": p.trainable_params, "memory": p.memory,
                "device_name": p.device.name, "device_source": p.device.source,
                "device_memory": p.device.memory_bytes, "largest_buffer": list(p.largest_buffer),
                "flops_per_token": p.flops_per_token, "total_flops": p.total_flops, "step_time_s": p.step_time_s,
                "total_time_s": p.total_time_s, "steps": p.steps, "fits": p.fits, "reasons": p.reasons,
                "suggestions": p.suggestions,
            }

    def _static_html(self):
        if not self.result:
            return ""
        text = repr(self.plan)
        if self.plan.device.source == "measured":  # timings measured on this machine differ from run to run
            text = "\n".join(line for line in text.splitlines() if not line.startswith(("step time", "total time")))
        return "<b>PlanEstimator</b><pre>" + self.esc(text) + "</pre>"
