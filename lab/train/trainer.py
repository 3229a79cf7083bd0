"""The training loop: AdamW, warmup + cosine learning rate, global-norm clipping, periodic evaluation.

One training step records forward, backward, clipping and the optimizer update without reading anything
back, so on the wgpu backend it is a single submit; the loss is read only on logging steps.
"""
import contextlib
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from ..checks import InputError, choice, integer, real, show
from ..data import IGNORE_INDEX, Examples, get_batch, min_tokens
from ..engine.random import draw_from, generator, own_stream
from ..engine.tensor import is_grad_enabled, no_grad
from ..nn import Blocks, checkpoint_interval, checkpointing, evaluating, in_use, step_lock
from .faults import NonFiniteError, first_nonfinite
from .optim import AdamW, grad_norm
from .replay import Recorded, StepReplay, recording_seeds, upload_batches


@dataclass
class TrainConfig:
    steps: int = 500
    batch_size: int = 12
    block_size: int = 0                # tokens per training sequence (0: the model's block_size; at most that)
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.99)
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    grad_accum_steps: int = 1          # micro-batches per optimizer step (effective batch = batch_size x this)
    early_stopping_patience: int = 0   # stop after this many evaluations without a better val loss (0: never)
    early_stopping_min_delta: float = 0.0
    max_seconds: float = 0.0           # stop once training has run this long (0: no limit)
    nonfinite: str = "stop"            # a NaN/Inf step (always skipped on the device): "stop" training, or "skip" it
    check_finite_every: int = 1        # run() reads the loss and gradient norm this often to detect NaN/Inf (0: never)
    checkpoint_dir: str = ""           # run() saves a checkpoint here (atomically) ...
    checkpoint_every: int = 0          # ... every this many steps and at the end (0: only at the end)
    replay_steps: bool = True          # wgpu: capture a step's dispatches, replay them for later steps (replay.py)
    checkpoint_activations: int = 0    # True/1: keep only each block's input, recompute the block in the backward;
                                       # k: every k-th block (0/False: the model's own gradient_checkpointing)

    def __post_init__(self):
        """Every field checked (and 3.0 made 3): the one validation a TrainConfig, a resumed run and a panel's
        inputs (Trainer.reconfigure) all go through."""
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "log_every", "grad_accum_steps"):
            setattr(self, name, integer(name, getattr(self, name), low=1))
        for name in ("block_size", "warmup_steps", "early_stopping_patience", "check_finite_every",
                     "checkpoint_every"):
            setattr(self, name, integer(name, getattr(self, name), low=0))
        self.lr = real("lr", self.lr, low=0, low_open=True)
        for name in ("min_lr", "weight_decay", "grad_clip", "early_stopping_min_delta", "max_seconds"):
            setattr(self, name, real(name, getattr(self, name), low=0))
        try:
            if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2) or 1 in self.betas:
                raise ValueError
            self.betas = tuple(real("betas", b, low=0, high=1) for b in self.betas)
        except ValueError:
            raise InputError(f"betas must be two finite numbers in [0, 1), got {show(self.betas)}") from None
        choice("nonfinite", self.nonfinite, ("stop", "skip"))
        self.checkpoint_activations = checkpoint_interval("checkpoint_activations", self.checkpoint_activations)


def _check_tokens(x, vocab_size, targets=False):
    """Batches go to the device as int32 tensors here, past the embedding's own range check: check them first.
    Targets may also be IGNORE_INDEX (Examples' masked positions)."""
    x = x[x != IGNORE_INDEX] if targets else x
    if x.size and (x.min() < 0 or x.max() >= vocab_size):
        raise InputError(f"token ids must be in [0, {vocab_size}) for this model, the batch has {x.min()}..{x.max()}")


def _token_ids(name, ids, vocab_size):
    """A split as a 1-D integer array whose ids are all in the model's vocabulary (an array given stays that
    array). Examples are checked and kept as they are."""
    if isinstance(ids, Examples):
        return ids.check_vocab(name, vocab_size)
    try:
        arr = None if ids is None or isinstance(ids, (str, bytes)) else np.asarray(ids)
    except ValueError:  # a ragged nested list
        arr = None
    if arr is None or arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        what = f"shape {arr.shape}, dtype {arr.dtype}" if arr is not None else show(ids)
        raise InputError(f"{name} must be a 1-D sequence of integer token ids (e.g. tokenizer.encode(text)), got "
                         f"{what}")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise InputError(f"{name} holds token ids {arr.min()}..{arr.max()}, the model's vocabulary is "
                         f"[0, {vocab_size}): encode the text with the tokenizer the model was made for")
    return arr


@contextlib.contextmanager
def _interrupt_after_step():
    """Hold SIGINT (Ctrl-C, Jupyter's interrupt) until the block ends, then raise KeyboardInterrupt. Only the main
    thread receives signals; elsewhere (a widget's training thread) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _interrupt_stops(trainer):
    """For a whole run in the main thread: a Ctrl-C between steps asks the loop to stop after the step (as
    request_stop does) instead of raising KeyboardInterrupt wherever the run is. Raised there, it could land in a
    finalizer (a GPU buffer's __del__), where Python prints "Exception ignored" and drops it: the run trained on to
    its time limit. Yields a list that holds the signal once one arrived. (Within a step, train_step holds it.)"""
    received = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def stop(signum, frame):
        received.append(signum)
        trainer.request_stop()
    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


HISTORY_LIMIT = 20_000   # logged records kept in full; beyond, older ones are thinned (memory stays flat)


def _frozen_reason(model):
    from ..lora import adapters   # (lora imports the models, which import this module)
    if not is_grad_enabled():
        return "gradients are off in this thread (the step runs inside lab.no_grad())"
    found = [m for _, m in adapters(model)]
    if found and not any(m.enabled and not m.merged for m in found):
        return ("the model's LoRA adapters are switched off or merged, and they are all it trains: "
                "lab.lora.use_adapter(model, True) or unmerge_adapter() first")
    return "every parameter the model uses is frozen (requires_grad False)"


def cosine_lr(step, cfg):
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


class Trainer:
    def __init__(self, model, train_ids, val_ids, cfg=None, callbacks=()):
        # the arguments checked here, each named: a wrong one otherwise surfaced as an AttributeError or a bare
        # TypeError from deep inside (e.g. len(None)) at construction, or as an embedding error at some later step
        if not (hasattr(model, "optimizer_groups") and hasattr(getattr(model, "config", None), "vocab_size")):
            raise InputError(f"model must be a lab language model (TransformerLM, LlamaLM, ProNeuralLM), got {show(model)}")
        if cfg is not None and not isinstance(cfg, TrainConfig):
            raise InputError(f"cfg must be a TrainConfig (e.g. TrainConfig(steps=100)), got {show(cfg)}")
        given = callbacks
        try:
            callbacks = list(callbacks)
        except TypeError:  # e.g. callbacks=print, not [print]
            callbacks = [None]
        if not all(callable(cb) for cb in callbacks):
            raise InputError(f"callbacks must be a list of functions taking a record (e.g. [print]), got {show(given)}")
        self.model, self.cfg = model, cfg or TrainConfig()
        vocab = model.config.vocab_size
        self.train_ids, self.val_ids = _token_ids("train_ids", train_ids, vocab), _token_ids("val_ids", val_ids, vocab)
        self._check_block_size()
        self._check_checkpointing()
        self._check_fits()
        self._check_splits()
        self.optimizer = AdamW(model.optimizer_groups(self.cfg.weight_decay), lr=self.cfg.lr, betas=self.cfg.betas)
        self.callbacks = callbacks
        self.step_num = 0
        self.history = []          # one dict per logged step
        self.best_val_loss, self._evals_without_gain = math.inf, 0
        self.last_val_loss = None  # run()'s latest evaluation, which each log record carries until the next one
        self.stop_reason = None
        self.skipped_steps = []    # (step, message) of steps skipped for NaN/Inf
        self.tokenizer = None      # saved with run()'s checkpoints when set
        self.fault = None          # the NonFiniteError that stopped the last run()
        self.last_loss = None      # the training loss of the last step run() took (logged or not; NaN after a fault)
        self._step_loss = None     # ... as the tensor train_step returned, read once when run() ends
        self._last_batches = []
        self._stop = False
        self._running = threading.Event()  # cleared while paused
        self._running.set()
        # held for a whole step (train_step; run() holds it across a step and its bookkeeping): the saves take
        # it, so a checkpoint taken from another thread never holds the weights of step k with the optimizer
        # moments of step k+1. The model's own (nn.step_lock): save_pretrained, which knows no trainer, takes it
        # too. Re-entrant: run() saves its own checkpoints while holding it
        self.step_lock = step_lock(model)
        self.rng = np.random.default_rng(generator().integers(2**32))
        # the dropout seeds' own stream: generation or a model made in another thread meanwhile draws from the
        # global generator and leaves this run's masks, and so its losses, as they would be alone
        self.seed_rng = own_stream()
        backend = self.optimizer.backend
        self.replay = StepReplay(backend) if backend.supports_capture else None

    @property
    def block_size(self):
        """Tokens per training sequence: TrainConfig.block_size, or the model's (a Llama model's is its
        max_position_embeddings, 8192 for SmolLM2: far longer than most runs want). Examples: their length."""
        return self._seq(self.cfg)

    def _seq(self, cfg):
        if isinstance(self.train_ids, Examples):
            return self.train_ids.width
        return cfg.block_size or self.model.config.block_size

    def _check_block_size(self, cfg=None):
        cfg = cfg or self.cfg
        limit = self.model.config.block_size
        if cfg.block_size > limit:
            raise InputError(f"block_size {cfg.block_size} is longer than the model's block_size {limit}: a "
                             f"training sequence takes 1..{limit} tokens (0: the model's)")
        for name, ids in (("train_ids", self.train_ids), ("val_ids", self.val_ids)):
            if isinstance(ids, Examples) and ids.width > limit:
                raise InputError(f"{name}: Examples of {ids.width} tokens are longer than the model's block_size {limit}")
        if isinstance(self.train_ids, Examples):
            if cfg.block_size not in (0, self.train_ids.width):
                raise InputError(f"block_size {cfg.block_size} does not apply to Examples: a batch is whole "
                                 f"examples of {self.train_ids.width} tokens (leave block_size 0)")

    def _check_checkpointing(self, cfg=None):
        """checkpoint_activations=k needs a model of at least k blocks (GPT-2's or Llama's: nn.Blocks)."""
        k = (cfg or self.cfg).checkpoint_activations
        if not k:
            return
        if not isinstance(self.model, Blocks):
            raise InputError(f"checkpoint_activations={k}: {type(self.model).__name__} has no blocks to checkpoint "
                             f"(a TransformerLM or LlamaLM has)")
        checkpoint_interval("checkpoint_activations", k, len(self.model.blocks()))

    def checkpoint_every(self, cfg=None):
        """The block interval this trainer's steps checkpoint: TrainConfig.checkpoint_activations, else the
        model's own gradient_checkpointing_enable setting (0: none)."""
        k = (cfg or self.cfg).checkpoint_activations
        return k or (self.model.checkpoint_every if isinstance(self.model, Blocks) else 0)

    def _check_fits(self, cfg=None):
        """Refuse, before any step allocates its activations, a batch the device cannot hold (the plan estimator
        says why and what would fit)."""
        cfg = cfg or self.cfg
        seq = self._seq(cfg)
        from ..models.llama import LlamaConfig, check_batch_fits
        from ..models.transformer import TransformerConfig
        from ..plan.estimator import check_fits
        config = self.model.config
        lora = getattr(self.model, "lora_config", None)
        if isinstance(config, TransformerConfig) or isinstance(config, LlamaConfig) and lora:
            # (a LoRA step holds no gradients or optimizer state for the frozen base, and a packed base is smaller)
            embedding = self.model.wte if isinstance(config, TransformerConfig) else self.model.model.embed_tokens
            check_fits(config, cfg.batch_size, embedding.weight.backend, seq=seq,
                       lora_rank=lora["r"] if lora else None,
                       lora_base_dtype=lora.get("base_dtype", "float32") if lora else "float32",
                       lora_targets=lora["target_modules"] if lora and isinstance(config, LlamaConfig) else None,
                       checkpoint_activations=self.checkpoint_every(cfg))
        elif isinstance(config, LlamaConfig):
            check_batch_fits(config, cfg.batch_size, self.model.model.embed_tokens.weight.backend, seq=seq,
                             checkpoint_activations=self.checkpoint_every(cfg))

    def reconfigure(self, **values):
        """Change TrainConfig fields of this trainer (between runs, or during one: applied from the next step).
        The new values go through TrainConfig's own checks and the fit check first; a refused value raises
        ValueError (DoesNotFitError for a batch the device cannot hold) and changes nothing."""
        unknown = sorted(set(values) - {f.name for f in fields(TrainConfig)})
        if unknown:
            raise InputError(f"unknown TrainConfig field(s) {show(unknown)}")
        if {"weight_decay", "betas"} & set(values):  # the optimizer built from them keeps its own copies
            raise InputError("weight_decay and betas are fixed once the trainer has built its optimizer")
        new = replace(self.cfg, **values)
        self._check_block_size(new)
        self._check_checkpointing(new)
        if (new.batch_size, new.block_size, new.checkpoint_activations) != (
                self.cfg.batch_size, self.cfg.block_size, self.cfg.checkpoint_activations):
            self._check_fits(new)
            self._check_splits(self._seq(new))
        # between two steps (the step lock): a step reads cfg's fields as it goes (grad_accum_steps per micro-batch)
        with self.step_lock:
            for name in values:  # the same object: a running loop reads self.cfg's fields each step
                setattr(self.cfg, name, getattr(new, name))
            if "lr" in values:
                self.optimizer.lr = self.cfg.lr
        return self.cfg

    def _check_splits(self, block=None):
        """Refuse splits too short to draw a block from now, not at the first evaluation after the training time."""
        block = block or self.block_size
        need = min_tokens(block)
        # Examples hold whole rows (never fewer than one): only a token stream is too short for a block
        examples = isinstance(self.train_ids, Examples)
        sizes = {"train": f"{len(self.train_ids)} {'examples' if examples else 'tokens'}",
                 "validation": f"{len(self.val_ids)}{' tokens' if examples else ''}"}
        short = [k for k, ids in (("train", self.train_ids), ("validation", self.val_ids))
                 if not isinstance(ids, Examples) and len(ids) < need]
        if short:
            raise InputError(f"the {' and '.join(short)} split{'s are' if len(short) > 1 else ' is'} too short for "
                             f"block_size {block}: train has {sizes['train']}, validation {sizes['validation']}, "
                             f"each needs at least {need}; use a longer text, a larger validation fraction, or a "
                             f"smaller block_size")

    @classmethod
    def resume(cls, directory, train_ids, val_ids, callbacks=()):
        """A trainer that continues the run saved in `directory` (lab.checkpoint.save_checkpoint) exactly where
        it stopped: same model and optimizer state, same step, same batch and dropout random streams."""
        from ..checkpoint import STATE_FILE, CheckpointError, load_checkpoint, reading, restore_trainer
        with reading(directory):   # weights, trainer state and optimizer moments of one save, not of two
            model, tokenizer, state = load_checkpoint(directory)
            if state is None:
                raise CheckpointError(f"{directory}: holds a model but no trainer state (trainer_state.json)")
            try:
                cfg = TrainConfig(**{k: tuple(v) if k == "betas" else v for k, v in state["train_config"].items()})
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise CheckpointError(f"{Path(directory) / STATE_FILE}: invalid train_config ({e})") from None
            if cfg.block_size > model.config.block_size:   # the file's, not the caller's: named as such
                raise CheckpointError(f"{Path(directory) / STATE_FILE}: invalid train_config (block_size "
                                      f"{cfg.block_size} is longer than the model's block_size {model.config.block_size})")
            if cfg.checkpoint_dir:   # saves go on where the run resumed from, not to a path a file names (a copied
                cfg.checkpoint_dir = str(directory)   # or downloaded checkpoint would overwrite another run's)
            trainer = cls(model.train(), train_ids, val_ids, cfg, callbacks)
            restore_trainer(trainer, directory, state)
        trainer.tokenizer = tokenizer
        return trainer

    def request_stop(self):
        """Stop after the current step (safe to call from another thread or a widget callback)."""
        self._stop = True
        self._running.set()

    def pause(self):
        """Hold the loop between steps until resume() (or request_stop())."""
        self._running.clear()

    def resume_training(self):
        self._running.set()

    def clear_requests(self):
        """Forget a stop or pause requested after the last run's last step (a panel's button clicked as the run
        ended): the next run() would otherwise wait paused, or stop before its first step."""
        self._stop = False
        self._running.set()

    @property
    def paused(self):
        return not self._running.is_set()

    def train_step(self):
        """One optimizer step (over grad_accum_steps micro-batches). Returns the mean loss and the gradient norm
        before clipping, as tensors still on the device. A Ctrl-C (KeyboardInterrupt) arriving during the step
        takes effect after it, so a step is never left half done. On wgpu, steps after the first two are
        replays of a captured step when nothing they depend on changed (TrainConfig.replay_steps, replay.py)."""
        # numpy's overflow/invalid warnings would repeat what check_finite reports, once per op
        # the step holds the backend (exclusive): generation in another thread waits for the step boundary
        # the step lock before the backend's: a save (step lock, then the backend for each readback) cannot deadlock
        with _interrupt_after_step(), np.errstate(over="ignore", invalid="ignore", divide="ignore"), \
                in_use(self.model, "Trainer.train_step"), self.step_lock, draw_from(self.seed_rng), \
                checkpointing(self.cfg.checkpoint_activations), self.optimizer.backend.exclusive():
            # kept for last_loss: a Ctrl-C raised as this block ends drops the return value of a finished step
            loss, norm = self._train_step()
            self._step_loss = loss
            return loss, norm

    def _train_step(self):
        cfg, model = self.cfg, self.model
        model.train()
        self.optimizer.zero_grad()
        self._last_batches = [get_batch(self.train_ids, cfg.batch_size, self.block_size, self.rng)
                              for _ in range(cfg.grad_accum_steps)]
        lr = cosine_lr(self.step_num, cfg)
        # (lab.interp hook functions run in every step while hooked: a replay would skip them)
        replay = self.replay if cfg.replay_steps and not getattr(model, "has_hooks", False) else None
        if replay is None and self.replay is not None:
            self.replay.suspend()  # replay turned off: its held buffers go back to the pool
        replaying = replay is not None and replay.use_replay(self)
        capturing = not replaying and replay is not None and replay.want_capture(self)
        if replaying or capturing:  # the batches go to the device as int32 tensors, past the embedding's check
            for x, y in self._last_batches:
                _check_tokens(x, model.config.vocab_size)
                _check_tokens(y, model.config.vocab_size, targets=True)
        if replaying:
            self.optimizer.step_count += 1
            loss, norm = replay.replay_step(self, self._last_batches, lr, self.optimizer.step_count)
        elif capturing:
            loss, norm = self._captured_step(replay, lr)
        else:
            loss, norm = self._eager_step(self._last_batches, lr)
        self.step_num += 1
        # one submit per step, without waiting: the device starts on this step while the host records the next
        self.optimizer.backend.sync()
        return loss, norm

    def _captured_step(self, replay, lr):
        """An eager step recorded by the backend, handed to the replay state (which may replay it later)."""
        B = self.optimizer.backend
        inputs = upload_batches(self._last_batches, B)
        B.capture_begin()
        try:
            with recording_seeds() as seeds:
                loss, norm = self._eager_step(inputs, lr)
        except BaseException:
            B.release_capture(B.capture_end())
            raise
        grads = [p.grad.data if p.grad is not None else None for p in self.optimizer.params]
        replay.captured(self, Recorded(B.capture_end(), inputs, seeds, lr, self.optimizer.step_count, loss.data,
                                       norm.data, grads))
        return loss, norm

    def _eager_step(self, batches, lr):
        """Forward and backward over the micro-batches, clipping, the optimizer update: every op run by Python."""
        cfg = self.cfg
        total = None
        for x, y in batches:
            _, loss = self.model(x, y, return_logits=False)   # the loss alone: no (B, T, vocab) logits held
            if cfg.grad_accum_steps > 1:
                loss = loss * (1.0 / cfg.grad_accum_steps)  # gradients add up over micro-batches: take their mean
            if not loss.requires_grad:   # backward() said only "no input had requires_grad=True"
                raise InputError("Trainer: no trainable parameter takes part in the loss: " +
                                 _frozen_reason(self.model))
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        if not any(p.grad is not None for p in self.optimizer.params):   # grad_norm would refuse, not saying why
            raise InputError("Trainer: the loss reached none of the parameters its optimizer holds: the model's "
                             "trainable parameters changed after this Trainer was built (lora.apply, load_adapter or "
                             "requires_grad set since): build a new Trainer for the model as it is now")
        norm = grad_norm(self.optimizer.params)
        # clipping happens inside the update's kernel; a NaN/Inf norm skips the update on the device (no readback):
        # the weights never take a bad step
        self.optimizer.step(lr=lr, guard=norm, max_norm=cfg.grad_clip)
        return total, norm

    def check_finite(self, loss, norm):
        """Read the last step's loss and gradient norm; on NaN/Inf find where it first appeared and raise
        NonFiniteError (the step's update was already skipped on the device)."""
        if np.isfinite(loss.item()) and np.isfinite(norm.item()):
            return
        where = first_nonfinite(self.model, self._last_batches[0]) or "the loss or gradient norm"
        raise NonFiniteError(self.step_num, where)

    def _save(self, say=print):
        from ..checkpoint import NonFiniteSaveError, save_checkpoint
        if self.tokenizer is None:
            raise InputError("TrainConfig.checkpoint_dir is set but the trainer has no tokenizer: set "
                             "trainer.tokenizer (it is saved with the checkpoint)")
        try:
            save_checkpoint(self.cfg.checkpoint_dir, self.model, self.tokenizer, self)
        except NonFiniteSaveError as e:  # the run goes on; its last good checkpoint stays what resuming finds
            say(f"lab: step {self.step_num}: checkpoint not saved: {e}")

    def evaluate(self, batches=None):
        """Mean loss over `batches` random validation blocks (fixed seed: comparable across calls)."""
        model, cfg = self.model, self.cfg
        # checked: -1 gave NaN from a mean of no losses (with a warning), 2.5 a TypeError from range()
        batches = cfg.eval_batches if batches is None else integer("batches", batches, low=1)
        rng = np.random.default_rng(1234)
        losses = []
        with no_grad(), evaluating():  # called from the kernel while a panel trains: the steps keep their dropout
            for _ in range(batches):
                x, y = get_batch(self.val_ids, cfg.batch_size, self.block_size, rng)
                losses.append(model(x, y, return_logits=False)[1].item())
        return float(np.mean(losses))

    def run(self, progress=True, log_evals=True):
        """Train for cfg.steps steps (from the current step); see _run. The model is held for the whole run
        (nn.in_use): another thread's lora.apply, load_state_dict, eval() or second Trainer on it is refused
        with one clear error, not applied under a step (or between steps, with the optimizer holding the old
        parameters)."""
        with in_use(self.model, "Trainer.run"):
            return self._run(progress, log_evals)

    def _run(self, progress=True, log_evals=True):
        """Train for cfg.steps steps (from the current step). Returns the history of logged steps. With
        log_evals, each evaluation prints a line (through the progress bar when there is one)."""
        from tqdm.auto import tqdm
        cfg = self.cfg
        if cfg.checkpoint_dir:  # refused now, not after the training that a refused save would lose
            from ..checkpoint import check_save_target
            check_save_target(cfg.checkpoint_dir, writable=True)
        bar = tqdm(total=cfg.steps, initial=self.step_num, disable=not progress, desc="train", unit="step")
        say = bar.write if progress else print
        t0, last_t, last_step, val_loss = time.perf_counter(), time.perf_counter(), self.step_num, self.last_val_loss
        # _stop is not reset here: a stop requested just before the loop starts (a panel's Stop right after Start)
        # must be honoured; it is cleared when the run ends, for the next one
        self.stop_reason, self.fault = None, None
        if self.replay is not None:
            self.replay.reset()
        with _interrupt_stops(self) as interrupted:
            try:
                while self.step_num < cfg.steps and not self._stop:
                    if not self._running.is_set():
                        paused_at = time.perf_counter()
                        self._running.wait()
                        t0 += time.perf_counter() - paused_at   # a pause is not training time
                        last_t += time.perf_counter() - paused_at
                        if self._stop:
                            break
                    # the whole step, its check, evaluation, log record and checkpoint under the step lock: a
                    # save_checkpoint from another thread (the kernel, beside a panel's training thread) waits
                    # for the boundary and finds weights, moments, counters, RNG states and history of one step
                    with self.step_lock:
                        loss, norm = self.train_step()
                        step = self.step_num
                        if cfg.check_finite_every and step % cfg.check_finite_every == 0:
                            try:
                                self.check_finite(loss, norm)
                            except NonFiniteError as e:
                                say(f"lab: {e}")
                                if cfg.nonfinite == "stop":
                                    self._stop, self.stop_reason, self.fault = True, str(e), e
                                    break
                                self.skipped_steps.append((step, str(e)))
                                bar.update(1)
                                continue
                        out_of_time = cfg.max_seconds > 0 and time.perf_counter() - t0 >= cfg.max_seconds
                        if step % cfg.eval_every == 0 or step == cfg.steps or out_of_time:
                            if self.replay is not None:
                                self.replay.suspend()  # the evaluation reuses the step's buffers; recaptured after it
                            val_loss = self.last_val_loss = self.evaluate()
                            self._early_stopping(val_loss)
                            if log_evals:
                                say(
                                    f"step {step}: train loss {loss.item():.4f}, val loss {val_loss:.4f}, "
                                    f"{time.perf_counter() - t0:.0f} s")
                        if out_of_time and not self._stop:
                            self._stop, self.stop_reason = True, f"time limit of {cfg.max_seconds:g} s reached"
                        if step % cfg.log_every == 0 or step == cfg.steps:
                            now = time.perf_counter()   # (the batch and length as reconfigure left them)
                            tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * self.block_size
                            record = {
                                "step": step, "loss": loss.item(), "val_loss": val_loss, "grad_norm": norm.item(),
                                "lr": cosine_lr(step - 1, cfg),
                                "tokens_per_s": (step - last_step) * tokens_per_step / max(now - last_t, 1e-9),
                                "elapsed": now - t0,
                            }
                            record["eta"] = (cfg.steps - step) * (now - last_t) / max(step - last_step, 1)
                            last_t, last_step = now, step
                            self.history.append(record)
                            if len(self.history) > HISTORY_LIMIT:
                                self._thin_history()
                            for cb in self.callbacks:
                                cb(record)
                            bar.set_postfix(loss=f"{record['loss']:.3f}",
                                            val=f"{val_loss:.3f}" if val_loss is not None else "-",
                                            tok_s=f"{record['tokens_per_s']:.0f}")
                        if cfg.checkpoint_dir and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                            self._save(say)
                        bar.update(1)
            except KeyboardInterrupt:  # held to the step's end (train_step): stop here, usable, resumable
                self._stop, self.stop_reason = True, f"interrupted (KeyboardInterrupt) after step {self.step_num}"
                say(f"lab: {self.stop_reason}")
        if interrupted and self.stop_reason is None:   # (a Ctrl-C between steps: the loop stopped after the step)
            self.stop_reason = f"interrupted (KeyboardInterrupt) after step {self.step_num}"
            say(f"lab: {self.stop_reason}")
        bar.close()
        if self._step_loss is not None:  # one read, after the loop: the summary's loss when no step was logged
            self.last_loss, self._step_loss = float(self._step_loss.item()), None
        if cfg.checkpoint_dir and self.fault is None:  # a run stopped by NaN/Inf keeps its last good checkpoint
            self._save(say)
        if self._stop and self.stop_reason is None:
            self.stop_reason = "stop requested"
        self._stop = False
        return self.history

    def _thin_history(self):
        """Keep a long run's history bounded: drop every other record of its older half, except evaluation steps.
        The curve keeps its shape at half the resolution there; the recent half stays step by step."""
        h, half, every = self.history, len(self.history) // 2, self.cfg.eval_every
        self.history = [r for i, r in enumerate(h[:half]) if i % 2 == 0 or r["step"] % every == 0] + h[half:]

    def _early_stopping(self, val_loss):
        cfg = self.cfg
        if val_loss < self.best_val_loss - cfg.early_stopping_min_delta:
            self.best_val_loss, self._evals_without_gain = val_loss, 0
            return
        self._evals_without_gain += 1
        if cfg.early_stopping_patience and self._evals_without_gain >= cfg.early_stopping_patience:
            self.stop_reason = (f"early stopping: no val loss below {self.best_val_loss:.4f} in "
                                f"{self._evals_without_gain} evaluations")
            self._stop = True

    def config_dict(self):
        return asdict(self.cfg)
