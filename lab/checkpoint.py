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
import math
from pathlib import Path

import numpy as np

from .checks import InputError, integer, real, show
# the file I/O moved to lab.io; its names stay importable from here, where users and tests have always found them
from .data import load_tokenizer_file as load_tokenizer  # noqa: F401  (its name here since the first version)
from .io import (JOURNAL_FILE, REMOVABLE, CheckpointError, NonFiniteSaveError, _metadata, atomic_files,  # noqa: F401
                 check_floats, check_save_target, finish_interrupted_save, mismatch, read_json, read_safetensors,
                 reading)
# a model directory (config.json + model.safetensors) belongs to the model family, which reads and writes it
from .models.transformer import (CONFIG_FILE, MODEL_FILE, _config_from_hf, _load_into, _write_model,  # noqa: F401
                                 hf_config, save_pretrained)
from .models import load_pretrained   # any family, by config.json

TOKENIZER_FILE, OPTIMIZER_FILE, STATE_FILE = "tokenizer.json", "optimizer.safetensors", "trainer_state.json"


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
    from .data import TOKENIZER_SIDE_FILES, write_tokenizer
    from .engine.random import get_state
    if not callable(getattr(tokenizer, "write", None)) and not callable(getattr(tokenizer, "save", None)):
        raise InputError(f"save_checkpoint: tokenizer must be a lab tokenizer (CharTokenizer, BPETokenizer) or a "
                         f"pretrained one (lab.load_tokenizer): a checkpoint holds the tokenizer its model was "
                         f"trained with, got {show(tokenizer)}")
    if trainer is not None and getattr(trainer, "model", None) is not model:
        raise InputError(f"save_checkpoint: trainer must be the Trainer training this model (its optimizer state "
                         f"belongs to the trainer's model), got {show(trainer)}")
    # between the steps of the model's trainers (nn.step_lock): a trainer stepping in another thread (a panel's)
    # would otherwise change the weights or moments while they are read, mixing step k and step k+1
    from .nn import step_lock
    # a pretrained tokenizer's side files go unless this tokenizer writes its own: transformers reads them over
    # tokenizer_config.json, so they would dress the new tokenizer in the old one's template and special tokens
    remove = (OPTIMIZER_FILE, STATE_FILE, *TOKENIZER_SIDE_FILES, *remove)
    with step_lock(model), atomic_files(directory, remove=remove) as files:
        model.write_files(files, "lab")   # in its family's layout
        write_tokenizer(files, tokenizer)
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
                # the log records after the resume carry it until the next evaluation, as the run's would
                "last_val_loss": trainer.last_val_loss,
            })
        yield files


def tokenizer_of(directory, model):
    """The tokenizer `directory` carries (lab.data.tokenizer_from_directory), checked against the model: lab's own
    have exactly the model's vocabulary; a pretrained one may have fewer ids than the model has embeddings."""
    from .data import CharTokenizer, lab_tokenizer_file, tokenizer_from_directory
    from .data.bpe import BPETokenizer
    d = Path(directory)
    if lab_tokenizer_file(d) is None and (d / "tokenizer_config.json").is_file():
        from .data.pretrained import load_tokenizer as load_pretrained_tokenizer
        tokenizer = load_pretrained_tokenizer(d)
    else:
        tokenizer = tokenizer_from_directory(d)
    n, vocab = getattr(tokenizer, "vocab_size", None), model.config.vocab_size
    own = isinstance(tokenizer, (CharTokenizer, BPETokenizer))
    if isinstance(n, int) and (n > vocab or own and n != vocab):
        raise CheckpointError(f"{d}: the tokenizer has a vocabulary of {n} tokens, but the model has vocab_size "
                              f"{vocab}")
    return tokenizer


def load_checkpoint(directory):
    """(model, tokenizer, state) of a training checkpoint; state is None when it holds no trainer state. A
    caller reading more of it (the optimizer state: Trainer.resume) holds reading(directory) across both."""
    with reading(directory):   # model, tokenizer and trainer state of one save
        return _load_checkpoint(Path(directory))


def _load_checkpoint(d):
    model = load_pretrained(d)
    tokenizer = tokenizer_of(d, model)
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
        if name.split(".", 1)[0] in opt.nonnegative and (np.asarray(arrays[name]) < 0).any():
            raise CheckpointError(f"{d / OPTIMIZER_FILE}: tensor {name!r} holds negative values (lowest "
                                  f"{np.asarray(arrays[name]).min():g}), where the optimizer keeps averages of "
                                  f"squares: a damaged or edited file")
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
        # older checkpoints: the last logged record's (the evaluation's, unless one came after the last log)
        last_val = state.get("last_val_loss", next((r.get("val_loss") for r in reversed(history)), None))
        last_val = None if last_val is None else real("last_val_loss", last_val)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"{d / STATE_FILE}: incomplete or invalid trainer state ({e})") from None
    for name in own:
        opt.load_state_array(name, arrays[name])
    (opt.step_count, trainer.step_num), trainer.history = steps, history
    trainer.best_val_loss, trainer._evals_without_gain, trainer.last_val_loss = best, without_gain, last_val
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
