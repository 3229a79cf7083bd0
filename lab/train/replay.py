"""Step replay: a training step recorded once on the wgpu backend, then replayed for the following steps.

Python runs every op of an eager step (autograd, shape checks, params packing, bind group lookups): on a GPU
that is most of a small model's step. A replay skips all of it. The trainer captures two consecutive eager steps;
when the second is exactly what the first would record with the new step's values (the same kernels, grids and
params, once the learning rate, the AdamW step count and the dropout seeds are patched, and the same uploads
except the batches), later steps are replays: the new batches are written into the captured input buffers and
the captured dispatches are recorded again with patched params, the same arithmetic in the same order as an
eager step. A change the replay cannot follow (new parameter or optimizer arrays after loading a checkpoint,
another batch size or clipping, a module's settings such as a dropout rate, LoRA's switches or a forward patched
onto an instance, lab.profile()) sends the step back to eager and, once settled, to a new capture. What no check
can see is a model class's code edited during a run: Trainer.run starts every run with new captures
(TrainConfig(replay_steps=False) turns replay off).
"""
import numpy as np

from ..engine.random import next_seed, recording_seeds
from ..engine.tensor import Tensor, tensor
from ..nn import setting
from .optim import mark_stepped

MAX_MISMATCHES = 3  # a trainer whose consecutive steps differ this often stays eager


def module_signature(model):
    """What a capture of `model`'s forward bakes in, as far as Python sees it without running it: the arrays its
    modules hold (by identity; a tuple of tensors too, such as a model's rotary tables) and every module's own
    settings (dropout rates, LoRA scales and switches, a forward patched onto an instance)."""
    arrays, settings = [], []
    for module in model.modules():
        settings.append(type(module))
        for name, value in vars(module).items():
            if isinstance(value, tuple) and value and all(isinstance(t, Tensor) for t in value):
                arrays.extend(t.data for t in value)
            elif isinstance(value, Tensor):
                arrays.append(value.data)
                settings.append((name, value.requires_grad))
            elif isinstance(value, (bool, int, float, str, type(None))):
                settings.append((name, setting(module, name)))
            elif callable(value) and not isinstance(value, type):
                settings.append((name, "callable", id(value)))
    return tuple(arrays), tuple(settings)


def same_signature(a, b):
    return a is not None and b is not None and a[1] == b[1] and len(a[0]) == len(b[0]) and all(
        x is y for x, y in zip(a[0], b[0]))


class Recorded:
    """One captured eager step: the backend's Capture and the step's own handles into it."""

    def __init__(self, capture, inputs, seeds, lr, step, loss, norm, grads):
        self.capture, self.inputs, self.seeds = capture, inputs, seeds
        self.lr, self.step = lr, step
        self.loss, self.norm, self.grads = loss, norm, grads

    def input_uploads(self):
        arrays = {id(t.data) for pair in self.inputs for t in pair}
        return {k for k, (a, _) in enumerate(self.capture.uploads) if id(a) in arrays}


class StepReplay:
    """The replay state of one trainer: the capture waiting for its check, the verified one, or why it is off."""

    def __init__(self, backend):
        self.backend = backend
        self.reference = None   # the last captured step (metadata): what the next capture must match
        self.ready = None       # a confirmed capture, its buffers held: the steps after it replay it
        self.signature = None   # the reference's (signature_of)
        self.mismatches = 0
        self.off = None         # why this trainer's steps stay eager
        self.replayed = 0

    def __del__(self):
        try:
            self.suspend()
        except Exception:  # interpreter shutdown
            pass

    @staticmethod
    def signature_of(trainer):
        """What a capture bakes in: the arrays it binds (compared by identity) and the settings it was recorded
        with: the trainer's and optimizer's, and every module's own (dropout rates, LoRA scales and switches, a
        forward patched onto an instance), as far as Python can see them without running the step."""
        opt, cfg = trainer.optimizer, trainer.cfg
        arrays = [p.data for p in opt.params] + list(opt.state_arrays().values())
        settings = [cfg.batch_size, trainer.block_size, cfg.grad_accum_steps, cfg.grad_clip, cfg.checkpoint_activations,
                    type(opt), tuple(opt.decay),
                    getattr(opt, "b1", None), getattr(opt, "b2", None), getattr(opt, "eps", None),
                    getattr(opt, "momentum", None), tuple(p.requires_grad for p in opt.params)]
        more_arrays, more_settings = module_signature(trainer.model)
        return tuple(arrays) + more_arrays, tuple(settings) + more_settings

    def _same_signature(self, trainer):
        if self.signature is None:
            return False
        arrays, settings = self.signature_of(trainer)
        old_arrays, old_settings = self.signature
        return settings == old_settings and len(arrays) == len(old_arrays) and all(
            a is b for a, b in zip(arrays, old_arrays))

    def suspend(self):
        """Give the ready capture's buffers back to the pool (an evaluation can use them). The next step is
        captured again and, matching the reference, replays resume after it."""
        if self.ready is not None:
            self._release(self.ready)   # (it stays the reference)
            self.ready = None

    def _release(self, rec):
        """Give rec's buffers back; rec may stay the reference, compared and never replayed: its step's gradients,
        loss and norm must not stay through the next step (a copy of every gradient at the next capture's peak)."""
        self.backend.release_capture(rec.capture)
        rec.grads, rec.loss, rec.norm = (), None, None

    def reset(self):
        """Forget every capture (Trainer.run calls this as it starts: edits to the model between runs, which no
        signature can see, are picked up by two new captures)."""
        self.suspend()
        self.reference = self.signature = self.off = None
        self.mismatches = 0

    def use_replay(self, trainer):
        """Whether this step can be a replay of the ready capture."""
        if self.ready is None or self.backend.profiling:
            return False
        if not self._same_signature(trainer):
            self.suspend()
            self.reference = None
            return False
        return True

    def want_capture(self, trainer):
        if self.off is not None or self.backend.profiling:
            return False
        if self.reference is not None and not self._same_signature(trainer):
            self.reference = None
        return True

    def captured(self, trainer, rec):
        """Take a just captured eager step: it becomes the reference, and the ready capture when it matches the
        previous reference (the next step's values patched in); otherwise its buffers go back at once."""
        ref, self.reference, self.signature = self.reference, rec, self.signature_of(trainer)
        if rec.capture.broken:
            self.off, self.reference = rec.capture.broken, None
            self.backend.release_capture(rec.capture)
            return
        why = self._difference(ref, rec) if ref is not None else "first capture"
        if why is None:
            self.ready = rec
            return
        self._release(rec)
        if ref is not None:
            self.mismatches += 1
            if self.mismatches >= MAX_MISMATCHES:  # something outside the known step values changes every step
                self.off, self.reference = why, None

    @staticmethod
    def _difference(ref, rec):
        inputs = ref.input_uploads()
        if len(ref.seeds) != len(rec.seeds):
            return f"the step drew {len(ref.seeds)} random seeds, the next one {len(rec.seeds)}"
        if inputs != rec.input_uploads():
            return "the batches were uploaded at different places in the step"
        step = {"lr": rec.lr, "step": rec.step, "seeds": dict(zip(ref.seeds, rec.seeds))}
        return ref.capture.difference(rec.capture, step, inputs)

    def replay_step(self, trainer, batches, lr, step_count):
        """Run the ready capture for new batches [(x, y)] at this lr and optimizer step. Returns (loss, norm) as
        new device tensors; the parameters' .grad hold this step's (clipped) gradients."""
        rec, B = self.ready, self.backend
        for (xt, yt), (x, y) in zip(rec.inputs, batches):
            B.write(xt.data, x)
            B.write(yt.data, y)
        seeds = {s: next_seed() for s in rec.seeds}
        B.replay(rec.capture, {"lr": lr, "step": step_count, "seeds": seeds})
        for p, g in zip(trainer.optimizer.params, rec.grads):
            p.grad = Tensor(g, B) if g is not None else None
        mark_stepped(trainer.optimizer.params)   # (the capture's optimizer update ran, not Optimizer.step)
        self.replayed += 1
        # copies: the captured loss and norm buffers are overwritten by the next replay, returned tensors are not
        return Tensor(B.scalar("mul", rec.loss, 1.0), B), Tensor(B.scalar("mul", rec.norm, 1.0), B)


def upload_batches(batches, backend):
    """The step's batches as device int32 tensors (a capture needs to know its input buffers)."""
    return [(tensor(x.astype(np.int32), backend=backend), tensor(y.astype(np.int32), backend=backend))
            for x, y in batches]


__all__ = ["StepReplay", "Recorded", "upload_batches", "recording_seeds"]
