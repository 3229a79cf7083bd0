"""Decode steps replayed: one token's forward recorded once on the wgpu backend, then replayed for the next tokens.

A decode step is a forward of one token per row through the KV cache. Eagerly, Python runs each of its ops (shape
checks, params packing, bind group lookups), which on a GPU is most of a small model's step. DecodeRunner's cache
layers are FixedCache: a one-token step reads a window of the cache (the next power of two >= pos+1 slots, at least
MIN_WINDOW, at most the block) with the slots past its position masked in the softmax, so within a window its
kernels and grids do not depend on the position, only some params do (the offsets its keys and values are written
at, the rotary position, the softmax's length); a window rather than the whole block keeps a short sequence from
reading a long model's every slot. Each window has its own capture. Three consecutive eager steps are captured;
the params that differ between the first two are taken as linear in the position, and the patched first capture
must record exactly what the third did. Later steps are replays: the token ids are written into the captured
input buffer and the dispatches recorded again with the position patched in, the same arithmetic in the same
order as an eager step of this cache, so the logits are bitwise equal. A change the replay cannot see in its
params (new weight arrays, LoRA switched or merged, a forward patched onto an instance: module_signature) sends
the step back to eager and to a new capture. The numpy backend (and lab.profile()) runs every step eagerly.

A padded batch (pad: each row's left padding, as forward_cached's) uploads its rows' positions (slot - pad) each
step: int32 uploads that follow the position are patched as the params are (Capture.follow). With a sampler
(lab.sampling.TokenSampler), sample() steps draw the next ids inside the step itself: the sampling dispatch writes
them into the step's own ids input and into a ring of the last `ring` steps' [id, log p], so steps replay one after
another without a readback (WebGPU runs a queue's writes and submits in order: each replay's params land after the
previous step's work) and read() brings several steps' ids back at once.
"""
import contextlib

import numpy as np

from .checks import InputError, integer, show
from .engine.tensor import Tensor, tensor
from .models.transformer import check_pad
from .nn import step_lock
from .train.replay import MAX_MISMATCHES, module_signature, same_signature

CAPTURED_STEPS = 3   # two to find which params follow the position, a third to check the patches
MIN_WINDOW = 16
RING = 16            # sample() steps whose ids read() can bring back at once
CHUNK = 8            # sample() steps lab.generate runs before one read() (a readback waits for the device)


class FixedCache(tuple):
    """One layer's (keys, values) of a KV cache whose one-token steps read `window` slots (see the module's
    docstring); DecodeRunner sets the window before each step."""
    window = None


class _Window:
    """The captures of one window: the last eager steps [(pos, Capture, logits)] and the verified one."""

    def __init__(self):
        self.captured, self.ready, self.mismatches, self.off = [], None, 0, None


class DecodeRunner:
    """Decode steps of `model` for `batch` rows on its own KV cache (self.cache, a model.new_cache(batch) whose
    layers are FixedCache): prefill with model.forward_cached(ids, runner.cache, 0, pad=pad), then step(ids, pos)
    per token, or with a sampler sample(ids, pos) per token and read(n) every few. On wgpu the steps after the
    first three of a window are replays; close() gives their buffers back."""

    def __init__(self, model, batch, pad=None, sampler=None, ring=RING, length=None):
        if not (hasattr(model, "new_cache") and hasattr(model, "forward_cached")):
            raise InputError(f"DecodeRunner: {type(model).__name__} keeps no KV cache (no new_cache / forward_cached): "
                             f"its tokens are made by full forwards")
        self.model, self.batch = model, integer("batch", batch, low=1)
        try:
            # (a row keeps at least the cache's last slot for its own tokens; the prefill checks its own length)
            self.pad = check_pad(pad, np.zeros((self.batch, length or model.config.block_size)))
        except InputError:
            raise InputError(f"DecodeRunner: pad must be one non-negative integer per row of the batch "
                             f"({self.batch}), each below {'block_size' if length is None else 'the cache length'} "
                             f"{length or model.config.block_size}, got {show(pad)}") from None
        if sampler is not None and (sampler.rows, sampler.vocab) != (self.batch, model.config.vocab_size):
            raise InputError(f"DecodeRunner: a sampler of {sampler.rows} rows of a {sampler.vocab}-token vocabulary "
                             f"for a batch of {self.batch} of {type(model).__name__}'s {model.config.vocab_size}")
        self.sampler = sampler
        self.backend = model.parameters()[0].backend
        self.off = None if self.backend.supports_capture else "the backend has no step capture"
        # (numpy's steps stay eager over the filled slots only: reading a whole window would only cost it time)
        # (length: the slots this generation fills, fewer than block_size's GiBs for a long-context model)
        self.cache = [layer if self.off else FixedCache(layer) for layer in model.new_cache(self.batch, length)]
        self.block = self.cache[0][0].shape[2]
        # a replay cannot grow the rotary tables as an eager step does: each step makes them cover its window first
        # (a growth replaces them: a new module_signature, so new captures)
        self.rope = getattr(model, "_rope", None)
        self.ids = tensor(np.zeros((self.batch, 1), np.int32), backend=self.backend)
        self.ring = None if sampler is None else tensor(
            np.zeros((integer("ring", ring, low=1), self.batch, 2), np.int32), backend=self.backend)
        self.windows = {}    # (window, whether the step samples) -> _Window
        self.signature = None
        self.replayed = 0
        self.drawn = 0       # sample() steps so far
        self.offset = None   # the sampler's step minus the position: its draws' counter as the replays patch it

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def close(self):
        """Give the captures' buffers back to the pool."""
        for w in self.windows.values():
            for _, capture, _ in w.captured + ([w.ready] if w.ready else []):
                self.backend.release_capture(capture)
        self.windows = {}

    def window(self, pos):
        """The slots a step at `pos` reads: a power of two >= pos + 1."""
        return min(self.block, max(MIN_WINDOW, 1 << int(pos).bit_length()))

    def step(self, token_ids, pos):
        """Logits (batch, 1, vocab), a device tensor of its own, for one token per row at cache slot `pos`
        (the slots before it filled by the prefill and earlier steps). token_ids None: the ids the last sample()
        drew."""
        logits, shared = self._run(self._ids(token_ids, "step"), pos, False)
        # a copy of a capture's logits: the next replay overwrites them, a returned tensor is not
        return Tensor(self.backend.scalar("mul", logits.data, 1.0), self.backend) if shared else logits

    def sample(self, token_ids, pos, count=1):
        """`count` steps as step()'s at slots pos.. that draw the next token of each row with the sampler inside
        themselves: nothing is read back; each step's ids feed the next (token_ids None: the last draw's) and
        read() returns them. The steps hold the model's step lock together, so a change another thread makes to
        the model meanwhile (adapters switched, weights replaced) applies from the next call's steps."""
        if self.sampler is None:
            raise InputError("DecodeRunner.sample: this runner has no sampler (DecodeRunner(..., sampler=...))")
        ids = self._ids(token_ids, "sample")
        pos = integer("pos", pos, low=1, high=self.block - 1)
        count = integer("count", count, low=1, high=self.block - pos)
        if self.offset != self.sampler.step - pos:   # (the captured draws' counter follows the position)
            self.close()
            self.offset = self.sampler.step - pos
        self._run(ids, pos, True, count)
        self.drawn += count

    def read(self, count):
        """The ids (count, batch) int64 the last `count` sample() steps drew, in order (one readback)."""
        if self.sampler is None:
            raise InputError("DecodeRunner.read: this runner has no sampler, so no step drew ids "
                             "(DecodeRunner(..., sampler=...), then sample())")
        count, most = integer("count", count, low=1), min(self.drawn, self.ring.shape[0])
        if count > most:
            raise InputError(f"DecodeRunner.read: count {count}, but {self.drawn} steps have drawn ids and the ring "
                             f"keeps the last {self.ring.shape[0]}: at most {most}")
        got = self.backend.to_numpy(self.ring.data)
        steps = np.arange(self.sampler.step - count, self.sampler.step) % self.ring.shape[0]
        return self.sampler.ids(got[steps])

    def _ids(self, token_ids, what):
        """token_ids as (batch, 1) int32, checked (None stays None: the ids on the device)."""
        if token_ids is None:
            return None
        ids = np.asarray(token_ids)
        if ids.dtype.kind not in "iu" or ids.size != self.batch:
            raise InputError(f"DecodeRunner.{what}: one integer token id per row of the batch ({self.batch}), "
                             f"got {show(token_ids)}")
        vocab = self.model.config.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:  # (a replay skips the embedding's own check)
            raise InputError(f"DecodeRunner.{what}: token ids must be in [0, {vocab - 1}], got {show(token_ids)}")
        return ids.reshape(self.batch, 1).astype(np.int32)

    def _run(self, ids, pos, sample, count=1):
        """Steps at slots pos..pos+count-1, the first fed `ids` (None: those on the device), under one hold of the
        step lock and the backend, the model's signature checked once: (the last one's logits, whether they are a
        capture's, which its next replay overwrites)."""
        pos = integer("pos", pos, low=1, high=self.block - 1)
        B = self.backend
        with step_lock(self.model), (B.exclusive() if self.off is None else contextlib.nullcontext()):
            if ids is not None:
                B.sync()   # (a write lands before work recorded earlier and not yet submitted)
                B.write(self.ids.data, ids)
            if self.off is None and self.rope is not None:   # (before the signature: a growth replaces the tables)
                self.rope(self.window(pos + count - 1))
            eager = self.off is not None or B.profiling or getattr(self.model, "has_hooks", False)  # (hooks: eager)
            if not eager:
                signature = module_signature(self.model)
                if not same_signature(signature, self.signature):
                    self.close()
                    self.signature = signature
            for p in range(pos, pos + count):
                out = self._one(p, sample, eager)
            return out

    def _one(self, pos, sample, eager):
        B = self.backend
        if self.off is None:
            for layer in self.cache:
                layer.window = self.window(pos)
        if eager:
            return self._forward(pos, sample), False
        w = self.windows.setdefault((self.window(pos), sample), _Window())
        if w.ready is not None:
            _, capture, logits = w.ready
            B.replay(capture, {"pos": pos})
            self.replayed += 1
            if sample:   # (the draw's counter patched in as the position's: the sampler's own follows)
                self.sampler.step += 1
            return logits, True
        if w.off is not None:
            return self._forward(pos, sample), False
        return self._captured_step(w, pos, sample), True

    def _forward(self, pos, sample):
        logits = self.model.forward_cached(self.ids, self.cache, pos, pad=self.pad)
        if sample:
            B = self.backend
            self.sampler.record(B.reshape(logits.data, (self.batch, logits.shape[-1])), self.ids.data,
                                self.ring.data)
        return logits

    def _captured_step(self, w, pos, sample):
        B = self.backend
        B.capture_begin()
        try:
            logits = self._forward(pos, sample)
        except BaseException:  # (an interrupted step's capture holds buffers out of the pool: back at once)
            B.release_capture(B.capture_end())
            raise
        capture = B.capture_end()
        w.captured.append((pos, capture, logits))
        if capture.broken:
            w.off = capture.broken
        elif len(w.captured) > CAPTURED_STEPS:
            B.release_capture(w.captured.pop(0)[1])
        if w.off is None and len(w.captured) == CAPTURED_STEPS and [
                p for p, _, _ in w.captured] == list(range(pos - 2, pos + 1)):
            (p0, first, _), (_, second, _), (_, third, _) = w.captured
            why = first.follow(second, "pos", p0) or first.difference(third, {"pos": pos})
            if why is None:
                w.ready = w.captured.pop(0)
            else:
                first.patches.clear()
                first.upload_patches.clear()
                w.mismatches += 1
                if w.mismatches >= MAX_MISMATCHES:  # something beside the position changes from step to step
                    w.off = why
        if w.ready is not None or w.off is not None:
            for _, c, _ in w.captured:
                B.release_capture(c)
            w.captured = []
        return logits


__all__ = ["DecodeRunner", "FixedCache"]
