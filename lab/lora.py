"""LoRA adapters (Hu et al., 2021) on a frozen base model, in PEFT's format.

`apply(model, r, alpha, targets)` wraps the named linear layers so that  y = x W + b + (alpha/r) (x A^T) B^T,
freezes everything else, and leaves A (r, in) and B (out, r) as the only trainable tensors. A starts as PEFT's
Kaiming-uniform, B at zero, so an untrained adapter changes nothing. Adapters can be switched off and on
(`model.use_adapter(False)`), merged into the base weights and unmerged, and saved / loaded as PEFT's
adapter_model.safetensors + adapter_config.json. With base_dtype="float16" the frozen linear weights are stored
as float16 (half their memory; on wgpu where the device has shader-f16) and read in float32 arithmetic: the
adapters train against the base rounded to float16. A lab-layout checkpoint holds the adapters and their settings
too (checkpoint_config / apply_config), so a LoRA run resumes like any other.
"""
import contextlib
import difflib
import functools
import math
import os
import re
import threading
from pathlib import Path

import numpy as np

from . import nn
from .checks import InputError, choice, integer, real, show
from .engine import ops as F
from .engine.backend import require_half_storage
from .engine.quant import quantize
from .engine.random import generator
from .engine.tensor import QuantizedWeight
from .io import (CheckpointError, atomic_files, check_floats, directory_path, mismatch, read_json, read_safetensors,
                 reading)

ADAPTER_FILE, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc")
# the frozen base's storage: float32, float16, or packed (quant.py's kinds; "q4" is GGUF's Q4_1)
BASE_DTYPES, PACKED = ("float32", "float16", "int8", "q4"), {"int8": "int8", "q4": "q4_1"}
ALL_LINEAR = "all-linear"   # PEFT's name for every linear layer but the output head


class LoRALinear(nn.Linear):
    """A frozen Linear (its weight and bias keep their names) plus the low-rank update."""

    def __init__(self, base, r, alpha, dropout):
        n_in, n_out = base.weight.shape
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad = False
        if self.bias is not None:
            self.bias.requires_grad = False
        bound = 1.0 / math.sqrt(n_in)  # PEFT: kaiming_uniform_(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        # on the base's backend, not the active one: after lab.set_backend("numpy") a wgpu model got numpy
        # adapters, and its first step failed inside the optimizer ('numpy.ndarray' object has no attribute ...)
        self.lora_A = nn.parameter(generator().uniform(-bound, bound, size=(r, n_in)), backend=base.weight.backend)
        self.lora_B = nn.parameter(np.zeros((n_out, r)), backend=base.weight.backend)
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.scale = alpha / r
        self.enabled, self.merged = True, False
        self._premerge = None   # while merged by merge(): (the merged weight's data, the base's values)

    @property
    def enabled(self):
        """use_adapter's setting, or adapter_enabled's inside its block in the calling thread."""
        return getattr(_switches, "on", {}).get(id(self), self._enabled)

    @enabled.setter
    def enabled(self, value):
        self._enabled = value

    @property
    def plain(self):   # the base layer alone (its weight holds a merged adapter), by this class's forward
        return (not self.enabled or self.merged) and not nn.own_forward(self, LoRALinear)

    def forward(self, x, activation=None, residual=None):
        if not self.enabled or self.merged:  # the base layer alone, its epilogues fused as a plain Linear's
            return super().forward(x, activation, residual)
        y = F.lora_add(super().forward(x), F.dropout(x, self.dropout, self.training), self.lora_A, self.lora_B,
                       self.scale)
        y = F.activate(y, activation)   # on base + adapter, not on the base's product alone
        return y if residual is None else residual + y

    def _delta(self):
        """The update as a weight in the (in, out) layout: scale * A^T B^T."""
        return self.scale * (self.lora_A.numpy().T @ self.lora_B.numpy().T)

    def merge(self):
        if not self.merged:
            base = self._shift_weight(1.0)
            # (w + u) - u is w only to within a rounding: the base's own values are kept (on the host) while merged
            self._premerge = (self.weight.data, base)
            self.merged = True

    def unmerge(self):
        if self.merged:
            merged, base = self._premerge or (None, None)
            if self.weight.data is merged:   # the weight merge() made, not replaced since: its base bit for bit
                self.weight.data = self.weight.backend.from_numpy(base)
            else:   # merged when loaded (a checkpoint) or weights loaded since: to within one rounding
                self._shift_weight(-1.0)
            self._premerge = None
            self.merged = False

    def _shift_weight(self, sign):
        """The base weight plus sign times the update, kept in its own dtype (a float16 base is rounded again).
        Returns the weight's values before."""
        if isinstance(self.weight, QuantizedWeight):   # its data would become a float array the matmul cannot read
            raise InputError(f"LoRA merge/unmerge: this layer's base is packed ({self.weight.dtype}); the update "
                             f"stays beside it (see lab.lora.merge)")
        w = self.weight.numpy()
        self.weight.data = self.weight.backend.from_numpy((w + sign * self._delta()).astype(w.dtype))
        return w


def linear_names(model):
    """Names of the model's linear layers, as PEFT's target_modules match them (the last path component)."""
    return sorted({path.rsplit(".", 1)[-1] for path, _ in _linears(model)})


def _linears(model):
    """(path, Linear) of every linear layer in the model, in module order."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, nn.Linear) and path]


_ARGUMENTS = {"r": "LoRA rank r", "lora_alpha": "LoRA alpha", "lora_dropout": "LoRA dropout",
              "target_modules": "LoRA targets", "base_dtype": "LoRA base_dtype"}


def _check_settings(cfg, name=_ARGUMENTS.get):
    """The settings as model.lora_config holds them, checked: one check for apply's arguments, adapter_config.json
    and a checkpoint's config.json (`name` says how the message names each field). Returns them normalized."""
    r = integer(name("r"), cfg["r"], low=1)
    alpha = real(name("lora_alpha"), cfg["lora_alpha"], low=0, low_open=True)
    try:
        dropout = real(name("lora_dropout"), cfg["lora_dropout"], low=0, high=1)
    except ValueError:
        dropout = 1.0
    if dropout == 1:   # 1 would drop every input
        raise InputError(f"{name('lora_dropout')} must be a number in [0, 1), got {show(cfg['lora_dropout'])}")
    targets = cfg["target_modules"]
    if isinstance(targets, (set, frozenset)):   # names in no order: sorted for a stable config
        targets = sorted(targets, key=str)
    if isinstance(targets, (list, tuple)) and ALL_LINEAR in targets:
        if len(targets) > 1:
            raise InputError(f"{name('target_modules')}: {ALL_LINEAR!r} stands alone (it names every linear layer "
                             f"but the output head), got {show(targets)}")
        targets = ALL_LINEAR
    # a string is kept as it is: "all-linear", a module name, or (as PEFT reads a string) a pattern of whole paths
    if not (isinstance(targets, str) or isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in
                                                                                  targets)):
        raise InputError(f"{name('target_modules')} must be a module name, a list of them or {ALL_LINEAR!r}, got "
                         f"{show(targets)}")
    return {"r": r, "lora_alpha": int(alpha) if alpha.is_integer() else alpha, "lora_dropout": dropout,
            "target_modules": targets if isinstance(targets, str) else list(targets), "base_dtype": choice(name("base_dtype"), cfg["base_dtype"],
                                                                  BASE_DTYPES)}


def _sites(model, r, targets):
    """(path, parent, attribute, Linear) of every layer apply() wraps, as PEFT chooses them: "all-linear" takes every
    linear layer but the output head; a name takes each layer whose path is it or ends in "." + it (q_proj,
    self_attn.q_proj, model.layers.0.self_attn.q_proj); a string that is no such name is a pattern the whole path
    matches (re.fullmatch, as PEFT reads a string). Refuses targets that match nothing, the head of a model whose
    head is its embedding, and a rank above a layer's size. Changes nothing."""
    within = _peft_prefix(model)[len("base_model.model."):]   # matched as PEFT matches: transformers' paths
    layers = [(within + path, m) for path, m in _linears(model)]
    head, tied = getattr(model, "peft_head", None), _tied_embedding(model)

    def matches(path, t):
        return path == t or path.endswith("." + t)
    if targets == ALL_LINEAR:
        chosen = [path for path, _ in layers if path != head]
    else:
        names = [targets] if isinstance(targets, str) else targets
        if isinstance(targets, str) and not any(matches(path, targets) for path, _ in layers):
            chosen = [path for path, _ in layers if _fullmatch(targets, path)]
            unknown = [] if chosen else names
        else:
            chosen = [path for path, _ in layers if any(matches(path, t) for t in names)]
            unknown = [t for t in names if not any(matches(path, t) for path, _ in layers)]
        if tied and head and any(t == head or t.endswith("." + head) for t in names):
            raise InputError(f"target {head!r}: this model's output head is its embedding {tied!r} (one tensor, "
                             f"tie_word_embeddings), not a linear layer of its own; an adapter there would untie them. "
                             f"Target the linear layers ({', '.join(linear_names(model))}) or {ALL_LINEAR!r}")
        if unknown or not names:  # no targets would freeze the whole model and train nothing
            valid = linear_names(model)
            leaves = [t.rsplit(".", 1)[-1] for t in unknown]   # a dotted path is compared by its layer's name
            near = sorted(valid, key=lambda v: -max(difflib.SequenceMatcher(None, t, v).ratio() for t in leaves)) \
                if unknown else valid
            raise InputError(f"{f'unknown target module(s) {unknown}' if unknown else 'no target modules given'}: "
                             f"this model's linear layers are {near}{' (nearest first)' if unknown else ''}; a target is one of them, a "
                             f"dotted path ending in one, or {ALL_LINEAR!r}")
    sites = []
    for path, module in model.named_modules():
        for name, child in vars(module).items():
            full = f"{path}.{name}" if path else name
            if isinstance(child, nn.Linear) and within + full in chosen:
                n_in, n_out = child.weight.shape
                if r > min(n_in, n_out):
                    raise InputError(f"LoRA rank r={r} exceeds min(in, out) = {min(n_in, n_out)} of {full} "
                                     f"({n_in} -> {n_out}): r must be at most {min(n_in, n_out)}")
                sites.append((full, module, name, child))
    return sites


def _fullmatch(pattern, path):
    try:
        return re.fullmatch(pattern, path) is not None
    except re.error:   # not a pattern either: an unknown name
        return False


def _tied_embedding(model):
    """The path of the embedding the model's output head reads as its weight (one tensor), or None."""
    return model.tied_embedding() if isinstance(model, Adapters) else None


def _holding(what, hint=""):
    """The function changes the model's parameters, their set or which of them train: refused while another
    thread trains the model (nn.in_use), instead of changing them under its step; and made between two saves of
    another thread (nn.step_lock), which read the weights of one whole state, never half merged."""
    def wrap(fn):
        @functools.wraps(fn)
        def held(model, *args, **kwargs):
            with nn.in_use(model, what, hint), nn.step_lock(model):
                return fn(model, *args, **kwargs)
        return held
    return wrap


@_holding("lora.apply")
def apply(model, r=8, alpha=16, dropout=0.0, targets=None, base_dtype="float32", modules_to_save=None):
    """Wrap the linear layers `targets` names with LoRA adapters (PEFT's target_modules: names such as "q_proj",
    dotted paths, or "all-linear": every linear layer but the output head; None: the family's default, every linear
    layer but the head, as `lab plan` counts it); freeze all other parameters. `dropout`
    drops the adapter's input (before A) in training mode, PEFT's lora_dropout. base_dtype "float16" stores every
    frozen linear weight as float16 (embeddings, norms and biases stay float32). All or nothing: a refused
    argument leaves the model as it was. Returns the model (changed in place)."""
    if modules_to_save:
        raise InputError(f"lora.apply: modules_to_save={show(modules_to_save)} is not supported: lab trains the "
                         f"adapters alone, the embeddings and head stay frozen (leave it None)")
    if targets is None:   # GPT-2's default named its layers, which a Llama model does not have
        targets = getattr(model, "lora_default_targets", DEFAULT_TARGETS)
    return _apply(model, _check_settings({"r": r, "lora_alpha": alpha, "lora_dropout": dropout,
                                          "target_modules": targets, "base_dtype": base_dtype}))


def _apply(model, cfg, q4_0=()):
    """apply() of checked settings; the layers `q4_0` names are packed as q4_0 where base_dtype 'q4' packs q4_1."""
    if adapters(model):
        raise InputError("the model already has LoRA adapters (load_adapter replaces their values)")
    sites = _sites(model, cfg["r"], cfg["target_modules"])
    linears = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.Linear)]
    # weights already packed (a model loaded with base_dtype "q4" or "int8") stay as they are; the config says so
    kinds, held = _held_base(linears)
    if kinds:
        if cfg["base_dtype"] == "float32" and held:
            cfg = {**cfg, "base_dtype": held}
        elif cfg["base_dtype"] != held:
            raise InputError(f"LoRA base_dtype {cfg['base_dtype']!r}: this model's linear weights are packed already "
                             f"({', '.join(sorted(kinds))}: from_pretrained(..., base_dtype=...)); leave base_dtype out"
                             f"{f' or pass {held!r}' if held else ''}, or load the model as float32 for another base")
    floats = [(path, m) for path, m in linears if not isinstance(m.weight, QuantizedWeight)]
    half = [m.weight for _, m in floats] if cfg["base_dtype"] == "float16" else []
    for w in half:
        require_half_storage(w.backend, "use base_dtype='float32'")
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    try:   # every upload before the model changes: a device error half way leaves it as it was
        wrapped = [LoRALinear(child, cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) for *_, child in sites]
        halves = [w.backend.from_numpy(w.numpy().astype(np.float16)) for w in half]
        packed = [(m, _packed(path, m, "q4_0" if path in q4_0 else PACKED[cfg["base_dtype"]])) for path, m in floats
                  if cfg["base_dtype"] in PACKED]
    except BaseException:
        for p, flag in trainable:   # (LoRALinear froze its base)
            p.requires_grad = flag
        raise
    for p, _ in trainable:
        p.requires_grad = False
    for w, data in zip(half, halves):
        w.data = data
    for m, weight in packed:
        m.weight = weight
    for (_, module, name, child), layer in zip(sites, wrapped):
        layer.weight = child.weight   # (packed above: the wrapper took the float one)
        setattr(module, name, layer)
    model.lora_config = cfg
    return model


def _held_base(linears):
    """(the packed kinds among the (path, Linear) pairs' weights, the base_dtype they make or None if mixed)."""
    kinds = {m.weight.dtype for _, m in linears if isinstance(m.weight, QuantizedWeight)}
    return kinds, "int8" if kinds == {"int8"} else "q4" if kinds and kinds <= {"q4_0", "q4_1"} else None


def _packed(path, linear, kind):
    """linear's weight quantized as `kind` along its input (GPT-2's Conv1D (in, out): per output column)."""
    n_in, n_out = linear.weight.shape
    if n_in == 0:
        raise InputError(f"LoRA base_dtype: layer {path} has no inputs ({n_in} -> {n_out}): there is nothing to "
                         f"quantize along; use base_dtype 'float32' or 'float16'")
    try:
        return QuantizedWeight(quantize(linear.weight.numpy().T, kind), linear.weight.backend)
    except InputError as e:
        raise InputError(f"LoRA base_dtype: layer {path}: {e}") from None


def _file_settings(cfg, path, prefix=""):
    """_check_settings on a file's fields; errors name the file and the field."""
    try:
        return _check_settings(cfg, name=lambda key: f"field {prefix + key!r}")
    except KeyError as e:
        raise CheckpointError(f"{path}: missing field {prefix + e.args[0]!r}") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def checkpoint_config(model):
    """What a checkpoint's config.json records of the model's LoRA adapters (None without): the settings and
    their mode (merged, enabled)."""
    found = adapters(model)
    if not found:
        return None
    modes = {(m.merged, m.enabled) for _, m in found}
    if len(modes) > 1:
        raise InputError("LoRA adapters are merged or switched off in some layers only: lab.lora.merge / unmerge / "
                         "use_adapter set them all alike; do that before saving")
    (merged, enabled), = modes
    # a GGUF's Q4_0 layers: their saved values pack back to the same blocks as q4_0 only (as q4_1 they round again)
    q4_0 = [path for path, m in _linears(model) if getattr(m.weight, "dtype", None) == "q4_0"]
    # the frozen base's source (a Hub id): save_adapter names it after a resume too, as it did before the save
    base = getattr(model, "name_or_path", None)
    return {**model.lora_config, "merged": merged, "enabled": enabled, **({"q4_0": q4_0} if q4_0 else {}),
            **({"base_model_name_or_path": base} if isinstance(base, str) and base else {})}


def apply_config(model, cfg, path):
    """apply() as checkpoint_config recorded it, in the recorded mode (a merged adapter's update is already in the
    base weights the checkpoint holds, which are loaded next). Errors name `path` and the field."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: field 'lora' must be an object, got {show(cfg)}")
    settings = _file_settings({"lora_dropout": 0.0, "base_dtype": "float32", **cfg}, path, "lora.")
    modes = [cfg.get("merged", False), cfg.get("enabled", True)]
    for key, value in zip(("merged", "enabled"), modes):
        if not isinstance(value, bool):
            raise CheckpointError(f"{path}: field 'lora.{key}' must be true or false, got {show(value)}")
    kinds, held = _held_base(_linears(model))
    packed = sorted(kinds) or ([PACKED[settings["base_dtype"]]] if settings["base_dtype"] in PACKED else [])
    if packed and modes[0]:   # unmerge would write float values into the packed weights
        raise CheckpointError(f"{path}: the adapters are merged into this checkpoint's base weights (field "
                              f"'lora.merged'), which a packed base ({', '.join(packed)}) cannot take out "
                              f"again: load it with base_dtype 'float32' (and unmerge_adapter() before saving it for "
                              f"a quantized base)")
    if held:   # loaded with from_pretrained(..., base_dtype=): the adapters, trained on any base, go on that one
        settings["base_dtype"] = held
    q4_0 = cfg.get("q4_0", [])
    if not (isinstance(q4_0, list) and all(isinstance(p, str) for p in q4_0)):
        raise CheckpointError(f"{path}: field 'lora.q4_0' must be a list of layer paths, got {show(q4_0)}")
    base = cfg.get("base_model_name_or_path")
    if not (base is None or isinstance(base, str) and base):
        raise CheckpointError(f"{path}: field 'lora.base_model_name_or_path' must be a Hub id or a path, got "
                              f"{show(base)}")
    try:
        _apply(model, settings, set(q4_0) if settings["base_dtype"] == "q4" else ())
    except ValueError as e:  # settings that do not fit this model
        raise CheckpointError(f"{path}: {e}") from None
    for _, m in adapters(model):
        m.merged, m.enabled = modes
    if base:
        model.name_or_path = base
    return model


def adapters(model):
    """(path, LoRALinear) for every adapter in the model."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALinear)]


def _require_adapters(model):
    found = adapters(model)
    if not found:
        raise InputError("the model has no LoRA adapters: call lab.lora.apply(model, ...) first")
    return found


def _switchable(model, enabled):
    found = [m for _, m in _require_adapters(model)]
    if not enabled and any(m.merged for m in found):
        raise InputError("adapters are merged into the base weights: unmerge first to switch them off")
    return found


@_holding("lora.use_adapter", "; `with lora.adapter_enabled(model, on):` switches them in this thread only")
def use_adapter(model, enabled=True):
    """Switch every adapter on or off (the base weights are untouched either way)."""
    for m in _switchable(model, enabled):
        m.enabled = bool(enabled)
    return model


_switches = threading.local()  # adapter_enabled's switches in this thread: id(adapter module) -> on


@contextlib.contextmanager
def adapter_enabled(model, enabled):
    """Switch adapters on or off for the block, e.g. to compare base and adapter answers to one prompt. Only in the
    calling thread: a training thread stepping the same model meanwhile (TrainingPanel.start()) keeps them as set."""
    found = _switchable(model, enabled)
    previous = getattr(_switches, "on", {})
    _switches.on = {**previous, **{id(m): bool(enabled) for m in found}}
    try:
        yield model
    finally:
        _switches.on = previous


@_holding("lora.merge")
def merge(model):
    """Fold scale * A^T B^T into each base weight: same outputs, no adapter cost at inference. The base's values
    stay on the host (a copy of the adapted weights) until unmerge gives them back bit for bit. Refused, changing
    nothing, where a base is quantized (quantized_bases) or the adapters are switched off."""
    found = _require_adapters(model)
    off = [path for path, m in found if not (m.enabled and m._enabled)]   # (this thread's switch, or use_adapter's)
    if off:   # merged, they would change the outputs while they read as off (PEFT's forward unmerges them then)
        raise InputError(f"merge_adapter: refused: the adapters are switched off ({off[0]}, ...: use_adapter(False) "
                         f"or adapter_enabled); merging would fold their update into the base weights and turn "
                         f"them on. Nothing was changed: use_adapter(True) first to merge them")
    packed = quantized_bases(model)
    if packed:
        raise InputError(f"merge_adapter: refused: the base weights of {len(packed)} adapted layers are quantized "
                         f"({packed[0]}, ...); folding the update in would need them dequantized to float32 and "
                         f"quantized again, and the rounding would lose most of the update. Nothing was changed: "
                         f"keep the adapter unmerged (it runs beside the quantized base), or load the base with "
                         f"base_dtype='float32' and merge into that")
    for _, m in found:
        m.merge()
    return model


def quantized_bases(model):
    """Paths of the adapted layers whose frozen base holds packed weights (base_dtype "int8"/"q4"), which merge
    refuses."""
    return [path for path, m in adapters(model) if isinstance(m.weight, QuantizedWeight)]


@_holding("lora.unmerge")
def unmerge(model):
    for _, m in _require_adapters(model):
        m.unmerge()
    return model


def _peft_prefix(model):
    return getattr(model, "peft_prefix", "base_model.model.")


def save_adapter(model, directory, base_model_name_or_path=None):
    """Write adapter_model.safetensors and adapter_config.json in PEFT's format (loadable by
    peft.PeftModel.from_pretrained on the model exported with save_pretrained(format="hf")).
    base_model_name_or_path defaults to where lab.from_pretrained read the model (model.name_or_path: the Hub id,
    also for the shipped GGUF of a Hub model, or the local path)."""
    _require_adapters(model)   # before the directory is made
    with nn.step_lock(model), atomic_files(directory) as files:   # A and B of one step of a training thread
        write_adapter(model, files, base_model_name_or_path)
    return Path(directory)


def write_adapter(model, files, base_model_name_or_path=None, subdir=""):
    """The adapter's two files into a save's staging (io.atomic_files), in `subdir`/ when given: export
    writes the adapter with the base in one save, so an interrupted export never pairs a base with another's
    adapter."""
    found = _require_adapters(model)
    prefix = _peft_prefix(model)
    tensors = {}
    for path, m in found:
        tensors[f"{prefix}{path}.lora_A.weight"] = m.lora_A.numpy()
        tensors[f"{prefix}{path}.lora_B.weight"] = m.lora_B.numpy()
    cfg = dict(model.lora_config)
    targets = cfg["target_modules"]
    if isinstance(targets, str) and targets != ALL_LINEAR:   # PEFT reads a string as a pattern: the layers it took
        targets = [prefix[len("base_model.model."):] + path for path, _ in found]
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None)
    elif isinstance(base_model_name_or_path, os.PathLike):
        base_model_name_or_path = str(base_model_name_or_path)
    if base_model_name_or_path is not None and not (isinstance(base_model_name_or_path, str) and
                                                    base_model_name_or_path):
        raise InputError(f"save_adapter: base_model_name_or_path must be a Hub id, a path or None, got "
                         f"{show(base_model_name_or_path)}")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg["r"], "lora_alpha": cfg["lora_alpha"],
        "lora_dropout": cfg["lora_dropout"], "target_modules": targets,
        # GPT-2's Conv1D stores weights (in, out), as lab's Linear does; torch.nn.Linear (Llama's) (out, in)
        "fan_in_fan_out": getattr(model, "peft_fan_in_fan_out", False),
        "bias": "none", "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "use_rslora": False, "use_dora": False,
    }
    where = f"{subdir}/" if subdir else ""
    files.write_tensors(where + ADAPTER_FILE, tensors, metadata={"format": "pt"})
    files.write_json(where + ADAPTER_CONFIG, config)


@_holding("lora.load_adapter")
def load_adapter(model, directory):
    """Load a PEFT LoRA adapter (saved by lab or by PEFT) into `model`, applying LoRA first if needed. The config
    and every tensor (name, shape, dtype, finite values) are checked before anything changes, so a failed load
    leaves the model as it was. The adapters keep their mode: on a merged model the old update is taken out of
    the base weights and the loaded one folded in."""
    d = directory_path(directory, "load")
    cpath, tpath = d / ADAPTER_CONFIG, d / ADAPTER_FILE
    with reading(d):   # the config and the tensors of one save_adapter, not of two
        cfg, tensors = read_json(cpath, "adapter config"), read_safetensors(tpath)
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{cpath}: peft_type is {cfg.get('peft_type')!r}, expected 'LORA'")
    unsupported = {k: cfg[k] for k in UNSUPPORTED if cfg.get(k) not in (None, *UNSUPPORTED[k])}
    if unsupported:   # each would change what the adapter computes: loaded without it, the logits would differ
        raise CheckpointError(f"{cpath}: unsupported PEFT options {unsupported}: lab loads plain LoRA adapters "
                              f"(bias 'none', no DoRA/rsLoRA, no modules_to_save or trainable tokens, one rank and "
                              f"alpha for every layer, target_modules without exclusions or layer selections)")
    found = adapters(model)
    base_dtype = model.lora_config.get("base_dtype", "float32") if found else "float32"
    settings = _file_settings({**cfg, "lora_dropout": cfg.get("lora_dropout") or 0.0, "base_dtype": base_dtype},
                              cpath)
    r, prefix = settings["r"], _peft_prefix(model)
    if found and r != model.lora_config["r"]:   # the shape check below blamed another base
        raise CheckpointError(f"{cpath}: the adapter has rank r={r}, this model's adapters r="
                              f"{model.lora_config['r']}: load_adapter replaces the values of adapters of the same "
                              f"rank; load it into the model without adapters (it applies r={r} itself)")
    if found:
        shapes = {f"{prefix}{path}.lora_{ab}.weight": getattr(m, f"lora_{ab}").shape for path, m in found
                  for ab in "AB"}
    else:
        try:
            sites = _sites(model, r, settings["target_modules"])
        except ValueError as e:  # an adapter config that does not fit this model
            raise CheckpointError(f"{cpath}: {e}") from None
        shapes = {}
        for path, _, _, linear in sites:
            n_in, n_out = linear.weight.shape
            shapes[f"{prefix}{path}.lora_A.weight"], shapes[f"{prefix}{path}.lora_B.weight"] = (r, n_in), (n_out, r)
    values = _adapter_tensors(tensors, shapes, tpath)
    if not found:
        _apply(model, settings)
    # every upload first, so the swaps below do not stop halfway on a device error
    new = [(m, *(m.lora_A.backend.from_numpy(values[f"{prefix}{path}.lora_{ab}.weight"]) for ab in "AB"))
           for path, m in adapters(model)]
    for m, a, b in new:
        merged = m.merged
        m.unmerge()
        m.lora_A.data, m.lora_B.data = a, b
        m.alpha, m.dropout, m.scale = settings["lora_alpha"], settings["lora_dropout"], settings["lora_alpha"] / r
        if merged:
            m.merge()
    model.lora_config = settings
    return model


def _adapter_tensors(tensors, shapes, path):
    """The file's tensors under lab's names, as float32, once every name, shape, dtype and value is right."""
    named = {}
    for key, value in tensors.items():
        name = key.replace(".default.weight", ".weight")  # PEFT names the adapter ("default") in some versions
        if name in named:
            raise CheckpointError(f"{path}: two tensors for {name!r} (with and without '.default')")
        named[name] = value
    diff = mismatch(shapes, named)
    if diff:
        raise CheckpointError(f"{path}: adapter tensors do not match the model: {diff}")
    check_floats(named, path)
    for name, shape in shapes.items():
        if tuple(named[name].shape) != shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(named[name].shape)}, this model needs "
                                  f"{shape} (an adapter for a different base?)")
    return {name: np.asarray(value, dtype=np.float32) for name, value in named.items()}


# PEFT options lab does not implement -> the values that mean "not used" (None counts as not used too)
UNSUPPORTED = {"bias": ("none",), "use_rslora": (False,), "use_dora": (False,), "modules_to_save": ([],),
               "trainable_token_indices": ({}, []), "rank_pattern": ({},), "alpha_pattern": ({},),
               "layers_to_transform": ([],), "exclude_modules": ([], ""), "target_parameters": ([],),
               "lora_bias": (False,), "use_qalora": (False,), "layer_replication": ([],),
               "alora_invocation_tokens": ([],), "arrow_config": ({},), "use_bdlora": (False,)}


class Adapters:
    """The adapter methods of a model that supports LoRA (a mixin beside nn.Module): the layers below know nothing
    of adapters. `peft_prefix` is where PEFT's files name the model's weights, `peft_head` transformers' name of
    the output head ("all-linear" leaves it out, as PEFT does)."""
    peft_prefix = "base_model.model."
    peft_head = "lm_head"
    peft_fan_in_fan_out = False
    lora_default_targets = ALL_LINEAR   # apply's targets when none are given

    peft_embedding = "model.embed_tokens"

    def tied_embedding(self):
        """The path of the embedding whose weight is also the output head's (transformers' tie_word_embeddings),
        or None: a head of its own."""
        return self.peft_embedding if getattr(self.config, "tie_word_embeddings", False) else None

    def use_adapter(self, enabled=True):
        return use_adapter(self, enabled)

    def save_adapter(self, directory, base_model_name_or_path=None):
        return save_adapter(self, directory, base_model_name_or_path)

    def merge_adapter(self):
        return merge(self)

    def unmerge_adapter(self):
        return unmerge(self)
