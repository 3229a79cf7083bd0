"""LoRA adapters (Hu et al., 2021) on a frozen base model, in PEFT's format.

`apply(model, r, alpha, targets)` wraps the named linear layers so that  y = x W + b + (alpha/r) (x A^T) B^T,
freezes everything else, and leaves A (r, in) and B (out, r) as the only trainable tensors. A starts as PEFT's
Kaiming-uniform, B at zero, so an untrained adapter changes nothing. Adapters can be switched off and on
(`model.use_adapter(False)`), merged into the base weights and unmerged, and saved / loaded as PEFT's
adapter_model.safetensors + adapter_config.json. With base_dtype="float16" the frozen linear weights are stored
as float16 (half their memory; on wgpu where the device has shader-f16) and read in float32 arithmetic: the
adapters train against the base rounded to float16.
"""
import contextlib
import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from . import nn
from .checkpoint import CheckpointError, _AtomicDir, read_json, read_safetensors
from .engine import ops as F
from .engine.backend import require_half_storage
from .engine.random import generator

ADAPTER_FILE, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc")


class LoRALinear(nn.Linear):
    """A frozen Linear (its weight and bias keep their names) plus the low-rank update."""

    def __init__(self, base, r, alpha, dropout):
        n_in, n_out = base.weight.shape
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad = False
        if self.bias is not None:
            self.bias.requires_grad = False
        bound = 1.0 / math.sqrt(n_in)  # PEFT: kaiming_uniform_(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        self.lora_A = nn.parameter(generator().uniform(-bound, bound, size=(r, n_in)))
        self.lora_B = nn.parameter(np.zeros((n_out, r)))
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.scale = alpha / r
        self.enabled, self.merged = True, False

    def forward(self, x):
        y = super().forward(x)
        if not self.enabled or self.merged:
            return y
        return F.lora_add(y, F.dropout(x, self.dropout, self.training), self.lora_A, self.lora_B, self.scale)

    def _delta(self):
        """The update as a weight in the (in, out) layout: scale * A^T B^T."""
        return self.scale * (self.lora_A.numpy().T @ self.lora_B.numpy().T)

    def merge(self):
        if not self.merged:
            self._shift_weight(1.0)
            self.merged = True

    def unmerge(self):
        if self.merged:
            self._shift_weight(-1.0)
            self.merged = False

    def _shift_weight(self, sign):
        """The base weight plus sign times the update, kept in its own dtype (a float16 base is rounded again:
        unmerge then restores it to within float16's rounding, not bit for bit)."""
        w = self.weight.numpy()
        self.weight.data = self.weight.backend.from_numpy((w + sign * self._delta()).astype(w.dtype))


def linear_names(model):
    """Names of the model's linear layers, as PEFT's target_modules match them (the last path component)."""
    return sorted({path.rsplit(".", 1)[-1] for path, m in model.named_modules() if isinstance(m, nn.Linear) and path})


def apply(model, r=8, alpha=16, dropout=0.0, targets=DEFAULT_TARGETS, base_dtype="float32"):
    """Wrap every linear layer whose name is in `targets` with a LoRA adapter; freeze all other parameters.
    base_dtype "float16" stores every frozen linear weight as float16 (embeddings, LayerNorms and biases stay
    float32). Returns the model (changed in place)."""
    if base_dtype not in ("float32", "float16"):
        raise ValueError(f"LoRA base_dtype must be 'float32' or 'float16', got {base_dtype!r}")
    targets = [targets] if isinstance(targets, str) else list(targets)
    existing = linear_names(model)
    unknown = [t for t in targets if t not in existing]
    if unknown:
        raise ValueError(f"unknown target module(s) {unknown}: this model's linear layers are {existing}")
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if adapters(model):
        raise ValueError("the model already has LoRA adapters (load_adapter replaces their values)")
    sites = []
    for path, module in list(model.named_modules()):
        for name, child in list(vars(module).items()):
            if isinstance(child, nn.Linear) and name in targets:
                n_in, n_out = child.weight.shape
                if r > min(n_in, n_out):
                    raise ValueError(f"LoRA rank r={r} exceeds min(in, out) = {min(n_in, n_out)} of "
                                     f"{path + '.' if path else ''}{name} ({n_in} -> {n_out})")
                sites.append((module, name, child))
    half = [m.weight for m in model.modules() if isinstance(m, nn.Linear)] if base_dtype == "float16" else []
    for w in half:
        require_half_storage(w.backend, "use base_dtype='float32'")
    for p in model.parameters():
        p.requires_grad = False
    for w in half:
        w.data = w.backend.from_numpy(w.numpy().astype(np.float16))
    for module, name, child in sites:
        setattr(module, name, LoRALinear(child, r, alpha, dropout))
    model.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets,
                         "base_dtype": base_dtype}
    return model


def adapters(model):
    """(path, LoRALinear) for every adapter in the model."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALinear)]


def _require_adapters(model):
    found = adapters(model)
    if not found:
        raise ValueError("the model has no LoRA adapters: call lab.lora.apply(model, ...) first")
    return found


def use_adapter(model, enabled=True):
    """Switch every adapter on or off (the base weights are untouched either way)."""
    for _, m in _require_adapters(model):
        if m.merged and not enabled:
            raise ValueError("adapters are merged into the base weights: unmerge first to switch them off")
        m.enabled = bool(enabled)
    return model


@contextlib.contextmanager
def adapter_enabled(model, enabled):
    """Temporarily switch adapters on or off, e.g. to compare base and adapter answers to one prompt."""
    previous = [m.enabled for _, m in _require_adapters(model)]
    use_adapter(model, enabled)
    try:
        yield model
    finally:
        for (_, m), e in zip(adapters(model), previous):
            m.enabled = e


def merge(model):
    """Fold scale * A^T B^T into each base weight: same outputs, no adapter cost at inference."""
    for _, m in _require_adapters(model):
        m.merge()
    return model


def unmerge(model):
    for _, m in _require_adapters(model):
        m.unmerge()
    return model


def _peft_prefix(model):
    from .models.transformer import TransformerLM
    return "base_model.model.transformer." if isinstance(model, TransformerLM) else "base_model.model."


def save_adapter(model, directory, base_model_name_or_path=None):
    """Write adapter_model.safetensors and adapter_config.json in PEFT's format (loadable by
    peft.PeftModel.from_pretrained on the model exported with save_pretrained(format="hf"))."""
    found = _require_adapters(model)
    prefix = _peft_prefix(model)
    tensors = {}
    for path, m in found:
        tensors[f"{prefix}{path}.lora_A.weight"] = m.lora_A.numpy()
        tensors[f"{prefix}{path}.lora_B.weight"] = m.lora_B.numpy()
    cfg = dict(model.lora_config)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg["r"], "lora_alpha": cfg["lora_alpha"],
        "lora_dropout": cfg["lora_dropout"], "target_modules": cfg["target_modules"],
        "fan_in_fan_out": True,  # GPT-2's Conv1D stores weights (in, out), as lab's Linear does
        "bias": "none", "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "use_rslora": False, "use_dora": False,
    }
    with _AtomicDir(directory) as tmp:
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return Path(directory)


def load_adapter(model, directory):
    """Load a PEFT LoRA adapter (saved by lab or by PEFT) into `model`, applying LoRA first if needed.
    Shape mismatches (an adapter for another base) name the tensor."""
    d = Path(directory)
    cfg = read_json(d / ADAPTER_CONFIG, "adapter config")
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{d / ADAPTER_CONFIG}: peft_type is {cfg.get('peft_type')!r}, expected 'LORA'")
    unsupported = [k for k in ("use_rslora", "use_dora") if cfg.get(k)]
    if unsupported or cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{d / ADAPTER_CONFIG}: unsupported options {unsupported or ['bias']}")
    try:
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
        dropout = float(cfg.get("lora_dropout") or 0.0)
        targets = cfg["target_modules"]
        targets = [targets] if isinstance(targets, str) else list(targets)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{d / ADAPTER_CONFIG}: missing or invalid field ({e})") from None
    tensors = read_safetensors(d / ADAPTER_FILE)
    if not adapters(model):
        try:
            apply(model, r=r, alpha=alpha, dropout=dropout, targets=targets)
        except (TypeError, ValueError) as e:  # an adapter config that does not fit this model
            raise CheckpointError(f"{d / ADAPTER_CONFIG}: {e}") from None
    prefix = _peft_prefix(model)
    found = adapters(model)
    expected = {f"{prefix}{path}.lora_{ab}.weight" for path, _ in found for ab in "AB"}
    names = {k.replace(".default.weight", ".weight") for k in tensors}
    if names != expected:
        missing, extra = sorted(expected - names)[:4], sorted(names - expected)[:4]
        raise CheckpointError(f"{d / ADAPTER_FILE}: adapter tensors do not match the model: missing {missing}, "
                              f"unexpected {extra}")
    tensors = {k.replace(".default.weight", ".weight"): v for k, v in tensors.items()}
    for path, m in found:
        m.scale = alpha / r
        for ab, param in (("A", m.lora_A), ("B", m.lora_B)):
            key = f"{prefix}{path}.lora_{ab}.weight"
            value = tensors[key]
            if tuple(value.shape) != param.shape:
                raise CheckpointError(f"{d / ADAPTER_FILE}: tensor {key!r} has shape {tuple(value.shape)}, this "
                                      f"model needs {param.shape} (an adapter for a different base?)")
            param.data = param.backend.from_numpy(np.asarray(value, dtype=np.float32))
    model.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout,
                         "target_modules": targets}
    return model
