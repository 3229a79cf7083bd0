"""Saving and loading models and training runs.

A model directory holds model.safetensors (metadata {"format": "pt"}) and config.json, in lab's own layout or in
Hugging Face's GPT-2 layout (loadable by transformers' GPT2LMHeadModel). A training checkpoint adds the
tokenizer, the optimizer state and trainer_state.json (step, RNG states, config, history), so a resumed run
continues with exactly the losses of an uninterrupted one.

A save writes and replaces only its own files inside the directory (atomic_files), as transformers does: other
files there, and the directory itself, stay as they were; an interrupted save leaves either the previous files or
the new ones, all of them from one save.
"""
import contextlib
import json
import math
from pathlib import Path

import numpy as np

from .checks import InputError, integer, real, show
# the file I/O moved to lab.io; its names stay importable from here, where users and tests have always found them
from .io import (JOURNAL_FILE, REMOVABLE, CheckpointError, NonFiniteSaveError, _metadata, atomic_files,  # noqa: F401
                 check_floats, check_save_target, finish_interrupted_save, mismatch, read_json, read_safetensors,
                 reading)

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"
TOKENIZER_FILE, OPTIMIZER_FILE, STATE_FILE = "tokenizer.json", "optimizer.safetensors", "trainer_state.json"


def _load_into(model, tensors, path):
    """Copy a file's tensors (finite, read_safetensors checked) into the model: they must be floats, then names
    and shapes must match (Module.load_state_dict); every error names the file and the tensor."""
    check_floats(tensors, path)
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
        if data.get("n_inner") is not None and data["n_inner"] != 4 * n_embd:
            raise CheckpointError(f"{path}: n_inner={data['n_inner']} is not supported (lab's MLP is 4 x n_embd)")
        act = data.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(f"{path}: activation_function {act!r} is not supported (lab uses gelu_new)")
        eps = data.get("layer_norm_epsilon", 1e-5)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or abs(eps - 1e-5) > 1e-12:
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
    except CheckpointError:  # already names the file (it is a ValueError: keep it from being wrapped again)
        raise
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
        raise InputError(f"unknown format {format!r}: expected 'lab' or 'hf'")
    from .nn import step_lock
    with step_lock(model), atomic_files(directory) as files:   # between a training thread's steps
        _write_model(model, files, format)
    return Path(directory)


def _write_model(model, files, format):
    """Lab's layout holds the whole model: LoRA adapters too, their settings and mode in config.json's "lora", so
    a checkpoint resumes a LoRA run. The GPT-2 layout holds the base only (transformers has no adapters; PEFT's
    format, lab.lora.save_adapter, does), with a merged adapter's update inside its weights."""
    from .lora import checkpoint_config
    cfg = model.config
    lora = checkpoint_config(model) if format == "lab" else None
    tensors = {k: v for k, v in model.state_dict().items() if lora or ".lora_" not in k}
    if format == "lab":
        files.write_tensors(MODEL_FILE, tensors, metadata={"format": "pt"})
        files.write_json(CONFIG_FILE, {"model_type": "lab-transformer", **cfg.to_dict(), **({"lora": lora} if lora
                                                                                              else {})})
        return
    out = {f"transformer.{k}": v for k, v in tensors.items()}
    if cfg.positions == "sinusoidal":  # GPT-2 has a learned table: export the fixed one's values
        out["transformer.wpe.weight"] = model._positions.numpy()
    if not cfg.bias:                    # GPT-2 always has biases: zeros are the same function
        for name, p in model.named_parameters():
            if name.endswith(".weight") and name.rsplit(".", 2)[-2] in ("ln_1", "ln_2", "ln_f", "c_attn", "c_proj", "c_fc"):
                out[f"transformer.{name[:-len('weight')]}bias"] = np.zeros(p.shape[-1], dtype=np.float32)
    files.write_tensors(MODEL_FILE, out, metadata={"format": "pt"})
    files.write_json(CONFIG_FILE, hf_config(cfg))


def load_pretrained(directory):
    """A TransformerLM, in eval mode, from a directory in lab's layout or the GPT-2 layout (from config.json)."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise CheckpointError(f"{d}: is a file, not a checkpoint directory (one holding {CONFIG_FILE} and "
                              f"{MODEL_FILE})")
    if not d.is_dir():
        raise CheckpointError(f"{d}: no such checkpoint directory")
    with reading(d):   # config.json and model.safetensors of one save
        return _load_pretrained(d)


def _load_pretrained(d):
    from .models.transformer import TransformerConfig, TransformerLM
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
    if kind == "lab-transformer" and data.get("lora") is not None:   # a LoRA run: its adapters are in the file
        from .lora import apply_config
        apply_config(model, data["lora"], d / CONFIG_FILE)
    _load_into(model, tensors, d / MODEL_FILE)
    return model.eval()  # as transformers does: dropout stays off until model.train()


# ------------------------------------------------------------------------------------------------ training runs

def save_checkpoint(directory, model, tokenizer, trainer=None):
    """Model, tokenizer and (with a trainer) optimizer state, step, RNG states and history, atomically. Without a
    trainer, the optimizer and trainer state of an earlier save there are removed: they belong to other weights."""
    with checkpoint_files(directory, model, tokenizer, trainer):
        pass
    return Path(directory)


@contextlib.contextmanager
def checkpoint_files(directory, model, tokenizer, trainer=None, remove=()):
    """save_checkpoint as a save the caller adds files to (atomic_files' staging, yielded), all landing at once:
    import_model writes the adapter beside the model in the same save."""
    from .engine.random import get_state
    if not callable(getattr(tokenizer, "to_json", None)):
        raise InputError(f"save_checkpoint: tokenizer must be a lab tokenizer (CharTokenizer, BPETokenizer: a "
                         f"checkpoint holds the tokenizer its model was trained with), got {show(tokenizer)}")
    if trainer is not None and getattr(trainer, "model", None) is not model:
        raise InputError(f"save_checkpoint: trainer must be the Trainer training this model (its optimizer state "
                         f"belongs to the trainer's model), got {show(trainer)}")
    # between the steps of the model's trainers (nn.step_lock): a trainer stepping in another thread (a panel's)
    # would otherwise change the weights or moments while they are read, mixing step k and step k+1
    from .nn import step_lock
    with step_lock(model), atomic_files(directory, remove=(OPTIMIZER_FILE, STATE_FILE, *remove)) as files:
        _write_model(model, files, "lab")
        files.write_text(TOKENIZER_FILE, tokenizer.to_json())
        if trainer is not None:
            opt = trainer.optimizer
            arrays = {k: opt.backend.to_numpy(a) for k, a in opt.state_arrays().items()}
            files.write_tensors(OPTIMIZER_FILE, arrays, metadata={"format": "pt", "step": str(opt.step_count)})
            files.write_json(STATE_FILE, {
                "step": trainer.step_num, "optimizer_step": opt.step_count, "train_config": trainer.config_dict(),
                "batch_rng": trainer.rng.bit_generator.state, "global_rng": get_state(),
                "seed_rng": trainer.seed_rng.bit_generator.state, "history": trainer.history,
                # a resumed run with early stopping stops where the uninterrupted one would (None: no evaluation yet)
                "early_stopping": {"best_val_loss": trainer.best_val_loss,
                                   "evals_without_gain": trainer._evals_without_gain},
            })
        yield files


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
    """(model, tokenizer, state) of a training checkpoint; state is None when it holds no trainer state. A
    caller reading more of it (the optimizer state: Trainer.resume) holds reading(directory) across both."""
    with reading(directory):   # model, tokenizer and trainer state of one save
        return _load_checkpoint(Path(directory))


def _load_checkpoint(d):
    model = load_pretrained(d)
    tokenizer = load_tokenizer(d / TOKENIZER_FILE)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise CheckpointError(f"{d / TOKENIZER_FILE}: vocabulary of {tokenizer.vocab_size} tokens, but the model "
                              f"has vocab_size {model.config.vocab_size}")
    state = read_json(d / STATE_FILE, "trainer state") if (d / STATE_FILE).exists() else None
    return model, tokenizer, state


def restore_trainer(trainer, directory, state):
    """Put optimizer moments, step counters, RNG states and history from a checkpoint into `trainer`: all of it is
    checked first, so a checkpoint that does not fit leaves the trainer as it was."""
    from .engine.random import set_state
    d = Path(directory)
    opt = trainer.optimizer
    arrays = _named_state(read_safetensors(d / OPTIMIZER_FILE), opt)
    check_floats(arrays, d / OPTIMIZER_FILE)
    own = opt.state_arrays()
    diff = mismatch(own, arrays)
    if diff:
        raise CheckpointError(f"{d / OPTIMIZER_FILE}: the optimizer state does not match this optimizer's "
                              f"parameters: {diff}")
    for name, target in own.items():
        if tuple(arrays[name].shape) != tuple(target.shape):
            raise CheckpointError(f"{d / OPTIMIZER_FILE}: tensor {name!r} has shape {tuple(arrays[name].shape)}, "
                                  f"expected {tuple(target.shape)}")
    try:
        steps = _checked_steps(state)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"{d / STATE_FILE}: incomplete or invalid trainer state ({e})") from None
    saved_at = _metadata(d / OPTIMIZER_FILE).get("step")   # written by save_checkpoint since the first version
    if saved_at is not None and saved_at != str(steps[0]):
        raise CheckpointError(f"{d / OPTIMIZER_FILE}: optimizer state of optimizer step {saved_at}, but "
                              f"{d / STATE_FILE} is at optimizer step {steps[0]}: the two files are from different "
                              f"saves (copied from another checkpoint?)")
    try:
        batch_rng, global_rng, seed_rng = (np.random.default_rng() for _ in range(3))
        batch_rng.bit_generator.state, global_rng.bit_generator.state = state["batch_rng"], state["global_rng"]
        # the dropout seeds' stream; a checkpoint saved before trainers had one drew them from the global generator
        seed_rng.bit_generator.state = state.get("seed_rng", state["global_rng"])
        history = state.get("history", [])
        if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
            raise ValueError(f"history must be a list of records, got {show(history)}")
        stopping = state.get("early_stopping", {"best_val_loss": None, "evals_without_gain": 0})   # older: none
        best = stopping["best_val_loss"]   # JSON has no Infinity: None before the first evaluation
        best = math.inf if best is None else real("early_stopping.best_val_loss", best)
        without_gain = integer("early_stopping.evals_without_gain", stopping["evals_without_gain"], low=0)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"{d / STATE_FILE}: incomplete or invalid trainer state ({e})") from None
    for name in own:
        opt.load_state_array(name, arrays[name])
    (opt.step_count, trainer.step_num), trainer.history = steps, history
    trainer.best_val_loss, trainer._evals_without_gain = best, without_gain
    trainer.rng.bit_generator.state = batch_rng.bit_generator.state
    trainer.seed_rng.bit_generator.state = seed_rng.bit_generator.state
    set_state(global_rng.bit_generator.state)


def _checked_steps(state):
    """(optimizer_step, step): counts of steps taken, so non-negative integers, and the optimizer steps once per
    trainer step at most (a damaged -1 would make Adam's bias correction divide by zero)."""
    step = integer("step", state["step"], low=0)
    optimizer_step = integer("optimizer_step", state["optimizer_step"], low=0)
    if optimizer_step > step:
        raise ValueError(f"optimizer_step must be <= step, got optimizer_step {optimizer_step} and step {step}")
    for name in ("batch_rng", "global_rng", "seed_rng"):
        rng = state.get(name, {"bit_generator": "PCG64", "state": {"state": 0, "inc": 1}})
        words = rng.get("state") if isinstance(rng, dict) else None
        if (not isinstance(words, dict) or rng.get("bit_generator") != "PCG64"
                or not all(isinstance(words.get(k), int) and 0 <= words[k] < 2**128 for k in ("state", "inc"))):
            raise ValueError(f"{name} must be a numpy PCG64 state, got {show(rng)}")
    return optimizer_step, step


def _named_state(arrays, opt):
    """Checkpoints written before the optimizer state was keyed by parameter name hold m.0, v.0, ... in the
    optimizer's order of parameters (unchanged since): that order gives each its name."""
    keys = [k.split(".", 1) for k in arrays]
    if all(len(k) == 2 and k[1].isdecimal() and int(k[1]) < len(opt.names) for k in keys):
        return {f"{kind}.{opt.names[int(i)]}": v for (kind, i), v in zip(keys, arrays.values())}
    return arrays
