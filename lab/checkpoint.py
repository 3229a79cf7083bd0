"""Saving and loading models and training runs.

A model directory holds model.safetensors (metadata {"format": "pt"}) and config.json, in lab's own layout or in
Hugging Face's GPT-2 layout (loadable by transformers' GPT2LMHeadModel). A training checkpoint adds the
tokenizer, the optimizer state and trainer_state.json (step, RNG states, config, history), so a resumed run
continues with exactly the losses of an uninterrupted one.

Writes are atomic per directory: everything goes to a temporary sibling directory which then takes the target's
place, so an interrupted save leaves the previous checkpoint whole.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"
TOKENIZER_FILE, OPTIMIZER_FILE, STATE_FILE = "tokenizer.json", "optimizer.safetensors", "trainer_state.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match the model."""


# ------------------------------------------------------------------------------------------------ atomic writes

class _AtomicDir:
    """Context manager: yields a temporary directory; on success it replaces `target`."""

    def __init__(self, target):
        self.target = Path(target)

    def __enter__(self):
        self.target.parent.mkdir(parents=True, exist_ok=True)
        recover_interrupted_save(self.target)
        self.tmp = Path(tempfile.mkdtemp(dir=self.target.parent, prefix=f".{self.target.name}.tmp-"))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def recover_interrupted_save(target):
    """A save killed between moving the previous directory aside and moving the new one in leaves the previous
    one as .NAME.old-PID next to where it was: put it back. (A save killed earlier leaves the target untouched.)"""
    target = Path(target)
    if target.exists():
        return
    olds = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds:
        os.replace(olds[-1], target)


def _write_json(path, data):
    Path(path).write_text(json.dumps(data, indent=2), encoding="utf-8")


# ------------------------------------------------------------------------------------------------ reading

def read_json(path, what):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(path):
    """All tensors of a safetensors file as float32/int numpy arrays; errors name the file and the tensor."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    out = {}
    try:
        with safe_open(str(path), framework="np") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return out


def _load_into(model, tensors, path):
    """Copy a file's tensors into the model: they must be finite floats (a file is not trusted), then names and
    shapes must match (Module.load_state_dict); every error names the file and the tensor."""
    for name, value in tensors.items():
        if value.dtype.kind != "f":
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {value.dtype}, expected a float type")
        if not np.isfinite(value).all():
            raise CheckpointError(f"{path}: tensor {name!r} contains NaN or Inf")
    model.load_state_dict(tensors, source=str(path), error=CheckpointError)


# ------------------------------------------------------------------------------------------------ GPT-2 layout

def hf_config(cfg):
    """config.json of the GPT-2 layout, as transformers' GPT2Config reads it."""
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "n_inner": None, "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "tie_word_embeddings": True,
        "bos_token_id": cfg.vocab_size - 1, "eos_token_id": cfg.vocab_size - 1,
    }


def _config_from_hf(data, path):
    from .models.transformer import TransformerConfig
    try:
        n_embd = data["n_embd"]
        if not isinstance(n_embd, int) or data.get("n_inner") not in (None, 4 * n_embd):
            raise CheckpointError(f"{path}: n_inner={data['n_inner']} is not supported (lab's MLP is 4 x n_embd)")
        act = data.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(f"{path}: activation_function {act!r} is not supported (lab uses gelu_new)")
        eps = data.get("layer_norm_epsilon", 1e-5)
        if abs(eps - 1e-5) > 1e-12:
            raise CheckpointError(f"{path}: layer_norm_epsilon {eps} is not supported (lab uses 1e-5)")
        if data.get("tie_word_embeddings", True) is False:
            raise CheckpointError(f"{path}: untied output heads are not supported (lab ties the head to wte)")
        # lab's attention always scales scores by 1/sqrt(head_dim): other scalings would load with wrong logits
        for flag, lab_value in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
            if data.get(flag, lab_value) is not lab_value:
                raise CheckpointError(f"{path}: {flag}={json.dumps(data[flag])} is not supported (lab's attention "
                                      f"computes {flag}={json.dumps(lab_value)}: scores scaled by 1/sqrt(head_dim))")
        return TransformerConfig(vocab_size=data["vocab_size"], block_size=data["n_positions"], n_layer=data["n_layer"],
                                 n_head=data["n_head"], n_embd=n_embd, dropout=data.get("resid_pdrop") or 0.0,
                                 bias=True, positions="learned")
    except KeyError as e:
        raise CheckpointError(f"{path}: GPT-2 config is missing the field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid GPT-2 config ({e})") from None


# ------------------------------------------------------------------------------------------------ models

def _check_size(cfg, tensors, d):
    """Refuse a config that describes a bigger model than the weights file holds, before allocating it: a damaged
    or hostile config.json (n_embd = 10^9) must not make lab allocate more than the file justifies."""
    from .plan.estimator import count_params
    params, _ = count_params(cfg)
    if cfg.positions == "sinusoidal":   # a fixed (block_size, n_embd) table, allocated but not stored
        params += cfg.block_size * cfg.n_embd
    stored = sum(int(np.prod(v.shape)) for v in tensors.values())
    if params > 4 * stored + (1 << 20):  # slack for small mismatches, which the per-tensor check names precisely
        raise CheckpointError(f"{d / CONFIG_FILE}: describes a model of {params:,} parameters, but {d / MODEL_FILE} "
                              f"holds {stored:,} values: the config does not belong to these weights")


def save_pretrained(model, directory, format="lab"):
    """Write model.safetensors + config.json. format="hf" writes the GPT-2 layout transformers loads."""
    if format not in ("lab", "hf"):
        raise ValueError(f"unknown format {format!r}: expected 'lab' or 'hf'")
    with _AtomicDir(directory) as tmp:
        _write_model(model, tmp, format)
    return Path(directory)


def _write_model(model, d, format):
    cfg = model.config
    # the base model only: LoRA adapters travel separately (lab.lora.save_adapter), and a merged adapter's
    # update is inside the base weights already
    tensors = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    if format == "lab":
        save_file(tensors, str(d / MODEL_FILE), metadata={"format": "pt"})
        _write_json(d / CONFIG_FILE, {"model_type": "lab-transformer", **cfg.to_dict()})
        return
    out = {f"transformer.{k}": v for k, v in tensors.items()}
    if cfg.positions == "sinusoidal":  # GPT-2 has a learned table: export the fixed one's values
        out["transformer.wpe.weight"] = model._positions.numpy()
    if not cfg.bias:                    # GPT-2 always has biases: zeros are the same function
        for name, p in model.named_parameters():
            if name.endswith(".weight") and name.rsplit(".", 2)[-2] in ("ln_1", "ln_2", "ln_f", "c_attn", "c_proj", "c_fc"):
                out[f"transformer.{name[:-len('weight')]}bias"] = np.zeros(p.shape[-1], dtype=np.float32)
    save_file(out, str(d / MODEL_FILE), metadata={"format": "pt"})
    _write_json(d / CONFIG_FILE, hf_config(cfg))


def load_pretrained(directory):
    """A TransformerLM, in eval mode, from a directory in lab's layout or the GPT-2 layout (from config.json)."""
    from .models.transformer import TransformerConfig, TransformerLM
    d = Path(directory)
    recover_interrupted_save(d)
    if not d.is_dir():
        raise CheckpointError(f"{d}: no such checkpoint directory")
    data = read_json(d / CONFIG_FILE, "model config")
    kind = data.get("model_type")
    tensors = read_safetensors(d / MODEL_FILE)
    if kind == "gpt2":
        cfg = _config_from_hf(data, d / CONFIG_FILE)
        if "lm_head.weight" in tensors and not np.array_equal(tensors["lm_head.weight"], tensors.get("transformer.wte.weight")):
            raise CheckpointError(f"{d / MODEL_FILE}: lm_head.weight differs from transformer.wte.weight (untied head)")
        tensors = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in tensors.items()
                   if k != "lm_head.weight" and not k.endswith((".attn.bias", ".attn.masked_bias"))}
    elif kind == "lab-transformer":
        fields = {k: v for k, v in data.items() if k in TransformerConfig.__dataclass_fields__}
        try:
            cfg = TransformerConfig(**fields)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{d / CONFIG_FILE}: invalid model config ({e})") from None
    else:
        raise CheckpointError(f"{d / CONFIG_FILE}: unknown model_type {kind!r} (expected 'lab-transformer' or 'gpt2')")
    _check_size(cfg, tensors, d)
    model = TransformerLM(cfg)
    _load_into(model, tensors, d / MODEL_FILE)
    return model.eval()  # as transformers does: dropout stays off until model.train()


# ------------------------------------------------------------------------------------------------ training runs

def save_checkpoint(directory, model, tokenizer, trainer=None):
    """Model, tokenizer and (with a trainer) optimizer state, step, RNG states and history, atomically."""
    from .engine.random import get_state
    with _AtomicDir(directory) as tmp:
        _write_model(model, tmp, "lab")
        (tmp / TOKENIZER_FILE).write_text(tokenizer.to_json(), encoding="utf-8")
        if trainer is not None:
            opt = trainer.optimizer
            arrays = {k: opt.backend.to_numpy(a) for k, a in opt.state_arrays().items()}
            save_file(arrays, str(tmp / OPTIMIZER_FILE), metadata={"format": "pt", "step": str(opt.step_count)})
            _write_json(tmp / STATE_FILE, {
                "step": trainer.step_num, "optimizer_step": opt.step_count, "train_config": trainer.config_dict(),
                "batch_rng": trainer.rng.bit_generator.state, "global_rng": get_state(), "history": trainer.history,
            })
    return Path(directory)


def load_tokenizer(path):
    from .data import load_tokenizer_json
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer file not found")
    try:
        return load_tokenizer_json(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_checkpoint(directory):
    """(model, tokenizer, state) of a training checkpoint; state is None when it holds no trainer state."""
    d = Path(directory)
    model = load_pretrained(d)
    tokenizer = load_tokenizer(d / TOKENIZER_FILE)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise CheckpointError(f"{d / TOKENIZER_FILE}: vocabulary of {tokenizer.vocab_size} tokens, but the model "
                              f"has vocab_size {model.config.vocab_size}")
    state = read_json(d / STATE_FILE, "trainer state") if (d / STATE_FILE).exists() else None
    return model, tokenizer, state


def restore_trainer(trainer, directory, state):
    """Put optimizer moments, step counters, RNG states and history from a checkpoint into `trainer`."""
    from .engine.random import set_state
    d = Path(directory)
    arrays = read_safetensors(d / OPTIMIZER_FILE)
    opt = trainer.optimizer
    own = opt.state_arrays()
    if set(arrays) != set(own):
        raise CheckpointError(f"{d / OPTIMIZER_FILE}: optimizer state has tensors {sorted(arrays)[:4]}..., "
                              f"this optimizer needs {sorted(own)[:4]}...")
    for name, target in own.items():
        value = arrays[name]
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"{d / OPTIMIZER_FILE}: tensor {name!r} has shape {tuple(value.shape)}, "
                                  f"expected {tuple(target.shape)}")
        opt.load_state_array(name, value)
    try:
        opt.step_count = int(state["optimizer_step"])
        trainer.step_num = int(state["step"])
        trainer.rng.bit_generator.state = state["batch_rng"]
        set_state(state["global_rng"])
        trainer.history = list(state.get("history", []))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{d / STATE_FILE}: incomplete or invalid trainer state ({e})") from None
